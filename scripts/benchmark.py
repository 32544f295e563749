"""Training and evaluation throughput of gear_jax at a chosen catalog size.

  python scripts/benchmark.py [--items 99037] [--batch 128] [--max_len 50]
      [--precision float32|default|bfloat16] [--kernels auto|xla|cpu]
      [--loss auto|token|vocab|dense] [--no-deterministic_ops] [--json]
  python scripts/benchmark.py --matrix float32:xla:auto,bfloat16:cpu:dense --json
      # the train step of each precision:kernels:loss combination, in one process

Runs on whatever JAX backend is present (CPU or GPU). Measures, in one process:
  compile_s               lowering + compiling the train step
  step_s                  median seconds per training step (forward + backward + Adam) on
                          synthetic batches (random items, behaviors, gaps, with padding)
  train_seq_per_s         batch / step_s
  eval_users_per_s        end to end: grain evaluation pipeline + model, 1 + 99 candidates
  eval_full_users_per_s   end to end, ranking the whole catalogue
  peak_rss_mb             peak host memory of this process (ru_maxrss; the --reference
                          subprocess runs afterwards and is not counted)
  peak_device_mb          peak device memory (GPU only)
Evaluation uses a synthetic data set of --eval_users users over the same catalog.
--kernels and --loss are `config.model.kernels` and `config.train.loss`; --loss_memory_mb
0 (the default) sizes the loss's chunks from the device, as training does
(`gear_jax.backend`). XLA's deterministic-ops flag is set as in training
(--no-deterministic_ops leaves it out; it matters on GPU only). --matrix takes a
comma-separated list of precision:kernels:loss combinations and times the train step
of each in this one process: {"matrix": [{precision, kernels, loss, compile_s, step_s,
...}, ...]}, evaluation and the reference skipped (scripts/gpu_check.py runs the
product of all values).

On CPU the computations run inline, as in training: gear_jax.hostalloc.configure() turns
JAX's asynchronous CPU dispatch off together with its allocator settings (see there);
--cpu_async_dispatch turns it back on for comparison. With async dispatch the next step's
XLA scratch buffer (306 MB at 99,037 items) was often allocated before the worker thread
freed the previous one, and with the allocator settings (one arena, no mmap, no trim)
each such overlap left the heap one scratch buffer larger for good: peak RSS 1.05-1.65
GB from run to run, against 0.99-1.08 GB inline.

--reference PYTHON then runs scripts/reference_torch.py (the reference model in PyTorch,
checked against the parity fixture with its --verify) with that interpreter, which
needs torch and numpy, on the same shapes in a subprocess, and adds its figures under
"reference" and the ratios `train_speedup` and `eval_model_speedup`. gear_jax needs no
torch; keep it in its own environment.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

from gear_jax import backend, defaults, hostalloc


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_device_mb() -> float | None:
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    return None
  stats = dev.memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**20


def synthetic_batch(rng: np.random.Generator, batch: int, max_len: int, items: int,
                    behaviors: int = 4) -> dict[str, np.ndarray]:
  """Random training windows: lengths from 3 to L (left padding), real gaps."""
  lengths = rng.integers(3, max_len + 1, batch)
  real = np.arange(max_len)[None] >= (max_len - lengths)[:, None]
  return {'items': np.where(real, rng.integers(1, items + 1, (batch, max_len)), 0)
                   .astype(np.int32),
          'behaviors': np.where(real, rng.integers(1, behaviors + 1, (batch, max_len)), 0)
                       .astype(np.int32),
          'gaps': np.where(real, rng.integers(0, 100_000, (batch, max_len)), 0)
                  .astype(np.int32),
          'mask': np.ones(batch, bool)}


def train_benchmark(args) -> dict:
  from gear_jax import parallel, steps
  from gear_jax.models import layers, registry
  mesh = parallel.make_mesh()
  model_config = ml_collections.ConfigDict(dict(
      d_model=args.d_model, n_head=args.n_head, n_layer=args.n_layer, dropout=0.2,
      mask_padding=False, kernels=args.kernels))
  model = registry.build(args.items, 4, model_config, args.precision)
  tx = steps.make_optimizer(1e-3, 1e-6)
  state = steps.create_state(model, tx, mesh, seed=0, max_len=args.max_len)
  budget, _ = backend.loss_budget_mb(args.loss_memory_mb, mesh.devices.flat[0])
  step_fn = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, alpha=0.1, loss_impl=args.loss,
      loss_memory_mb=budget), donate_argnums=0)
  rng = np.random.default_rng(0)
  batches = [parallel.put_batch(synthetic_batch(rng, args.batch, args.max_len, args.items),
                                mesh) for _ in range(4)]
  t = time.perf_counter()
  compiled = step_fn.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t
  state, aux = compiled(state, batches[0])  # warm-up
  jax.block_until_ready(aux['loss'])
  times = []
  for i in range(args.steps):
    t = time.perf_counter()
    state, aux = compiled(state, batches[i % len(batches)])
    jax.block_until_ready(aux['loss'])
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  return dict(kernels=model.kernels, loss_memory_mb=budget,
              compile_s=round(compile_s, 2), step_s=round(step_s, 4),
              step_s_min=round(min(times), 4),
              train_seq_per_s=round(args.batch / step_s, 1),
              final_loss=float(aux['loss']), params=layers.count_params(state.params),
              state=state, model=model, mesh=mesh)


def eval_benchmark(args, model, params, mesh) -> dict:
  from gear_jax.data import preprocess, readers, synthetic
  from gear_jax.evaluator import Evaluator
  tmp = tempfile.mkdtemp(prefix='gear_bench_eval_')
  path = os.path.join(tmp, 'eval.txt')
  synthetic.write_tsv(path, synthetic.generate(args.eval_users, args.items, seed=1))
  data, _ = preprocess.load(path, readers.TSV, preprocess.Settings(), cache_dir='')
  config = defaults.get_default_config()
  config.data.max_len = args.max_len
  config.data.cache = False
  config.eval.batch_size = args.eval_batch
  out = {'eval_cases': int(len(data.val_user))}
  for protocol, key in (('sampled', 'eval_users_per_s'), ('full', 'eval_full_users_per_s')):
    if protocol == 'full' and args.skip_full:
      continue
    config.eval.protocol = protocol
    evaluator = Evaluator(data, config, model, mesh, verbose=False)
    # compile + warm-up; negatives are drawn here once and kept, as in training
    evaluator.evaluate(params, 'val')
    t = time.perf_counter()
    evaluator.evaluate(params, 'val')
    out[key] = round(len(data.val_user) / (time.perf_counter() - t), 1)
  return out


MATRIX_CHOICES = (defaults.choices('model.precision'), defaults.choices('model.kernels'),
                  defaults.choices('train.loss'))


def parse_matrix(parser, text: str) -> list[tuple[str, str, str]]:
  combos = []
  for item in text.split(','):
    parts = tuple(item.strip().split(':'))
    if len(parts) != 3 or any(p not in c for p, c in zip(parts, MATRIX_CHOICES)):
      parser.error(f'--matrix: {item!r} is not precision:kernels:loss with precision '
                   f'in {MATRIX_CHOICES[0]}, kernels in {MATRIX_CHOICES[1]}, loss in '
                   f'{MATRIX_CHOICES[2]}')
    combos.append(parts)
  return combos


def run_matrix(args, combos: list[tuple[str, str, str]]) -> list[dict]:
  """The train step of each (precision, kernels, loss) combination, in this process."""
  rows = []
  for precision, kernels, loss in combos:
    args.precision, args.kernels, args.loss = precision, kernels, loss
    try:
      train = train_benchmark(args)
    except Exception as e:  # noqa: BLE001 - one failing combination is reported, not fatal
      rows.append(dict(precision=precision, kernels=kernels, loss=loss,
                       error=f'{type(e).__name__}: {str(e)[:300]}'))
      continue
    for key in ('state', 'model', 'mesh'):
      train.pop(key)
    rows.append(dict(precision=precision, loss=loss, **train))
    device_mb = peak_device_mb()
    if device_mb is not None:
      rows[-1]['peak_device_mb'] = round(device_mb, 1)  # the process's peak so far
  return rows


def _matrix_table(result: dict) -> str:
  lines = [f'GEAR train step on {result["device"]} ({result["backend"]}): '
           f'{result["items"]:,} items, batch {result["batch"]} x {result["max_len"]}']
  for r in result['matrix']:
    what = f'{r["precision"]:<9} {r["kernels"]:<4} {r["loss"]:<6}'
    lines.append(f'  {what} ' + (f'ERROR {r["error"]}' if 'error' in r else
                                  f'compile {r["compile_s"]:6.1f}s  step '
                                  f'{r["step_s"]:.4f}s  {r["train_seq_per_s"]:,.0f} seq/s'))
  return '\n'.join(lines)


def reference_benchmark(args) -> dict:
  """scripts/reference_torch.py's JSON for the same shapes, run with `args.reference`."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reference_torch.py')
  cmd = [args.reference, script, '--items', str(args.items), '--batch', str(args.batch),
         '--max_len', str(args.max_len), '--d_model', str(args.d_model),
         '--n_head', str(args.n_head), '--n_layer', str(args.n_layer),
         '--steps', str(args.steps), '--eval_batch', str(args.eval_batch), '--json']
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f'reference run failed ({" ".join(cmd)}):\n{proc.stderr[-2000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--items', type=int, default=99_037)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--max_len', type=int, default=50)
  parser.add_argument('--d_model', type=int, default=32)
  parser.add_argument('--n_head', type=int, default=2)
  parser.add_argument('--n_layer', type=int, default=4)
  parser.add_argument('--precision', default='float32',
                      choices=['float32', 'default', 'bfloat16'])
  parser.add_argument('--kernels', default='auto',
                      choices=list(defaults.choices('model.kernels')))
  parser.add_argument('--loss', default='auto',
                      choices=['auto', 'token', 'vocab', 'dense', 'chunked'],
                      help="the item loss ('chunked' = auto)")
  parser.add_argument('--loss_memory_mb', type=float, default=0.0,
                      help='chunk budget of the item loss; 0 = from the device')
  parser.add_argument('--deterministic_ops', action=argparse.BooleanOptionalAction,
                      default=True, help="XLA's deterministic ops (GPU), as in training")
  parser.add_argument('--matrix', metavar='P:K:L,...', default=None,
                      help='time the train step of each precision:kernels:loss')
  parser.add_argument('--steps', type=int, default=10, help='timed training steps')
  parser.add_argument('--eval_users', type=int, default=20_000)
  parser.add_argument('--eval_batch', type=int, default=256)
  parser.add_argument('--skip_eval', action='store_true')
  parser.add_argument('--skip_full', action='store_true')
  parser.add_argument('--reference', metavar='PYTHON', default=None,
                      help='Also time the PyTorch reference (scripts/reference_torch.py) '
                      'with this interpreter, which needs torch.')
  parser.add_argument('--cpu_async_dispatch', action='store_true',
                      help="Keep JAX's asynchronous dispatch on CPU (see the module "
                      'docstring: raises and scatters peak_rss_mb).')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  args.loss = 'auto' if args.loss == 'chunked' else args.loss
  combos = parse_matrix(parser, args.matrix) if args.matrix else None
  hostalloc.configure()  # as train_and_evaluate does, before XLA starts its threads
  determinism = backend.configure_determinism(args.deterministic_ops)  # before the backend
  if args.cpu_async_dispatch:  # read when the CPU client is created: before any use
    jax.config.update('jax_cpu_enable_async_dispatch', True)

  result = dict(backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                devices=jax.device_count(), items=args.items, batch=args.batch,
                max_len=args.max_len, d_model=args.d_model, n_layer=args.n_layer,
                precision=args.precision, loss=args.loss,
                xla_gpu_deterministic_ops=determinism,
                cpu_async_dispatch=bool(jax.config.read('jax_cpu_enable_async_dispatch')))
  if args.matrix:
    result.pop('precision'), result.pop('loss')
    result['matrix'] = run_matrix(args, combos)
    result['peak_rss_mb'] = round(peak_rss_mb(), 1)
    print(json.dumps(result) if args.json else _matrix_table(result))
    return
  train = train_benchmark(args)
  state, model, mesh = train.pop('state'), train.pop('model'), train.pop('mesh')
  result.update(train)
  if not args.skip_eval:
    result.update(eval_benchmark(args, model, state.params, mesh))
  result['peak_rss_mb'] = round(peak_rss_mb(), 1)
  device_mb = peak_device_mb()
  if device_mb is not None:
    result['peak_device_mb'] = round(device_mb, 1)
  if args.reference:
    ref = reference_benchmark(args)
    result['reference'] = ref
    result['train_speedup'] = round(ref['step_s'] / result['step_s'], 2)
    if 'eval_users_per_s' in result:
      result['eval_model_speedup'] = round(result['eval_users_per_s'] / ref['eval_users_per_s'], 2)
  if args.json:
    print(json.dumps(result))
    return
  print(f'GEAR benchmark on {result["device"]} x{result["devices"]} ({result["backend"]}): '
        f'{args.items:,} items, batch {args.batch} x {args.max_len}, d {args.d_model}, '
        f'{args.n_layer} upper layers, {args.precision}, {result["kernels"]} kernels, '
        f'{args.loss} loss')
  rows = [('parameters', f'{result["params"]:,}'),
          ('compile (s)', f'{result["compile_s"]:.1f}'),
          ('train step (s, median)', f'{result["step_s"]:.4f}'),
          ('train sequences/s', f'{result["train_seq_per_s"]:,.0f}')]
  for key, name in (('eval_users_per_s', 'eval users/s (1 + 99 candidates)'),
                    ('eval_full_users_per_s', f'eval users/s (full, {args.items:,} items)')):
    if key in result:
      rows.append((name, f'{result[key]:,.0f}'))
  rows.append(('peak host RSS (MB)', f'{result["peak_rss_mb"]:,.0f}'))
  if 'peak_device_mb' in result:
    rows.append(('peak device memory (MB)', f'{result["peak_device_mb"]:,.0f}'))
  if 'reference' in result:
    ref = result['reference']
    rows += [(f'reference train step (s, torch {ref["torch"]})', f'{ref["step_s"]:.4f}'),
             ('  train speedup', f'{result["train_speedup"]:.2f}x'),
             ('reference eval users/s (model only)', f'{ref["eval_users_per_s"]:,.0f}'),
             ('reference peak RSS (MB)', f'{ref["peak_rss_mb"]:,.0f}')]
    if 'eval_model_speedup' in result:
      rows.append(('  eval speedup (ours end to end)', f'{result["eval_model_speedup"]:.2f}x'))
  for name, value in rows:
    print(f'  {name:<44}{value:>14}')
  sys.stdout.flush()


if __name__ == '__main__':
  main()
