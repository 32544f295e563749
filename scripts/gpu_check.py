"""One prepared check of the GPU path, to run the day a GPU is there.

  python scripts/gpu_check.py --install [--wheels DIR] [--out gpu_check.json]   # on a GPU
  python scripts/gpu_check.py --dry_run                 # anywhere: the same steps, small, CPU

Steps, each in its own subprocess (a failing step is reported and the next one runs):
  install      pip install -e ".[cuda12]" (only with --install; --wheels DIR installs
               offline from a directory of wheels, for machines without an index)
  device       what JAX computes on: platform, device kind and count, memory limit; on a
               real check anything but a GPU stops here
  parity       the parity tests on the device: the reference fixture (outputs,
               gradients, Adam step; both kernel implementations, every item loss) and
               the kernel-vs-autodiff tests of tests/test_kernels.py
  matrix       scripts/benchmark.py --matrix at 99,037 items, batch 128 x 50: the train
               step for every precision (float32, default = TF32 on NVIDIA, bfloat16) x
               kernels (xla, cpu) with the auto loss, and every item loss (dense, token,
               vocab) x precision with the kernels 'auto' picks
  determinism  scripts/benchmark.py with the defaults (auto kernels and loss, float32)
               with and without XLA's deterministic-ops flag: what the flag costs, plus
               evaluation throughput (sampled and full ranking)
  train        a 2-epoch run of configs/retail.py on retail-shaped synthetic data (99,037
               items, 30,000 users): epoch seconds and the validation metrics
Prints one JSON summary on the last line (also written to --out) and exits 1 if a step
failed. --time_limit (default 480 s) is shared by all steps:
a step that would start after it is skipped, a running one is stopped at it.

--dry_run runs every step on the CPU at small shapes (400 items, batch 8 x 12, one
upper block, the matrix covering each value once instead of the product, a 2-epoch run
of configs/test.py) and skips the install; tests/test_gpu_check.py runs it in CI so that
the script keeps working on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

PARITY = ['tests/test_model.py::test_fixture_outputs_and_gradients',
          'tests/test_model.py::test_fixture_adam_step',
          'tests/test_kernels.py']
DRY_PARITY = ['tests/test_kernels.py::test_query_blocks_at_user_shapes']
PRECISIONS = ('float32', 'default', 'bfloat16')


def matrix_combos(dry_run: bool) -> list[str]:
  """precision:kernels:loss strings for scripts/benchmark.py --matrix."""
  if dry_run:  # each value once ('auto' for both: the determinism step)
    return ['float32:xla:dense', 'default:cpu:token', 'bfloat16:xla:vocab']
  kernels = [f'{p}:{k}:auto' for p in PRECISIONS for k in ('xla', 'cpu')]
  return kernels + [f'{p}:auto:{loss}' for p in PRECISIONS
                    for loss in ('dense', 'token', 'vocab')]


class Clock:
  def __init__(self, limit: float):
    self.start, self.limit = time.monotonic(), limit

  def left(self) -> float:
    return self.limit - (time.monotonic() - self.start)


def run_step(name: str, cmd: list[str], env: dict, clock: Clock, log) -> dict:
  """Runs one step; {'status': 'ok' | 'failed' | 'timeout' | 'skipped', ...}."""
  left = clock.left()
  if left < 5:
    return dict(status='timeout', reason='not started: the time limit was reached')
  print(f'[gpu_check] {name}: {" ".join(cmd)}', file=log, flush=True)
  t = time.monotonic()
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=left)
  except subprocess.TimeoutExpired as e:
    return dict(status='timeout', seconds=round(time.monotonic() - t, 1),
                tail=_text(e.stdout)[-1500:] + _text(e.stderr)[-1500:])
  out = dict(status='ok' if proc.returncode == 0 else 'failed',
             seconds=round(time.monotonic() - t, 1), returncode=proc.returncode)
  if proc.returncode:
    out['tail'] = (proc.stdout[-1500:] + '\n' + proc.stderr[-2500:]).strip()
  out['stdout'] = proc.stdout
  return out


def _text(b) -> str:
  return b.decode(errors='replace') if isinstance(b, bytes) else (b or '')


def _last_json(step: dict) -> dict | None:
  lines = step.pop('stdout', '').strip().splitlines()
  if step['status'] != 'ok' or not lines:
    return None
  try:
    return json.loads(lines[-1])
  except json.JSONDecodeError:
    step['status'], step['tail'] = 'failed', 'no JSON on the last line: ' + lines[-1][:300]
    return None


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dry_run', action='store_true',
                      help='every step on the CPU at small shapes (CI)')
  parser.add_argument('--install', action='store_true',
                      help='pip install -e ".[cuda12]" first')
  parser.add_argument('--wheels', default=None,
                      help='with --install: install offline from this wheel directory')
  parser.add_argument('--time_limit', type=float, default=480.0,
                      help='seconds for all steps together')
  parser.add_argument('--out', default=None, help='also write the JSON summary here')
  parser.add_argument('--workdir', default=None,
                      help='scratch directory (default: a new temporary one)')
  args = parser.parse_args()
  clock = Clock(args.time_limit)
  log = sys.stderr
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='gear_gpu_check_'))
  work.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  # the tests' conftest defaults to the CPU; the device is what this check is about
  env['JAX_PLATFORMS'] = 'cpu' if args.dry_run else env.get('JAX_PLATFORMS', 'cuda')
  if not args.dry_run:
    env.pop('XLA_FLAGS', None)  # e.g. a CPU-only -O0 or forced device count
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'  # steps never hold memory at once
  py = sys.executable
  summary: dict = dict(mode='dry_run (cpu)' if args.dry_run else 'gpu', steps={})
  steps = summary['steps']

  # install
  if args.install and not args.dry_run:
    cmd = [py, '-m', 'pip', 'install', '-q', '-e', '.[cuda12]']
    if args.wheels:
      cmd += ['--no-index', '--find-links', args.wheels]
    steps['install'] = run_step('install', cmd, env, clock, log)
    steps['install'].pop('stdout', None)
  else:
    steps['install'] = dict(status='skipped', reason='dry run' if args.dry_run else
                            'no --install')

  # device
  probe = ('import json, jax; d = jax.devices()[0]; s = d.memory_stats() or {}; '
           'print(json.dumps(dict(platform=d.platform, kind=d.device_kind, '
           'count=jax.device_count(), jax=jax.__version__, '
           'bytes_limit=s.get("bytes_limit"))))')
  steps['device'] = run_step('device', [py, '-c', probe], env, clock, log)
  device = _last_json(steps['device'])
  if device is not None:
    steps['device'].update(device)
    if not args.dry_run and device['platform'] != 'gpu':
      steps['device'].update(status='failed', reason=f'JAX computes on '
                             f'{device["platform"]}, not a GPU (is the cuda12 extra '
                             'installed? try --install)')
  if steps['device']['status'] != 'ok':
    return _finish(summary, args.out)

  # parity on the device
  tests = DRY_PARITY if args.dry_run else PARITY
  steps['parity'] = run_step('parity', [py, '-m', 'pytest', '-q', '-n', '0', '-p',
                                        'no:cacheprovider', *tests], env, clock, log)
  lines = steps['parity'].pop('stdout', '').strip().splitlines()
  steps['parity']['result'] = lines[-1] if lines else ''

  # benchmark matrix
  if args.dry_run:
    shape = ['--items', '400', '--batch', '8', '--max_len', '12', '--n_layer', '1',
             '--d_model', '16', '--steps', '2', '--eval_users', '200']
  else:
    shape = ['--items', '99037', '--steps', '10']
  bench = [py, 'scripts/benchmark.py', *shape, '--json']
  steps['matrix'] = run_step('matrix', bench + ['--matrix', ','.join(matrix_combos(
      args.dry_run))], env, clock, log)
  result = _last_json(steps['matrix'])
  if result is not None:
    steps['matrix']['runs'] = [
        {k: r.get(k) for k in ('precision', 'kernels', 'loss', 'compile_s', 'step_s',
                               'train_seq_per_s', 'loss_memory_mb', 'final_loss',
                               'error') if k in r} for r in result['matrix']]
    if any('error' in r for r in result['matrix']):
      steps['matrix']['status'] = 'failed'

  # the deterministic-ops flag: its cost; evaluation throughput
  det = {}
  for flag in ('--deterministic_ops', '--no-deterministic_ops'):
    extra = [] if flag == '--deterministic_ops' else ['--skip_eval']
    step = run_step(f'determinism {flag}', bench + [flag, *extra], env, clock, log)
    result = _last_json(step)
    det[flag.strip('-')] = dict(status=step['status'], **({} if result is None else {
        k: result.get(k) for k in ('step_s', 'compile_s', 'final_loss', 'kernels',
                                   'loss_memory_mb', 'eval_users_per_s',
                                   'eval_full_users_per_s',
                                   'peak_device_mb', 'xla_gpu_deterministic_ops')
        if k in result}), **({'tail': step['tail']} if 'tail' in step else {}))
  on, off = det['deterministic_ops'], det['no-deterministic_ops']
  steps['determinism'] = dict(status='ok' if on['status'] == off['status'] == 'ok'
                              else 'failed', on=on, off=off)
  if on.get('step_s') and off.get('step_s'):
    steps['determinism']['cost'] = round(on['step_s'] / off['step_s'], 3)

  # a short real run
  run_dir = work / 'train'
  if args.dry_run:
    cfg = ['--config', 'configs/test.py', f'--config.data.path={work / "test_syn.txt"}',
           '--config.data.synthetic.enabled=True']
  else:
    cfg = ['--config', 'configs/retail.py', f'--config.data.path={work / "retail_syn.txt"}',
           '--config.data.synthetic.enabled=True', '--config.data.synthetic.num_users=30000',
           '--config.data.synthetic.num_items=99037']
  steps['train'] = run_step('train', [
      py, '-m', 'gear_jax.train', *cfg, '--config.train.num_epochs=2',
      f'--config.data.cache_dir={work / "cache"}', '--workdir', str(run_dir)], env, clock,
      log)
  steps['train'].pop('stdout', None)
  if steps['train']['status'] == 'ok':
    steps['train'].update(_run_figures(run_dir))
  return _finish(summary, args.out)


def _run_figures(run_dir: pathlib.Path) -> dict:
  records = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text()
             .splitlines() if line.strip()]
  summary = json.loads((run_dir / 'summary.json').read_text())
  env = json.loads((run_dir / 'run.json').read_text())['environment']
  keep = ('epoch', 'train/loss', 'train_s', 'eval_s', 'train/seq_per_s', 'val/NDCG@10',
          'val/Recall@10', 'val_full/NDCG@10')
  return dict(epochs=[{k: r[k] for k in keep if k in r} for r in records],
              best=summary.get('best_val', {}).get('val/NDCG@10'),
              device=env.get('device'), kernels=env.get('kernels'),
              loss_memory_mb=env.get('loss_memory_mb'),
              xla_gpu_deterministic_ops=env.get('xla_gpu_deterministic_ops'))


def _finish(summary: dict, out: str | None) -> int:
  for step in summary['steps'].values():
    step.pop('stdout', None)
  failed = [name for name, step in summary['steps'].items()
            if step['status'] not in ('ok', 'skipped')]
  summary['ok'] = not failed
  summary['failed'] = failed
  text = json.dumps(summary)
  if out:
    pathlib.Path(out).write_text(text + '\n')
  print(text)
  return 0 if summary['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
