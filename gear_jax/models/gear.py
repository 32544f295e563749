"""GEAR as a functional Flax (Linen) module, and its training loss.

Shapes: B batch, L max_len, d d_model, H heads, V num_items (ids 1..V, 0 = padding),
n_b behaviors. The network follows the model of docs/model.md operation for operation,
so that a converted PyTorch state_dict reproduces the reference outputs:

  item stream      E_item[i_1..i_{L-1}] -> Dropout -> shared LN -> item block (causal)
  behavior stream  E_beh[b_1..b_L] -> Dropout -> shared LN -> behavior block (causal +
                   per-head time bias -s_h log(1 + T), s_h = 2^(-8h/H))
  Dropout on both, interleave b_1, i_1, b_2, ..., i_{L-1}, b_L (2L - 1 positions),
  n_layer upper blocks (causal), heads tied to the embeddings.

`GEAR.__call__` returns the final hidden states at the behavior positions ([B, L, d],
scored against E_item by the item head) and at the item positions ([B, L - 1, d],
scored against E_beh by the behavior head). Logits are formed outside the module
(`behavior_logits`, `gear_jax.retrieval`, or the chunked loss `gear_loss`), so
training never has to materialise [B, L, V].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gear_jax import losses
from gear_jax.models import layers
from gear_jax.models.interface import ModelSpec
from gear_jax.models.layers import Dropout, EncoderLayer, PaddedEmbed

Array = jax.Array


def behavior_embedding_init(key, shape, dtype=jnp.float32):
  """N(0, 1) with the padding row 0 zeroed (PyTorch's padding_idx init)."""
  return jax.random.normal(key, shape, dtype).at[0].set(0.0)


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
    d = self.d_model
    self.item_emb = layers.item_table(self.num_items, d, self.dtype, self.table_rows)
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



def behavior_embedding(params) -> Array:
  return params['behavior_emb']['embedding']  # [n_b+1, d]



def behavior_logits(params, h_item: Array, precision=None) -> Array:
  """Behavior head: [B, L-1, d] -> [B, L-1, n_b+1]."""
  return jnp.einsum('bld,vd->blv', h_item, behavior_embedding(params).astype(
      h_item.dtype), precision=precision, preferred_element_type=jnp.float32)


def gear_loss(params, batch: dict[str, Array], dropout_key: Array | None, *,
              model: GEAR, alpha: float, loss_impl: str = 'auto',
              loss_memory_mb: float = 256.0, vocab_shards: int = 1
              ) -> tuple[Array, dict[str, Array]]:
  """The training loss: item CE over the L behavior slots (labels i_1..i_L, padding
  ignored, mean over the batch's real positions) + alpha * behavior CE over the L - 1
  item slots (labels b_2..b_L). Without `dropout_key` the model runs deterministically.
  """
  items, behaviors = batch['items'], batch['behaviors']  # [B, L]
  deterministic = dropout_key is None
  rngs = None if deterministic else {'dropout': dropout_key}
  h_beh, h_item = model.apply({'params': params}, items, behaviors, batch['gaps'],
                              deterministic=deterministic, rngs=rngs)
  item_loss, item_count = losses.item_cross_entropy(
      params, h_beh, items, items != 0, model=model, loss_impl=loss_impl,
      loss_memory_mb=loss_memory_mb, vocab_shards=vocab_shards)
  beh_sum, beh_count = losses.masked_mean_cross_entropy(
      behavior_logits(params, h_item, model.precision), behaviors[:, 1:])
  beh_loss = beh_sum / jnp.maximum(beh_count, 1.0)
  loss = item_loss + alpha * beh_loss
  return loss, {'loss': loss, 'item_loss': item_loss, 'behavior_loss': beh_loss,
                'positions': item_count}


SPEC = ModelSpec(name='gear', module=GEAR, loss=gear_loss)
