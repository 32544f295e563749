"""Non-learned baselines under exactly the trainer's evaluation protocol (a shortcut
that prints them; `python -m gear_jax.baselines` writes them as run directories).

  python scripts/heuristics.py --config configs/demo.py [--split val] [--json]

  popularity   items ranked by their training frequency
  transition   items ranked by how often they follow the case's previous item in the
               training data (first-order Markov), popularity breaking ties
Sampled protocol (1 + eval.num_negatives candidates, the trainer's cached negatives),
Recall / NDCG at 1, 5, 10, 20, 50 and MRR; the logic is gear_jax/heuristics.py's.
"""

from __future__ import annotations

import argparse
import json

from gear_jax import defaults, heuristics
from gear_jax.data import load_dataset, load_negatives


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='configs/X.py[:variant]')
  parser.add_argument('--split', default='val', choices=['val', 'test'])
  parser.add_argument('--data_path', default='', help='override config.data.path')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  config = defaults.load_config(args.config, {'data.path': args.data_path}
                                if args.data_path else {})
  data, _ = load_dataset(config.data)
  counts = heuristics.fit(data)
  _, pos = data.eval_cases(args.split)
  neg, _, _ = load_negatives(data, args.split, config.eval, config.data, int(config.seed))
  results = {}
  for name in heuristics.NAMES:
    rank = heuristics.sampled_ranks(name, counts, data.items[pos - 1], data.items[pos], neg,
                                   data.num_items + 1)
    m = heuristics.rank_metrics(rank, (1, 5, 10, 20, 50), 'x')
    results[name] = {'MRR': m.pop('x/MRR'), **{k[2:]: v for k, v in m.items()}}
  if args.json:
    print(json.dumps({'split': args.split, 'cases': int(len(pos)), **results}))
    return
  print(f'{config.data.path}: {len(pos):,} {args.split} cases, 1 + {neg.shape[1]} '
        f'candidates ({config.eval.negatives} negatives, seed {config.seed})')
  for name, m in results.items():
    print(f'  {name:<11} NDCG@10 {m["NDCG@10"]:.4f}  Recall@10 {m["Recall@10"]:.4f}  '
          f'MRR {m["MRR"]:.4f}')


if __name__ == '__main__':
  main()
