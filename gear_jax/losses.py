"""Softmax cross-entropy losses for GEAR's tied heads.

The item head scores every position against the whole item table: logits = h @ E.T is
[N, V] with N = batch * length and V up to ~875k items, i.e. several GB in float32. The
functions here compute the same loss and gradients without ever materialising [N, V]:

* `dense_linear_cross_entropy`: the reference (plain jnp + autodiff), materialises [N, V].
* `chunked_linear_cross_entropy`: scans over token chunks; the forward pass already forms
  the gradients (softmax - onehot is at hand there) and saves only dh [N, d] and dE [V, d],
  so the backward pass is a scalar multiply. Fastest; memory O(token_chunk * V + V * d).
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

PrecisionLike = Any  # None | str | jax.lax.Precision | tuple of two of them
DTypeLike = Any

# Bytes per logit element held live inside one chunk: float32 logits, probabilities and
# one more temporary (XLA does not always fuse the exp into the consumer).
_BYTES_PER_LOGIT = 4 * 3
_MIN_TOKEN_CHUNK = 8
_MAX_TOKEN_CHUNK = 4096
# Below this many rows per chunk the token scan spends its time re-reading/writing the
# [V, d] gradient accumulator instead of computing; vocabulary chunks are better then.
_MIN_USEFUL_TOKEN_CHUNK = 64
_MIN_VOCAB_CHUNK = 128
IMPLS = ("dense", "token", "vocab", "auto")


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


def _token_scan(h, emb, y, w, token_chunk: int, precision, cd, with_grads: bool):
  """Scans token chunks; returns per-position CE [N] and, if asked, dh [N, d], dE [V, d]."""
  n, d = h.shape
  v = emb.shape[0]
  chunk = max(1, min(token_chunk, n))  # N < token_chunk: a single chunk, no padding
  num = -(-n // chunk)
  pad = num * chunk - n
  hc, ec = _cast(h, cd), _cast(emb, cd)
  if pad:  # padded rows: h = 0, label 0, weight 0 -> finite CE (log V) that counts for 0
    hc = jnp.pad(hc, ((0, pad), (0, 0)))
    y = jnp.pad(y, (0, pad))
    w = jnp.pad(w, (0, pad))
  xs = (hc.reshape(num, chunk, d), y.reshape(num, chunk), w.reshape(num, chunk))

  def chunk_terms(h_c, y_c):
    logits = _logits(h_c, ec, precision)  # [T, V] f32
    m = jnp.max(logits, axis=-1, keepdims=True)
    lse = m[:, 0] + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1))
    label_logit = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
    return logits, lse, lse - label_logit

  if not with_grads:
    def body_loss(carry, x):
      h_c, y_c, _ = x
      return carry, chunk_terms(h_c, y_c)[2]

    _, ce = lax.scan(body_loss, None, xs)
    return ce.reshape(-1)[:n], None, None

  def body(de, x):
    h_c, y_c, w_c = x
    logits, lse, ce = chunk_terms(h_c, y_c)
    # d(w * CE)/d logits = w * (softmax - onehot); the compare against an iota fuses into
    # the same elementwise pass as the exp instead of a scatter into [T, V].
    onehot = y_c[:, None] == lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    dlogits = w_c[:, None] * (jnp.exp(logits - lse[:, None]) - onehot)
    dlogits = dlogits.astype(ec.dtype)  # matmul operands in compute dtype, f32 accumulation
    dh_c = _dot(dlogits, ec, (1, 0), precision)  # [T, d]
    de = de + _dot(dlogits, h_c, (0, 0), precision)  # [V, d]
    return de, (ce, dh_c)

  de, (ce, dh) = lax.scan(body, jnp.zeros((v, d), jnp.float32), xs)
  return ce.reshape(-1)[:n], dh.reshape(-1, d)[:n], de


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


def _vocab_layout(emb, vocab_chunk: int, cd):
  """Pads the table to a multiple of the chunk and stacks it [C, vocab_chunk, d]."""
  v, d = emb.shape
  chunk = max(1, min(vocab_chunk, v))
  num = -(-v // chunk)
  pad = num * chunk - v
  ec = _cast(emb, cd)
  if pad:
    ec = jnp.pad(ec, ((0, pad), (0, 0)))
  offsets = jnp.arange(num, dtype=jnp.int32) * chunk
  return ec.reshape(num, chunk, d), offsets, chunk, pad


def _vocab_chunk_logits(hc, e_c, offset, v: int, pad: int, precision):
  """[N, chunk] float32 logits of one vocabulary chunk; padded rows get -inf."""
  logits = _logits(hc, e_c, precision)
  col = offset + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  if pad:  # static: only emitted when the table was padded
    logits = jnp.where(col < v, logits, -jnp.inf)
  return logits, col


def _vocab_forward(h, emb, y, vocab_chunk: int, precision, cd):
  """Per-position log-sum-exp [N] and CE [N] via an online (running max / sum) scan."""
  n = h.shape[0]
  v = emb.shape[0]
  hc = _cast(h, cd)
  e_chunks, offsets, chunk, pad = _vocab_layout(emb, vocab_chunk, cd)

  def body(carry, x):
    m, s, label_logit = carry
    e_c, offset = x
    logits, _ = _vocab_chunk_logits(hc, e_c, offset, v, pad, precision)
    # Every chunk holds at least one real row, so m_new is finite and exp(m - m_new) = 0
    # on the first step (m = -inf) instead of NaN.
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=-1)
    # The label logit is read from the same matmul as the lse (same rounding/TF32).
    local = y - offset
    inside = (local >= 0) & (local < chunk)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[:, None], axis=-1)[:, 0]
    label_logit = label_logit + jnp.where(inside, picked, 0.0)
    return (m_new, s, label_logit), None

  init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
  (m, s, label_logit), _ = lax.scan(body, init, (e_chunks, offsets))
  lse = m + jnp.log(s)
  return lse, lse - label_logit


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _vocab_ce(h, emb, y, w, vocab_chunk, precision, cd):
  _, ce = _vocab_forward(h, emb, y, vocab_chunk, precision, cd)
  return jnp.sum(w * ce)


def _vocab_ce_fwd(h, emb, y, w, vocab_chunk, precision, cd):
  lse, ce = _vocab_forward(h, emb, y, vocab_chunk, precision, cd)
  return jnp.sum(w * ce), (h, emb, y, w, lse, ce)


def _vocab_ce_bwd(vocab_chunk, precision, cd, res, g):
  h, emb, y, w, lse, ce = res
  n, d = h.shape
  v = emb.shape[0]
  hc = _cast(h, cd)
  e_chunks, offsets, _, pad = _vocab_layout(emb, vocab_chunk, cd)
  scale = (g * w)[:, None]  # fold the incoming cotangent into the weights once

  def body(dh, x):
    e_c, offset = x
    logits, col = _vocab_chunk_logits(hc, e_c, offset, v, pad, precision)
    # Padded rows: exp(-inf - lse) = 0, so they add nothing to dh and their dE is cut off.
    dlogits = scale * (jnp.exp(logits - lse[:, None]) - (y[:, None] == col))
    dlogits = dlogits.astype(e_c.dtype)
    dh = dh + _dot(dlogits, e_c, (1, 0), precision)  # [N, d]
    return dh, _dot(dlogits, hc, (0, 0), precision)  # [chunk, d]

  dh, de = lax.scan(body, jnp.zeros((n, d), jnp.float32), (e_chunks, offsets))
  de = de.reshape(-1, d)[:v]
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


def plan_chunks(num_positions: int, vocab_size: int, memory_budget_mb: float = 256.0) -> dict:
  """How `linear_cross_entropy(impl='auto')` will chunk a [num_positions, vocab_size] head.

  Token chunks: the largest power of two T with T * V * 12 bytes (logits, probabilities and
  a temporary, float32) within the budget, clamped to [8, 4096], then evened out over N so
  the last chunk is not mostly padding. If all positions fit in one chunk that is used. If T
  would be under 64, vocabulary chunks are used instead, sized the same way from N.
  Returns a dict with impl, token_chunk, vocab_chunk (None for the unused one), num_chunks,
  est_chunk_mb (the budgeted [chunk] temporaries) and fits_budget.
  """
  n, v = int(num_positions), int(vocab_size)
  if n < 1 or v < 1:
    raise ValueError(f"need num_positions >= 1 and vocab_size >= 1, got {n}, {v}")
  budget = float(memory_budget_mb) * 2**20
  t_pow2 = min(_floor_pow2(budget / (v * _BYTES_PER_LOGIT)), _MAX_TOKEN_CHUNK)
  if n <= t_pow2 or t_pow2 >= _MIN_USEFUL_TOKEN_CHUNK:
    token_chunk = _balanced(n, max(t_pow2, _MIN_TOKEN_CHUNK), _MIN_TOKEN_CHUNK)
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
) -> jnp.ndarray:
  """Sum of weighted softmax CE of hidden @ embedding.T; label 0 ignored.

  impl: 'dense' (reference), 'token' or 'vocab' (chunk sizes from `plan_chunks` with the
  given budget, forced to that kind), or 'auto' (whatever `plan_chunks` picks).
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  kw = dict(precision=precision, compute_dtype=compute_dtype)
  if impl == "dense":
    return dense_linear_cross_entropy(hidden, embedding, labels, weights, **kw)
  n, v = math.prod(labels.shape), embedding.shape[0]
  plan = plan_chunks(n, v, memory_budget_mb)
  kind = plan["impl"] if impl == "auto" else impl
  if kind == "token":
    chunk = plan["token_chunk"]
    if chunk is None:  # forced 'token' where the plan wanted vocab chunks: smallest chunk
      chunk = _MIN_TOKEN_CHUNK
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
