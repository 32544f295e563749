"""Orbax checkpoints of a run: the latest (to resume) and the best (to evaluate).

A checkpoint is one orbax step directory (named by the global micro-step) with items
  params     the model parameters (StandardSave)
  train      optimizer state, step counter and base RNG key (absent after convert)
  data_iter  the grain training iterator state, one file per process
  meta       JSON: epoch, early-stopping state, validation metrics, the config
Saves are atomic (orbax writes a temporary directory and renames it after a commit
marker; unfinished ones are ignored and cleaned up) and asynchronous: the next epoch
trains while the previous one is written. `CheckpointManager` keeps exactly two: the
LATEST and the BEST by the monitored metric (ties keep the earlier step, which is the
one early stopping calls best).
"""

from __future__ import annotations

import math
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from gear_jax import parallel

ITEMS = ('params', 'train', 'data_iter', 'meta')


def _rank(metrics: dict) -> tuple[float, int]:
  value = float(metrics['monitor'])
  return (-math.inf if math.isnan(value) else value, -int(metrics['step']))


class CheckpointStore:
  """The checkpoints under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, *, read_only: bool = False,
               num_items: int | None = None, mesh=None):
    """`num_items` and `mesh` (when given) convert a padded, row-sharded item table of
    the training state to and from the unpadded checkpoint form (`parallel`)."""
    self.num_items, self.mesh = num_items, mesh
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(1),
        checkpoint_managers.BestN(get_metric_fn=_rank, reverse=False, n=1,
                                  keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_rank, best_mode='max',
        create=not read_only, cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=True)
    handlers = {'params': ocp.StandardCheckpointHandler(),
                'train': ocp.StandardCheckpointHandler(),
                'data_iter': grain.checkpoint.CheckpointHandler(),
                'meta': ocp.JsonCheckpointHandler()}
    self.directory = directory
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=ITEMS, item_handlers=handlers)

  # -- queries -----------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def resolve(self, which: str | int) -> int:
    """'best', 'latest' or a step number -> an existing step (or a clear error)."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoints in {self.directory}')
    if which == 'best':
      step = self.best_step()
    elif which == 'latest':
      step = self.latest_step()
    else:
      step = int(which)
    if step not in steps:
      raise FileNotFoundError(f'checkpoint {which!r} not found in {self.directory}; '
                              f'available steps: {sorted(steps)}')
    return step

  # -- save / restore ----------------------------------------------------------------
  def save(self, step: int, *, params, train: Any | None, iterator: Any | None,
           meta: dict, monitor: float | None) -> None:
    """Saves (asynchronously) one checkpoint; `monitor` ranks it for 'best'."""
    if self.num_items is not None:
      params = parallel.to_canonical(params, self.num_items, self.mesh)
      train = parallel.to_canonical(train, self.num_items, self.mesh)
    args = dict(params=ocp.args.StandardSave(params),
                meta=ocp.args.JsonSave(meta))
    if train is not None:
      args['train'] = ocp.args.StandardSave(train)
    if iterator is not None:
      args['data_iter'] = grain.checkpoint.CheckpointSave(iterator)
    metrics = None if monitor is None else {'monitor': float(monitor), 'step': step}
    self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics)

  def restore(self, step: int, *, params_target, train_target=None,
              iterator=None) -> dict[str, Any]:
    """Restores `step` onto the shardings of the abstract targets.

    Targets are pytrees of `jax.ShapeDtypeStruct` with shardings (see `abstract`), so
    a checkpoint written on one mesh restores onto another."""
    targets = {'params': params_target, 'train': train_target}
    stored = dict(targets)
    if self.num_items is not None:
      stored = {k: parallel.canonical_target(t, self.num_items, self.mesh)
                for k, t in targets.items()}
    args = dict(params=ocp.args.StandardRestore(stored['params']),
                meta=ocp.args.JsonRestore())
    if train_target is not None:
      args['train'] = ocp.args.StandardRestore(stored['train'])
    if iterator is not None:
      args['data_iter'] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    out = {k: restored[k] for k in args}
    if self.num_items is not None:
      for k in ('params', 'train'):
        if k in out:
          out[k] = parallel.from_canonical(out[k], targets[k])
    return out

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract(tree) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays, as restore targets."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
