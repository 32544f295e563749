"""Evaluation of parameters on held-out cases: the `Evaluator` (used by the trainer
every epoch and by ``python -m gear_jax.evaluate``) and `evaluate_run`, one checkpoint
of a run directory.

On ``checkpoint='best'`` `evaluate_run` reproduces the best validation metrics recorded
in ``summary.json`` exactly (same data, negatives, batches and compiled step).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gear_jax import defaults, hostalloc, metrics, parallel, rundir, run_log, steps
from gear_jax.data import load_dataset, load_negatives
from gear_jax.data import pipeline as pipeline_lib
from gear_jax.models.interface import SequenceModel


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

  def __init__(self, data, config, model: SequenceModel, mesh, *,
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


def evaluate_run(config, workdir: str, *, checkpoint: str = 'best', split: str = 'val',
                 protocol: str | None = None) -> dict:
  """Evaluates one checkpoint of `workdir`; returns the metrics and where they came from."""
  hostalloc.configure()  # before XLA starts its threads; see gear_jax/hostalloc.py
  config = ml_collections.ConfigDict(config.to_dict())
  if protocol:
    config.eval.protocol = protocol
    config.eval.other_protocol = False
    config.eval.monitor = 'val/NDCG@10'
  defaults.validate_config(config)
  parallel.initialize_distributed(
      config.distributed.coordinator, int(config.distributed.num_processes),
      int(config.distributed.process_id), **parallel.timeouts(config.distributed))
  data, _ = load_dataset(config.data)
  mesh = parallel.make_mesh(int(config.mesh.data), int(config.mesh.model))
  trained = rundir.load_trained(config, workdir, data, mesh, checkpoint)
  evaluator = Evaluator(data, config, trained.model, mesh, verbose=False)
  start = time.perf_counter()
  result = evaluator.evaluate(trained.params, split)
  return dict(checkpoint=trained.step, epoch=trained.meta.get('epoch'), split=split,
              seconds=round(time.perf_counter() - start, 3), metrics=result)
