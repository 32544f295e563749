"""Time (and optionally profile) the jitted GEAR train step on the current backend.

  python scripts/profile_step.py [--items 4000] [--batch 128] [--max_len 50]
      [--steps 7] [--precision float32|default|bfloat16] [--loss_impl auto]
      [--profile DIR] [--top 30]

Measures the compile time (`lower(...).compile()`) and the median of --steps step times
after two warm-up steps, for `steps.train_step` with the retail configuration (d 32,
2 heads, 4 upper layers, dropout 0.2, alpha 0.1).

--profile DIR writes a jax.profiler trace of a few steps to DIR and prints the time per
op aggregated over its 'X' events. To compare two revisions, run this script from two
checkouts (``git worktree add ../base REV``) alternately, a few times each, and compare
the medians (docs/performance.md).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gear_jax import hostalloc  # noqa: E402
from gear_jax import steps  # noqa: E402
from gear_jax.models import gear, layers, registry  # noqa: E402


def make_batch(batch: int, max_len: int, items: int) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  return dict(items=jnp.asarray(rng.integers(1, items, (batch, max_len)), jnp.int32),
              behaviors=jnp.asarray(rng.integers(1, 5, (batch, max_len)), jnp.int32),
              gaps=jnp.asarray(rng.integers(1, 500, (batch, max_len)), jnp.int32),
              mask=jnp.ones(batch, bool))


class Runner:
  """A compiled train step and its state."""

  def __init__(self, label: str, args, batch):
    self.label, self.batch = label, batch
    m = gear.GEAR(num_items=args.items, num_behaviors=4, d_model=32, n_head=2,
                  n_layer=4, dropout=0.2, dtype=layers.compute_dtype(args.precision),
                  precision=layers.matmul_precision(args.precision))
    tx = steps.make_optimizer(1e-3, 1e-6)
    params = registry.init_params(m, jax.random.PRNGKey(0), args.max_len)
    self.state = steps.init_state(params, tx, steps.dropout_base_key(0))
    f = jax.jit(functools.partial(steps.train_step, model=m, tx=tx, alpha=0.1,
                                  loss_impl=args.loss_impl,
                                  loss_memory_mb=args.loss_memory_mb),
                donate_argnums=0)
    t0 = time.perf_counter()
    self.step_fn = f.lower(self.state, batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.times: list[float] = []
    self.loss = None

  def step(self, record: bool = True) -> None:
    t0 = time.perf_counter()
    self.state, aux = self.step_fn(self.state, self.batch)
    jax.block_until_ready(self.state)
    if record:
      self.times.append(time.perf_counter() - t0)
    self.loss = float(aux['loss'])


# Trace events of the runtime itself (not ops) and of the Python host side.
_NOT_OPS = ('ThunkExecutor', 'SlinkyThreadPool', 'ThreadpoolListener', 'end: ', '$',
            'PjitFunction', 'PjRt', 'CommonPjRt', 'Wait for', 'PythonRefManager',
            'ParseArguments', 'Handle ', 'AllocateOutput')


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (result shape, JAX op_name metadata) from compiled HLO text."""
  ops = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\S+) ', line)
    if m and m.group(1) not in ops:
      meta = re.search(r'op_name="([^"]*)"', line)
      ops[m.group(1)] = (m.group(2), meta.group(1) if meta else '')
  return ops


def op_summary(trace_dir: str, top: int, steps_traced: int, hlo_text: str) -> None:
  """Prints milliseconds per step per op name over the trace's 'X' events, with the op's
  shape and JAX source op. Ops that run concurrently on the CPU thread pool overlap, so
  the times add up to more than the step time."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))
  if not files:
    print(f'no trace under {trace_dir}')
    return
  with gzip.open(files[-1]) as f:
    events = json.load(f).get('traceEvents', [])
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e or e['name'].startswith(_NOT_OPS):
      continue
    total[e['name']] += e['dur']
    count[e['name']] += 1
  ops = hlo_ops(hlo_text)
  print(f'\nper-op time from {files[-1]} (ms per step over {steps_traced} steps; '
        f'all ops: {sum(total.values()) / 1e3 / steps_traced:.1f} ms)')
  print(f'{"ms/step":>8} {"calls":>5}  {"name":32s} {"shape":28s} op')
  for name, us in total.most_common(top):
    shape, op_name = ops.get(name, ('', ''))
    print(f'{us / 1e3 / steps_traced:8.2f} {count[name] // steps_traced:5d}  {name[:32]:32s} '
          f'{shape[:28]:28s} {op_name[-70:]}')


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--items', type=int, default=4000)
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--max_len', type=int, default=50)
  ap.add_argument('--steps', type=int, default=7)
  ap.add_argument('--precision', default='float32')
  ap.add_argument('--loss_impl', default='auto')
  ap.add_argument('--loss_memory_mb', type=float, default=256.0)
  ap.add_argument('--profile', default=None, help='trace dir; prints a per-op summary')
  ap.add_argument('--top', type=int, default=30)
  args = ap.parse_args()
  hostalloc.configure()  # as train_and_evaluate does, before XLA starts its threads

  print(f'backend {jax.default_backend()}, {os.cpu_count()} CPUs, jax {jax.__version__}; '
        f'B {args.batch} L {args.max_len} V {args.items} precision {args.precision}')
  batch = make_batch(args.batch, args.max_len, args.items)
  runners = [Runner('current', args, batch)]
  for r in runners:
    r.step(record=False)
    r.step(record=False)
    for _ in range(args.steps):
      r.step()
  for r in runners:
    med = statistics.median(r.times)
    print(json.dumps({'impl': r.label, 'items': args.items, 'compile_s': round(r.compile_s, 2),
                      'step_s_median': round(med, 4), 'step_s_min': round(min(r.times), 4),
                      'steps': len(r.times), 'loss_after': round(r.loss, 5),
                      'times_s': [round(x, 3) for x in r.times]}))
  if args.profile:
    r = runners[0]
    n = 3
    os.makedirs(args.profile, exist_ok=True)
    trace_dir = tempfile.mkdtemp(dir=args.profile)
    with jax.profiler.trace(trace_dir):
      for _ in range(n):
        r.step(record=False)
    op_summary(trace_dir, args.top, n, r.step_fn.as_text())


if __name__ == '__main__':
  main()
