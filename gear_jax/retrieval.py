"""Scoring hidden states against the item table: candidates, the catalogue's rank of a
target, and the exact top-K over the whole catalogue.

`h_last` [B, d] is a model's `last_state`; the table is the item embedding
(`layers.item_embedding`), which every model ties to its item head. Nothing here
materialises [B, V] except `score_catalogue` and the dense `item_logits` (tests and
small catalogues).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gear_jax.models.layers import item_embedding

Array = jax.Array


def item_logits(params, h_behavior: Array, precision=None,
                num_items: int | None = None) -> Array:
  """Dense item head: [B, L, d] -> [B, L, V+1] (tests and small catalogs only)."""
  return jnp.einsum('bld,vd->blv', h_behavior, item_embedding(params, num_items).astype(
      h_behavior.dtype), precision=precision, preferred_element_type=jnp.float32)



def score_candidates(params, h_last: Array, candidates: Array, precision=None) -> Array:
  """Scores of candidate items at the last position: [B, d], [B, C] -> [B, C] f32."""
  e = jnp.take(item_embedding(params), candidates, axis=0).astype(h_last.dtype)
  return jnp.einsum('bd,bcd->bc', h_last, e, precision=precision,
                    preferred_element_type=jnp.float32)


def _catalogue_chunks(params, chunk: int, dtype, num_items: int | None):
  """The item table padded to a multiple of `chunk` rows: [n_chunks, chunk, d]."""
  e = item_embedding(params, num_items).astype(dtype)
  v1 = e.shape[0]
  n = -(-v1 // chunk)
  e = jnp.pad(e, ((0, n * chunk - v1), (0, 0)))
  return e.reshape(n, chunk, -1), v1


def score_catalogue(params, h_last: Array, chunk: int = 16384, precision=None,
                    num_items: int | None = None) -> Array:
  """Scores of every item id 0..V: [B, d] -> [B, V+1] f32, computed in item chunks
  (the working set is [B, chunk]; the result itself is [B, V+1])."""
  e, v1 = _catalogue_chunks(params, chunk, h_last.dtype, num_items)
  out = jax.lax.map(lambda ec: jnp.einsum('bd,cd->bc', h_last, ec, precision=precision,
                                          preferred_element_type=jnp.float32), e)
  return jnp.moveaxis(out, 0, 1).reshape(h_last.shape[0], -1)[:, :v1]


def rank_in_catalogue(params, h_last: Array, target: Array, chunk: int = 16384,
                      precision=None, num_items: int | None = None) -> Array:
  """0-based rank of `target` among items 1..V (ties count against it): [B] int32.

  Never materialises [B, V]: each item chunk adds its count of better-or-equal
  scores. The padding id 0 and the target itself are excluded; the user's history
  is NOT excluded (buys are often of viewed or carted items)."""
  e, v1 = _catalogue_chunks(params, chunk, h_last.dtype, num_items)
  target_score = score_candidates(params, h_last, target[:, None], precision)[:, 0]

  def count(carry, inputs):
    k, ec = inputs
    s = jnp.einsum('bd,cd->bc', h_last, ec, precision=precision,
                   preferred_element_type=jnp.float32)  # [B, chunk]
    ids = k * chunk + jnp.arange(chunk)
    real = (ids >= 1) & (ids < v1)
    beats = (s >= target_score[:, None]) & real[None] & (ids[None] != target[:, None])
    return carry + beats.sum(axis=1, dtype=jnp.int32), None

  ranks, _ = jax.lax.scan(count, jnp.zeros(h_last.shape[0], jnp.int32),
                          (jnp.arange(e.shape[0]), e))
  return ranks


# The top-K search (`top_k_in_catalogue`) at 99,037 items, batch 256, on CPU: items per
# chunk of the first pass (8,192: ~20 ms a batch, as fast as counting a rank over the
# catalogue; 16,384 and 32,768 were 5-30 % slower) and per group (16: more groups to
# rank; 64: more candidates to score again).
TOP_K_CHUNK = 8192
TOP_K_GROUP = 32


def top_k_in_catalogue(params, h_last: Array, k: int, chunk: int = TOP_K_CHUNK,
                       precision=None, num_items: int | None = None,
                       exclude: Array | None = None, group: int = TOP_K_GROUP
                       ) -> tuple[Array, Array]:
  """The `k` best items 1..V for each row: ([B, k] f32 scores, [B, k] int32 ids),
  scores descending, ties broken by the lower item id; exact over the whole catalogue
  (no approximate search).

  Never materialises [B, V]. Two passes over the item table:
  1. in item chunks, the [B, chunk] scores are reduced to the maximum of each group of
     `group` consecutive ids ([B, V / group] in all);
  2. the k groups with the highest maxima hold the k best items (an item in the top k
     has fewer than k better items, so fewer than k groups have a better maximum; equal
     maxima go to the lower group, which holds the lower ids). Their k * group items
     are scored again and the top k of those is the answer.
  A `lax.top_k` merge over whole chunks gives the same result 1.5-2x slower on CPU. The
  second pass computes each dot product again in another kernel layout, so a returned
  score may differ from `score_catalogue`'s in its last bit (< 1e-6 relative), and
  two items whose scores agree to that precision may come out in either order.

  `exclude` ([B, H] item ids, 0 = none) removes items per row (e.g. the user's
  history). Rows with fewer than k allowed items are filled with id 0 and score -inf.
  `k` must be <= V."""
  chunk = -(-chunk // group) * group
  e, v1 = _catalogue_chunks(params, chunk, h_last.dtype, num_items)  # [n, chunk, d]
  b = h_last.shape[0]
  rows = jnp.arange(b)[:, None]
  per_chunk = chunk // group

  def group_max(inputs):  # pass 1, one chunk: [B, chunk / group]
    c, ec = inputs
    s = jnp.einsum('bd,cd->bc', h_last, ec, precision=precision,
                   preferred_element_type=jnp.float32)  # [B, chunk]
    ids = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    allowed = jnp.broadcast_to((ids >= 1) & (ids < v1), s.shape)
    if exclude is not None:
      pos = exclude - c * chunk  # [B, H]; out of this chunk -> dropped
      pos = jnp.where((exclude > 0) & (pos >= 0) & (pos < chunk), pos, chunk)
      allowed = allowed.at[rows, pos].set(False, mode='drop')
    return jnp.where(allowed, s, -jnp.inf).reshape(b, per_chunk, group).max(axis=2)

  maxima = jax.lax.map(group_max, (jnp.arange(e.shape[0]), e))  # [n, B, chunk / group]
  maxima = jnp.moveaxis(maxima, 0, 1).reshape(b, -1)  # [B, groups]
  _, best = jax.lax.top_k(maxima, min(k, maxima.shape[1]))
  best = jnp.sort(best, axis=1)  # ascending ids: top_k's tie rule keeps the lower id
  ids = (best[:, :, None] * group + jnp.arange(group, dtype=jnp.int32)).reshape(b, -1)
  table = item_embedding(params, num_items)
  cand = jnp.take(table, jnp.minimum(ids, v1 - 1), axis=0).astype(h_last.dtype)
  s = jnp.einsum('bd,bcd->bc', h_last, cand, precision=precision,
                 preferred_element_type=jnp.float32)  # [B, k * group]
  allowed = (ids >= 1) & (ids < v1)
  if exclude is not None:  # where each excluded id sits among the candidates, if at all
    match = ((exclude // group)[:, :, None] == best[:, None, :]) & (exclude > 0)[:, :, None]
    pos = jnp.argmax(match, axis=2) * group + exclude % group  # [B, H]
    pos = jnp.where(match.any(axis=2), pos, ids.shape[1])  # not a candidate -> dropped
    allowed = allowed.at[rows, pos].set(False, mode='drop')
  top_s, where = jax.lax.top_k(jnp.where(allowed, s, -jnp.inf), k)
  top_i = jnp.take_along_axis(ids, where, axis=1)
  return top_s, jnp.where(jnp.isfinite(top_s), top_i, 0)

