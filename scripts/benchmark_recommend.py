"""Recommendation throughput against full-ranking evaluation, side by side, one command.

  python scripts/benchmark_recommend.py [--items 99037] [--users 20000] [--k 10]
      [--batch 128] [--eval_batch 256] [--rounds 2] [--exclude none|seen|target] [--json]

Builds once (in --dir, default a temporary folder) a synthetic data set whose catalogue
is exactly --items items (the synthetic generator's users, plus filler users with three
views each of the items it left out: 2,742 of them at the defaults) and a run directory
with a real orbax checkpoint of freshly initialised retail-shaped parameters (L = 50,
d = 32, 4 upper blocks; throughput does not depend on the weights). Then, alternating
for --rounds:

  eval       evaluation with protocol 'full' over the validation cases (the trainer's
             Evaluator: grain pipeline + model + rank over the whole catalogue),
             end to end, the faster of two passes after a compiling one
  recommend  `gear_jax.recommend` end to end for the generator's users (--batch users a
             step, two steps at once): histories from the data file, input windows,
             top-k over the whole catalogue, CSV rows written to a file
             (`write_recommendations`, what the CLI runs), the faster of two passes
             after one compiling batch

Each phase runs in its own process, so its peak RSS (its own ru_maxrss) is its own.
Prints per round and the median users/s of each, and the ratio recommend / eval.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

PASSES = 2  # timed passes per phase; the faster one counts (this machine is noisy)

def build(directory: str, items: int, users: int, eval_batch: int
          ) -> tuple[str, str, str]:
  """(data file, run directory, users file) in `directory`, made on first use."""
  data_path = os.path.join(directory, f'bench_{items}.txt')
  workdir = os.path.join(directory, f'run_{items}')
  users_path = os.path.join(directory, f'users_{items}.txt')
  if os.path.exists(os.path.join(workdir, 'config.json')):
    return data_path, workdir, users_path
  from gear_jax import defaults, parallel, run_log, steps
  from gear_jax import checkpoint as ckpt_lib
  from gear_jax.models import registry
  from gear_jax.data import load_dataset, synthetic
  cols = synthetic.generate(users, items, seed=1)
  missing = np.setdiff1d(np.arange(1, items + 1), cols['item'])
  n_fill = -(-len(missing) // 3)  # filler users with 3 views each
  fill_items = np.resize(missing, n_fill * 3)
  fill = dict(user=np.repeat(np.arange(users + 1, users + n_fill + 1), 3),
              item=fill_items,
              behavior=np.zeros(n_fill * 3, np.uint8),
              timestamp=1_500_000_000 + np.tile(np.arange(3), n_fill) * 60)
  cols = {k: np.concatenate([cols[k], fill[k].astype(cols[k].dtype)]) for k in cols}
  synthetic.write_tsv(data_path, cols)
  with open(users_path, 'w') as f:
    f.write(''.join(f'{u}\n' for u in range(1, users + 1)))
  config = defaults.get_default_config()
  config.data.path = data_path
  config.data.cache_dir = os.path.join(directory, 'cache')
  config.eval.batch_size = eval_batch
  config.eval.protocol = 'full'
  data, _ = load_dataset(config.data)
  assert data.num_items == items, (data.num_items, items)
  mesh = parallel.make_mesh(1, 1)
  model = registry.build(data.num_items, data.num_behaviors, config.model)
  state = steps.create_state(model, steps.make_optimizer(1e-3, 1e-6), mesh, seed=0,
                             max_len=int(config.data.max_len))
  store = ckpt_lib.CheckpointStore(workdir, num_items=data.num_items, mesh=mesh)
  meta = dict(epoch=0, step=0, config=config.to_dict(), data_key=data.key,
              num_items=data.num_items, num_behaviors=data.num_behaviors,
              note='freshly initialised parameters (benchmark)')
  store.save(0, params=state.params, train=None, iterator=None, meta=meta, monitor=0.0)
  store.wait()
  store.close()
  run_log.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  return data_path, workdir, users_path


def phase_eval(workdir: str) -> dict:
  from gear_jax import hostalloc, parallel, rundir
  from gear_jax.evaluator import Evaluator
  from gear_jax.data import load_dataset
  hostalloc.configure()
  config = rundir.read_config(workdir)
  data, _ = load_dataset(config.data)
  mesh = parallel.make_mesh(1, 1)
  trained = rundir.load_trained(config, workdir, data, mesh)
  evaluator = Evaluator(data, config, trained.model, mesh, verbose=False)
  evaluator.evaluate(trained.params, 'val')  # compiles
  times = []
  for _ in range(PASSES):
    start = time.perf_counter()
    metrics = evaluator.evaluate(trained.params, 'val')
    times.append(time.perf_counter() - start)
  seconds = min(times)
  cases = evaluator.num_cases('val')
  return dict(users=cases, seconds=round(seconds, 3), users_per_s=round(cases / seconds, 1),
              ndcg10=round(metrics['val/NDCG@10'], 5))


def phase_recommend(workdir: str, users_path: str, k: int, batch: int, exclude: str,
                    out_dir: str) -> dict:
  import contextlib
  from gear_jax import hostalloc, recommender
  hostalloc.configure()
  rec = recommender.Recommender.load(workdir, batch_size=batch)
  hist, missing = rec.select_users(recommender.read_user_ids(users_path))
  assert not missing
  next(rec.iter_batches(hist, k=k, exclude=exclude))  # compiles, off the clock
  out = os.path.join(out_dir, 'recs.csv')
  runs = []
  for _ in range(PASSES):
    with open(os.devnull, 'w') as devnull, contextlib.redirect_stderr(devnull):
      runs.append(recommender.write_recommendations(rec, hist, users_path, k=k,
                                                  exclude=exclude, at=None, output=out))
  summary = min(runs, key=lambda r: r['seconds'])
  return dict(users=summary['users'], rows=summary['rows'],
              seconds=round(summary['seconds'], 3),
              users_per_s=round(summary['users'] / summary['seconds'], 1),
              output_mb=round(os.path.getsize(out) / 2**20, 1))


def run_phase(args, name: str) -> dict:
  """One phase in a child process; its JSON plus its own peak RSS."""
  cmd = [sys.executable, os.path.abspath(__file__), '--phase', name, '--dir', args.dir,
         '--items', str(args.items), '--users', str(args.users), '--k', str(args.k),
         '--batch', str(args.batch), '--eval_batch', str(args.eval_batch),
         '--exclude', args.exclude]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f'phase {name} failed:\n{proc.stderr[-3000:]}')
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result['peak_rss_mb'] = result.pop('rss_mb')
  return result


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--items', type=int, default=99_037)
  p.add_argument('--users', type=int, default=20_000)
  p.add_argument('--k', type=int, default=10)
  p.add_argument('--batch', type=int, default=128, help='recommend: users per step')
  p.add_argument('--eval_batch', type=int, default=256, help='eval.batch_size')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--exclude', default='none', choices=['none', 'seen', 'target'])
  p.add_argument('--dir', default=None, help='where the data and run are kept')
  p.add_argument('--phase', default=None, choices=['eval', 'recommend'],
                 help=argparse.SUPPRESS)
  p.add_argument('--json', action='store_true')
  args = p.parse_args()
  if args.phase:
    import resource
    _, workdir, users_path = build(args.dir, args.items, args.users, args.eval_batch)
    with tempfile.TemporaryDirectory() as out_dir:
      result = (phase_eval(workdir) if args.phase == 'eval' else
                phase_recommend(workdir, users_path, args.k, args.batch, args.exclude,
                                out_dir))
    result['rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))
    return
  keep = args.dir is not None
  args.dir = args.dir or tempfile.mkdtemp(prefix='gear_bench_recommend_')
  start = time.perf_counter()
  build(args.dir, args.items, args.users, args.eval_batch)
  setup_s = time.perf_counter() - start
  rounds = []
  for r in range(args.rounds):
    row = {name: run_phase(args, name) for name in ('eval', 'recommend')}
    rounds.append(row)
    if not args.json:
      e, c = row['eval'], row['recommend']
      print(f'round {r + 1}: eval full {e["users_per_s"]:,.0f} users/s '
            f'({e["users"]:,} cases, RSS {e["peak_rss_mb"]:,.0f} MB) | recommend top '
            f'{args.k} {c["users_per_s"]:,.0f} users/s ({c["users"]:,} users, RSS '
            f'{c["peak_rss_mb"]:,.0f} MB)', flush=True)
  med = {name: statistics.median(r[name]['users_per_s'] for r in rounds)
         for name in ('eval', 'recommend')}
  summary = dict(items=args.items, k=args.k, batch=args.batch, eval_batch=args.eval_batch,
                 exclude=args.exclude,
                 setup_s=round(setup_s, 1), rounds=rounds,
                 eval_full_users_per_s=med['eval'], recommend_users_per_s=med['recommend'],
                 ratio=round(med['recommend'] / med['eval'], 3),
                 recommend_peak_rss_mb=max(r['recommend']['peak_rss_mb'] for r in rounds),
                 eval_peak_rss_mb=max(r['eval']['peak_rss_mb'] for r in rounds),
                 dir=args.dir if keep else None)
  if args.json:
    print(json.dumps(summary))
  else:
    print(f'median: recommend {med["recommend"]:,.0f} users/s vs eval full '
          f'{med["eval"]:,.0f} users/s (ratio {summary["ratio"]:.2f}); peak RSS recommend '
          f'{summary["recommend_peak_rss_mb"]:,.0f} MB, eval '
          f'{summary["eval_peak_rss_mb"]:,.0f} MB')
  if not keep:
    import shutil
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == '__main__':
  main()
