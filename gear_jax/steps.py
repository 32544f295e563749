"""Pure train, eval and recommend steps, the training state and the optimizer.

`train_step` and `eval_step` are module-level pure functions with explicit arguments;
the trainer binds the static ones (model, optimizer, loss settings) with
`functools.partial` and jits them once per run, donating the state. The dropout key of
step s is ``fold_in(state.rng, s)``, so a resumed run draws the same masks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from gear_jax import metrics, parallel, retrieval
from gear_jax.models import registry
from gear_jax.models.interface import SequenceModel

Array = jax.Array


# The base dropout key uses XLA's RngBitGenerator ('rbg'): each dropout site draws only
# two words from it (the mask bits come from a hash, see layers.Dropout), and with rbg
# the train step compiles ~30% faster on CPU than with threefry. Deterministic either way.
DROPOUT_PRNG = 'rbg'


@flax.struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: Array  # int32 scalar: micro-steps taken
  rng: Array  # raw data of the base dropout key (uint32); per-step keys fold the step in


def dropout_base_key(seed: int) -> Array:
  """The raw key data from which every dropout mask of a run derives."""
  key = jax.random.fold_in(jax.random.key(seed, impl=DROPOUT_PRNG), 1)
  return jax.random.key_data(key)


def make_optimizer(lr: float, weight_decay: float, grad_accum: int = 1
                   ) -> optax.GradientTransformation:
  """Adam with PyTorch's weight decay: wd * w is ADDED TO THE GRADIENT before the Adam
  moments (torch.optim.Adam(weight_decay=wd), not AdamW). With `grad_accum` > 1 the
  gradients of that many micro-batches are averaged before one update (what
  Lightning's accumulate_grad_batches does with its loss scaling)."""
  tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))
  if grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
  return tx


def init_state(params, tx: optax.GradientTransformation, rng: Array) -> TrainState:
  """Step 0: fresh optimizer state; `rng` from `dropout_base_key`."""
  return TrainState(params=params, opt_state=tx.init(params),
                    step=jnp.zeros((), jnp.int32), rng=rng)


def param_target(model: SequenceModel, mesh, max_len: int, shard_items: bool):
  """Shapes, dtypes and shardings of the parameters on `mesh` (restore targets)."""
  shapes = jax.eval_shape(functools.partial(registry.init_params, model,
                                            max_len=max_len), jax.random.PRNGKey(0))
  shardings = parallel.state_shardings(shapes, mesh, shard_items)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def create_state(model: SequenceModel, tx: optax.GradientTransformation, mesh, *,
                 seed: int, max_len: int, shard_items: bool = False) -> TrainState:
  """The initial training state, created directly with its shardings on `mesh`.

  Parameters come from fold_in(PRNGKey(seed), 0), the dropout base key from
  `dropout_base_key(seed)`; the optimizer state is sharded like the parameters
  (`parallel.state_shardings`)."""
  target = param_target(model, mesh, max_len, shard_items)
  init = jax.jit(functools.partial(registry.init_params, model, max_len=max_len),
                 out_shardings=jax.tree_util.tree_map(lambda x: x.sharding, target))
  params = init(jax.random.fold_in(jax.random.PRNGKey(seed), 0))
  rng = dropout_base_key(seed)
  make = functools.partial(init_state, tx=tx)
  shapes = jax.eval_shape(make, params, rng=rng)
  shardings = parallel.state_shardings(shapes, mesh, shard_items)
  return jax.jit(make, out_shardings=shardings)(params, rng=rng)


def train_step(state: TrainState, batch: dict[str, Array], *, model: SequenceModel,
               tx: optax.GradientTransformation, alpha: float, loss_impl: str,
               loss_memory_mb: float, vocab_shards: int = 1
               ) -> tuple[TrainState, dict[str, Array]]:
  """One micro-step: forward, backward, optimizer update (or accumulation)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=DROPOUT_PRNG),
                           state.step)
  grad_fn = jax.value_and_grad(registry.spec_of(model).loss, has_aux=True)
  (_, aux), grads = grad_fn(state.params, batch, key, model=model, alpha=alpha,
                            loss_impl=loss_impl, loss_memory_mb=loss_memory_mb,
                            vocab_shards=vocab_shards)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  aux['grad_norm'] = optax.tree.norm(grads)
  return state.replace(params=params, opt_state=opt_state, step=state.step + 1), aux


def eval_step(params, batch: dict[str, Array], *, model: SequenceModel,
              protocols: Sequence[str], ks: Sequence[int], full_chunk: int
              ) -> dict[str, dict[str, Array]]:
  """Metric sums of one evaluation batch for each protocol ('sampled', 'full')."""
  # [B, d]: the output at the target-behavior slot b_L (only that position is computed
  # in the last upper block)
  h_last = model.apply({'params': params}, batch['items'], batch['behaviors'],
                       batch['gaps'], method='last_state')
  out = {}
  for protocol in protocols:
    if protocol == 'sampled':
      scores = retrieval.score_candidates(params, h_last, batch['candidates'],
                                          model.precision)  # [B, C]
      rank = metrics.rank_of_first(scores)
    else:
      rank = retrieval.rank_in_catalogue(params, h_last, batch['target'], full_chunk,
                                         model.precision, model.num_items)
    out[protocol] = metrics.rank_sums(rank, batch['mask'], ks)
  return out


def recommend_step(params, batch: dict[str, Array], *, model: SequenceModel, k: int,
                   chunk: int = retrieval.TOP_K_CHUNK) -> tuple[Array, Array]:
  """The top-k items for the scored slot of each window: ([B, k] f32 scores, [B, k]
  int32 item ids), best first, over the whole catalogue (`retrieval.top_k_in_catalogue`);
  batch['exclude'] ([B, H] item ids, 0 = none) lists items not to return per row."""
  h_last = model.apply({'params': params}, batch['items'], batch['behaviors'],
                       batch['gaps'], method='last_state')  # [B, d]
  return retrieval.top_k_in_catalogue(params, h_last, k, chunk, model.precision,
                                      model.num_items, batch['exclude'])
