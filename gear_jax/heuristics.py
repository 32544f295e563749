"""Non-learned baselines scored by the trainer's exact protocol (the library behind
``python -m gear_jax.baselines``, which describes them):
  popularity   items ranked by their count in the training interactions
  transition   items ranked by how often they follow the case's previous interaction's
               item in the training data, popularity breaking ties

The full-catalogue protocol ranks the held-out item among all items 1..V (ties count
against it), in blocks of cases, with the transition counts kept sparse (sorted pair
keys), so any catalog size works.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from gear_jax import defaults, rundir
from gear_jax.data import load_dataset, load_negatives

NAMES = ('popularity', 'transition')
# cases x items scored at once in the full protocol: 4 M cells, about 100 MB of int64 keys,
# float64 counts and scores
_BLOCK_CELLS = 1 << 22


@dataclasses.dataclass
class Counts:
  """What the baselines learn from the training interactions."""
  popularity: np.ndarray  # [V + 1] float64 counts
  pair_keys: np.ndarray  # sorted unique src * (V + 1) + dst of consecutive training items
  pair_counts: np.ndarray  # float64, aligned with pair_keys

  @property
  def tie_break(self) -> np.ndarray:
    """Popularity scaled into [0, 1): added to transition counts, it orders equal
    counts by popularity without ever outweighing one transition."""
    return self.popularity / (self.popularity.max() + 1)


def fit(data) -> Counts:
  v1 = data.num_items + 1
  popularity = np.bincount(data.train_items(), minlength=v1).astype(np.float64)
  flat = data.train_positions()
  prev_ok = flat > np.repeat(data.offsets[:-1], data.train_len)  # not a user's first
  keys = (data.items[flat[prev_ok] - 1].astype(np.int64) * v1
          + data.items[flat[prev_ok]])
  pair_keys, pair_counts = np.unique(keys, return_counts=True)
  return Counts(popularity, pair_keys, pair_counts.astype(np.float64))


def transition_counts(counts: Counts, prev: np.ndarray, cand: np.ndarray,
                      v1: int) -> np.ndarray:
  """How often each candidate followed the case's previous item: [n, C] float64."""
  keys = prev[:, None].astype(np.int64) * v1 + cand
  at = np.minimum(np.searchsorted(counts.pair_keys, keys), len(counts.pair_keys) - 1)
  found = counts.pair_keys[at] == keys
  return np.where(found, counts.pair_counts[at], 0.0)


def candidate_scores(name: str, counts: Counts, prev: np.ndarray, cand: np.ndarray,
                     v1: int) -> np.ndarray:
  if name == 'popularity':
    return counts.popularity[cand]
  return transition_counts(counts, prev, cand, v1) + counts.tie_break[cand]


def rank_metrics(rank: np.ndarray, ks, prefix: str) -> dict[str, float]:
  """The trainer's metrics (`gear_jax.metrics`) from 0-based ranks, in its key order."""
  out = {}
  for k in ks:
    out[f'{prefix}/Recall@{k}'] = float(np.mean(rank < k))
  for k in ks:
    out[f'{prefix}/NDCG@{k}'] = float(np.mean(np.where(rank < k, 1.0 / np.log2(rank + 2),
                                                        0.0)))
  out[f'{prefix}/MRR'] = float(np.mean(1.0 / (rank + 1)))
  return out


def sampled_ranks(name: str, counts: Counts, prev, target, negatives, v1) -> np.ndarray:
  cand = np.concatenate([target[:, None], negatives], axis=1)  # positive first
  scores = candidate_scores(name, counts, prev, cand, v1)
  return (scores[:, 1:] >= scores[:, :1]).sum(axis=1)


def full_ranks(name: str, counts: Counts, prev, target, v1) -> np.ndarray:
  """Rank among items 1..V, the target itself excluded, ties against it."""
  items = np.arange(1, v1)
  if name == 'popularity':
    pop = np.sort(counts.popularity[1:])
    t = counts.popularity[target]
    return len(pop) - np.searchsorted(pop, t, side='left') - 1
  block = max(1, _BLOCK_CELLS // max(v1, 1))
  ranks = []
  for lo in range(0, len(target), block):
    p, t = prev[lo:lo + block], target[lo:lo + block]
    scores = candidate_scores(name, counts, p, np.broadcast_to(items, (len(p), v1 - 1)),
                              v1)
    own = candidate_scores(name, counts, p, t[:, None], v1)
    ranks.append((scores >= own).sum(axis=1) - 1)
  return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def evaluate(config, data=None) -> dict[str, dict[str, dict[str, float]]]:
  """{baseline: {'val': metrics, 'test': metrics (val_test only)}} with the trainer's
  metric names: the configured protocol as val/..., the other as val_full/... or
  val_sampled/... when eval.other_protocol."""
  if data is None:
    data, _ = load_dataset(config.data)
  counts = fit(data)
  v1 = data.num_items + 1
  ks = tuple(int(k) for k in config.eval.ks)
  main = config.eval.protocol
  protocols = [main] + ([p for p in ('sampled', 'full') if p != main]
                        if config.eval.other_protocol else [])
  splits = ['val'] + (['test'] if data.split == 'val_test' else [])
  out = {name: {} for name in NAMES}
  for split in splits:
    _, pos = data.eval_cases(split)
    target, prev = data.items[pos], data.items[pos - 1]
    negatives = None
    if 'sampled' in protocols:
      negatives, _, _ = load_negatives(data, split, config.eval, config.data,
                                       int(config.seed))
    for name in NAMES:
      metrics = {}
      for protocol in protocols:
        prefix = split if protocol == main else f'{split}_{protocol}'
        rank = (sampled_ranks(name, counts, prev, target, negatives, v1)
                if protocol == 'sampled' else full_ranks(name, counts, prev, target, v1))
        metrics.update(rank_metrics(rank, ks, prefix))
      out[name][split] = metrics
  return out


def write_runs(config, workdir: str) -> dict[str, str]:
  """Evaluates both baselines and writes their run directories; returns their paths."""
  defaults.validate_config(config)
  t0 = time.perf_counter()
  data, _ = load_dataset(config.data)
  results = evaluate(config, data)
  seconds = time.perf_counter() - t0
  paths = {}
  monitor = config.eval.monitor
  for name, result in results.items():
    run_dir = os.path.join(workdir, name)
    c = defaults.get_default_config()
    c.update_from_flattened_dict(defaults.flat_config(config) | {'model.name': name})
    val = result['val']
    row = {'epoch': 0, 'step': 0, **val, 'train_s': 0.0, 'eval_s': round(seconds, 3)}
    summary = {'best_epoch': 0, 'best_step': 0, 'monitor': monitor,
               'best': val.get(monitor), 'best_val': val, 'epochs_run': 0,
               'early_stopped': False, 'num_params': 0, 'learned': False}
    if 'test' in result:
      summary['test'] = result['test']
    rundir.write_static_run(run_dir, c.to_dict(), row, summary)
    paths[name] = run_dir
  return paths
