"""The building blocks GEAR and SASRec share: PyTorch-matching initialisers, the
hashed dropout, the padded embedding tables, self-attention and the post-norm
transformer block, and the precision settings.

Shapes: B batch, T tokens, d d_model, H heads, V num_items (ids 1..V, 0 = padding).
Each block matches its PyTorch counterpart parameter for parameter, so that converted
reference weights reproduce the reference outputs (docs/model.md).

The attention core and the feed-forward block come in two implementations
(`kernels`, chosen per backend by `gear_jax.backend.resolve_kernels`): 'cpu', the
`jax.custom_vjp` functions with hand-written backward passes tuned for XLA:CPU, and
'xla', their plain autodiff twins, which XLA:GPU / TPU fuse freely. Both live in
`gear_jax.models.kernels` and compute the same function and gradients, with the same
parameters and dropout masks.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gear_jax.models import kernels

Array = jax.Array


# The settings of ``model.precision`` (allowed values: `gear_jax.defaults`) as
# (activation dtype, lax matmul precision). Parameters stay float32 in all of them.
_PRECISION = {
    'float32': (jnp.float32, jax.lax.Precision.HIGHEST),  # parity with the reference
    'default': (jnp.float32, None),  # the platform's default, e.g. TF32 on GPUs
    'bfloat16': (jnp.bfloat16, None),
}


def _precision(precision: str):
  if precision not in _PRECISION:
    raise ValueError(f'unknown precision {precision!r}; use one of {tuple(_PRECISION)}')
  return _PRECISION[precision]


def compute_dtype(precision: str):
  """The activation dtype of a precision setting (parameters stay float32)."""
  return _precision(precision)[0]


def matmul_precision(precision: str):
  """The lax matmul precision of a precision setting ('highest' for parity)."""
  return _precision(precision)[1]


# -- initialisers matching PyTorch ----------------------------------------------------

def torch_linear_kernel_init():
  """nn.Linear's default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_linear_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _padded_init(init, rows: int):
  """`init` over the first `rows` rows (its fan-in/out computed for those), zeros below."""
  def padded(key, shape, dtype=jnp.float32):
    table = init(key, (rows,) + tuple(shape[1:]), dtype)
    return jnp.pad(table, ((0, shape[0] - rows), (0, 0)))
  return padded


class Dropout(nn.Module):
  """Inverted dropout whose mask bits come from a counter-based hash.

  Same semantics as `nn.Dropout` (keep with probability 1 - rate, scale by
  1 / (1 - rate), identity when deterministic), and the same RNG plumbing (one
  `make_rng('dropout')` per call site). Only the bit source differs: two rounds of
  murmur3's finaliser over (element index, 64 bits of the site's key) instead of
  threefry. On CPU threefry made the forward pass 3x slower and each dropout site
  cost ~2 s of compile time; this costs a few integer ops per element."""
  rate: float

  def seed(self) -> Array:
    """The site's two key words, for code that forms this site's mask itself
    (`kernels.keep_mask` over the flat element indices of the tensor being dropped)."""
    return jax.random.bits(self.make_rng('dropout'), (2,), jnp.uint32)

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    idx = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
    keep = kernels.keep_mask(idx, self.seed(), self.rate)
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


def item_table(num_items: int, features: int, dtype, table_rows: int = 0) -> PaddedEmbed:
  """The item embedding (also the tied item head) of GEAR and SASRec: Xavier-uniform
  over the num_items + 1 real rows, zero padding rows up to `table_rows` (if larger)."""
  return PaddedEmbed(table_rows or num_items + 1, features,
                     _padded_init(nn.initializers.xavier_uniform(), num_items + 1), dtype)


class DenseParams(nn.Module):
  """The kernel [n_in, features] and bias [features] of an `nn.Dense` (same names,
  shapes and initialisers), for layers that apply them inside a custom computation."""
  n_in: int
  features: int
  kernel_init: Any
  bias_init: Any

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    return (self.param('kernel', self.kernel_init, (self.n_in, self.features)),
            self.param('bias', self.bias_init, (self.features,)))


class SelfAttention(nn.Module):
  """torch.nn.MultiheadAttention (fused q, k, v input projection), batch first, causal."""
  d_model: int
  n_head: int
  dropout: float
  dtype: Any = jnp.float32
  precision: Any = None
  kernels: str = 'cpu'  # 'cpu': kernels.attend, 'xla': kernels.attend_reference

  @nn.compact
  def __call__(self, x: Array, valid: Array | None, bias: Array | None,
               deterministic: bool, last: int | None = None) -> Array:
    # x [B, T, d]; valid [B, T] bool (padded keys hidden) or None; bias [B, H, T, T]
    # additive or None. last=n: outputs of the last n positions only, [B, n, d]
    # (inference; every position is still a key).
    b, t, d = x.shape
    kernel, bias_in = DenseParams(d, 3 * d, nn.initializers.xavier_uniform(),
                                  nn.initializers.zeros, name='in_proj')()  # [d, 3d], [3d]
    kernel, bias_in = kernel.astype(self.dtype), bias_in.astype(self.dtype)
    # The key bias adds q . b_k to every score of a query row, which the softmax
    # cancels exactly; leaving it out changes nothing but float rounding and makes its
    # gradient exactly 0 instead of rounding noise (which Adam would amplify to lr-sized
    # steps, differently on every device layout).
    bias_in = jnp.concatenate([bias_in[:d], jnp.zeros_like(bias_in[d:2 * d]),
                               bias_in[2 * d:]])
    if last is not None:
      if not deterministic:
        raise ValueError('last= computes inference outputs; it needs deterministic=True')
      out = self._attend_last(x, kernel, bias_in, valid, bias, last)  # [B*n, d]
      t = last
    else:
      drop = Dropout(self.dropout)  # one site for all heads, as in the reference
      seed = drop.seed() if not deterministic and self.dropout > 0.0 else None
      out = self._attend_all(x, kernel, bias_in, valid, bias, seed)  # [B*T, d]
    y = nn.Dense(d, name='out_proj', dtype=self.dtype, precision=self.precision,
                 kernel_init=torch_linear_kernel_init(),
                 bias_init=nn.initializers.zeros)(out)
    return y.reshape(b, t, d)

  def _attend_last(self, x, kernel, bias_in, valid, bias, n: int) -> Array:
    """Queries of the last n positions against all keys, without dropout: [B*n, d]."""
    b, t, d = x.shape
    h, dh = self.n_head, d // self.n_head
    q = jnp.dot(x[:, t - n:], kernel[:, :d], precision=self.precision) + bias_in[:d]
    kv = jnp.dot(x, kernel[:, d:], precision=self.precision) + bias_in[d:]  # [B, T, 2d]
    q = q.reshape(b, n, h, dh)
    k, v = kv[..., :d].reshape(b, t, h, dh), kv[..., d:].reshape(b, t, h, dh)
    s = jnp.einsum('bqhc,bkhc->bhqk', q, k, precision=self.precision,
                   preferred_element_type=jnp.float32) / math.sqrt(dh)  # [B, H, n, T]
    if bias is not None:
      s = s + bias[:, :, t - n:]
    allowed = kernels.allowed(jnp.arange(t)[None, :], jnp.arange(t - n, t)[:, None],
                       None if valid is None else valid[:, None, None, :])  # [(B, 1,) n, T]
    p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1)
    o = jnp.einsum('bhqk,bkhc->bqhc', p.astype(self.dtype), v, precision=self.precision,
                   preferred_element_type=jnp.float32)
    return o.astype(self.dtype).reshape(b * n, d)  # heads side by side

  def _attend_all(self, x, kernel, bias_in, valid, bias, seed) -> Array:
    """Every position's attention output, [B*T, d] (training; dropout iff seed)."""
    b, t, d = x.shape
    h, dh = self.n_head, d // self.n_head
    qkv = jnp.dot(x.reshape(b * t, d), kernel, precision=self.precision) + bias_in
    # [B*T, 3d] -> heads into the batch, [3, B*H, T, dh] (one small copy)
    qkv = qkv.reshape(b, t, 3, h, dh).transpose(2, 0, 3, 1, 4).reshape(3, b * h, t, dh)
    if bias is not None:
      bias = bias.reshape(b * h, t, t)
    if valid is not None:
      valid = jnp.repeat(valid, h, axis=0)  # [B*H, T]
    spec = kernels.AttnSpec(self.dropout if seed is not None else 0.0,
                            kernels.query_blocks(t), self.dtype,
                            self.precision)
    attend = kernels.implementation(self.kernels).attend
    out = attend(qkv[0], qkv[1], qkv[2], bias, valid, seed, spec)  # [B*H, T, dh]
    return out.reshape(b, h, t, dh).transpose(0, 2, 1, 3).reshape(b * t, d)  # heads side by side


class EncoderLayer(nn.Module):
  """torch.nn.TransformerEncoderLayer, post-norm, ReLU, FFN width 4d, eps 1e-5, causal."""
  d_model: int
  n_head: int
  dropout: float
  dtype: Any = jnp.float32
  precision: Any = None
  kernels: str = 'cpu'  # see SelfAttention

  @nn.compact
  def __call__(self, x: Array, valid: Array | None, bias: Array | None,
               deterministic: bool, last: int | None = None) -> Array:
    # x [B, T, d]; valid [B, T] bool or None; bias [B, H, T, T] or None. last=n: the
    # outputs of the last n positions only, [B, n, d] (inference, see SelfAttention)
    b, t, d = x.shape
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, dtype=self.dtype,  # noqa: E731
                                     use_fast_variance=False)
    drop = lambda y: Dropout(self.dropout)(y, deterministic)  # noqa: E731
    attn = SelfAttention(d, self.n_head, self.dropout, self.dtype, self.precision,
                         self.kernels, name='self_attn')(x, valid, bias, deterministic,
                                                         last)
    if last is not None:
      x, t = x[:, t - last:], last
    # the rest is position-wise: 2-D [B*T, .] operands (flat indices, hence dropout
    # masks, are those of the 3-D tensors)
    x2 = norm('norm1')((x + drop(attn)).reshape(b * t, d))  # [B*T, d]
    # linear1 -> ReLU -> Dropout -> linear2 as one function (`kernels.ffn`, a custom_vjp,
    # or its autodiff twin `kernels.ffn_reference`), same params
    w1, b1 = DenseParams(d, 4 * d, torch_linear_kernel_init(), torch_linear_bias_init(d),
                         name='linear1')()
    drop_ff = Dropout(self.dropout)  # created here so that the site keeps its name and key
    w2, b2 = DenseParams(4 * d, d, torch_linear_kernel_init(),
                         torch_linear_bias_init(4 * d), name='linear2')()
    use_dropout = not deterministic and self.dropout > 0.0
    cast = lambda z: z.astype(self.dtype)  # noqa: E731
    ffn = kernels.implementation(self.kernels).ffn
    ff = ffn(x2, cast(w1), cast(b1), cast(w2), cast(b2),
              drop_ff.seed() if use_dropout else None,
              kernels.FFNSpec(self.dropout if use_dropout else 0.0,
                              self.precision))  # [B*T, d]
    return norm('norm2')(x2 + drop(ff)).reshape(b, t, d)  # [B, T, d]


def item_embedding(params, num_items: int | None = None) -> Array:
  """The item table [V+1, d] (`item_table`'s parameter). A table padded to shard
  evenly (see `GEAR.table_rows`)
  is cut back to its num_items + 1 real rows when `num_items` is given."""
  table = params['item_emb']['embedding']
  if num_items is not None and table.shape[0] != num_items + 1:
    table = table[:num_items + 1]
  return table



def count_params(params, num_items: int | None = None) -> int:
  """Number of parameters; with `num_items`, padding rows of the item table excluded."""
  total = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
  if num_items is not None:
    table = params['item_emb']['embedding']
    total -= (table.shape[0] - num_items - 1) * table.shape[1]
  return total
