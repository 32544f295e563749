"""Kill-and-resume soak: SIGKILL a training at random moments, restart it each time, and
check that it ends exactly like an uninterrupted run.

  python scripts/soak.py [--kills 10] [--seed 0] [--config configs/demo.py]
      [--epochs 12] [--root /tmp/gear_soak] [--json] [-- extra --config.* flags]

1. Trains once without interruption (the reference) and records when each epoch
   line appeared and how long its training and evaluation took.
2. Starts the same training in another workdir and SIGKILLs it `--kills` times,
   restarting after each kill. The kill moments are drawn at random (seeded) from
   three kinds, so that every phase is hit: `any` (uniform from start-up to the middle
   of the second epoch of that start, compilation included), `save` (the moment orbax's temporary checkpoint
   directory appears, i.e. during an asynchronous save) and `eval` (inside the
   validation pass that follows an epoch's training, timed from the reference).
   Each kill point is reported with its phase and what was on disk at that moment.
   Each start makes at most about two epochs of progress, so all kills happen before
   the run could finish. Evaluation batches default to 16 users (`DEFAULT_EXTRA`) so
   that validation lasts about as long as training.
3. Lets the last start finish and compares metrics.jsonl (without timings) and
   summary.json with the reference; exits 1 on any difference.
All runs share a persistent XLA compilation cache, so restarts do not recompile.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ('train_s', 'eval_s', 'train/seq_per_s')


# small evaluation batches make validation last about as long as an epoch's training,
# so that a kill timed into it lands there
DEFAULT_EXTRA = ['--config.eval.batch_size=16']


def _command(args, workdir: str) -> list[str]:
  return [sys.executable, '-m', 'gear_jax.train', '--config', args.config,
          '--workdir', workdir, f'--config.train.num_epochs={args.epochs}',
          *(args.extra or DEFAULT_EXTRA)]


class Child:
  """A training process whose stdout lines are timestamped as they arrive."""

  def __init__(self, cmd: list[str], env: dict):
    self.start = time.perf_counter()
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    self.lines: list[tuple[float, str]] = []
    self.stderr = ''
    self._out = threading.Thread(target=self._read, daemon=True)
    self._out.start()
    self._err = threading.Thread(target=self._read_err, daemon=True)
    self._err.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append((time.perf_counter() - self.start, line.rstrip()))

  def _read_err(self):
    self.stderr = self.proc.stderr.read()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def epochs_done(self) -> int:
    return sum(1 for _, l in self.lines if l.startswith('epoch '))

  def wait(self) -> int:
    code = self.proc.wait()
    self._out.join()
    self._err.join()
    return code


def _tmp_checkpoints(workdir: str) -> set[str]:
  d = os.path.join(workdir, 'checkpoints')
  return {n for n in os.listdir(d) if 'tmp' in n} if os.path.isdir(d) else set()


def _disk_state(workdir: str) -> dict:
  d = os.path.join(workdir, 'checkpoints')
  names = sorted(os.listdir(d)) if os.path.isdir(d) else []
  path = os.path.join(workdir, 'metrics.jsonl')
  lines = open(path).read().count('\n') if os.path.exists(path) else 0
  return {'checkpoints': names, 'metrics_lines': lines}


def _kill_when(child: Child, workdir: str, kind: str, plan: dict, rng: random.Random,
               left_over: set[str]) -> dict | None:
  """Waits for the planned moment and SIGKILLs the child; None if it finished first.
  `left_over`: temporary checkpoint directories of an earlier killed start (orbax
  removes them when the new start opens the directory)."""
  if kind == 'any':  # from start-up to the middle of the second epoch of this start
    target = rng.uniform(0.5, plan['first_epoch_s'] + 1.5 * max(plan['train_s']))
    while child.proc.poll() is None and child.elapsed() < target:
      time.sleep(0.005)
  elif kind == 'save':  # a save of this start (one left by a killed start is ignored)
    while child.proc.poll() is None and not (_tmp_checkpoints(workdir) - left_over):
      time.sleep(0.001)
  else:  # eval: after an epoch line, wait out the next epoch's training
    while child.proc.poll() is None and child.epochs_done() == 0:
      time.sleep(0.005)
    if child.proc.poll() is None:
      epoch = min(_next_epoch(child), len(plan['train_s']) - 1)
      time.sleep(plan['train_s'][epoch] + rng.uniform(0.2, 0.8) * plan['eval_s'][epoch])
  if child.proc.poll() is not None:
    return None
  saving = bool(_tmp_checkpoints(workdir) - left_over)
  at = child.elapsed()
  child.proc.send_signal(signal.SIGKILL)
  child.wait()
  last = child.lines[-1][1] if child.lines else ''
  return {'kind': kind, 'seconds_after_start': round(at, 2), 'saving': saving,
          'phase': _phase(child, at, plan, saving), 'last_line': last[:100],
          **_disk_state(workdir)}


def _phase(child: Child, at: float, plan: dict, saving: bool) -> str:
  """Where the run was when it was killed, from its output and the reference timings
  (training and evaluation are told apart by time, so that label is an estimate)."""
  if saving:
    return 'checkpoint save (orbax temporary directory present)'
  seen = [(t, l) for t, l in child.lines if t <= at]
  if any(l.startswith('best ') for _, l in seen):
    return 'after the last epoch (summary, shutdown)'
  marks = [(t, l) for t, l in seen if l.startswith(('compiled the train step', 'epoch '))]
  if not marks:
    return 'start-up (imports, data, compilation)'
  t0, line = marks[-1]
  epoch = int(line.split()[1]) + 1 if line.startswith('epoch ') else _resumed_epoch(seen)
  epoch = min(epoch, len(plan['train_s']) - 1)
  into = at - t0
  if into <= plan['train_s'][epoch]:
    return f'training epoch {epoch} ({into:.1f}s in)'
  return f'evaluation after epoch {epoch} (estimated: {into:.1f}s after its start, ' \
         f'training takes {plan["train_s"][epoch]:.1f}s)'


def _resumed_epoch(lines) -> int:
  for _, line in lines:
    if line.startswith('resuming'):
      return int(line.split('(epoch ')[1].split(',')[0]) + 1
  return 0


def _next_epoch(child: Child) -> int:
  last = [l for _, l in child.lines if l.startswith('epoch ')][-1]
  return int(last.split()[1]) + 1


def _without_timing(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS}
            for l in f if l.strip()]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--epochs', type=int, default=12)
  parser.add_argument('--root', default=None, help='default: a new temporary folder')
  parser.add_argument('--json', action='store_true')
  parser.add_argument('extra', nargs='*', help='more --config.* flags (after --)')
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = args.root or tempfile.mkdtemp(prefix='gear_soak_')
  ref_dir, soak_dir = os.path.join(root, 'reference'), os.path.join(root, 'soak')
  for d in (ref_dir, soak_dir):
    shutil.rmtree(d, ignore_errors=True)
  env = dict(os.environ)
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(root, 'xla_cache'))
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

  ref = Child(_command(args, ref_dir), env)
  if ref.wait() != 0:
    print(ref.stderr[-3000:], file=sys.stderr)
    return 1
  records = [json.loads(l) for l in open(os.path.join(ref_dir, 'metrics.jsonl'))]
  first_epoch = next(t for t, l in ref.lines if l.startswith('epoch '))
  plan = {'total_s': ref.elapsed(), 'first_epoch_s': first_epoch,
          'train_s': [r['train_s'] for r in records],
          'eval_s': [r['eval_s'] for r in records]}
  print(f'reference: {len(records)} epochs in {plan["total_s"]:.1f}s -> {ref_dir}',
        file=sys.stderr)

  kinds = (['any', 'save', 'eval'] * args.kills)[:args.kills]
  rng.shuffle(kinds)
  kills, starts = [], 0
  for kind in kinds:
    left_over = _tmp_checkpoints(soak_dir)
    child = Child(_command(args, soak_dir), env)
    starts += 1
    point = _kill_when(child, soak_dir, kind, plan, rng, left_over)
    if point is None:  # finished before the moment came: nothing left to kill
      break
    point['start'] = starts
    kills.append(point)
    print(f'kill {len(kills)}: {point}', file=sys.stderr)
  final = Child(_command(args, soak_dir), env)
  code = final.wait()
  starts += 1
  same_metrics = code == 0 and _without_timing(soak_dir) == _without_timing(ref_dir)
  with open(os.path.join(ref_dir, 'summary.json')) as a:
    ref_summary = json.load(a)
  soak_summary = None
  if os.path.exists(os.path.join(soak_dir, 'summary.json')):
    with open(os.path.join(soak_dir, 'summary.json')) as b:
      soak_summary = json.load(b)
  result = {'kills': kills, 'starts': starts, 'final_exit': code,
            'metrics_equal': same_metrics, 'summary_equal': soak_summary == ref_summary,
            'epochs': len(records), 'root': root}
  if args.json:
    print(json.dumps(result))
  else:
    for k in kills:
      print(f"  kill {k['start']:2d} at {k['seconds_after_start']:6.2f}s ({k['kind']:<4}): "
            f"{k['phase']}; on disk {k['checkpoints']}, {k['metrics_lines']} metrics lines")
    print(f"{len(kills)} kills, {starts} starts; metrics.jsonl equal: {same_metrics}; "
          f"summary.json equal: {result['summary_equal']}")
  if code != 0:
    print(final.stderr[-3000:], file=sys.stderr)
  return 0 if same_metrics and result['summary_equal'] else 1


if __name__ == '__main__':
  sys.exit(main())
