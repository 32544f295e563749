"""Data-path benchmark: preprocessing (parse + split + negatives) and pipeline throughput.

  python scripts/bench_data.py [--path FILE] [--json]

Without --path it generates the synthetic 'bench' preset (70,000 users, ~2.3 M
interactions) once into a temporary folder, in a child process, so the peak memory
reported is the data path's own. Measured, in this one process:
  parse + split        read + GEAR preprocessing of the raw file, no cache
  negatives            99 uniform negatives per validation user (users/s)
  cached load          the same data set from the on-disk cache
  train pipeline       one epoch of grain training batches (128 x 50), sequences/s
  eval pipeline        one pass of grain evaluation batches with 1 + 99 candidates, users/s
  baseline             the same sample construction written per sample in Python (a
                       loop over users, the L x L time matrix built per sample, as the
                       reference implementation does), timed on a subset, side by side
The reference implementation's own figures on such a file (measured on a 2-core CPU)
are printed beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REFERENCE = {'parse_split_s': 13.0, 'negatives_users_per_s': 2500.0,
             'train_seq_per_s': 2800.0, 'eval_users_per_s': 256.0}


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def baseline_train_samples(data, users, max_len: int, rng) -> int:
  """Per-sample Python construction (the reference's way), for comparison."""
  for u in users:
    lo, n = int(data.offsets[u]), int(data.train_len[u])
    seq = list(range(lo, lo + n))
    if n > max_len:
      s = rng.integers(0, n - max_len + 1) if rng.random() < 0.2 else n - max_len
      seq = seq[s:s + max_len]
    pad = max_len - len(seq)
    items = [0] * pad + [int(data.items[p]) for p in seq]
    behs = [0] * pad + [int(data.behavior[p]) for p in seq]
    gaps = [0] * pad + [int(data.gaps[p]) for p in seq]
    cum = np.cumsum(gaps)
    t = np.zeros((max_len, max_len), np.float32)
    for i in range(max_len):
      for j in range(i):
        t[i, j] = cum[i] - cum[j]
    del items, behs, t
  return len(users)


def baseline_negatives(data, users, num: int, seed: int) -> int:
  """Per-user Python rejection sampling with a set (the straightforward way)."""
  rng = np.random.default_rng(seed)
  for u in users:
    lo, hi = int(data.offsets[u]), int(data.offsets[u + 1])
    seen = set(data.items[lo:hi].tolist())
    out = []
    while len(out) < num:
      c = int(rng.integers(1, data.num_items + 1))
      if c not in seen:
        seen.add(c)
        out.append(c)
  return len(users)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--path', default='', help='raw file (default: synthetic bench)')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--max_len', type=int, default=50)
  parser.add_argument('--eval_batch', type=int, default=1024)
  parser.add_argument('--baseline_users', type=int, default=2000)
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()

  tmp = tempfile.mkdtemp(prefix='gear_bench_')
  path = args.path
  if not path:
    path = os.path.join(tmp, 'bench.txt')
    t = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'gear_jax.data.synthetic', '--out', path,
                    '--preset', 'bench'], check=True, capture_output=True)
    print(f'generated the synthetic bench file in {time.perf_counter() - t:.1f}s '
          f'(child process)', file=sys.stderr)

  from gear_jax.data import negatives, pipeline, preprocess, readers
  rss_start = peak_rss_mb()
  settings = preprocess.Settings()
  cache = os.path.join(tmp, 'cache')
  t = time.perf_counter()
  data, info = preprocess.load(path, readers.TSV, settings, cache_dir=cache)
  parse_split = time.perf_counter() - t
  t = time.perf_counter()
  neg = negatives.sample(data, data.val_user, mode='random', num=99, seed=42)
  neg_s = time.perf_counter() - t
  t = time.perf_counter()
  preprocess.load(path, readers.TSV, settings, cache_dir=cache)
  cached_s = time.perf_counter() - t

  tb = pipeline.TrainBatches(data, args.batch, args.max_len, seed=42)
  it = iter(pipeline.train_pipeline(tb))
  next(it)
  t = time.perf_counter()
  seqs = 0
  for _ in range(tb.batches_per_epoch):
    seqs += int(next(it)['mask'].sum())
  train_rate = seqs / (time.perf_counter() - t)
  eb = pipeline.EvalBatches(data, 'val', args.eval_batch, args.max_len, neg)
  t = time.perf_counter()
  users = sum(int(b['mask'].sum()) for b in pipeline.eval_pipeline(eb))
  eval_rate = users / (time.perf_counter() - t)
  peak = peak_rss_mb()

  rng = np.random.default_rng(0)
  sub = rng.choice(tb.users, size=min(args.baseline_users, len(tb.users)), replace=False)
  t = time.perf_counter()
  base_train = baseline_train_samples(data, sub, args.max_len, rng) / (
      time.perf_counter() - t)
  sub_val = data.val_user[:min(args.baseline_users, len(data.val_user))]
  t = time.perf_counter()
  base_neg = baseline_negatives(data, sub_val, 99, 0) / (time.perf_counter() - t)

  result = dict(
      file=path, users=data.num_users, items=data.num_items,
      interactions=data.num_interactions, val_users=int(len(data.val_user)),
      parse_split_s=round(parse_split, 3), parse_s=round(info.parse_seconds, 3),
      negatives_s=round(neg_s, 3),
      negatives_users_per_s=round(len(data.val_user) / neg_s, 1),
      preprocess_total_s=round(parse_split + neg_s, 3), cached_load_s=round(cached_s, 3),
      train_seq_per_s=round(train_rate, 1), eval_users_per_s=round(eval_rate, 1),
      peak_rss_mb=round(peak, 1), rss_before_mb=round(rss_start, 1),
      baseline_train_seq_per_s=round(base_train, 1),
      baseline_negatives_users_per_s=round(base_neg, 1), reference=REFERENCE)
  shutil.rmtree(tmp, ignore_errors=True)
  if args.json:
    print(json.dumps(result))
    return
  ref = REFERENCE
  ref_total = ref['parse_split_s'] + len(data.val_user) / ref['negatives_users_per_s']
  print(f'{path}: {data.num_users:,} users, {data.num_items:,} items, '
        f'{data.num_interactions:,} interactions, {len(data.val_user):,} validation users')
  rows = [
      ('parse + split (s)', parse_split, ref['parse_split_s'], None),
      ('negatives (users/s)', result['negatives_users_per_s'],
       ref['negatives_users_per_s'], base_neg),
      ('parse + split + negatives (s)', parse_split + neg_s, ref_total, None),
      ('cached load (s)', cached_s, None, None),
      ('train pipeline (seq/s)', train_rate, ref['train_seq_per_s'], base_train),
      ('eval pipeline, 100 cand. (users/s)', eval_rate, ref['eval_users_per_s'], None),
      ('peak RSS (MB)', peak, None, None)]
  print(f'{"":36}{"gear_jax":>14}{"reference*":>14}{"py baseline":>14}')
  for name, ours, theirs, base in rows:
    fmt = (lambda v: '' if v is None else f'{v:,.1f}' if v < 100 else f'{v:,.0f}')
    print(f'{name:36}{fmt(ours):>14}{fmt(theirs):>14}{fmt(base):>14}')
  print('* the reference implementation measured on a file of this size on a 2-core '
        'CPU; "py baseline": per-sample Python construction timed here on '
        f'{len(sub):,} users')


if __name__ == '__main__':
  main()
