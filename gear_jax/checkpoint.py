"""Orbax checkpoints of a run: the latest (to resume) and the best (to evaluate).

A checkpoint is one orbax step directory (named by the global micro-step) with items
  params     the model parameters (StandardSave)
  train      optimizer state, step counter and base RNG key (absent after convert)
  data_iter  the grain training iterator state, one file per process
  meta       JSON: epoch, early-stopping state, validation metrics, the config
Saves are atomic (orbax writes a temporary directory and renames it after a commit
marker; unfinished ones are ignored and cleaned up) and asynchronous: the next epoch
trains while the previous one is written. `CheckpointManager` keeps the two LATEST
(the newest and a fallback for when it is damaged; mid-epoch saves count) and the BEST
by the monitored metric (ties keep the earlier step, which is the
one early stopping calls best).

A checkpoint that cannot be read (a damaged disk, a file emptied or cut short) raises
`CheckpointError` naming its step and the reason in one line. Nothing here ever deletes
one: `set_aside` moves a damaged step out of the manager's directory (into
``<workdir>/damaged_checkpoints/``) so that a resumed run can save that step again.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from gear_jax import parallel
from gear_jax.errors import CheckpointError, is_failed_read_echo

ITEMS = ('params', 'train', 'data_iter', 'meta')
KEEP_LATEST = 2  # the newest checkpoint and its fallback
DAMAGED_DIR = 'damaged_checkpoints'


def one_line_reason(error: BaseException, limit: int = 240) -> str:
  """The root cause of an exception in one line, cut short (orbax wraps tensorstore's
  precise error, e.g. "OUT_OF_RANGE: Error reading ...", in pages of specs)."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen and len(chain) < 16:
    seen.add(id(error))
    chain.append(error)
    error = (error.__cause__ if error.__cause__ is not None else
             None if error.__suppress_context__ else error.__context__)
  for e in reversed(chain):
    text = str(e).strip().split('\n')[0].split(' See full TensorStore details')[0]
    if text.strip():
      text = text.strip()
      if len(text) < 24:  # e.g. KeyError('0'): the type says more than the text
        text = f'{type(e).__name__}: {text}'
      return text if len(text) <= limit else text[:limit - 3] + '...'
  return type(chain[0]).__name__


@contextlib.contextmanager
def _quiet_failed_reads():
  """Drops the echoes of a failed restore (`is_failed_read_echo`) while it runs and
  until its dropped reads are collected; the command lines keep such a filter for
  the whole process (`gear_jax.cli`), since late completions can come later still."""
  previous = sys.unraisablehook

  def hook(u):
    if not is_failed_read_echo(u.exc_type, u.exc_value, u.exc_traceback, u.object):
      previous(u)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


@contextlib.contextmanager
def _unranked_ok():
  """While saving a checkpoint without metrics on purpose (mid-epoch: never 'best'),
  drops orbax's warning that the best-checkpoint policy got no metrics."""
  import logging

  def keep(record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()

  logger = logging.getLogger('absl')
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


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
    self.workdir = os.path.abspath(workdir)
    directory = os.path.join(self.workdir, 'checkpoints')
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(KEEP_LATEST),
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
    try:
      self.manager = ocp.CheckpointManager(directory, options=options,
                                           item_names=ITEMS, item_handlers=handlers)
    except Exception as e:  # a step's metrics or metadata file cannot be parsed
      raise self._diagnose(e) from e

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
      raise CheckpointError(f'no checkpoints in {self.directory}',
                            hint='train first (python -m gear_jax.train), or check '
                            '--workdir')
    if which == 'best':
      step = self.best_step()
    elif which == 'latest':
      step = self.latest_step()
    else:
      try:
        step = int(which)
      except ValueError:
        raise CheckpointError(f"--checkpoint {which!r} is not 'best', 'latest' or a "
                              'step number') from None
    if step not in steps:
      raise CheckpointError(f'checkpoint {which!r} not found in {self.directory}',
                            hint=f'available steps: {sorted(steps)}')
    return step

  def _unreadable(self, step: int, error: BaseException) -> CheckpointError:
    return CheckpointError(f'checkpoint step {step} in {self.directory} cannot be '
                           f'read: {one_line_reason(error)}', step=step)

  def _diagnose(self, error: BaseException) -> CheckpointError:
    """Which step made opening the directory fail (orbax reads every step's metrics
    file when it starts)."""
    for step in sorted(step_dirs(self.directory), reverse=True):
      for name in ('metrics/metrics', '_CHECKPOINT_METADATA'):
        path = os.path.join(self.directory, str(step), name)
        if os.path.exists(path):
          try:
            with open(path) as f:
              json.load(f)
          except ValueError as e:
            return CheckpointError(
                f'checkpoint step {step} in {self.directory} cannot be read: {name}: '
                f'{one_line_reason(e)}', step=step, hint='move that step directory '
                f'aside (e.g. into {os.path.join(self.workdir, DAMAGED_DIR)}) to use the '
                'other checkpoints')
    return CheckpointError(f'the checkpoints in {self.directory} cannot be listed: '
                           f'{one_line_reason(error)}')

  def set_aside(self, step: int) -> str:
    """Moves a damaged step out of the manager's directory (kept, never deleted) and
    returns its new path."""
    self.wait()
    target = set_aside(self.workdir, step)
    self.manager.reload()
    return target

  # -- save / restore ----------------------------------------------------------------
  def save(self, step: int, *, params, train: Any | None, iterator: Any | None,
           meta: dict, monitor: float | None) -> None:
    """Saves (asynchronously) one checkpoint; `monitor` ranks it for 'best'. A
    checkpoint of the same step (a save at a stop during the evaluation that ends an
    epoch) is replaced: both hold the same state, the new one also the epoch's
    results."""
    if step in self.all_steps():
      self.wait()
      self.manager.delete(step)
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
    with _unranked_ok() if metrics is None else contextlib.nullcontext():
      saved = self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics)
    if not saved:
      raise RuntimeError(f'orbax skipped the save of step {step} in {self.directory} '
                         f'(existing steps: {self.all_steps()})')

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
    try:
      with _quiet_failed_reads():
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # tensorstore, JSON, grain: all mean "unreadable"
      raise self._unreadable(step, e) from e
    out = {k: restored[k] for k in args}
    if self.num_items is not None:
      for k in ('params', 'train'):
        if k in out:
          out[k] = parallel.from_canonical(out[k], targets[k])
    return out

  def read_meta(self, step: int) -> dict:
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:
      raise self._unreadable(step, e) from e
    if not isinstance(meta, dict) or 'config' not in meta:
      raise self._unreadable(step, ValueError('its meta item holds no run record'))
    return meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def step_dirs(directory: str) -> list[int]:
  """The step numbers of the (committed or not) step directories in `directory`."""
  if not os.path.isdir(directory):
    return []
  return [int(n) for n in os.listdir(directory) if n.isdigit()]


def set_aside(workdir: str, step: int) -> str:
  """Moves <workdir>/checkpoints/<step> to <workdir>/damaged_checkpoints/<step>-<time>
  (for inspection; nothing is deleted) and returns the new path."""
  workdir = os.path.abspath(workdir)
  source = os.path.join(workdir, 'checkpoints', str(step))
  target = os.path.join(workdir, DAMAGED_DIR, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
  parallel.sync_processes('set_aside')
  return target


def abstract(tree) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays, as restore targets."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
