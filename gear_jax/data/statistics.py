"""Data set statistics after preprocessing (the library behind ``python -m
gear_jax.data.stats``): counts after behavior selection, the min_uc filter and the
split, sequence-length quantiles, and how long preprocessing took."""

from __future__ import annotations

import time

from gear_jax.data import load_dataset, load_negatives, preprocess


def compute(config, *, use_cache: bool = True, with_negatives: bool = False) -> dict:
  """The statistics dict for ``config.data`` (optionally timing negatives too)."""
  if not use_cache:
    config = config.copy_and_resolve_references()
    config.data.cache = False
  start = time.perf_counter()
  data, info = load_dataset(config.data)
  out = preprocess.summary(data)
  out['path'] = config.data.path
  out['split'] = data.split
  out['behaviors'] = list(data.behaviors)
  out['target'] = data.behaviors[data.target - 1]
  out['preprocess_seconds'] = round(info.seconds, 3)
  out['parse_seconds'] = round(info.parse_seconds, 3)
  out['from_cache'] = info.from_cache
  if with_negatives:
    neg, seconds, _ = load_negatives(data, 'val', config.eval, config.data,
                                     int(config.seed))
    out['negatives_seconds'] = round(seconds, 3)
    out['num_negatives'] = int(neg.shape[1])
  out['total_seconds'] = round(time.perf_counter() - start, 3)
  return out


def print_table(s: dict) -> None:
  print(f'{s["path"]}  (split {s["split"]}, target {s["target"]})')
  rows = [('users', s['num_users']), ('items', s['num_items']),
          ('interactions', s['num_interactions']),
          ('training interactions', s['num_train_interactions']),
          ('validation users', s['num_val_users'])]
  if 'num_test_users' in s:
    rows.append(('test users', s['num_test_users']))
  for name, value in rows:
    print(f'  {name:<24}{value:>12,}')
  print('  behaviors')
  total = max(s['num_interactions'], 1)
  for name, count in s['behavior_counts'].items():
    print(f'    {name:<22}{count:>12,}  {100 * count / total:5.1f}%')
  q = s['seq_len']
  print(f'  interactions per user   min {q["min"]}  median {q["median"]:g}  mean '
        f'{q["mean"]:g}  p90 {q["p90"]:g}  p99 {q["p99"]:g}  max {q["max"]}')
  print(f'  density                 {s["density"]:.2e}')
  how = 'loaded from cache' if s['from_cache'] else 'parsed and preprocessed'
  print(f'  {how} in {s["preprocess_seconds"]:.2f}s')
