"""GEAR as a functional Flax (Linen) module: params are a pytree, steps call `apply`.

Shapes: B batch, L max_len, d d_model, H heads, V num_items (ids 1..V, 0 = padding),
n_b behaviors. The network follows ``GEAR_SPEC.md`` ("Model") operation for operation so
that a converted PyTorch state_dict reproduces the reference outputs:

  item stream      E_item[i_1..i_{L-1}] -> Dropout -> shared LN -> item block (causal)
  behavior stream  E_beh[b_1..b_L] -> Dropout -> shared LN -> behavior block (causal +
                   per-head time bias -s_h log(1 + T), s_h = 2^(-8h/H))
  Dropout on both, interleave b_1, i_1, b_2, ..., i_{L-1}, b_L (2L - 1 positions),
  n_layer upper blocks (causal), heads tied to the embeddings.

`GEAR.__call__` returns the final hidden states at the behavior positions ([B, L, d],
scored against E_item by the item head) and at the item positions ([B, L - 1, d],
scored against E_beh by the behavior head). Logits are formed outside the module
(`item_logits`, `behavior_logits`, or the chunked loss), so training never has to
materialise [B, L, V].
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
PRECISIONS = {'float32': 'highest', 'default': None, 'bfloat16': None}


def compute_dtype(precision: str):
  """The activation dtype of a precision setting (parameters stay float32)."""
  return jnp.bfloat16 if precision == 'bfloat16' else jnp.float32


def matmul_precision(precision: str):
  """The lax matmul precision of a precision setting ('highest' for parity)."""
  if precision not in PRECISIONS:
    raise ValueError(f"unknown precision {precision!r}; use 'float32' (highest matmul "
                     "precision, parity), 'default' (platform default, e.g. TF32) or "
                     "'bfloat16'")
  p = PRECISIONS[precision]
  return jax.lax.Precision.HIGHEST if p == 'highest' else None


# -- initialisers matching PyTorch ----------------------------------------------------

def torch_linear_kernel_init():
  """nn.Linear's default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_linear_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def behavior_embedding_init(key, shape, dtype=jnp.float32):
  """N(0, 1) with the padding row 0 zeroed (PyTorch's padding_idx init)."""
  return jax.random.normal(key, shape, dtype).at[0].set(0.0)


def _fmix32(x: Array) -> Array:
  """murmur3's 32-bit finaliser: a bijective, well-mixing integer hash."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


class Dropout(nn.Module):
  """Inverted dropout whose mask bits come from a counter-based hash.

  Same semantics as `nn.Dropout` (keep with probability 1 - rate, scale by
  1 / (1 - rate), identity when deterministic), and the same RNG plumbing (one
  `make_rng('dropout')` per call site). Only the bit source differs: two rounds of
  murmur3's finaliser over (element index, 64 bits of the site's key) instead of
  threefry. On CPU threefry made the forward pass 3x slower and each dropout site
  cost ~2 s of compile time; this costs a few integer ops per element."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    seed = jax.random.bits(self.make_rng('dropout'), (2,), jnp.uint32)
    idx = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
    bits = _fmix32(_fmix32(idx * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])
    threshold = jnp.uint32(min(int(self.rate * 2.0 ** 32), 2 ** 32 - 1))
    keep = bits >= threshold  # P(keep) = 1 - rate
    return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class PaddedEmbed(nn.Module):
  """An embedding table whose index-0 lookups pass no gradient to row 0.

  This is PyTorch's ``padding_idx=0``: the forward value of row 0 is whatever row 0
  holds (the item table's row 0 is random and trained through the tied head), only
  the lookup's gradient to it is cut."""
  num_embeddings: int
  features: int
  embedding_init: Any
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param('embedding', self.embedding_init,
                                (self.num_embeddings, self.features))

  def __call__(self, ids: Array) -> Array:
    x = jnp.take(self.embedding, ids, axis=0)  # [..., d]
    x = jnp.where((ids == 0)[..., None], jax.lax.stop_gradient(x), x)
    return x.astype(self.dtype)


class SelfAttention(nn.Module):
  """torch.nn.MultiheadAttention (fused q, k, v input projection), batch first."""
  d_model: int
  n_head: int
  dropout: float
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array | None,
               deterministic: bool) -> Array:
    # x [B, T, d]; mask [B or 1, 1, T, T] bool (True = may attend);
    # bias [B, H, T, T] additive or None
    b, t, d = x.shape
    dh = d // self.n_head
    qkv = nn.Dense(3 * d, name='in_proj', dtype=self.dtype, precision=self.precision,
                   kernel_init=nn.initializers.xavier_uniform(),
                   bias_init=nn.initializers.zeros)(x)  # [B, T, 3d]
    q, k, v = jnp.split(qkv.reshape(b, t, 3, self.n_head, dh), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, T, H, dh]
    scores = jnp.einsum('bqhc,bkhc->bhqk', q, k, precision=self.precision,
                        preferred_element_type=jnp.float32) / math.sqrt(dh)
    if bias is not None:
      scores = scores + bias  # [B, H, T, T]
    scores = jnp.where(mask, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = Dropout(self.dropout)(weights, deterministic)
    out = jnp.einsum('bhqk,bkhc->bqhc', weights.astype(self.dtype), v,
                     precision=self.precision).reshape(b, t, d)  # [B, T, d]
    return nn.Dense(d, name='out_proj', dtype=self.dtype, precision=self.precision,
                    kernel_init=torch_linear_kernel_init(),
                    bias_init=nn.initializers.zeros)(out)


class EncoderLayer(nn.Module):
  """torch.nn.TransformerEncoderLayer, post-norm, ReLU, FFN width 4d, eps 1e-5."""
  d_model: int
  n_head: int
  dropout: float
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array | None,
               deterministic: bool) -> Array:
    d = self.d_model
    dense = lambda n, fan_in, name: nn.Dense(  # noqa: E731
        n, name=name, dtype=self.dtype, precision=self.precision,
        kernel_init=torch_linear_kernel_init(), bias_init=torch_linear_bias_init(fan_in))
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, dtype=self.dtype,  # noqa: E731
                                     use_fast_variance=False)
    drop = lambda y: Dropout(self.dropout)(y, deterministic)  # noqa: E731
    attn = SelfAttention(d, self.n_head, self.dropout, self.dtype, self.precision,
                         name='self_attn')(x, mask, bias, deterministic)
    x = norm('norm1')(x + drop(attn))  # [B, T, d]
    ff = dense(d, 4 * d, 'linear2')(drop(nn.relu(dense(4 * d, d, 'linear1')(x))))
    return norm('norm2')(x + drop(ff))  # [B, T, d]


def time_matrix(gaps: Array) -> Array:
  """T[b, i, j] = c_i - c_j for j < i, else 0, with c = cumsum(gaps): [B, L, L].

  Built on device from O(L) gaps per sample; int32 arithmetic keeps it exact."""
  c = jnp.cumsum(gaps.astype(jnp.int32), axis=-1)  # [B, L]
  t = c[:, :, None] - c[:, None, :]  # [B, L, L]
  return jnp.maximum(t, 0)  # j > i gives negatives; the causal mask hides them


def alibi_slopes(n_head: int) -> Array:
  return 2.0 ** (-8.0 * jnp.arange(n_head, dtype=jnp.float32) / n_head)  # [H]


def time_bias(gaps: Array, n_head: int) -> Array:
  """Per-head additive attention bias -s_h log(1 + T): [B, H, L, L] float32."""
  t = time_matrix(gaps).astype(jnp.float32)
  return -alibi_slopes(n_head)[None, :, None, None] * jnp.log1p(t)[:, None]


def _causal_mask(valid: Array | None, length: int) -> Array:
  """[B or 1, 1, T, T] bool: causal, and (with `valid`) padded keys hidden.

  A query always sees itself, so a padded query row is never fully masked."""
  i = jnp.arange(length)
  causal = (i[None, :] <= i[:, None])[None, None]  # [1, 1, T, T]
  if valid is None:
    return causal
  keys = valid[:, None, None, :] | (i[None, :] == i[:, None])[None, None]
  return causal & keys


class GEAR(nn.Module):
  """The GEAR network. See the module docstring for the data flow."""
  num_items: int
  num_behaviors: int
  d_model: int = 32
  n_head: int = 2
  n_layer: int = 4
  dropout: float = 0.2
  mask_padding: bool = False  # reference: False (padded positions are attended to)
  dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    if self.d_model % self.n_head:
      raise ValueError(f'd_model {self.d_model} is not divisible by n_head {self.n_head}')
    d = self.d_model
    self.item_emb = PaddedEmbed(self.num_items + 1, d, nn.initializers.xavier_uniform(),
                                self.dtype)
    self.behavior_emb = PaddedEmbed(self.num_behaviors + 1, d, behavior_embedding_init,
                                    self.dtype)
    self.LayerNorm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                                  use_fast_variance=False)
    layer = lambda: EncoderLayer(d, self.n_head, self.dropout, self.dtype,  # noqa: E731
                                 self.precision)
    # lists name their elements <attribute>_<k>, mirroring the PyTorch module names
    self.item_attention_blocks = [layer()]
    self.behavior_attention_blocks = [layer()]
    self.upper_transformer = [layer() for _ in range(self.n_layer)]
    self.drop = Dropout(self.dropout)

  def __call__(self, items: Array, behaviors: Array, gaps: Array, *,
               deterministic: bool = True) -> tuple[Array, Array]:
    """items, behaviors, gaps [B, L] int -> (h_behavior [B, L, d], h_item [B, L-1, d]).

    Only items[:, :L-1] are read (the last slot is a label or a placeholder)."""
    b, length = behaviors.shape
    items = items[:, :length - 1]  # [B, L-1]
    drop = lambda x: self.drop(x, deterministic)  # noqa: E731
    item_valid = beh_valid = None
    if self.mask_padding:
      item_valid, beh_valid = items != 0, behaviors != 0
    x_item = self.LayerNorm(drop(self.item_emb(items)))  # [B, L-1, d]
    x_item = self.item_attention_blocks[0](x_item, _causal_mask(item_valid, length - 1), None,
                             deterministic)
    x_beh = self.LayerNorm(drop(self.behavior_emb(behaviors)))  # [B, L, d]
    x_beh = self.behavior_attention_blocks[0](x_beh, _causal_mask(beh_valid, length),
                                time_bias(gaps, self.n_head), deterministic)
    x_item, x_beh = drop(x_item), drop(x_beh)
    # interleave b_1, i_1, ..., b_{L-1}, i_{L-1}, then b_L: [B, 2L-1, d]
    pairs = jnp.stack([x_beh[:, :-1], x_item], axis=2).reshape(b, 2 * length - 2, -1)
    x = jnp.concatenate([pairs, x_beh[:, -1:]], axis=1)
    valid = None
    if self.mask_padding:
      valid = jnp.concatenate([jnp.stack([beh_valid[:, :-1], item_valid], axis=2)
                               .reshape(b, -1), beh_valid[:, -1:]], axis=1)
    mask = _causal_mask(valid, 2 * length - 1)
    for layer in self.upper_transformer:
      x = layer(x, mask, None, deterministic)  # [B, 2L-1, d]
    return x[:, 0::2], x[:, 1::2]  # [B, L, d] behavior slots, [B, L-1, d] item slots


def build(num_items: int, num_behaviors: int, model_config, precision: str = 'float32'
          ) -> GEAR:
  """The module from ``config.model`` (d_model, n_head, n_layer, dropout, mask_padding)."""
  return GEAR(num_items=num_items, num_behaviors=num_behaviors,
              d_model=model_config.d_model, n_head=model_config.n_head,
              n_layer=model_config.n_layer, dropout=model_config.dropout,
              mask_padding=bool(model_config.get('mask_padding', False)),
              dtype=compute_dtype(precision), precision=matmul_precision(precision))


def init_params(model: GEAR, key: Array, max_len: int) -> dict:
  """Initial parameters (float32) for sequences of length `max_len`."""
  z = jnp.zeros((1, max_len), jnp.int32)
  return model.init({'params': key}, z, z, z, deterministic=True)['params']


def item_embedding(params) -> Array:
  return params['item_emb']['embedding']  # [V+1, d]


def behavior_embedding(params) -> Array:
  return params['behavior_emb']['embedding']  # [n_b+1, d]


def item_logits(params, h_behavior: Array, precision=None) -> Array:
  """Dense item head: [B, L, d] -> [B, L, V+1] (tests and small catalogs only)."""
  return jnp.einsum('bld,vd->blv', h_behavior, item_embedding(params).astype(
      h_behavior.dtype), precision=precision, preferred_element_type=jnp.float32)


def behavior_logits(params, h_item: Array, precision=None) -> Array:
  """Behavior head: [B, L-1, d] -> [B, L-1, n_b+1]."""
  return jnp.einsum('bld,vd->blv', h_item, behavior_embedding(params).astype(
      h_item.dtype), precision=precision, preferred_element_type=jnp.float32)


def score_candidates(params, h_last: Array, candidates: Array, precision=None) -> Array:
  """Scores of candidate items at the last position: [B, d], [B, C] -> [B, C] f32."""
  e = jnp.take(item_embedding(params), candidates, axis=0).astype(h_last.dtype)
  return jnp.einsum('bd,bcd->bc', h_last, e, precision=precision,
                    preferred_element_type=jnp.float32)


def _catalogue_chunks(params, chunk: int, dtype):
  """The item table padded to a multiple of `chunk` rows: [n_chunks, chunk, d]."""
  e = item_embedding(params).astype(dtype)
  v1 = e.shape[0]
  n = -(-v1 // chunk)
  e = jnp.pad(e, ((0, n * chunk - v1), (0, 0)))
  return e.reshape(n, chunk, -1), v1


def score_catalogue(params, h_last: Array, chunk: int = 16384, precision=None) -> Array:
  """Scores of every item id 0..V: [B, d] -> [B, V+1] f32, computed in item chunks
  (the working set is [B, chunk]; the result itself is [B, V+1])."""
  e, v1 = _catalogue_chunks(params, chunk, h_last.dtype)
  out = jax.lax.map(lambda ec: jnp.einsum('bd,cd->bc', h_last, ec, precision=precision,
                                          preferred_element_type=jnp.float32), e)
  return jnp.moveaxis(out, 0, 1).reshape(h_last.shape[0], -1)[:, :v1]


def rank_in_catalogue(params, h_last: Array, target: Array, chunk: int = 16384,
                      precision=None) -> Array:
  """0-based rank of `target` among items 1..V (ties count against it): [B] int32.

  Never materialises [B, V]: each item chunk adds its count of better-or-equal
  scores. The padding id 0 and the target itself are excluded; the user's history
  is NOT excluded (buys are often of viewed or carted items)."""
  e, v1 = _catalogue_chunks(params, chunk, h_last.dtype)
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


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
