"""glibc allocator settings that keep XLA:CPU's per-step scratch memory mapped.

XLA:CPU allocates each execution's temporary buffers (hundreds of MB for a GEAR train
step) with malloc on its worker threads and frees them when the step ends. With glibc's
defaults a request that large from a worker thread is served by a fresh mmap and
unmapped again on free, so every step faults all of those pages back in: ~57,000 page
faults and ~0.12 s of kernel time per step at 4,000 items on a 2-core host, ~15% of
the step. Three `mallopt` settings make the memory stay with the process instead:

  M_ARENA_MAX 1            every thread allocates from the main arena (a worker
                           thread's own arena cannot hold a request over 64 MB and
                           falls back to mmap whatever the other settings say)
  M_MMAP_MAX 0             large requests come from the heap, not from mmap
  M_TRIM_THRESHOLD 2 GiB   freed memory at the top of the heap is kept for reuse

The cost is that memory freed by the process is reused by it but not returned to the
system until exit, so the heap stays at its high-water mark. That mark depends on how
many scratch buffers were ever alive at once: with JAX's asynchronous CPU dispatch the
next step's buffer is often allocated before the worker thread has freed the previous
one, and each such overlap leaves the heap one buffer (306 MB for a retail train step)
larger for the rest of the run. Measured at 99,037 items, 20 train steps: heap 1.27-1.36
GB and peak RSS 1.49-1.58 GB with async dispatch, heap 0.76 GB and peak RSS 0.94 GB with
jax_cpu_enable_async_dispatch=False. So `configure()` also turns JAX's asynchronous
dispatch on CPU devices off whenever it applies the allocator settings: steps then run
inline and the heap holds one scratch buffer, not a run-dependent number of them
(training and evaluation speed unchanged within this machine's noise, measured in the
docs/performance.md). Routing large buffers to mmap instead (M_MMAP_THRESHOLD) brings back ~78,000
page faults a step (step 1.1 s -> 1.8 s, measured).

Importing gear_jax changes nothing. `configure()` is called by `trainer.train_and_evaluate`
and `evaluator.evaluate_run` (so by the command lines) and by the benchmark scripts, first thing,
before XLA starts its thread pool: the arena setting only binds threads that have not
allocated yet. A program that drives the model and steps itself can call it first. It
does nothing when the C library is not glibc, when JAX will not compute on the CPU
(`computes_on_cpu`: JAX_PLATFORMS names another platform first, or a GPU / TPU plugin
is installed), when GEAR_JAX_HOST_ALLOCATOR=0, or when the user set glibc's own
MALLOC_* / GLIBC_TUNABLES variables (theirs win).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

ENV = 'GEAR_JAX_HOST_ALLOCATOR'
_USER_VARS = ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_',
              'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TOP_PAD_', 'GLIBC_TUNABLES')
# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int

_applied: dict[str, int] | None = None


ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                       'jax_rocm7_plugin', 'libtpu')


def computes_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, decided without starting a backend (which
  would start XLA's threads too early): the first entry of JAX_PLATFORMS /
  `jax_platforms` when set; otherwise True unless a GPU or TPU plugin is installed
  (JAX then prefers that device; a plugin without a device leaves the settings off,
  the cautious side)."""
  import importlib.util
  jax = sys.modules.get('jax')  # set in code only if jax is imported already
  chosen = ((jax.config.jax_platforms if jax is not None else None)
            or os.environ.get('JAX_PLATFORMS', ''))
  if chosen:
    return chosen.split(',')[0].strip().lower() == 'cpu'
  return not any(importlib.util.find_spec(name) is not None
                 for name in ACCELERATOR_PLUGINS)


def configure() -> dict[str, int]:
  """Applies the settings once per process; returns those applied ({} when skipped)."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = {}
  if os.environ.get(ENV, '1') == '0' or any(v in os.environ for v in _USER_VARS):
    return _applied
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return _applied
  if not computes_on_cpu():  # a CPU remedy: on a GPU / TPU host XLA's scratch is device memory
    return _applied
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return _applied
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  for name, param, value in (('M_ARENA_MAX', M_ARENA_MAX, 1), ('M_MMAP_MAX', M_MMAP_MAX, 0),
                             ('M_TRIM_THRESHOLD', M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
    if mallopt(param, value) == 1:  # mallopt returns 1 on success
      _applied[name] = value
  if _applied:
    import jax  # read when the CPU client is created: before the first computation
    jax.config.update('jax_cpu_enable_async_dispatch', False)
    _applied['jax_cpu_enable_async_dispatch'] = 0
  return _applied
