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

The attention core and the feed-forward block come in two implementations
(`kernels`, chosen per backend by `gear_jax.backend.resolve_kernels`): 'cpu', the
`jax.custom_vjp` functions with hand-written backward passes tuned for XLA:CPU, and
'xla', their plain autodiff twins, which XLA:GPU / TPU fuse freely. Both live in
`gear_jax.kernels` and compute the same function and gradients, with the same
parameters and dropout masks.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gear_jax import backend, kernels

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


def _padded_init(init, rows: int):
  """`init` over the first `rows` rows (its fan-in/out computed for those), zeros below."""
  def padded(key, shape, dtype=jnp.float32):
    table = init(key, (rows,) + tuple(shape[1:]), dtype)
    return jnp.pad(table, ((0, shape[0] - rows), (0, 0)))
  return padded


def behavior_embedding_init(key, shape, dtype=jnp.float32):
  """N(0, 1) with the padding row 0 zeroed (PyTorch's padding_idx init)."""
  return jax.random.normal(key, shape, dtype).at[0].set(0.0)


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
    attend = kernels.attend if self.kernels == 'cpu' else kernels.attend_reference
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
    ffn = kernels.ffn if self.kernels == 'cpu' else kernels.ffn_reference
    ff = ffn(x2, cast(w1), cast(b1), cast(w2), cast(b2),
              drop_ff.seed() if use_dropout else None,
              kernels.FFNSpec(self.dropout if use_dropout else 0.0,
                              self.precision))  # [B*T, d]
    return norm('norm2')(x2 + drop(ff)).reshape(b, t, d)  # [B, T, d]


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
  # log(1 + t), not log1p: t is a whole number of seconds, so 1 + t is exact below 2^24 and
  # the two agree; XLA:CPU vectorises log but not log1p (0.15 vs 0.4 ms here).
  return -alibi_slopes(n_head)[None, :, None, None] * jnp.log(1.0 + t)[:, None]


class GEAR(nn.Module):
  """The GEAR network. See the module docstring for the data flow."""
  KIND: ClassVar[str] = 'gear'
  num_items: int
  num_behaviors: int
  d_model: int = 32
  n_head: int = 2
  n_layer: int = 4
  dropout: float = 0.2
  mask_padding: bool = False  # reference: False (padded positions are attended to)
  dtype: Any = jnp.float32
  precision: Any = None
  # Rows of the item table: 0 = num_items + 1. More only to shard the table evenly
  # over a mesh axis; the extra rows are zero, never looked up and cut off before
  # every softmax and ranking (`item_embedding(params, num_items)`).
  table_rows: int = 0
  kernels: str = 'cpu'  # 'cpu' (custom VJPs tuned for XLA:CPU) or 'xla' (plain autodiff)

  def setup(self):
    if self.d_model % self.n_head:
      raise ValueError(f'd_model {self.d_model} is not divisible by n_head {self.n_head}')
    if self.kernels not in ('cpu', 'xla'):
      raise ValueError(f"kernels must be 'cpu' or 'xla', got {self.kernels!r}")
    d = self.d_model
    self.item_emb = item_table(self.num_items, d, self.dtype, self.table_rows)
    self.behavior_emb = PaddedEmbed(self.num_behaviors + 1, d, behavior_embedding_init,
                                    self.dtype)
    self.LayerNorm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                                  use_fast_variance=False)
    layer = lambda: EncoderLayer(d, self.n_head, self.dropout, self.dtype,  # noqa: E731
                                 self.precision, self.kernels)
    # lists name their elements <attribute>_<k>, mirroring the PyTorch module names
    self.item_attention_blocks = [layer()]
    self.behavior_attention_blocks = [layer()]
    self.upper_transformer = [layer() for _ in range(self.n_layer)]
    self.drop = Dropout(self.dropout)

  def __call__(self, items: Array, behaviors: Array, gaps: Array, *,
               deterministic: bool = True) -> tuple[Array, Array]:
    """items, behaviors, gaps [B, L] int -> (h_behavior [B, L, d], h_item [B, L-1, d]).

    Only items[:, :L-1] are read (the last slot is a label or a placeholder)."""
    x, valid = self._upper_input(items, behaviors, gaps, deterministic)
    for layer in self.upper_transformer:  # causal attention over all 2L - 1 positions
      x = layer(x, valid, None, deterministic)  # [B, 2L-1, d]
    return x[:, 0::2], x[:, 1::2]  # [B, L, d] behavior slots, [B, L-1, d] item slots

  def last_state(self, items: Array, behaviors: Array, gaps: Array) -> Array:
    """The output at the last position (b_L, the one evaluation scores): [B, d].

    Equals `__call__(...)[0][:, -1]` in inference mode; the last upper block computes
    only that position (its keys and values still cover all 2L - 1): 14.5 instead of
    17.7 MFLOP per user at the retail shape, about 25 % faster on CPU."""
    x, valid = self._upper_input(items, behaviors, gaps, True)
    if not self.upper_transformer:
      return x[:, -1]
    for layer in self.upper_transformer[:-1]:
      x = layer(x, valid, None, True)
    return self.upper_transformer[-1](x, valid, None, True, last=1)[:, 0]

  def _upper_input(self, items: Array, behaviors: Array, gaps: Array,
                   deterministic: bool) -> tuple[Array, Array | None]:
    """The interleaved sequence the upper blocks read, [B, 2L-1, d], and its key mask
    ([B, 2L-1] bool, or None without `mask_padding`)."""
    b, length = behaviors.shape
    items = items[:, :length - 1]  # [B, L-1]
    drop = lambda x: self.drop(x, deterministic)  # noqa: E731
    item_valid = beh_valid = None
    if self.mask_padding:
      item_valid, beh_valid = items != 0, behaviors != 0
    x_item = self.LayerNorm(drop(self.item_emb(items)))  # [B, L-1, d]
    x_item = self.item_attention_blocks[0](x_item, item_valid, None, deterministic)
    x_beh = self.LayerNorm(drop(self.behavior_emb(behaviors)))  # [B, L, d]
    x_beh = self.behavior_attention_blocks[0](x_beh, beh_valid, time_bias(gaps, self.n_head),
                                              deterministic)
    x_item, x_beh = drop(x_item), drop(x_beh)
    # interleave b_1, i_1, ..., b_{L-1}, i_{L-1}, then b_L: [B, 2L-1, d]
    pairs = jnp.stack([x_beh[:, :-1], x_item], axis=2).reshape(b, 2 * length - 2, -1)
    x = jnp.concatenate([pairs, x_beh[:, -1:]], axis=1)
    valid = None
    if self.mask_padding:
      valid = jnp.concatenate([jnp.stack([beh_valid[:, :-1], item_valid], axis=2)
                               .reshape(b, -1), beh_valid[:, -1:]], axis=1)
    return x, valid


def build(num_items: int, num_behaviors: int, model_config, precision: str = 'float32',
          table_rows: int = 0) -> GEAR:
  """The module from ``config.model`` (name, d_model, n_head, n_layer, dropout,
  mask_padding, kernels; 'auto' kernels resolved for the platform JAX computes on):
  `GEAR`, or `gear_jax.sasrec.SASRec` for name 'sasrec'."""
  name = model_config.get('name', 'gear')
  if name not in ('gear', 'sasrec'):
    raise ValueError(f"model.name must be 'gear' or 'sasrec', got {name!r}")
  if name == 'sasrec':
    from gear_jax import sasrec  # it builds on this module's blocks
    cls = sasrec.SASRec
  else:
    cls = GEAR
  return cls(num_items=num_items, num_behaviors=num_behaviors, table_rows=table_rows,
             d_model=model_config.d_model, n_head=model_config.n_head,
             n_layer=model_config.n_layer, dropout=model_config.dropout,
             # without the key: the model's own default (GEAR False, SASRec True)
             mask_padding=bool(model_config.get('mask_padding', cls.mask_padding)),
             dtype=compute_dtype(precision), precision=matmul_precision(precision),
             kernels=backend.resolve_kernels(model_config.get('kernels', 'auto')))


def init_params(model: GEAR, key: Array, max_len: int) -> dict:
  """Initial parameters (float32) for sequences of length `max_len`."""
  z = jnp.zeros((1, max_len), jnp.int32)
  return model.init({'params': key}, z, z, z, deterministic=True)['params']


def item_embedding(params, num_items: int | None = None) -> Array:
  """The item table [V+1, d]. A table padded to shard evenly (see `GEAR.table_rows`)
  is cut back to its num_items + 1 real rows when `num_items` is given."""
  table = params['item_emb']['embedding']
  if num_items is not None and table.shape[0] != num_items + 1:
    table = table[:num_items + 1]
  return table


def behavior_embedding(params) -> Array:
  return params['behavior_emb']['embedding']  # [n_b+1, d]


def item_logits(params, h_behavior: Array, precision=None,
                num_items: int | None = None) -> Array:
  """Dense item head: [B, L, d] -> [B, L, V+1] (tests and small catalogs only)."""
  return jnp.einsum('bld,vd->blv', h_behavior, item_embedding(params, num_items).astype(
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


def count_params(params, num_items: int | None = None) -> int:
  """Number of parameters; with `num_items`, padding rows of the item table excluded."""
  total = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
  if num_items is not None:
    table = params['item_emb']['embedding']
    total -= (table.shape[0] - num_items - 1) * table.shape[1]
  return total
