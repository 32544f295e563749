"""Reading a run directory (the ``--workdir`` of a training run): its config, its
records and its checkpoints, for evaluate, recommend, export, report and baselines.

A run directory holds ``config.json`` (the run's whole config), ``metrics.jsonl`` (one
row per epoch), ``summary.json`` (at the end), ``run.json`` (environment, data
statistics) and ``checkpoints/`` (orbax; latest and best). `load_trained` restores one
checkpoint for the data set it was trained on and refuses one of other data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from gear_jax import defaults
from gear_jax.errors import CheckpointError, ConfigError, UserError

CONFIG = 'config.json'
SUMMARY = 'summary.json'
RUN = 'run.json'


def read_json(path: str) -> dict | None:
  """The JSON object in `path`; None if it is missing or torn (a run in progress)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError:
    return None


def read_config(workdir: str):
  """The run's ConfigDict: its config.json over the defaults (keys added since the run
  started keep their defaults)."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise ConfigError(f'{path} not found', hint='pass --config (the file used for '
                      'training), or check --workdir')
  with open(path) as f:
    return defaults.config_from_dict(json.load(f))


def read_flat_config(workdir: str) -> dict:
  """config.json flattened ('section.key' -> JSON value), for reports."""
  if not os.path.isdir(workdir):
    raise UserError(f'{workdir} is not a directory', hint='pass a run directory '
                    '(the --workdir of gear_jax.train)')
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise UserError(f'{workdir} holds no config.json: not a run directory',
                    hint='pass the --workdir of a gear_jax.train run')
  with open(path) as f:
    return defaults.flat_config(json.load(f))


@dataclasses.dataclass
class Trained:
  """The parameters of one checkpoint, with the module they belong to."""
  model: Any  # models.interface.SequenceModel
  params: Any
  step: int
  meta: dict


def load_trained(config, workdir: str, data, mesh, checkpoint: str = 'best') -> Trained:
  """Restores checkpoint `checkpoint` ('best', 'latest' or a step) of `workdir` onto
  `mesh`, for the data set `data` it was trained on.

  Refused with the reason: a checkpoint made for another number of items, or (for
  checkpoints that record it) another data file or other data settings than `data`'s.
  An unreadable checkpoint is left as it is, with a hint to another one."""
  from gear_jax import checkpoint as ckpt_lib
  from gear_jax import parallel, steps
  from gear_jax.models import registry
  store = ckpt_lib.CheckpointStore(workdir, read_only=True, num_items=data.num_items,
                                   mesh=mesh)
  try:
    step = store.resolve(checkpoint)
    shard_items = bool(config.mesh.shard_items)
    model = registry.build(data.num_items, data.num_behaviors, config.model,
                           config.model.precision,
                           parallel.table_rows(data.num_items, mesh, shard_items))
    target = steps.param_target(model, mesh, int(config.data.max_len), shard_items)
    try:
      meta = store.read_meta(step)
      check_same_data(meta, step, config, data)
      params = store.restore(step, params_target=target)['params']
    except CheckpointError as e:
      raise CheckpointError(e.message, step=step, hint='the checkpoint is left as it '
                            f'is; {_other_checkpoint(store, step)}') from None
  finally:
    store.close()
  return Trained(model=model, params=params, step=step, meta=meta)


def _other_checkpoint(store, step: int) -> str:
  best = store.best_step()
  others = [s for s in store.all_steps() if s != step]
  if best is not None and best != step:
    return f'try --checkpoint best (step {best})'
  if others:
    return f'try --checkpoint {others[-1]}'
  return 'it is the only one in this workdir'


def check_same_data(meta: dict, step: int, config, data) -> None:
  """Refuses checkpoint `step` (its `meta`) for a data set other than `data`."""
  if meta.get('num_items') not in (None, data.num_items):
    raise ConfigError(f'checkpoint {step} was made for {meta["num_items"]:,} items but '
                      f'{config.data.path} has {data.num_items:,}',
                      field='config.data.path',
                      hint='point data.path at the data set the model was trained on')
  key = meta.get('data_key')
  if key is not None and key != data.key:
    raise ConfigError(f'checkpoint {step} was trained on other data: the content of '
                      f'{config.data.path} or the data settings (format, behaviors, '
                      f'min_uc, split) changed since (preprocessing key {key} != '
                      f'{data.key})', field='config.data.path',
                      hint='use the data file and data.* settings the run was trained '
                      "with (the run's config.json)")


def write_static_run(run_dir: str, config: dict, row: dict, summary: dict) -> None:
  """A run directory for a result that is not trained (a baseline): config.json, one
  metrics row and summary.json, readable by `gear_jax.report` like any run."""
  from gear_jax import run_log
  os.makedirs(run_dir, exist_ok=True)
  run_log.write_json(os.path.join(run_dir, CONFIG), config)
  run_log.atomic_write_text(os.path.join(run_dir, 'metrics.jsonl'), json.dumps(row) + '\n')
  run_log.write_json(os.path.join(run_dir, SUMMARY), summary)
