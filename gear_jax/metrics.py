"""Ranking metrics: Recall@K, NDCG@K and MRR from the rank of the held-out item.

There is one relevant item per case, so with its 0-based rank r (the number of other
candidates scoring at least as high: ties count against it):
  Recall@K = [r < K],  NDCG@K = [r < K] / log2(r + 2)  (the ideal DCG is 1),
  MRR = 1 / (r + 1).
Sums are accumulated on device per batch (padding rows masked out) and divided by the
number of real cases at the end: an exact average over users, unlike the reference,
which averages per batch and then over batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def rank_of_first(scores: Array) -> Array:
  """[B, C] scores with the positive in column 0 -> [B] int32 0-based rank."""
  return jnp.sum(scores[:, 1:] >= scores[:, :1], axis=1, dtype=jnp.int32)


def rank_sums(rank: Array, mask: Array, ks: Sequence[int]) -> dict[str, Array]:
  """Per-batch metric sums over the rows where `mask` is True (float32 scalars)."""
  m = mask.astype(jnp.float32)
  r = rank.astype(jnp.float32)
  out = {'count': m.sum(), 'MRR': (m / (r + 1.0)).sum()}
  gain = m / jnp.log2(r + 2.0)
  for k in ks:
    hit = rank < k
    out[f'Recall@{k}'] = jnp.where(hit, m, 0.0).sum()
    out[f'NDCG@{k}'] = jnp.where(hit, gain, 0.0).sum()
  return out


def finalize(sums: dict[str, Array | float], prefix: str) -> dict[str, float]:
  """Averages over cases: {'<prefix>/Recall@10': ..., ...} (float64 on the host)."""
  sums = {k: float(np.asarray(v, np.float64)) for k, v in sums.items()}
  count = sums.pop('count')
  if count == 0:
    return {}
  return {f'{prefix}/{k}': v / count for k, v in sorted(sums.items(), key=_order)}


def _order(item):
  name = item[0]
  if '@' in name:
    metric, k = name.split('@')
    return (0 if metric == 'Recall' else 1, int(k))
  return (2, 0)
