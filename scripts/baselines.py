"""Non-learned baselines under exactly the trainer's evaluation protocol.

  python scripts/baselines.py --config configs/demo.py [--split val] [--json]

Scores the same held-out cases with the same negatives (same cache) as
`gear_jax.train`, so the numbers are directly comparable with a run's val/ metrics:
  popularity   items ranked by their training frequency
  transition   items ranked by how often they follow the case's previous item in the
               training data (first-order Markov), popularity breaking ties
A sequence model that does not beat these has learned nothing about sequences.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np

from gear_jax.data import load_dataset, load_negatives


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def rank_metrics(scores: np.ndarray, ks=(1, 5, 10, 20, 50)) -> dict[str, float]:
  """scores [n, C] with the positive first; ties count against it (as the trainer)."""
  rank = (scores[:, 1:] >= scores[:, :1]).sum(axis=1)
  out = {'MRR': float(np.mean(1.0 / (rank + 1)))}
  for k in ks:
    hit = rank < k
    out[f'Recall@{k}'] = float(hit.mean())
    out[f'NDCG@{k}'] = float(np.mean(np.where(hit, 1.0 / np.log2(rank + 2), 0.0)))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--split', default='val', choices=['val', 'test'])
  parser.add_argument('--data_path', default='', help='override config.data.path')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  config = load_config(args.config)
  if args.data_path:
    config.data.path = args.data_path
  data, _ = load_dataset(config.data)
  users, pos = data.eval_cases(args.split)
  neg, _, _ = load_negatives(data, args.split, config.eval, config.data, int(config.seed))
  cand = np.concatenate([data.items[pos][:, None], neg], axis=1)  # [n, 1 + num]
  v1 = data.num_items + 1
  train_items = data.train_items()
  popularity = np.bincount(train_items, minlength=v1).astype(np.float64)
  # first-order transitions inside each user's training interactions
  flat = data.train_positions()
  prev_ok = flat > np.repeat(data.offsets[:-1], data.train_len)  # not a user's first
  src, dst = data.items[flat[prev_ok] - 1], data.items[flat[prev_ok]]
  pair = np.bincount(src.astype(np.int64) * v1 + dst, minlength=v1 * v1) \
      if v1 * v1 <= 50_000_000 else None
  prev_item = data.items[pos - 1]  # the interaction just before the held-out one
  results = {'popularity': rank_metrics(popularity[cand])}
  if pair is not None:
    trans = pair[prev_item[:, None].astype(np.int64) * v1 + cand]
    results['transition'] = rank_metrics(trans + popularity[cand] / (popularity.max() + 1))
  if args.json:
    print(json.dumps({'split': args.split, 'cases': int(len(users)), **results}))
    return
  print(f'{config.data.path}: {len(users):,} {args.split} cases, 1 + {neg.shape[1]} '
        f'candidates ({config.eval.negatives} negatives, seed {config.seed})')
  for name, m in results.items():
    print(f'  {name:<11} NDCG@10 {m["NDCG@10"]:.4f}  Recall@10 {m["Recall@10"]:.4f}  '
          f'MRR {m["MRR"]:.4f}')


if __name__ == '__main__':
  main()
