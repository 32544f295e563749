"""Softmax cross-entropy losses for GEAR's tied heads.

The item head scores every position against the whole item table: logits = h @ E.T is
[N, V] with N = batch * length and V up to ~875k items, i.e. several GB in float32. The
functions here compute the same loss and gradients without ever materialising [N, V]:

* `dense_linear_cross_entropy`: the reference (plain jnp + autodiff), materialises [N, V].
* `chunked_linear_cross_entropy`: scans over token chunks; the forward pass already forms
  the gradients (the softmax part in the loop, the one-hot part once outside it) and saves
  only dh [N, d] and dE [V, d], so the backward pass is a scalar multiply. Fastest; memory
  O(token_chunk * V + V * d).
* `vocab_chunked_linear_cross_entropy`: scans over vocabulary chunks with an online
  log-sum-exp and saves only lse [N]; the backward pass recomputes each chunk's logits.
  Memory O(N * vocab_chunk); for catalogs where even a few rows of [V] logits are too big.
* `linear_cross_entropy`: front door that picks one of them from a memory budget
  (`plan_chunks`).

Conventions shared by all of them:
* hidden [..., d], labels [...] int in [0, V), weights [...] (or None = all ones); leading
  dimensions are flattened.
* Label 0 is the padding item: such positions are ignored (their weight is forced to 0),
  but column 0 stays in the softmax (the reference scores all V = num_items + 1 rows).
* They return the float32 SUM over positions of weight * CE; the caller divides by the
  number of non-padded positions.
* Gradients flow to hidden, embedding and weights (d sum / d w_n = CE_n, exact and free);
  labels are integers. The chunked versions are `jax.custom_vjp`: reverse mode only (grad,
  value_and_grad, vjp), no jvp/linearize.
* `precision` goes to every matmul (None = platform default, which is TF32 on recent NVIDIA
  GPUs; pass `jax.lax.Precision.HIGHEST` for parity). `compute_dtype` (e.g. jnp.bfloat16)
  is used for the matmul operands only: log-sum-exp, softmax, loss and accumulated gradients
  stay float32 and gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gear_jax import defaults
from gear_jax.models.layers import item_embedding

PrecisionLike = Any  # None | str | jax.lax.Precision | tuple of two of them
DTypeLike = Any

# Bytes per logit element held live inside one chunk: float32 logits, probabilities and
# one more temporary (XLA does not always fuse the exp into the consumer).
_BYTES_PER_LOGIT = 4 * 3
_MIN_TOKEN_CHUNK = 8
_MAX_TOKEN_CHUNK = 4096
# On CPU, chunks beyond ~512 rows got slower again (V = 4k: 256-640 rows ~38 ms per
# loss + grads for N = 6400, 3200 rows 55 ms): smaller chunks stay in cache longer.
_MAX_TOKEN_CHUNK_CPU = 512
# Below this many rows per chunk the token scan spends its time re-reading/writing the
# [V, d] gradient accumulator instead of computing; vocabulary chunks are better then.
_MIN_USEFUL_TOKEN_CHUNK = 64
_MIN_VOCAB_CHUNK = 128


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _dot(a: jnp.ndarray, b: jnp.ndarray, contract: tuple[int, int], precision) -> jnp.ndarray:
  """2-D matmul contracting a's axis contract[0] with b's axis contract[1], f32 result."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _logits(h: jnp.ndarray, e: jnp.ndarray, precision) -> jnp.ndarray:
  """h [M, d] @ e[K, d].T -> [M, K] float32."""
  return _dot(h, e, (1, 1), precision)


def _canon_dtype(compute_dtype: DTypeLike | None) -> np.dtype | None:
  # A numpy dtype is hashable, so it can be a static (nondiff) argument of custom_vjp.
  return None if compute_dtype is None else np.dtype(compute_dtype)


def _cast(x: jnp.ndarray, compute_dtype: np.dtype | None) -> jnp.ndarray:
  return x if compute_dtype is None else x.astype(compute_dtype)


def _flatten(
  hidden: jnp.ndarray, embedding: jnp.ndarray, labels: jnp.ndarray, weights: jnp.ndarray | None
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Flattens leading dims and folds the label-0 mask into float32 weights."""
  d = hidden.shape[-1]
  if embedding.ndim != 2 or embedding.shape[1] != d:
    raise ValueError(f"embedding must be [V, {d}] to match hidden [..., {d}]; got {embedding.shape}")
  if labels.shape != hidden.shape[:-1]:
    raise ValueError(f"labels {labels.shape} must equal hidden's leading dims {hidden.shape[:-1]}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers, got {labels.dtype}")
  if weights is not None and weights.shape != labels.shape:
    raise ValueError(f"weights {weights.shape} must match labels {labels.shape}")
  h = hidden.reshape(-1, d)
  y = labels.reshape(-1).astype(jnp.int32)
  w = jnp.ones(y.shape, jnp.float32) if weights is None else weights.reshape(-1).astype(jnp.float32)
  # Padding positions are ignored whatever weight the caller passed.
  w = jnp.where(y != 0, w, 0.0)
  return h, y, w


# --------------------------------------------------------------------------------------
# 1. Dense reference
# --------------------------------------------------------------------------------------


def dense_linear_cross_entropy(
  hidden: jnp.ndarray,
  embedding: jnp.ndarray,
  labels: jnp.ndarray,
  weights: jnp.ndarray | None = None,
  *,
  precision: PrecisionLike = None,
  compute_dtype: DTypeLike | None = None,
) -> jnp.ndarray:
  """Reference: sum_n w_n * CE(hidden_n @ embedding.T, labels_n); materialises [N, V]."""
  h, y, w = _flatten(hidden, embedding, labels, weights)
  cd = _canon_dtype(compute_dtype)
  logits = _logits(_cast(h, cd), _cast(embedding, cd), precision)  # [N, V] f32
  lse = jax.nn.logsumexp(logits, axis=-1)
  label_logit = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  return jnp.sum(w * (lse - label_logit))


# --------------------------------------------------------------------------------------
# 2. Token chunks: gradients formed in the forward pass
# --------------------------------------------------------------------------------------


def _label_logits(hc: jnp.ndarray, ec: jnp.ndarray, y: jnp.ndarray, precision) -> jnp.ndarray:
  """hc[n] . ec[y[n]]: the label's logit per position, [N] float32 (a gather, O(N d))."""
  return jnp.einsum("nd,nd->n", hc, jnp.take(ec, y, axis=0), precision=precision,
                    preferred_element_type=jnp.float32)


def _label_grads(hc: jnp.ndarray, ec: jnp.ndarray, y: jnp.ndarray, scale: jnp.ndarray
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The one-hot part of d(sum scale * CE): -scale * E[y] for h, -scale * h added to row y
  of E. Done once outside the chunk loops (a gather and a scatter-add of N rows), so the
  loops only handle the softmax part and never compare an iota against the labels."""
  f32 = jnp.float32
  dh = -scale[:, None] * jnp.take(ec, y, axis=0).astype(f32)  # [N, d]
  de = jnp.zeros(ec.shape, f32).at[y].add(-scale[:, None] * hc.astype(f32))  # [V, d]
  return dh, de


def _token_scan(h, emb, y, w, token_chunk: int, precision, cd, with_grads: bool):
  """Scans token chunks; returns per-position CE [N] and, if asked, dh [N, d], dE [V, d].

  Per chunk of T rows: logits [T, V], their row max m, ex = exp(logits - m) (the only
  exp) and s = rowsum(ex). The softmax part of dlogits is ex * (w / s); instead of
  forming it, the row scale c = w / s is applied to the small operands: dh = (ex @ E) * c
  and dE^T += (h * c)^T @ ex. So after the logits matmul there are two elementwise passes
  over [T, V] (max, exp + sum) and the two gradient matmuls read ex directly."""
  n, d = h.shape
  v = emb.shape[0]
  f32 = jnp.float32
  chunk = max(1, min(token_chunk, n))  # N < token_chunk: a single chunk, no padding
  num = -(-n // chunk)
  pad = num * chunk - n
  hc, ec = _cast(h, cd), _cast(emb, cd)
  label_logit = _label_logits(hc, ec, y, precision)  # [N]
  hp, wp = hc, w
  if pad:  # padded rows: h = 0, weight 0 -> finite lse (log V) that counts for 0
    hp = jnp.pad(hc, ((0, pad), (0, 0)))
    wp = jnp.pad(w, (0, pad))
  # Chunk j holds positions j, j + num, j + 2 num, ...: a [chunk, num] view scanned over
  # its second axis. Positions split over devices in contiguous blocks (the batch on
  # 'data') then split each chunk's rows the same way, so every device scans its own
  # rows; contiguous chunks would each live on one device and force a gather.
  xs = (hp.reshape(chunk, num, d).swapaxes(0, 1), wp.reshape(chunk, num).swapaxes(0, 1))
  unchunk = lambda a: a.swapaxes(0, 1).reshape((num * chunk,) + a.shape[2:])[:n]  # noqa: E731

  def chunk_exp(h_c):
    logits = _logits(h_c, ec, precision)  # [T, V] f32
    m = jnp.max(logits, axis=-1)
    ex = jnp.exp(logits - m[:, None])  # [T, V], in (0, 1]
    s = jnp.sum(ex, axis=-1)
    return ex, s, m + jnp.log(s)

  if not with_grads:
    _, lse = lax.scan(lambda carry, x: (carry, chunk_exp(x[0])[2]), None, xs)
    return unchunk(lse) - label_logit, None, None

  def body(de_t, x):
    h_c, w_c = x
    ex, s, lse = chunk_exp(h_c)
    c = w_c / s  # [T]: w * softmax = ex * c
    ex = ex.astype(ec.dtype)  # matmul operands in compute dtype, f32 accumulation
    dh_c = _dot(ex, ec, (1, 0), precision) * c[:, None]  # [T, d]
    # dE^T = (h c)^T ex: [d, V]. Contracting the rows of ex as the right operand keeps
    # it in the row-major [K, N] layout the CPU matmul kernels take directly (ex^T h
    # took a generic, ~2x slower path).
    hs = (h_c.astype(f32) * c[:, None]).astype(ec.dtype)
    de_t = de_t + _dot(hs, ex, (0, 0), precision)  # [d, V]
    return de_t, (lse, dh_c)

  de_t, (lse, dh) = lax.scan(body, jnp.zeros((d, v), f32), xs)
  dh_label, de_label = _label_grads(hc, ec, y, w)
  return unchunk(lse) - label_logit, unchunk(dh) + dh_label, de_t.T + de_label


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _token_ce(h, emb, y, w, token_chunk, precision, cd):
  ce, _, _ = _token_scan(h, emb, y, w, token_chunk, precision, cd, with_grads=False)
  return jnp.sum(w * ce)


def _token_ce_fwd(h, emb, y, w, token_chunk, precision, cd):
  ce, dh, de = _token_scan(h, emb, y, w, token_chunk, precision, cd, with_grads=True)
  # Gradients are saved in the inputs' dtypes so the backward pass knows them.
  return jnp.sum(w * ce), (dh.astype(h.dtype), de.astype(emb.dtype), ce)


def _token_ce_bwd(token_chunk, precision, cd, res, g):
  dh, de, ce = res
  scale = lambda x: (g * x.astype(jnp.float32)).astype(x.dtype)
  # d(sum w*CE)/dw = CE exactly, so weights get their true gradient for free; labels are
  # integers (no cotangent).
  return scale(dh), scale(de), None, g * ce


_token_ce.defvjp(_token_ce_fwd, _token_ce_bwd)


def chunked_linear_cross_entropy(
  hidden: jnp.ndarray,
  embedding: jnp.ndarray,
  labels: jnp.ndarray,
  weights: jnp.ndarray | None = None,
  *,
  token_chunk: int,
  precision: PrecisionLike = None,
  compute_dtype: DTypeLike | None = None,
) -> jnp.ndarray:
  """Same value as the dense reference, scanning `token_chunk` positions at a time.

  The forward pass also computes dh and dE (custom_vjp), so a value_and_grad costs one pass
  over the logits; a forward-only call skips the gradient work. Peak memory is about
  token_chunk * V * 12 bytes plus the [V, d] float32 gradient accumulator.
  """
  if token_chunk < 1:
    raise ValueError(f"token_chunk must be >= 1, got {token_chunk}")
  h, y, w = _flatten(hidden, embedding, labels, weights)
  return _token_ce(h, embedding, y, w, int(token_chunk), precision, _canon_dtype(compute_dtype))


# --------------------------------------------------------------------------------------
# 3. Vocabulary chunks: online log-sum-exp, recompute in the backward pass
# --------------------------------------------------------------------------------------


def _vocab_layout(ec, vocab_chunk: int):
  """Splits the table into whole chunks [C, chunk, d] and a tail [r, d] (None if r = 0).

  The tail is handled by one more call of the loop body outside the scan, so no padded
  rows (and no -inf masking of their logits) are needed."""
  v, d = ec.shape
  chunk = max(1, min(vocab_chunk, v))
  num = v // chunk
  tail = ec[num * chunk:] if num * chunk < v else None
  return ec[:num * chunk].reshape(num, chunk, d), tail


def _vocab_forward(h, emb, y, vocab_chunk: int, precision, cd):
  """Per-position log-sum-exp [N] and CE [N] via an online (running max / sum) scan."""
  n = h.shape[0]
  hc, ec = _cast(h, cd), _cast(emb, cd)
  e_chunks, tail = _vocab_layout(ec, vocab_chunk)

  def body(carry, e_c):
    m, s = carry
    logits = _logits(hc, e_c, precision)  # [N, chunk]
    # Every chunk holds at least one row, so m_new is finite and exp(m - m_new) = 0 on
    # the first step (m = -inf) instead of NaN.
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=-1)
    return (m_new, s), None

  carry = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
  carry, _ = lax.scan(body, carry, e_chunks)
  if tail is not None:
    carry, _ = body(carry, tail)
  m, s = carry
  lse = m + jnp.log(s)
  return lse, lse - _label_logits(hc, ec, y, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _vocab_ce(h, emb, y, w, vocab_chunk, precision, cd):
  _, ce = _vocab_forward(h, emb, y, vocab_chunk, precision, cd)
  return jnp.sum(w * ce)


def _vocab_ce_fwd(h, emb, y, w, vocab_chunk, precision, cd):
  lse, ce = _vocab_forward(h, emb, y, vocab_chunk, precision, cd)
  return jnp.sum(w * ce), (h, emb, y, w, lse, ce)


def _vocab_ce_bwd(vocab_chunk, precision, cd, res, g):
  h, emb, y, w, lse, ce = res
  f32 = jnp.float32
  hc, ec = _cast(h, cd), _cast(emb, cd)
  e_chunks, tail = _vocab_layout(ec, vocab_chunk)
  scale = g * w  # fold the incoming cotangent into the weights once: [N]
  # softmax part of dlogits: exp(logits - lse) * scale; the row scale goes on the small
  # operands (h for dE, the accumulated dh at the end), see `_token_scan`
  hs = (hc.astype(f32) * scale[:, None]).astype(ec.dtype)

  def body(dh, e_c):
    p = jnp.exp(_logits(hc, e_c, precision) - lse[:, None]).astype(ec.dtype)  # [N, chunk]
    return dh + _dot(p, e_c, (1, 0), precision), _dot(hs, p, (0, 0), precision)

  dh, de_t = lax.scan(body, jnp.zeros(h.shape, f32), e_chunks)  # de_t [C, d, chunk]
  de_t = jnp.moveaxis(de_t, 0, 1).reshape(h.shape[1], -1)  # [d, C * chunk]
  if tail is not None:
    dh, de_tail = body(dh, tail)
    de_t = jnp.concatenate([de_t, de_tail], axis=1)
  dh_label, de_label = _label_grads(hc, ec, y, scale)
  dh = dh * scale[:, None] + dh_label
  de = de_t.T + de_label
  return dh.astype(h.dtype), de.astype(emb.dtype), None, g * ce


_vocab_ce.defvjp(_vocab_ce_fwd, _vocab_ce_bwd)


def vocab_chunked_linear_cross_entropy(
  hidden: jnp.ndarray,
  embedding: jnp.ndarray,
  labels: jnp.ndarray,
  weights: jnp.ndarray | None = None,
  *,
  vocab_chunk: int,
  precision: PrecisionLike = None,
  compute_dtype: DTypeLike | None = None,
) -> jnp.ndarray:
  """Same value as the dense reference, scanning `vocab_chunk` table rows at a time.

  Saves only hidden, the table and lse [N]; the backward pass recomputes each chunk's
  logits (two passes over the logits in total). Peak memory about N * vocab_chunk * 12 bytes.
  """
  if vocab_chunk < 1:
    raise ValueError(f"vocab_chunk must be >= 1, got {vocab_chunk}")
  h, y, w = _flatten(hidden, embedding, labels, weights)
  return _vocab_ce(h, embedding, y, w, int(vocab_chunk), precision, _canon_dtype(compute_dtype))


# --------------------------------------------------------------------------------------
# 4. Front door
# --------------------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _balanced(total: int, cap: int, align: int) -> int:
  """Chunk <= cap (a multiple of align) that splits total into equal-ish aligned chunks."""
  if total <= cap:
    return total
  num = -(-total // cap)
  return min(cap, _round_up(-(-total // num), align))


def _floor_pow2(x: float) -> int:
  return 0 if x < 1 else 1 << int(math.floor(math.log2(x)))


def _default_max_token_chunk() -> int:
  return _MAX_TOKEN_CHUNK_CPU if jax.default_backend() == "cpu" else _MAX_TOKEN_CHUNK


def token_chunk_for(num_positions: int, vocab_size: int, memory_budget_mb: float,
                    max_token_chunk: int | None = None) -> int:
  """Tokens per chunk for [num_positions, vocab_size] logits: the largest power of two T
  with T * vocab_size * 12 bytes within the budget, clamped to [8, max_token_chunk]
  (default 512 on CPU, 4096 elsewhere), then evened out over the positions."""
  if max_token_chunk is None:
    max_token_chunk = _default_max_token_chunk()
  budget = float(memory_budget_mb) * 2**20
  t_pow2 = min(_floor_pow2(budget / (int(vocab_size) * _BYTES_PER_LOGIT)), _MAX_TOKEN_CHUNK)
  cap = max(min(t_pow2, int(max_token_chunk)), _MIN_TOKEN_CHUNK)
  return _balanced(int(num_positions), cap, _MIN_TOKEN_CHUNK)


def plan_chunks(num_positions: int, vocab_size: int, memory_budget_mb: float = 256.0,
                max_token_chunk: int | None = None) -> dict:
  """How `linear_cross_entropy(impl='auto')` will chunk a [num_positions, vocab_size] head.

  Token chunks: the largest power of two T with T * V * 12 bytes (logits, probabilities and
  a temporary, float32) within the budget, clamped to [8, max_token_chunk] (default 512 on
  CPU, 4096 elsewhere), then evened out over N so the last chunk is not mostly padding. If
  all positions fit in one chunk that is used. If T would be under 64, vocabulary chunks
  are used instead, sized the same way from N.
  Returns a dict with impl, token_chunk, vocab_chunk (None for the unused one), num_chunks,
  est_chunk_mb (the budgeted [chunk] temporaries) and fits_budget.
  """
  n, v = int(num_positions), int(vocab_size)
  if n < 1 or v < 1:
    raise ValueError(f"need num_positions >= 1 and vocab_size >= 1, got {n}, {v}")
  budget = float(memory_budget_mb) * 2**20
  if max_token_chunk is None:
    max_token_chunk = _default_max_token_chunk()
  t_pow2 = min(_floor_pow2(budget / (v * _BYTES_PER_LOGIT)), _MAX_TOKEN_CHUNK)
  if n <= t_pow2 or t_pow2 >= _MIN_USEFUL_TOKEN_CHUNK:
    token_chunk = token_chunk_for(n, v, memory_budget_mb, max_token_chunk)
    est = token_chunk * v * _BYTES_PER_LOGIT
    return dict(
      impl="token", token_chunk=token_chunk, vocab_chunk=None,
      num_chunks=-(-n // token_chunk), est_chunk_mb=est / 2**20, fits_budget=est <= budget,
    )
  v_pow2 = max(_floor_pow2(budget / (n * _BYTES_PER_LOGIT)), _MIN_VOCAB_CHUNK)
  vocab_chunk = _balanced(v, v_pow2, _MIN_VOCAB_CHUNK)
  est = n * vocab_chunk * _BYTES_PER_LOGIT
  return dict(
    impl="vocab", token_chunk=None, vocab_chunk=vocab_chunk,
    num_chunks=-(-v // vocab_chunk), est_chunk_mb=est / 2**20, fits_budget=est <= budget,
  )


def linear_cross_entropy(
  hidden: jnp.ndarray,
  embedding: jnp.ndarray,
  labels: jnp.ndarray,
  weights: jnp.ndarray | None = None,
  *,
  impl: str = "auto",
  memory_budget_mb: float = 256.0,
  precision: PrecisionLike = None,
  compute_dtype: DTypeLike | None = None,
  vocab_shards: int = 1,
) -> jnp.ndarray:
  """Sum of weighted softmax CE of hidden @ embedding.T; label 0 ignored.

  impl: 'dense' (reference), 'token' or 'vocab' (chunk sizes from `plan_chunks` with the
  given budget, forced to that kind), or 'auto' (whatever `plan_chunks` picks).
  vocab_shards: the number of devices the table's rows are split over. Each then holds
  only [chunk, V / vocab_shards] logits, which is what the budget is planned for, and
  'auto' keeps to token chunks: a scan over vocabulary chunks would gather the table.
  """
  impls = defaults.choices("train.loss")
  if impl not in impls:
    raise ValueError(f"impl must be one of {impls}, got {impl!r}")
  kw = dict(precision=precision, compute_dtype=compute_dtype)
  if impl == "dense":
    return dense_linear_cross_entropy(hidden, embedding, labels, weights, **kw)
  n, v = math.prod(labels.shape), embedding.shape[0]
  plan = plan_chunks(n, -(-v // vocab_shards), memory_budget_mb)
  kind = plan["impl"] if impl == "auto" else impl
  if impl == "auto" and vocab_shards > 1:
    kind = "token"
  if kind == "token":
    chunk = plan["token_chunk"]
    if chunk is None:  # 'token' where the plan wanted vocab chunks: what the budget holds
      chunk = token_chunk_for(n, -(-v // vocab_shards), memory_budget_mb)
    return chunked_linear_cross_entropy(hidden, embedding, labels, weights, token_chunk=chunk, **kw)
  chunk = plan["vocab_chunk"]
  if chunk is None:  # forced 'vocab' where the plan wanted token chunks: size from N
    budget = float(memory_budget_mb) * 2**20
    cap = max(_floor_pow2(budget / (n * _BYTES_PER_LOGIT)), _MIN_VOCAB_CHUNK)
    chunk = _balanced(v, cap, _MIN_VOCAB_CHUNK)
  return vocab_chunked_linear_cross_entropy(hidden, embedding, labels, weights, vocab_chunk=chunk, **kw)


# --------------------------------------------------------------------------------------
# 5. Small heads
# --------------------------------------------------------------------------------------


def masked_mean_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(sum of CE over positions with label != 0, number of such positions), both float32.

  For small heads (behaviors) where [..., C] logits are cheap; divide sum by max(count, 1).
  """
  mask = labels != 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(jnp.where(mask, ce, 0.0)), jnp.sum(mask).astype(jnp.float32)


def item_cross_entropy(params, hidden: jnp.ndarray, labels: jnp.ndarray,
                       weights: jnp.ndarray, *, model, loss_impl: str,
                       loss_memory_mb: float, vocab_shards: int
                       ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(mean, count) of the item head's cross-entropy of `hidden` [..., d] against
  `model`'s item table for `labels` [...], over the positions where `weights` [...]
  is 1 (the one `linear_cross_entropy` call of every model's loss)."""
  weights = weights.astype(jnp.float32).reshape(-1)
  total = linear_cross_entropy(
      hidden.reshape(-1, hidden.shape[-1]), item_embedding(params, model.num_items),
      labels.reshape(-1), weights, impl=loss_impl, memory_budget_mb=loss_memory_mb,
      precision=model.precision,
      compute_dtype=None if model.dtype == jnp.float32 else model.dtype,
      vocab_shards=vocab_shards)
  count = weights.sum()
  return total / jnp.maximum(count, 1.0), count
