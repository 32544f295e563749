"""SASRec (Kang and McAuley, ICDM 2018) as a second model of the package.

``config.model.name = 'sasrec'`` (or a config variant ``configs/demo.py:sasrec``): the
item sequence only, as multi-behavior papers run it. Every interaction's item is a
token, whatever its behavior; behaviors and times are ignored. Shapes as in
`gear_jax.models.gear` (B batch, L max_len, d d_model, V items):

  tokens    items i_1..i_{L-1} of a window (its last slot is the label / the slot to
            score, as for GEAR)
  input     E_item[i_t] * sqrt(d) + P[t]  (learned positions, right-aligned: the
            newest item always sits at position L - 2) -> Dropout
  blocks    n_layer causal post-norm transformer blocks, the same `EncoderLayer` code
            as GEAR's upper stack (and the same kernels, `model.kernels`)
  head      tied to E_item: the output at position t scores i_{t+1}

It is trained with the full-softmax cross-entropy (`sasrec_loss`: the chunked item
loss GEAR uses) to predict the next item at every position of the sequence, and
implements `interface.SequenceModel` as GEAR does, so evaluation, checkpoints,
resuming, sharding the item table, recommendation and export work unchanged. Its own
defaults (one head, two blocks, padding hidden) are its line in `registry.BUILTIN`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gear_jax import losses
from gear_jax.models import layers
from gear_jax.models.interface import ModelSpec

Array = jax.Array


class Positions(nn.Module):
  """Learned position embeddings [T, d]; T is the window's token count, known at init."""
  features: int

  @nn.compact
  def __call__(self, t: int) -> Array:
    return self.param('embedding', nn.initializers.xavier_uniform(), (t, self.features))


class SASRec(nn.Module):
  """Self-attentive sequential recommendation over item ids."""
  num_items: int
  num_behaviors: int = 0  # unused: the model reads items only
  d_model: int = 32
  n_head: int = 1
  n_layer: int = 2
  dropout: float = 0.2
  mask_padding: bool = True  # padded positions hidden from attention, as in SASRec
  dtype: Any = jnp.float32
  precision: Any = None
  table_rows: int = 0  # see gear.GEAR.table_rows
  kernels: str = 'cpu'

  def setup(self):
    if self.d_model % self.n_head:
      raise ValueError(f'd_model {self.d_model} is not divisible by n_head {self.n_head}')
    d = self.d_model
    self.item_emb = layers.item_table(self.num_items, d, self.dtype, self.table_rows)
    self.blocks = [layers.EncoderLayer(d, self.n_head, self.dropout, self.dtype,
                                          self.precision, self.kernels)
                   for _ in range(self.n_layer)]
    self.pos_emb = Positions(d)
    self.drop = layers.Dropout(self.dropout)

  def _input(self, items: Array, deterministic: bool) -> tuple[Array, Array | None]:
    """[B, L-1, d] token inputs and the key mask ([B, L-1] bool or None)."""
    tokens = items[:, :-1]  # [B, L-1]
    positions = self.pos_emb(tokens.shape[1])  # [L-1, d]
    x = self.item_emb(tokens) * math.sqrt(self.d_model) + positions.astype(self.dtype)
    valid = (tokens != 0) if self.mask_padding else None
    return self.drop(x, deterministic), valid

  def __call__(self, items: Array, behaviors: Array, gaps: Array, *,
               deterministic: bool = True) -> Array:
    """items [B, L] -> hidden states [B, L-1, d]; the one at t scores items[:, t+1].
    `behaviors` and `gaps` are accepted (the batches are GEAR's) and ignored."""
    del behaviors, gaps
    x, valid = self._input(items, deterministic)
    for block in self.blocks:
      x = block(x, valid, None, deterministic)
    return x

  def last_state(self, items: Array, behaviors: Array, gaps: Array) -> Array:
    """The output at the newest item (it scores the window's last slot): [B, d]; the
    last block computes only that position."""
    del behaviors, gaps
    x, valid = self._input(items, True)
    for block in self.blocks[:-1]:
      x = block(x, valid, None, True)
    return self.blocks[-1](x, valid, None, True, last=1)[:, 0]


def sasrec_loss(params, batch: dict[str, Array], dropout_key: Array | None, *,
                model: SASRec, alpha: float = 0.0, loss_impl: str = 'auto',
                loss_memory_mb: float = 256.0, vocab_shards: int = 1
                ) -> tuple[Array, dict[str, Array]]:
  """SASRec's loss: next-item cross-entropy at every position whose token and label
  are real items, mean over those positions (`alpha` has no behavior head to weigh)."""
  del alpha
  items = batch['items']  # [B, L]
  rngs = None if dropout_key is None else {'dropout': dropout_key}
  h = model.apply({'params': params}, items, batch['behaviors'], batch['gaps'],
                  deterministic=dropout_key is None, rngs=rngs)  # [B, L-1, d]
  labels = items[:, 1:]
  loss, count = losses.item_cross_entropy(
      params, h, labels, (labels != 0) & (items[:, :-1] != 0), model=model,
      loss_impl=loss_impl, loss_memory_mb=loss_memory_mb, vocab_shards=vocab_shards)
  return loss, {'loss': loss, 'item_loss': loss, 'behavior_loss': jnp.zeros(()),
                'positions': count}


SPEC = ModelSpec(name='sasrec', module=SASRec, loss=sasrec_loss)
