"""Evaluation negatives: per held-out case, items the user never touched.

- ``random`` (the reference): ``num`` distinct items drawn uniformly from the items the
  user never touched (in any split), seeded, generated once and cached.
- ``popularity``: ``num`` distinct items drawn with probability proportional to their
  training frequency (successive sampling without replacement), from the items the user
  never touched that occur in training.

Sampling is vectorised rejection: each row draws a block of candidates at once and keeps
the first ``num`` that are untouched and not repeated, in draw order. By exchangeability
that is exactly a uniform (or successive-weighted) sample without replacement. Rows
that fall short draw again with a bigger block; a pathological row falls back to an
exact Gumbel-top-k over the whole catalogue.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from gear_jax.data import preprocess
from gear_jax.data.errors import DataError

MODES = ('random', 'popularity')
_CELLS_PER_CHUNK = 1 << 22  # candidate-matrix cells drawn at once (bounds memory)
_MAX_BLOCK = 1 << 14
_TABLE_CELLS = 1 << 26  # bytes of the per-chunk history table


def sample(data: preprocess.GearData, users: np.ndarray, *, mode: str = 'random',
           num: int = 99, seed: int | np.random.SeedSequence = 0) -> np.ndarray:
  """[len(users), num] int32 negatives for the given user rows.

  Phases: each row's history (its range of `touched_keys`) and the item weights of
  `mode`; the first block width of each row (`_first_blocks`, which also rejects rows
  with too small a pool); rounds of rejection sampling over chunks of rows of similar
  width (`_draw_chunk`), after which the rows that fell short double their block, or
  at `_MAX_BLOCK` take the exact `_gumbel_top_k`."""
  if mode not in MODES:
    raise DataError(f'unknown negatives mode {mode!r}; use one of {MODES}',
                    field='eval.negatives')
  users = np.asarray(users, np.int64)
  v1 = data.num_items + 1
  keys = data.touched_keys()
  key_start = np.searchsorted(keys, users * v1)
  n_touched = np.searchsorted(keys, (users + 1) * v1) - key_start
  if mode == 'random':
    weights = np.ones(v1)
    weights[0] = 0.0
    population = None
  else:
    population = data.train_items()
    weights = np.bincount(population, minlength=v1).astype(np.float64)
  block = _first_blocks(data, users, keys, key_start, n_touched, weights, v1, mode, num)
  rng = np.random.default_rng(seed)
  out = np.zeros((len(users), num), np.int32)
  # membership of candidates in a user's history: a boolean table of a few rows of the
  # catalogue, set and reset per chunk (O(history) per row, no search)
  table_rows = int(max(1, min(len(users), _TABLE_CELLS // v1)))
  table = np.zeros((table_rows, v1), bool)
  pending = np.arange(len(users))
  while len(pending):
    pending = pending[np.argsort(block[pending], kind='stable')]  # similar widths
    failed = []
    i = 0
    while i < len(pending):
      width = int(block[pending[i]])
      j = min(len(pending), i + table_rows, i + max(1, _CELLS_PER_CHUNK // width))
      rows = pending[i:j]
      ok, chosen = _draw_chunk(rng, rows, int(block[rows].max()), table, keys,
                               key_start, n_touched, population, num)
      out[rows[ok]] = chosen
      failed.append(rows[~ok])
      i = j
    pending = np.concatenate(failed)
    if len(pending):
      hopeless = pending[block[pending] >= _MAX_BLOCK]
      for r in hopeless:
        out[r] = _gumbel_top_k(rng, weights, keys, int(users[r]), v1, num)
      pending = pending[block[pending] < _MAX_BLOCK]
      block[pending] = np.minimum(block[pending] * 2, _MAX_BLOCK)
  return out


def _first_blocks(data: preprocess.GearData, users: np.ndarray, keys: np.ndarray,
                  key_start: np.ndarray, n_touched: np.ndarray, weights: np.ndarray,
                  v1: int, mode: str, num: int) -> np.ndarray:
  """The first number of draws of each row ([len(users)] int64), from an exact count
  of its drawable pool (untouched items with weight > 0); a row whose pool holds fewer
  than `num` items is a `DataError`."""
  total = weights.sum()
  pool_items = np.count_nonzero(weights)
  touched_items = keys[_ranges(key_start, n_touched)] % v1
  touched_w = np.zeros(len(users))
  np.add.at(touched_w, np.repeat(np.arange(len(users)), n_touched),
            weights[touched_items])
  touched_pool = np.zeros(len(users), np.int64)
  np.add.at(touched_pool, np.repeat(np.arange(len(users)), n_touched),
            weights[touched_items] > 0)
  pool = pool_items - touched_pool
  short = np.flatnonzero(pool < num)
  if len(short):
    u = int(users[short[0]])
    raise DataError(
        f'user {data.user_ids[u]!r} has only {int(pool[short[0]])} items left to draw '
        f'{num} {mode} negatives from', field='eval.num_negatives',
        hint='lower eval.num_negatives, or use eval.protocol=full')
  valid_mass = np.maximum(1.0 - touched_w / total, 1e-12)
  # draws needed for `num` distinct valid items, with a margin; doubled on failure
  block = np.ceil(num / valid_mass * 1.25 + 16 + num * num / np.maximum(pool, 1))
  return np.minimum(block, _MAX_BLOCK).astype(np.int64)


def _draw_chunk(rng: np.random.Generator, rows: np.ndarray, width: int,
                table: np.ndarray, keys: np.ndarray, key_start: np.ndarray,
                n_touched: np.ndarray, population: np.ndarray | None, num: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Draws `width` candidates for each of `rows`; returns `_first_valid`'s (ok mask,
  first `num` valid draws of the ok rows). The rows' histories are marked in `table`
  while the candidates are looked up, and unmarked again (it is all False after)."""
  v1 = table.shape[1]
  local = np.repeat(np.arange(len(rows)), n_touched[rows])
  hist = keys[_ranges(key_start[rows], n_touched[rows])] % v1
  table[local, hist] = True
  if population is None:
    cand = rng.integers(1, v1, size=(len(rows), width))
  else:  # a uniform training interaction's item: P(item) = its training share
    cand = population[rng.integers(0, len(population), size=(len(rows), width))]
  touched = table[np.arange(len(rows))[:, None], cand]
  table[local, hist] = False
  return _first_valid(cand, touched, num)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Concatenation of arange(s, s + n) for each (s, n), vectorised."""
  total = int(lengths.sum())
  if total == 0:
    return np.zeros(0, np.int64)
  offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
  return np.repeat(starts, lengths) + np.arange(total) - offsets


def _first_valid(cand, touched, num):
  """For each row: whether it has `num` valid draws, and the first `num` of them.

  Valid = not in the user's history and not an earlier draw of the same row."""
  order = np.argsort(cand, axis=1, kind='stable')
  srt = np.take_along_axis(cand, order, axis=1)
  dup_sorted = np.zeros(cand.shape, bool)
  dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
  dup = np.empty_like(dup_sorted)
  np.put_along_axis(dup, order, dup_sorted, axis=1)
  valid = ~touched & ~dup
  count = np.cumsum(valid, axis=1, dtype=np.int32)
  ok = count[:, -1] >= num
  take = valid[ok] & (count[ok] <= num)
  return ok, cand[ok][take].reshape(-1, num).astype(np.int32)


def _gumbel_top_k(rng, weights, keys, user, v1, num):
  """Exact weighted sampling without replacement for one row (slow path)."""
  logits = np.log(np.where(weights > 0, weights, 1.0)) + rng.gumbel(size=v1)
  logits[weights <= 0] = -np.inf
  lo, hi = np.searchsorted(keys, [user * v1, (user + 1) * v1])
  logits[keys[lo:hi] % v1] = -np.inf
  return np.argsort(-logits, kind='stable')[:num].astype(np.int32)


def load_or_sample(data: preprocess.GearData, split: str, *, mode: str, num: int,
                   seed: int, cache_dir: str | None = None
                   ) -> tuple[np.ndarray, float, bool]:
  """Negatives for the held-out cases of `split`, cached beside the data set.

  Returns (negatives [cases, num] int32, seconds, from_cache)."""
  start = time.perf_counter()
  users, _ = data.eval_cases(split)
  tag = hashlib.blake2b(f'{data.key}|{split}|{mode}|{num}|{seed}'.encode(),
                        digest_size=10).hexdigest()
  path = ''
  if cache_dir != '' and data.key:
    path = os.path.join(cache_dir or preprocess.default_cache_dir(), f'neg-{tag}.npz')
    arrays = preprocess.load_npz(path)
    if arrays is not None:
      neg = arrays.get('negatives')
      if (neg is not None and str(arrays.get('tag')) == tag
          and neg.shape == (len(users), num) and neg.dtype == np.int32
          and (neg.size == 0 or (neg.min() >= 1 and neg.max() <= data.num_items))):
        return neg, time.perf_counter() - start, True
  # each split draws from its own stream, so val and test negatives are independent
  split_seed = [seed, 0 if split == 'val' else 1]
  neg = sample(data, users, mode=mode, num=num, seed=np.random.SeedSequence(split_seed))
  if path:
    preprocess.atomic_save_npz(path, dict(negatives=neg, tag=np.array(tag)))
  return neg, time.perf_counter() - start, False
