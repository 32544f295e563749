"""What the code downstream of a model relies on: `SequenceModel` and `ModelSpec`.

The trainer, the steps, the evaluator, the recommender and the exporter are written
against `SequenceModel` only; `ModelSpec` is what a model module hands the registry
(`gear_jax.models.registry`). This module imports no JAX, so that reading the
registry (e.g. to validate ``model.name``) stays cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol


class SequenceModel(Protocol):
  """A Flax Linen module over windows of GEAR's batches.

  Inputs are ``items, behaviors, gaps`` ([B, L] int32 each; items[:, L-1] is the label
  or the slot to score). The parameters hold the item table at
  ``params['item_emb']['embedding']`` ([table_rows or V+1, d], see
  `layers.item_table`), which is also the item head: evaluation, recommendation and
  the chunked loss score hidden states against it."""
  num_items: int
  num_behaviors: int
  d_model: int
  n_head: int
  n_layer: int
  dropout: float
  mask_padding: bool
  dtype: Any
  precision: Any
  table_rows: int
  kernels: str

  def init(self, rngs, *args, **kwargs) -> Any: ...

  def apply(self, variables, *args, **kwargs) -> Any: ...

  def last_state(self, items, behaviors, gaps) -> Any:
    """[B, d]: the hidden state that scores the window's last slot (inference)."""


# loss(params, batch, dropout_key, *, model, alpha, loss_impl, loss_memory_mb,
#      vocab_shards) -> (scalar loss, {'loss', 'item_loss', 'behavior_loss', 'positions'})
# dropout_key None runs the model deterministically.
LossFn = Callable[..., tuple[Any, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model as the registry knows it."""
  name: str  # the value of config.model.name
  module: type  # a flax.linen.Module class implementing SequenceModel
  loss: LossFn  # its training loss
  # model-config values of its own (e.g. SASRec's single head), applied by
  # `defaults.get_default_config(name)` and used where a config lacks the key; for the
  # built-in models they sit in the registry's table, so that configs read them
  # without importing JAX
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
