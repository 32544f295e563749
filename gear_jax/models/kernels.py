"""The CPU-tuned kernels of GEAR's transformer blocks, and their plain autodiff twins.

`attend` (causal attention with dropout, heads folded into the batch) and `ffn`
(linear -> ReLU -> dropout -> linear) are `jax.custom_vjp` functions with hand-written
backward passes, written for XLA:CPU (see the comments at "attention"). `attend_reference`
and `ffn_reference` compute the same functions with plain jax.numpy that autodiff
differentiates: the tests compare values and gradients of the two at the shapes users
run (L = 50: 99 upper positions, two query blocks), with dropout, padding masks and
bfloat16. Dropout masks come from a counter-based hash of each element's flat index
(`keep_mask`), so both formulations (and `layers.Dropout`) draw the same masks.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def fmix32(x: Array) -> Array:
  """murmur3's 32-bit finaliser: a bijective, well-mixing integer hash."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def keep_mask(idx: Array, seed: Array, rate: float) -> Array:
  """True where the unit with flat index `idx` (uint32) survives dropout at `rate`."""
  bits = fmix32(fmix32(idx * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])
  threshold = jnp.uint32(min(int(rate * 2.0 ** 32), 2 ** 32 - 1))
  return bits >= threshold  # P(keep) = 1 - rate


# -- attention ------------------------------------------------------------------------
#
# What made autodiff attention slow on CPU, and what the code below does instead:
# * Causality: query rows are processed in blocks; the block of rows [q0, q1) only needs
#   keys [0, q1), so for T = 99 in two blocks a quarter of the [T, T] scores is never
#   formed. (Smaller blocks skip more but add ops; two blocks measured best.)
# * Heads are folded into the batch ([B*H, T, dh], one small transpose of the fused
#   projection), so every [T, T] op runs once per layer, not once per head.
# * Scores are kept transposed, S^T = K Q^T with keys along rows, so that all six
#   batched matmuls of the forward and backward pass (S^T, O^T = V^T Pd^T, dPd^T,
#   dV = Pd^T dO, dK = dS^T Q, dQ^T = K^T dS^T) contract row-major operands the way the
#   CPU matmul kernels want; in the [q, k] layout dK and dV contracted the rows of the
#   [T, T] operand and fell back to a generic kernel ~2x slower.
# * A custom_vjp saves the softmax weights P and the dropped weights Pd of the forward
#   pass and forms dS = Pd * dPd - P * rowsum(dO * O) in one fused pass per block (the
#   dropout mask is folded into Pd), instead of autodiff's chain of [T, T] passes back
#   through dropout, softmax and the mask select.
# Dropout masks are those of `Dropout` on the whole [B*H, T, T] weight tensor (the hash of
# each element's flat index), so blocking and the layout do not change them.

# Query rows per block (T = 99 -> 2 blocks, T = 49 or 50 -> 1 block).
QUERY_BLOCK = 50


class AttnSpec(NamedTuple):
  """Static settings of the attention core (a hashable custom_vjp argument)."""
  rate: float  # dropout on the attention weights; 0 = none
  blocks: tuple[tuple[int, int], ...]  # query row blocks [q0, q1)
  dtype: Any  # matmul operand dtype
  precision: Any


def query_blocks(t: int) -> tuple[tuple[int, int], ...]:
  n = max(1, round(t / QUERY_BLOCK))
  size = -(-t // n)
  return tuple((q0, min(q0 + size, t)) for q0 in range(0, t, size))


def allowed(ik: Array, iq: Array, valid_keys: Array | None) -> Array:
  """Which (key, query) pairs attend, from broadcastable key / query positions: causal
  (key <= query); with `valid_keys` (bool, broadcast like `ik`) padded keys are hidden
  too, but a query always sees itself (so no softmax row is empty)."""
  if valid_keys is None:
    return ik <= iq
  return (ik <= iq) & (valid_keys | (ik == iq))


def _block_weights(q: Array, k: Array, bias: Array | None, valid: Array | None,
                   seed: Array | None, spec: AttnSpec, q0: int, q1: int
                   ) -> tuple[Array, Array]:
  """(P^T, Pd^T) of query block [q0, q1): softmax weights before / after dropout,
  transposed: [B, q1, q1 - q0] f32, keys 0..q1-1 along rows, queries along columns."""
  _, t, dh = q.shape
  s = jnp.einsum('bkc,bqc->bkq', k[:, :q1], q[:, q0:q1], precision=spec.precision,
                 preferred_element_type=jnp.float32) / math.sqrt(dh)  # [B, q1, tq]
  if bias is not None:
    s = s + bias[:, q0:q1, :q1].transpose(0, 2, 1)
  ik = jnp.arange(q1)[:, None]
  iq = jnp.arange(q0, q1)[None, :]
  if valid is None:  # additive: fuses into the same pass as the softmax
    s = s + jnp.where(allowed(ik, iq, None), 0.0, -jnp.inf)[None]
  else:
    s = jnp.where(allowed(ik[None], iq[None], valid[:, :q1, None]), s, -jnp.inf)
  p = jax.nn.softmax(s, axis=1)  # over keys
  if spec.rate == 0.0:
    return p, p
  ib, rows, cols = (jax.lax.broadcasted_iota(jnp.uint32, s.shape, a) for a in range(3))
  idx = (ib * t + cols + q0) * t + rows  # flat index of (b, q, k) in [B*H, T, T]
  pd = jnp.where(keep_mask(idx, seed, spec.rate), p / (1.0 - spec.rate), 0.0)
  return p, pd


def _attend_forward(q, k, v, bias, valid, seed, spec: AttnSpec):
  """o [B, T, dh] f32 and per block (P^T, Pd^T), see `_block_weights`."""
  # The barriers materialise these small transposes: otherwise XLA folds them into the
  # matmuls, which turns those back into the slow transposed-operand kernel.
  vt = jax.lax.optimization_barrier(v.transpose(0, 2, 1))  # [B, dh, T]
  outs, saved = [], []
  for q0, q1 in spec.blocks:
    p, pd = _block_weights(q, k, bias, valid, seed, spec, q0, q1)
    outs.append(jnp.einsum('bck,bkq->bcq', vt[:, :, :q1], pd.astype(spec.dtype),
                           precision=spec.precision,
                           preferred_element_type=jnp.float32))  # O^T: [B, dh, tq]
    saved.append((p, pd))
  o_t = jax.lax.optimization_barrier(jnp.concatenate(outs, axis=2))  # [B, dh, T]
  return o_t.transpose(0, 2, 1), saved  # [B, T, dh]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def attend(q: Array, k: Array, v: Array, bias: Array | None, valid: Array | None,
            seed: Array | None, spec: AttnSpec) -> Array:
  """Causal attention with dropout, heads folded into the batch: q, k, v [B*H, T, dh]
  -> [B*H, T, dh].

  bias [B*H, T, T] additive or None; valid [B*H, T] bool (padded keys hidden) or None;
  seed: the dropout site's two key words (unused when spec.rate == 0)."""
  return _attend_forward(q, k, v, bias, valid, seed, spec)[0].astype(q.dtype)


def _attend_fwd(q, k, v, bias, valid, seed, spec):
  o, saved = _attend_forward(q, k, v, bias, valid, seed, spec)
  return o.astype(q.dtype), (q, k, v, bias, valid, o, saved)


def _attend_bwd(spec: AttnSpec, res, do):
  q, k, v, bias, valid, o, saved = res
  b, t, dh = q.shape
  f32 = jnp.float32
  # rowsum(dP * P) of the softmax backward equals rowsum(dO * O): O(T dh) work
  delta = jnp.sum(do.astype(f32) * o, axis=-1)[:, None, :]  # [B, 1, T]
  # barriers: see `_attend_forward`
  kt = jax.lax.optimization_barrier(k.astype(f32).transpose(0, 2, 1))  # [B, dh, T]
  dqt_blocks, ds_blocks = [], []
  dk = jnp.zeros((b, t, dh), f32)
  dv = jnp.zeros((b, t, dh), f32)
  for (q0, q1), (p, pd) in zip(spec.blocks, saved):
    do_i = do[:, q0:q1]  # [B, tq, dh]
    dpd = jnp.einsum('bkc,bqc->bkq', v[:, :q1], do_i, precision=spec.precision,
                     preferred_element_type=f32)  # [B, q1, tq]
    # P * (dP - delta) with dP = dPd * keep / (1 - rate), i.e. Pd * dPd - P * delta
    ds = pd * dpd - p * delta[:, :, q0:q1]  # dS^T: [B, q1, tq]
    dv = dv.at[:, :q1].add(jnp.einsum('bkq,bqc->bkc', pd.astype(spec.dtype), do_i,
                                      precision=spec.precision,
                                      preferred_element_type=f32))
    # dS stays float32 (as autodiff would keep it); q and k are upcast, [B, T, dh]
    dk = dk.at[:, :q1].add(jnp.einsum('bkq,bqc->bkc', ds, q[:, q0:q1].astype(f32),
                                      precision=spec.precision))
    dqt_blocks.append(jnp.einsum('bck,bkq->bcq', kt[:, :, :q1], ds,
                                 precision=spec.precision))  # dQ^T: [B, dh, tq]
    ds_blocks.append(ds)
  scale = 1.0 / math.sqrt(dh)
  dq_t = jax.lax.optimization_barrier(jnp.concatenate(dqt_blocks, axis=2))  # [B, dh, T]
  dq = dq_t.transpose(0, 2, 1) * scale
  dbias = None
  if bias is not None:  # the bias cotangent is dS itself (zero above the diagonal)
    dbias = jnp.concatenate([jnp.pad(ds.transpose(0, 2, 1), ((0, 0), (0, 0), (0, t - q1)))
                             for (_, q1), ds in zip(spec.blocks, ds_blocks)], axis=1)
    dbias = dbias.astype(bias.dtype)
  return (dq.astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype), dbias,
          None, None)


attend.defvjp(_attend_fwd, _attend_bwd)


class FFNSpec(NamedTuple):
  """Static settings of `ffn` (a hashable custom_vjp argument)."""
  rate: float  # dropout on the hidden units; 0 = none
  precision: Any


def _ffn_hidden(x, w1, b1, seed, spec: FFNSpec) -> Array:
  """drop(relu(x @ w1 + b1)): [N, 4d] in x's dtype."""
  a = nn.relu(jnp.dot(x, w1, precision=spec.precision) + b1)
  if spec.rate == 0.0:
    return a
  idx = jax.lax.iota(jnp.uint32, a.size).reshape(a.shape)
  keep = keep_mask(idx, seed, spec.rate)  # the mask `Dropout` draws for [B, T, 4d]
  return jnp.where(keep, a / (1.0 - spec.rate), 0.0).astype(a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def ffn(x: Array, w1: Array, b1: Array, w2: Array, b2: Array, seed: Array | None,
         spec: FFNSpec) -> Array:
  """drop(relu(x @ w1 + b1)) @ w2 + b2 for x [N, d]: [N, d].

  The backward pass needs only the dropped hidden units A [N, 4d]: a unit passes
  gradient iff it is > 0 (kept by dropout and positive before the ReLU), so neither
  the pre-activation nor the mask is saved."""
  return jnp.dot(_ffn_hidden(x, w1, b1, seed, spec), w2, precision=spec.precision) + b2


def _ffn_fwd(x, w1, b1, w2, b2, seed, spec):
  a = _ffn_hidden(x, w1, b1, seed, spec)
  return jnp.dot(a, w2, precision=spec.precision) + b2, (x, w1, w2, a)


def _ffn_bwd(spec: FFNSpec, res, dy):
  x, w1, w2, a = res
  p = spec.precision
  da = jnp.dot(dy, w2.T, precision=p)  # [N, 4d]
  dpre = jnp.where(a > 0, da / (1.0 - spec.rate), 0.0).astype(da.dtype)  # pre-activation
  return (jnp.dot(dpre, w1.T, precision=p), jnp.dot(x.T, dpre, precision=p),
          jnp.sum(dpre, axis=0), jnp.dot(a.T, dy, precision=p), jnp.sum(dy, axis=0), None)


ffn.defvjp(_ffn_fwd, _ffn_bwd)


# -- plain autodiff twins (the reference the tests hold the kernels to) ------------------

def attend_reference(q: Array, k: Array, v: Array, bias: Array | None,
                     valid: Array | None, seed: Array | None, spec: AttnSpec) -> Array:
  """`attend` in plain jax.numpy over the whole [B, T, T] scores, no query blocks and
  no custom VJP, with the same masks, dropout bits and dtype policy (operands in
  `spec.dtype`, float32 accumulation and softmax)."""
  _, t, dh = q.shape
  s = jnp.einsum('bqc,bkc->bqk', q, k, precision=spec.precision,
                 preferred_element_type=jnp.float32) / math.sqrt(dh)  # [B, T, T]
  if bias is not None:
    s = s + bias
  iq, ik = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  ok = allowed(ik[None], iq[None], None if valid is None else valid[:, None, :])
  p = jax.nn.softmax(jnp.where(ok, s, -jnp.inf), axis=-1)
  if spec.rate > 0.0:
    idx = jax.lax.iota(jnp.uint32, p.size).reshape(p.shape)  # flat (b, q, k)
    p = jnp.where(keep_mask(idx, seed, spec.rate), p / (1.0 - spec.rate), 0.0)
  o = jnp.einsum('bqk,bkc->bqc', p.astype(spec.dtype), v, precision=spec.precision,
                 preferred_element_type=jnp.float32)
  return o.astype(q.dtype)


def ffn_reference(x: Array, w1: Array, b1: Array, w2: Array, b2: Array,
                  seed: Array | None, spec: FFNSpec) -> Array:
  """`ffn` without its custom VJP: autodiff through ReLU and the same dropout mask."""
  return jnp.dot(_ffn_hidden(x, w1, b1, seed, spec), w2, precision=spec.precision) + b2


class Implementation(NamedTuple):
  """The attention core and feed-forward block of one ``model.kernels`` choice."""
  attend: Any
  ffn: Any


# resolved kernel names (``model.kernels`` after 'auto', see gear_jax.backend)
IMPLEMENTATIONS = {'cpu': Implementation(attend, ffn),
                   'xla': Implementation(attend_reference, ffn_reference)}


def implementation(name: str) -> Implementation:
  """The functions of kernels `name` ('cpu' or 'xla')."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'kernels must be one of {tuple(IMPLEMENTATIONS)}, got {name!r}')
  return IMPLEMENTATIONS[name]
