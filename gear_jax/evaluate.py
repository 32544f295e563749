"""Evaluation: the `Evaluator` used by the trainer, and the evaluation CLI.

  python -m gear_jax.evaluate --workdir runs/retail [--config configs/retail.py]
      [--checkpoint best|latest|STEP] [--split val|test] [--protocol sampled|full]
      [--json]

Without --config the run's own ``config.json`` is used (overrides still apply with
--config). On ``--checkpoint best`` it reproduces the best validation metrics recorded
in ``summary.json`` exactly (same data, negatives, batches and compiled step).
Checkpoints written by `gear_jax.convert` load the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gear_jax import checkpoint as ckpt_lib
from gear_jax import cli, defaults, hostalloc, metrics, parallel, run_log, steps
from gear_jax import model as model_lib
from gear_jax.data import load_dataset, load_negatives
from gear_jax.data import pipeline as pipeline_lib
from gear_jax.errors import CheckpointError, ConfigError


def protocols_of(eval_config) -> tuple[str, ...]:
  """The main protocol first, then the other one when requested."""
  main = eval_config.protocol
  other = 'full' if main == 'sampled' else 'sampled'
  return (main, other) if eval_config.other_protocol else (main,)


def metric_prefix(split: str, protocol: str, main_protocol: str) -> str:
  """'val' for the configured protocol, 'val_full' / 'val_sampled' for the other."""
  return split if protocol == main_protocol else f'{split}_{protocol}'


class Evaluator:
  """Evaluates parameters on the held-out cases of a split, all protocols at once."""

  def __init__(self, data, config, model: model_lib.GEAR, mesh, *,
               protocols: tuple[str, ...] | None = None, verbose: bool = True):
    self.data, self.config, self.mesh = data, config, mesh
    self.main = config.eval.protocol
    self.protocols = protocols or protocols_of(config.eval)
    self.verbose = verbose
    self.batch_size = int(config.eval.batch_size)
    parallel.check_batch_divisible(self.batch_size, mesh, 'eval.batch_size')
    self._negatives: dict[str, np.ndarray | None] = {}
    self._step = jax.jit(functools.partial(
        steps.eval_step, model=model, protocols=self.protocols,
        ks=tuple(int(k) for k in config.eval.ks), full_chunk=int(config.eval.full_chunk)))

  def negatives(self, split: str) -> np.ndarray | None:
    if 'sampled' not in self.protocols:
      return None
    if split not in self._negatives:
      neg, seconds, cached = load_negatives(self.data, split, self.config.eval,
                                            self.config.data, int(self.config.seed))
      if self.verbose and jax.process_index() == 0:
        how = 'loaded from cache' if cached else f'sampled in {seconds:.2f}s'
        print(f'{split} negatives: {neg.shape[0]:,} cases x {neg.shape[1]} '
              f'({self.config.eval.negatives}, {how})', flush=True)
      self._negatives[split] = neg
    return self._negatives[split]

  def num_cases(self, split: str) -> int:
    return len(self.data.eval_cases(split)[0])

  def evaluate(self, params, split: str, *, on_batch=None) -> dict[str, float]:
    """{'val/NDCG@10': ..., 'val_full/NDCG@10': ..., ...} for `split`. `on_batch()`
    is called before every batch (the trainer stops there after an interrupt)."""
    pidx, pcount = parallel.process_slice()
    batches = pipeline_lib.EvalBatches(
        self.data, split, self.batch_size, int(self.config.data.max_len),
        self.negatives(split), process_index=pidx, process_count=pcount)
    if batches.num_batches == 0:
      return {}
    progress = run_log.Progress(batches.num_batches, f'eval {split}',
                        enabled=self.verbose and pidx == 0)
    sums = None
    pipe = pipeline_lib.eval_pipeline(batches, num_threads=int(self.config.data.threads))
    for i, batch in enumerate(pipe):
      if on_batch is not None:
        on_batch()
      out = self._step(params, parallel.put_batch(batch, self.mesh))
      sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
      progress.update(i + 1)
    progress.close()
    result = {}
    for protocol in self.protocols:
      host = {k: parallel.to_host(v) for k, v in sums[protocol].items()}
      result.update(metrics.finalize(host, metric_prefix(split, protocol, self.main)))
    return result


# -- the CLI ----------------------------------------------------------------------------

FLAGS = flags.FLAGS


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Config file; default: the run\'s '
                                  'config.json in --workdir.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory holding checkpoints/.')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.")
  flags.DEFINE_enum('split', 'val', ['val', 'test'], 'Which held-out cases.')
  flags.DEFINE_enum('protocol', None, ['sampled', 'full'],
                    'Ranking protocol; default: the config\'s eval.protocol.')
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{path} not found', hint='pass --config (the file used for '
                      'training), or check --workdir')
  with open(path) as f:
    saved = json.load(f)
  config = defaults.get_default_config()
  config.update_from_flattened_dict(_flatten(saved))
  return config


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    elif isinstance(v, list):
      out[key] = tuple(v)
    else:
      out[key] = v
  return out


@dataclasses.dataclass
class Trained:
  """The parameters of one checkpoint, with the module they belong to."""
  model: model_lib.GEAR
  params: Any
  step: int
  meta: dict


def load_trained(config, workdir: str, data, mesh, checkpoint: str = 'best') -> Trained:
  """Restores checkpoint `checkpoint` ('best', 'latest' or a step) of `workdir` onto
  `mesh`, for the data set `data` it was trained on.

  Refused with the reason: a checkpoint made for another number of items, or (for
  checkpoints that record it) another data file or other data settings than `data`'s.
  An unreadable checkpoint is left as it is, with a hint to another one."""
  store = ckpt_lib.CheckpointStore(workdir, read_only=True, num_items=data.num_items,
                                   mesh=mesh)
  try:
    step = store.resolve(checkpoint)
    others = [s for s in store.all_steps() if s != step]
    shard_items = bool(config.mesh.shard_items)
    model = model_lib.build(data.num_items, data.num_behaviors, config.model,
                            config.model.precision,
                            parallel.table_rows(data.num_items, mesh, shard_items))
    target = steps.param_target(model, mesh, int(config.data.max_len), shard_items)
    try:
      meta = store.read_meta(step)
      _check_same_data(meta, step, config, data)
      params = store.restore(step, params_target=target)['params']
    except CheckpointError as e:
      best = store.best_step()
      if best is not None and best != step:
        hint = f'try --checkpoint best (step {best})'
      elif others:
        hint = f'try --checkpoint {others[-1]}'
      else:
        hint = 'it is the only one in this workdir'
      raise CheckpointError(e.message, step=step,
                            hint=f'the checkpoint is left as it is; {hint}') from None
  finally:
    store.close()
  return Trained(model=model, params=params, step=step, meta=meta)


def _check_same_data(meta: dict, step: int, config, data) -> None:
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


def run(config, workdir: str, *, checkpoint: str = 'best', split: str = 'val',
        protocol: str | None = None) -> dict:
  """Evaluates one checkpoint of `workdir`; returns the metrics and where they came from."""
  hostalloc.configure()  # before XLA starts its threads; see gear_jax/hostalloc.py
  config = ml_collections.ConfigDict(config.to_dict())
  if protocol:
    config.eval.protocol = protocol
    config.eval.other_protocol = False
    config.eval.monitor = 'val/NDCG@10'
  defaults.validate_config(config)
  parallel.initialize_distributed(config.distributed.coordinator,
                                  int(config.distributed.num_processes),
                                  int(config.distributed.process_id))
  data, _ = load_dataset(config.data)
  mesh = parallel.make_mesh(int(config.mesh.data), int(config.mesh.model))
  trained = load_trained(config, workdir, data, mesh, checkpoint)
  evaluator = Evaluator(data, config, trained.model, mesh, verbose=False)
  start = time.perf_counter()
  result = evaluator.evaluate(trained.params, split)
  return dict(checkpoint=trained.step, epoch=trained.meta.get('epoch'), split=split,
              seconds=round(time.perf_counter() - start, 3), metrics=result)


@cli.main
def main(argv):
  del argv
  config = cli.config_from_flag() or config_from_workdir(FLAGS.workdir)
  out = run(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, split=FLAGS.split,
            protocol=FLAGS.protocol)
  if jax.process_index() != 0:
    return
  if FLAGS.json:
    print(json.dumps(out))
    return
  print(f'checkpoint step {out["checkpoint"]} (epoch {out["epoch"]}), split '
        f'{out["split"]}, {out["seconds"]:.1f}s')
  for k, v in out['metrics'].items():
    print(f'  {k:<24} {v:.4f}')


if __name__ == '__main__':
  _define_flags()
  flags.mark_flag_as_required('workdir')
  app.run(main)
