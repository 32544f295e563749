"""What depends on the platform JAX computes on: which kernels, how much memory the
item loss may take, and XLA's determinism flag.

* `resolve_kernels`: ``config.model.kernels`` = 'auto' | 'xla' | 'cpu'. 'cpu' is the
  hand-written attention / feed-forward VJPs of `gear_jax.models.kernels`, tuned for XLA:CPU
  (query blocks, transposed score layout, optimisation barriers that stop XLA from
  fusing across them). 'xla' is the plain formulation of the same functions
  (`kernels.attend_reference` / `ffn_reference`) that JAX autodiff differentiates and
  XLA is free to fuse, which is what XLA:GPU and TPU compile best. 'auto' picks 'cpu' on
  the CPU and 'xla' anywhere else. Both compute the same values and gradients with the
  same dropout masks (tests/test_kernels.py, tests/test_model.py).
* `loss_budget_mb`: ``config.train.loss_memory_mb`` = 0 (auto) sizes the item loss's
  chunks from the device: 256 MB on the CPU (larger chunks fall out of cache and got
  slower, see `losses`), else `DEVICE_MEMORY_FRACTION` of the memory XLA may allocate
  on one device (``memory_stats()['bytes_limit']``), so that on a large GPU the head is
  computed in one or two chunks of thousands of positions instead of hundreds of small
  ones. A positive value is used as given.
* `configure_determinism`: on GPU, XLA implements scatter-adds (the gradients of the
  embedding lookups and of the loss's label logits) with atomics, whose order, and so
  whose float rounding, changes from run to run; a resumed run then drifts from the
  uninterrupted one. ``--xla_gpu_deterministic_ops=true`` makes XLA:GPU use
  deterministic algorithms instead. ``config.train.deterministic_ops`` (default True)
  adds it to XLA_FLAGS before the backend starts; False trades that for speed. The
  CPU backend accepts and ignores the flag (its reductions are deterministic anyway).
"""

from __future__ import annotations

import os
import sys
from typing import Any

CPU_LOSS_BUDGET_MB = 256.0
# Of one device's allocatable memory (bytes_limit): the budgeted logits of one chunk.
# The rest holds parameters, optimizer state, activations and XLA's other temporaries;
# at the retail shape on an 80 GB GPU this is ~7 GB: two token chunks of 3,200 positions.
DEVICE_MEMORY_FRACTION = 1 / 8
DETERMINISTIC_FLAG = '--xla_gpu_deterministic_ops=true'


def default_platform() -> str:
  import jax
  return jax.default_backend()


def resolve_kernels(choice: str, platform: str | None = None) -> str:
  """'cpu' or 'xla' for a ``model.kernels`` setting on `platform` ('cpu', 'gpu', 'tpu';
  default: the platform JAX computes on)."""
  from gear_jax import defaults
  allowed = defaults.choices('model.kernels')
  if choice not in allowed:
    raise ValueError(f'model.kernels must be one of {allowed}, got {choice!r}')
  if choice != 'auto':
    return choice
  return 'cpu' if (platform or default_platform()) == 'cpu' else 'xla'


def loss_budget_mb(setting: float, device: Any = None) -> tuple[float, str]:
  """(budget in MB, how it was chosen) for ``train.loss_memory_mb`` on `device` (an
  object with .platform and .memory_stats(); default: JAX's first local device)."""
  setting = float(setting)
  if setting > 0:
    return setting, 'set'
  if device is None:
    import jax
    device = jax.local_devices()[0]
  if device.platform == 'cpu':
    return CPU_LOSS_BUDGET_MB, 'auto: cpu'
  try:
    stats = device.memory_stats() or {}
  except Exception:  # a backend without memory statistics
    stats = {}
  limit = stats.get('bytes_limit')
  if not limit:
    return CPU_LOSS_BUDGET_MB, f'auto: {device.platform} reports no memory limit'
  budget = float(limit) * DEVICE_MEMORY_FRACTION / 2**20
  return budget, (f'auto: {DEVICE_MEMORY_FRACTION:g} of {device.platform} '
                  f'bytes_limit {limit / 2**30:.1f} GiB')


def _backends_started() -> bool:
  jax = sys.modules.get('jax')
  if jax is None:
    return False
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


def configure_determinism(enabled: bool) -> str:
  """Adds (or leaves out) XLA's deterministic-ops flag; returns what was done. Must run
  before JAX starts its backend; a flag the user put in XLA_FLAGS is left alone."""
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_gpu_deterministic_ops' in flags:
    return 'as set in XLA_FLAGS'
  if not enabled:
    return 'off (train.deterministic_ops=False)'
  if _backends_started():
    return 'not applied: the JAX backend had already started'
  os.environ['XLA_FLAGS'] = f'{flags} {DETERMINISTIC_FLAG}'.strip()
  return 'on'
