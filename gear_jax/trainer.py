"""The training loop: `train_and_evaluate(config, workdir)`.

input -> model -> update -> checkpoints -> evaluation -> the epoch loop with early
stopping on the monitored validation metric. Starting in a workdir that already holds
checkpoints resumes from the newest readable one (same batches, same dropout masks,
same metrics as an uninterrupted run); raising ``train.num_epochs`` extends a finished
run. The run holds the workdir's lock (`gear_jax.lock`) from start to end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gear_jax import checkpoint as ckpt_lib
from gear_jax import backend, defaults, hostalloc, parallel, run_log, steps
from gear_jax.defaults import flat_config
from gear_jax.models import layers, registry
from gear_jax.models.interface import SequenceModel
from gear_jax.data import load_dataset
from gear_jax.data import pipeline as pipeline_lib
from gear_jax.errors import (CheckpointError, ConfigError, Interrupted, ResumeRefused,
                             TrainingDiverged)
from gear_jax.evaluator import Evaluator
from gear_jax.lock import WorkdirLock

@dataclasses.dataclass
class EarlyStopping:
  """Mode-max early stopping; a new best needs a strict improvement."""
  patience: int
  best: float = -math.inf
  best_epoch: int = -1
  best_step: int = -1
  bad_epochs: int = 0
  best_metrics: dict = dataclasses.field(default_factory=dict)

  def update(self, value: float, epoch: int, step: int, metrics: dict) -> bool:
    """Records an epoch's monitored value; returns whether it is a new best."""
    if value > self.best:
      self.best, self.best_epoch, self.best_step = value, epoch, step
      self.best_metrics, self.bad_epochs = dict(metrics), 0
      return True
    self.bad_epochs += 1
    return False

  @property
  def should_stop(self) -> bool:
    return self.bad_epochs >= self.patience

  def state(self) -> dict:
    return dict(best=self.best, best_epoch=self.best_epoch, best_step=self.best_step,
                bad_epochs=self.bad_epochs, best_metrics=self.best_metrics)


def check_resumable(saved: dict, config) -> None:
  """Refuses to resume a workdir whose run used a different configuration (keys the
  table in `gear_jax.defaults` marks resumable may change)."""
  # keys added to the config since the run started count with their default values
  old = {**flat_config(defaults.get_default_config()), **flat_config(saved)}
  new = flat_config(config)
  changed = [k for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and not defaults.resumable(k)]
  if changed:
    detail = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed[:6])
    raise ResumeRefused(f'the workdir holds a run with a different config ({detail})',
                        hint='use a new --workdir, or the same config to resume it')


def _log(msg: str, *, err: bool = False) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


@dataclasses.dataclass
class _Run:
  """Everything one run holds between its phases."""
  config: Any
  workdir: str
  data: Any
  mesh: Any
  state: steps.TrainState
  train_step: Any  # compiled
  train_batches: pipeline_lib.TrainBatches
  iterator: Any
  evaluator: Evaluator
  store: ckpt_lib.CheckpointStore
  log: run_log.RunLog
  es: EarlyStopping
  n_params: int
  backend: dict  # the platform-dependent choices as resolved (kernels, loss budget, ...)
  start_epoch: int = 0
  step: int = 0
  epoch: int = 0
  epoch_times: list = dataclasses.field(default_factory=list)
  partial: _Partial | None = None  # the epoch in progress (or resumed into)
  last_record: dict | None = None  # metrics of the last finished epoch
  last_save: float = dataclasses.field(default_factory=time.monotonic)
  latest_save: dict | None = None  # where the newest checkpoint is (run.json)
  on_epoch: Any = None  # called with each epoch's metrics record; a reason stops the run
  stopped_by: str | None = None  # that reason (summary.json's 'stopped_by')
  started: str = dataclasses.field(
      default_factory=lambda: time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))


@dataclasses.dataclass
class _Partial:
  """The epoch in progress: what a mid-epoch checkpoint records to continue it so
  that the epoch ends exactly as an uninterrupted one (same batches, same float32 sum
  of the losses)."""
  epoch: int
  step: int = 0  # micro-batches of the epoch done
  loss_sum: Any = 0.0  # the float32 sum of their losses (a device scalar in the loop)
  bad: Any = 0  # how many had a non-finite loss or gradient norm
  sequences: int = 0
  train_s: float = 0.0

  def record(self) -> dict:
    return dict(epoch=self.epoch, step=self.step,
                loss_sum=float(parallel.to_host(jnp.asarray(self.loss_sum, jnp.float32))),
                bad=int(parallel.to_host(jnp.asarray(self.bad, jnp.int32))),
                sequences=int(self.sequences), train_s=round(float(self.train_s), 3))


# -- the phases -------------------------------------------------------------------------

def _build(config, workdir: str) -> _Run:
  """Data, mesh, model, initial state, the compiled train step, evaluator, store."""
  data, info = load_dataset(config.data)
  _log(f'data: {config.data.path}: {data.num_users:,} users, {data.num_items:,} items, '
       f'{data.num_interactions:,} interactions, {len(data.val_user):,} validation'
       + (f' / {len(data.test_user):,} test' if data.split == 'val_test' else '')
       + f' cases ({"cache" if info.from_cache else "parsed"} in {info.seconds:.2f}s)')
  mesh = parallel.make_mesh(int(config.mesh.data), int(config.mesh.model))
  seed, batch_size = int(config.seed), int(config.train.batch_size)
  max_len = int(config.data.max_len)
  parallel.check_batch_divisible(batch_size, mesh, 'train.batch_size')
  pidx, pcount = parallel.process_slice()
  train_batches = pipeline_lib.TrainBatches(data, batch_size, max_len, seed,
                                            process_index=pidx, process_count=pcount)

  shard_items = bool(config.mesh.shard_items)
  model = registry.build(data.num_items, data.num_behaviors, config.model,
                         config.model.precision,
                         parallel.table_rows(data.num_items, mesh, shard_items))
  tx = steps.make_optimizer(float(config.train.lr), float(config.train.weight_decay),
                            int(config.train.grad_accum))
  state = steps.create_state(model, tx, mesh, seed=seed, max_len=max_len,
                             shard_items=shard_items)
  n_params = layers.count_params(state.params, data.num_items)
  budget, how = loss_budget(config, mesh)
  _log(f'model: {type(model).__name__} d_model={model.d_model} n_head={model.n_head} '
       f'n_layer={model.n_layer}, {n_params:,} parameters ({n_params / 1e6:.1f} M), '
       f'precision {config.model.precision}, mesh {dict(mesh.shape)} on '
       f'{jax.device_count()} {jax.devices()[0].platform} device(s)')
  _log(f'kernels: {model.kernels} (model.kernels={config.model.kernels}); item loss '
       f'{config.train.loss}, chunk budget {budget:,.0f} MB ({how})')

  # Compiled ahead of time for the one batch shape there is (the last batch of an
  # epoch is padded), so the loop can never trigger a recompile.
  batch = parallel.abstract_batch(train_batches(0), mesh, pcount)
  jitted = jit_train_step(config, model, tx, mesh, state, batch)
  t0 = time.perf_counter()
  train_step = jitted.lower(state, batch).compile()
  _log(f'compiled the train step in {time.perf_counter() - t0:.1f}s')

  iterator = iter(pipeline_lib.train_pipeline(train_batches,
                                              num_threads=int(config.data.threads)))
  return _Run(config=config, workdir=workdir, data=data, mesh=mesh,
              state=state, train_step=train_step, train_batches=train_batches,
              iterator=iterator, evaluator=Evaluator(data, config, model, mesh),
              store=_open_store(workdir, data.num_items, mesh),
              log=run_log.RunLog(workdir, enabled=jax.process_index() == 0),
              es=EarlyStopping(int(config.train.patience)), n_params=n_params,
              backend=dict(kernels=model.kernels, loss=config.train.loss,
                           loss_memory_mb=budget, loss_memory_mb_from=how))


def loss_budget(config, mesh) -> tuple[float, str]:
  """The item loss's chunk budget in MB for `mesh`'s devices, and how it was chosen
  (``train.loss_memory_mb``, 0 = from the device; see `gear_jax.backend`)."""
  return backend.loss_budget_mb(config.train.loss_memory_mb, mesh.devices.flat[0])


def jit_train_step(config, model: SequenceModel, tx, mesh, state: steps.TrainState,
                   batch) -> Any:
  """The jitted train step as the trainer runs it, for `batch` (abstract, sharded):
  the state's shardings pinned on both sides, so the donated state keeps its layout
  step after step."""
  shard_items = bool(config.mesh.shard_items)
  state_sh = parallel.state_shardings(state, mesh, shard_items)
  return jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, alpha=float(config.train.alpha),
      loss_impl=config.train.loss, loss_memory_mb=loss_budget(config, mesh)[0],
      vocab_shards=mesh.shape[parallel.MODEL] if shard_items else 1),
      in_shardings=(state_sh, {k: v.sharding for k, v in batch.items()}),
      out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)


def _no_readable_checkpoint(directory: str, reasons: list[str]) -> CheckpointError:
  return CheckpointError(
      f'no readable checkpoint in {directory}: ' + '; '.join(reasons),
      hint='the damaged checkpoints are left as they are; move '
      f'{directory} aside to start this run again from scratch, or use a new --workdir')


def _open_store(workdir: str, num_items: int, mesh) -> ckpt_lib.CheckpointStore:
  """The run's checkpoint store. A step whose metrics cannot even be listed is set
  aside (moved, not deleted) when other steps remain to resume from."""
  while True:
    try:
      return ckpt_lib.CheckpointStore(workdir, num_items=num_items, mesh=mesh)
    except CheckpointError as e:
      directory = os.path.join(workdir, 'checkpoints')
      if e.step is None or len(ckpt_lib.step_dirs(directory)) <= 1:
        raise _no_readable_checkpoint(directory, [e.message]) from None
      moved = ckpt_lib.set_aside(workdir, e.step)
      _log(f'warning: {e.message}; moved it to {moved}', err=True)


def _restore(run: _Run, step: int) -> dict:
  """Reads checkpoint `step` onto the run's shardings (CheckpointError if it can't)."""
  meta = run.store.read_meta(step)
  check_resumable(meta['config'], run.config)
  if meta.get('data_key') != run.data.key:
    raise ResumeRefused('the data file changed since this run started (its content '
                        'hash differs)', hint='use a new --workdir')
  s = run.state
  restored = run.store.restore(
      step, params_target=ckpt_lib.abstract(s.params),
      train_target=ckpt_lib.abstract({'opt_state': s.opt_state, 'step': s.step,
                                      'rng': s.rng}),
      iterator=run.iterator)
  return {**restored, 'meta': meta}


def _restore_or_init(run: _Run) -> None:
  """Resumes from the newest readable checkpoint (the latest, its fallback, else the
  best), or starts fresh.

  An unreadable checkpoint is reported by step with its reason, set aside (moved to
  <workdir>/damaged_checkpoints/, never deleted) and the next one is tried; when none
  is readable the run refuses to start."""
  failures = []
  for step in sorted(run.store.all_steps(), reverse=True):
    try:
      restored = _restore(run, step)
    except CheckpointError as e:
      failures.append(e)
      continue
    for e in failures:  # the newer, damaged ones: out of the way of the next saves
      moved = run.store.set_aside(e.step)
      _log(f'warning: {e.message}; moved it to {moved} and resuming from step '
           f'{step}', err=True)
    _adopt(run, step, restored)
    break
  else:
    if failures:
      raise _no_readable_checkpoint(run.store.directory, [e.message for e in failures])
    run.log.truncate_metrics(0)
  run.step = int(parallel.to_host(run.state.step))
  run.log.write_config(run.config.to_dict())
  _write_run_record(run)


def _adopt(run: _Run, step: int, restored: dict) -> None:
  """The run continues from checkpoint `step` (`restored` by `_restore`)."""
  t = restored['train']
  run.state = steps.TrainState(params=restored['params'], opt_state=t['opt_state'],
                               step=t['step'], rng=t['rng'])
  run.iterator = restored['data_iter']
  meta = restored['meta']
  run.es = EarlyStopping(int(run.config.train.patience), **meta['early_stopping'])
  run.start_epoch = int(meta['epoch']) + 1
  run.last_record = meta.get('metrics')
  run.log.truncate_metrics(run.start_epoch, last=run.last_record)
  where = f'epoch {meta["epoch"]}'
  run.latest_save = dict(step=step, epoch=int(meta['epoch']), micro_batch=None)
  if meta.get('in_epoch'):
    run.partial = _Partial(**meta['in_epoch'])
    where = (f'in epoch {run.partial.epoch} after {run.partial.step} of its '
             f'{run.train_batches.batches_per_epoch} micro-batches')
    run.latest_save.update(epoch=run.partial.epoch, micro_batch=run.partial.step)
  _log(f'resuming from checkpoint step {step} ({where}, best '
       f'{run.config.eval.monitor} {run.es.best:.4f} at epoch {run.es.best_epoch})')


def _write_run_record(run: _Run) -> None:
  if run.log.enabled:
    run_log.write_json(os.path.join(run.workdir, 'run.json'), _run_record(run))


def _run_record(run: _Run) -> dict:
  """run.json: what a report needs besides config and metrics (environment, data
  statistics, model size), recorded when the run (or its resume) starts."""
  import importlib.metadata
  import platform
  from gear_jax.data import preprocess
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = 'not installed'
  device = jax.devices()[0]
  env = dict(**versions, python=platform.python_version(),
             device=f'{device.platform} ({device.device_kind})',
             devices=jax.device_count(), processes=jax.process_count(),
             mesh=' x '.join(f'{k}={v}' for k, v in run.mesh.shape.items()),
             shard_items=bool(run.config.mesh.shard_items),
             precision=run.config.model.precision, host=platform.node(),
             xla_flags=os.environ.get('XLA_FLAGS', ''), **run.backend)
  return dict(environment=env, data=preprocess.summary(run.data),
              model=dict(params=run.n_params), started=run.started,
              latest_checkpoint=run.latest_save)


def _step_boundary(run: _Run, stop, *, saves: bool = True) -> None:
  """Between two micro-steps (or evaluation batches): the mid-epoch saves of
  ``train.checkpoint_every_steps`` / ``_minutes`` and, after SIGINT / SIGTERM, a clean
  stop that saves this step first. In a run of several processes they decide together
  (a signal to any of them stops all at the same step), so the save is collective."""
  signum = stop.signum if stop is not None and stop.requested else 0
  due = saves and _save_due(run)
  if jax.process_count() > 1:
    signum, due = _max_over_processes([signum, int(due)])
  if signum or due:
    _save_partial(run, announce=not signum)
  if signum:
    run.store.wait()
    latest = run.store.latest_step()
    how = (f'resume from step {latest}' if latest is not None else 'start it again')
    raise Interrupted(signum, f'interrupted at epoch {run.epoch} step {run.step}; '
                      f'rerun the same command to {how}')


def _max_over_processes(values: list[int]) -> list[int]:
  """The element-wise maximum of `values` over the run's processes (a collective)."""
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(np.asarray(values, np.int32))
  return [int(v) for v in np.asarray(gathered).reshape(-1, len(values)).max(axis=0)]


def _save_due(run: _Run) -> bool:
  p, train = run.partial, run.config.train
  if p is None or p.step == 0:  # an epoch's start: the last epoch's checkpoint is here
    return False
  every, minutes = int(train.checkpoint_every_steps), float(train.checkpoint_every_minutes)
  return ((every > 0 and run.step % every == 0)
          or (minutes > 0 and time.monotonic() - run.last_save >= 60 * minutes))


def _save_partial(run: _Run, announce: bool = True) -> None:
  """A checkpoint of this step inside the epoch (none if one of this step exists, or
  if nothing was trained yet)."""
  p = run.partial
  if p is None or run.store.latest_step() == run.step or (run.step == 0 and p.step == 0):
    return
  t0 = time.perf_counter()
  record = p.record()
  _check_finite(run, record['loss_sum'] / max(p.step, 1), record['bad'])  # never save NaN
  _save(run, _meta(run, in_epoch=record), monitor=None)
  run.latest_save = dict(step=run.step, epoch=p.epoch, micro_batch=p.step)
  _write_run_record(run)
  if announce:
    _log(f'checkpoint: step {run.step} (epoch {p.epoch}, micro-batch {p.step} of '
         f'{run.train_batches.batches_per_epoch}), {time.perf_counter() - t0:.1f}s')


def _meta(run: _Run, *, in_epoch: dict | None = None) -> dict:
  """A checkpoint's run record: the last finished epoch, its early-stopping state and
  metrics, and (mid-epoch) the epoch in progress."""
  meta = dict(epoch=run.epoch if in_epoch is None else run.epoch - 1, step=run.step,
              early_stopping=run.es.state(), metrics=run.last_record,
              config=run.config.to_dict(), data_key=run.data.key,
              num_items=run.data.num_items, num_behaviors=run.data.num_behaviors)
  if in_epoch is not None:
    meta['in_epoch'] = in_epoch
  return meta


def _save(run: _Run, meta: dict, monitor: float | None) -> None:
  s = run.state
  run.store.save(run.step, params=s.params,
                 train={'opt_state': s.opt_state, 'step': s.step, 'rng': s.rng},
                 iterator=run.iterator, meta=meta, monitor=monitor)
  run.last_save = time.monotonic()


def _check_finite(run: _Run, loss: float, bad_steps: int) -> None:
  if math.isfinite(loss) and bad_steps == 0:
    return
  run.store.wait()
  what = (f'the training loss is {loss}' if not math.isfinite(loss) else
          f'{bad_steps} step(s) had a non-finite gradient norm (loss {loss:.4f})')
  raise TrainingDiverged(
      f'{what} by step {run.step} (epoch {run.epoch}); stopped without saving. The '
      f'last good checkpoints are intact (latest step {run.store.latest_step()}, '
      f'best step {run.store.best_step()}) in {run.store.directory}',
      hint='try a lower train.lr or model.precision=float32')


def _train_epoch(run: _Run, stop) -> dict:
  """One pass over the training batches (or the rest of one, resumed mid-epoch); the
  loss is read every train.log_every steps, with a check that every loss and gradient
  norm so far was finite."""
  steps_per_epoch = run.train_batches.batches_per_epoch
  log_every = max(1, int(run.config.train.log_every))
  pcount = jax.process_count()
  is_main = jax.process_index() == 0
  p = run.partial
  if p is None or p.epoch != run.epoch:
    p = run.partial = _Partial(run.epoch)
  t0 = time.perf_counter() - p.train_s
  loss_sum = jnp.asarray(p.loss_sum, jnp.float32)
  bad = jnp.asarray(p.bad, jnp.int32)  # steps with a non-finite loss or gradient norm
  progress = run_log.Progress(steps_per_epoch, f'epoch {run.epoch}', enabled=is_main)
  for i in range(p.step, steps_per_epoch):
    p.step, p.loss_sum, p.bad, p.train_s = i, loss_sum, bad, time.perf_counter() - t0
    _step_boundary(run, stop)
    batch = next(run.iterator)
    p.sequences += int(batch['mask'].sum()) * pcount
    run.state, aux = run.train_step(run.state, parallel.put_batch(batch, run.mesh))
    loss_sum = loss_sum + aux['loss']
    bad = bad + (~(jnp.isfinite(aux['loss']) & jnp.isfinite(aux['grad_norm']))
                 ).astype(jnp.int32)
    run.step += 1
    if (i + 1) % log_every == 0 or i + 1 == steps_per_epoch:
      mean = float(parallel.to_host(loss_sum)) / (i + 1)
      _check_finite(run, mean, int(parallel.to_host(bad)))
      if is_main and (i + 1) % log_every == 0:
        run.log.scalars(run.step, {'train/loss_running': mean})
      saved = run.latest_save and f', latest checkpoint step {run.latest_save["step"]}'
      progress.update(i + 1, f'loss {mean:.4f}{saved or ""}')
  progress.close()
  seconds = time.perf_counter() - t0
  p.step, p.loss_sum, p.bad, p.train_s = steps_per_epoch, loss_sum, bad, seconds
  return {'train/loss': float(parallel.to_host(loss_sum)) / steps_per_epoch,
          'train_s': seconds, 'sequences': p.sequences, 'start': t0}


def _evaluate_and_checkpoint(run: _Run, train: dict, stop) -> None:
  """Validation, early stopping, the epoch's checkpoint and its metrics record."""
  config, monitor = run.config, run.config.eval.monitor
  t1 = time.perf_counter()
  val = run.evaluator.evaluate(
      run.state.params, 'val', on_batch=lambda: _step_boundary(run, stop, saves=False))
  val_s = time.perf_counter() - t1
  if monitor not in val:
    raise ConfigError(f'monitored metric {monitor!r} was not computed (no validation '
                      f'cases?); computed: {sorted(val)}', field='config.eval.monitor')
  _step_boundary(run, stop, saves=False)
  improved = run.es.update(val[monitor], run.epoch, run.step, val)
  train_s = train['train_s']
  record = {'epoch': run.epoch, 'step': run.step, 'train/loss': train['train/loss'],
            **val, 'train_s': round(train_s, 3), 'eval_s': round(val_s, 3),
            'train/seq_per_s': round(train['sequences'] / train_s, 1)}
  run.last_record, run.partial = record, None
  _save(run, _meta(run), monitor=val[monitor])
  run.latest_save = dict(step=run.step, epoch=run.epoch, micro_batch=None)
  run.log.append_metrics(record)
  run.epoch_times.append(time.perf_counter() - train['start'])
  left = ((int(config.train.num_epochs) - run.epoch - 1)
          * float(np.mean(run.epoch_times[-5:])))
  es = run.es
  _log(f'epoch {run.epoch:3d}  loss {train["train/loss"]:.4f}  {monitor} '
       f'{val[monitor]:.4f}{" *" if improved else "  "} best {es.best:.4f} (epoch '
       f'{es.best_epoch})  {train["sequences"] / train_s:,.0f} seq/s  train '
       f'{train_s:.1f}s eval {val_s:.1f}s  eta <= {run_log.format_seconds(left)}')
  if es.should_stop:
    _log(f'early stopping: no improvement of {monitor} for {es.patience} epochs')
  elif run.on_epoch is not None and (reason := run.on_epoch(dict(record))):
    run.stopped_by = str(reason)
    _log(f'stopping after epoch {run.epoch}: {reason}')


def _summarize(run: _Run) -> dict:
  """summary.json: the best epoch and its metrics (and test metrics for val_test)."""
  run.store.wait()
  es, monitor = run.es, run.config.eval.monitor
  is_main = jax.process_index() == 0
  summary = {'best_epoch': es.best_epoch, 'best_step': es.best_step,
             'monitor': monitor, 'best': es.best if es.best_epoch >= 0 else None,
             'best_val': es.best_metrics,
             'epochs_run': len(run_log.read_metrics(run.workdir)) if is_main else None,
             'early_stopped': es.should_stop, 'num_params': run.n_params}
  if run.stopped_by:
    summary['stopped_by'] = run.stopped_by
  if run.data.split == 'val_test' and es.best_step >= 0:
    best_params = run.store.restore(
        es.best_step, params_target=ckpt_lib.abstract(run.state.params))['params']
    summary['test'] = run.evaluator.evaluate(best_params, 'test')
    _log('test (best checkpoint): ' + '  '.join(
        f'{k} {v:.4f}' for k, v in summary['test'].items() if k.endswith('@10')))
  run.log.write_summary(summary)
  if is_main:
    _write_report(run.workdir)
  if es.best_epoch >= 0:
    _log(f'best {monitor} {es.best:.4f} at epoch {es.best_epoch} '
         f'(checkpoint step {es.best_step}) -> {run.workdir}')
  return summary


def _write_report(workdir: str) -> None:
  """report.md and its figures; a failure here is a warning, never a failed run."""
  from gear_jax import reporting
  try:
    reporting.write_report(workdir)
  except Exception as e:  # noqa: BLE001 - the run itself has finished and is saved
    _log(f'warning: the report could not be written ({type(e).__name__}: {e}); '
         f'python -m gear_jax.report --workdir {workdir} tries again', err=True)


# -- the whole run ----------------------------------------------------------------------

def train_and_evaluate(config, workdir: str, *, stop=None, on_epoch=None) -> dict:
  """Trains with early stopping, keeps the best and latest checkpoints, and writes
  config.json, metrics.jsonl, TensorBoard events and summary.json to `workdir`.
  Returns the summary.

  `on_epoch(record)` (e.g. a tuner's pruning check) is called after each epoch's
  checkpoint with its metrics record; when it returns a reason (a string), the run
  ends there as early stopping would, and summary.json says ``stopped_by``.

  `stop` (e.g. `gear_jax.cli.GracefulStop`) is looked at at every step boundary: once
  it is `requested`, the run waits for the checkpoint in flight and raises
  `Interrupted`. Raises `RunLocked` when another live process holds the workdir."""
  hostalloc.configure()  # before XLA starts its threads; see gear_jax/hostalloc.py
  defaults.validate_config(config)
  # before the backend starts, too (XLA reads XLA_FLAGS once); see gear_jax/backend.py
  determinism = backend.configure_determinism(bool(config.train.deterministic_ops))
  parallel.initialize_distributed(
      config.distributed.coordinator, int(config.distributed.num_processes),
      int(config.distributed.process_id), **parallel.timeouts(config.distributed))
  if stop is not None and hasattr(stop, 'rearm'):
    stop.rearm()  # over the SIGTERM handler the distributed runtime installs
  workdir = os.path.abspath(workdir)
  lock = (WorkdirLock(workdir, 'train') if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    run = _build(config, workdir)
    run.backend['xla_gpu_deterministic_ops'] = determinism
    run.on_epoch = on_epoch
    with parallel.peer_guard(_describe_peer_lost(run)):
      try:
        _restore_or_init(run)
        for epoch in range(run.start_epoch, int(config.train.num_epochs)):
          if run.es.should_stop or run.stopped_by:
            break
          run.epoch = epoch
          _evaluate_and_checkpoint(run, _train_epoch(run, stop), stop)
        return _summarize(run)
      finally:
        run.store.close()  # waits for a save in flight
        run.log.close()


def _describe_peer_lost(run: _Run):
  """The message of `parallel.peer_guard`; only reads state (it may run on the watch
  thread while the loop is stuck in a collective). The resume step is the newest
  committed checkpoint (orbax renames a step directory when it commits)."""
  def describe(exc: BaseException) -> str:
    committed = ckpt_lib.step_dirs(run.store.directory)
    return parallel.peer_lost_message(exc, step=run.step, epoch=run.epoch,
                                      resume_step=max(committed, default=0))
  return describe
