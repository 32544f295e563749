"""Training: ``python -m gear_jax.train --config configs/retail.py --workdir runs/retail``.

`main` only parses flags; `train_and_evaluate(config, workdir)` does the work:
input -> model -> update -> checkpoints -> evaluation -> the epoch loop with early
stopping on the monitored validation metric. Starting in a workdir that already holds
checkpoints resumes from the latest one (same batches, same dropout masks, same
metrics as an uninterrupted run); raising ``train.num_epochs`` extends a finished run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gear_jax import checkpoint as ckpt_lib
from gear_jax import defaults, hostalloc, parallel, run_log, steps
from gear_jax import model as model_lib
from gear_jax.data import DataError, load_dataset
from gear_jax.data import pipeline as pipeline_lib
from gear_jax.evaluate import Evaluator

# Config keys that may change when a run is resumed in the same workdir; any other
# difference means a different experiment and is refused.
RESUMABLE_KEYS = ('train.num_epochs', 'train.patience', 'train.log_every',
                  'data.threads', 'data.cache', 'data.cache_dir', 'data.path',
                  'data.synthetic.enabled', 'eval.batch_size', 'mesh.', 'distributed.')


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


def _flat(config) -> dict:
  out = {}
  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  walk(config if isinstance(config, dict) else config.to_dict(), '')
  return out


def check_resumable(saved: dict, config) -> None:
  """Refuses to resume a workdir whose run used a different configuration."""
  old, new = _flat(saved), _flat(config)
  changed = [k for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)
             and not any(k == r or (r.endswith('.') and k.startswith(r))
                         for r in RESUMABLE_KEYS)]
  if changed:
    detail = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed[:6])
    raise ValueError(f'the workdir holds a run with a different config ({detail}); '
                     'use a new --workdir, or the same config to resume it')


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains with early stopping, keeps the best and latest checkpoints, and writes
  config.json, metrics.jsonl, TensorBoard events and summary.json to `workdir`.
  Returns the summary."""
  hostalloc.configure()  # before XLA starts its threads; see gear_jax/hostalloc.py
  defaults.validate_config(config)
  parallel.initialize_distributed(config.distributed.coordinator,
                                  int(config.distributed.num_processes),
                                  int(config.distributed.process_id))
  is_main = jax.process_index() == 0
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  seed = int(config.seed)

  # ---- input -------------------------------------------------------------------------
  data, info = load_dataset(config.data)
  _log(f'data: {config.data.path}: {data.num_users:,} users, {data.num_items:,} items, '
       f'{data.num_interactions:,} interactions, {len(data.val_user):,} validation'
       + (f' / {len(data.test_user):,} test' if data.split == 'val_test' else '')
       + f' cases ({"cache" if info.from_cache else "parsed"} in {info.seconds:.2f}s)')
  mesh = parallel.make_mesh(int(config.mesh.data), int(config.mesh.model))
  batch_size, max_len = int(config.train.batch_size), int(config.data.max_len)
  parallel.check_batch_divisible(batch_size, mesh, 'train.batch_size')
  pidx, pcount = parallel.process_slice()
  train_batches = pipeline_lib.TrainBatches(data, batch_size, max_len, seed,
                                            process_index=pidx, process_count=pcount)
  steps_per_epoch = train_batches.batches_per_epoch

  # ---- model and update ----------------------------------------------------------------
  precision = config.model.precision
  shard_items = bool(config.mesh.shard_items)
  model = model_lib.build(data.num_items, data.num_behaviors, config.model, precision,
                          parallel.table_rows(data.num_items, mesh, shard_items))
  tx = steps.make_optimizer(float(config.train.lr), float(config.train.weight_decay),
                            int(config.train.grad_accum))
  state = steps.create_state(model, tx, mesh, seed=seed, max_len=max_len,
                             shard_items=shard_items)
  n_params = model_lib.count_params(state.params, data.num_items)
  _log(f'model: GEAR d_model={model.d_model} n_head={model.n_head} '
       f'n_layer={model.n_layer}, {n_params:,} parameters ({n_params / 1e6:.1f} M), '
       f'precision {precision}, mesh {dict(mesh.shape)} on {jax.device_count()} '
       f'{jax.devices()[0].platform} device(s)')
  train_step = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, alpha=float(config.train.alpha),
      loss_impl=config.train.loss, loss_memory_mb=float(config.train.loss_memory_mb),
      vocab_shards=mesh.shape[parallel.MODEL] if shard_items else 1),
      donate_argnums=0)
  # Compiled ahead of time for the one batch shape there is (the last batch of an
  # epoch is padded), so the loop can never trigger a recompile.
  t_compile = time.perf_counter()
  train_step = train_step.lower(state, parallel.abstract_batch(
      train_batches(0), mesh, pcount)).compile()
  _log(f'compiled the train step in {time.perf_counter() - t_compile:.1f}s')
  evaluator = Evaluator(data, config, model, mesh)

  # ---- checkpoints ----------------------------------------------------------------
  store = ckpt_lib.CheckpointStore(workdir, num_items=data.num_items, mesh=mesh)
  iterator = iter(pipeline_lib.train_pipeline(train_batches,
                                              num_threads=int(config.data.threads)))
  es = EarlyStopping(int(config.train.patience))
  start_epoch = 0
  log = run_log.RunLog(workdir, enabled=is_main)
  latest = store.latest_step()
  if latest is not None:
    meta = store.read_meta(latest)
    check_resumable(meta['config'], config)
    if meta.get('data_key') != data.key:
      raise ValueError('the data file changed since this run started (content hash '
                       'differs); use a new --workdir')
    train_target = ckpt_lib.abstract({'opt_state': state.opt_state, 'step': state.step,
                                      'rng': state.rng})
    restored = store.restore(latest, params_target=ckpt_lib.abstract(state.params),
                             train_target=train_target, iterator=iterator)
    t = restored['train']
    state = steps.TrainState(params=restored['params'], opt_state=t['opt_state'],
                             step=t['step'], rng=t['rng'])
    iterator = restored['data_iter']
    es = EarlyStopping(int(config.train.patience), **{
        k: v for k, v in meta['early_stopping'].items()})
    start_epoch = int(meta['epoch']) + 1
    _log(f'resuming from checkpoint step {latest} (epoch {meta["epoch"]}, best '
         f'{config.eval.monitor} {es.best:.4f} at epoch {es.best_epoch})')
  log.truncate_metrics(start_epoch)
  log.write_config(config.to_dict())

  # ---- the epoch loop -----------------------------------------------------------------
  num_epochs = int(config.train.num_epochs)
  log_every = max(1, int(config.train.log_every))
  monitor = config.eval.monitor
  epoch_times: list[float] = []
  step = int(parallel.to_host(state.step))
  kill_at_step = int(os.environ.get('GEAR_JAX_KILL_AT_STEP', '-1'))
  for epoch in range(start_epoch, num_epochs):
    if es.should_stop:
      break
    t0 = time.perf_counter()
    loss_sum = jnp.zeros((), jnp.float32)
    progress = run_log.Progress(steps_per_epoch, f'epoch {epoch}', enabled=is_main)
    sequences = 0
    for i in range(steps_per_epoch):
      batch = next(iterator)
      sequences += int(batch['mask'].sum()) * pcount
      state, aux = train_step(state, parallel.put_batch(batch, mesh))
      loss_sum = loss_sum + aux['loss']
      step += 1
      if step == kill_at_step:  # fault injection for the resume tests
        os.kill(os.getpid(), signal.SIGKILL)
      if (i + 1) % log_every == 0 or i + 1 == steps_per_epoch:
        mean = float(parallel.to_host(loss_sum)) / (i + 1)
        _check_finite(mean, step, epoch, store)
        if is_main and (i + 1) % log_every == 0:
          log.scalars(step, {'train/loss_running': mean})
        progress.update(i + 1, f'loss {mean:.4f}')
    progress.close()
    train_loss = float(parallel.to_host(loss_sum)) / steps_per_epoch
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    val = evaluator.evaluate(state.params, 'val')
    val_s = time.perf_counter() - t1
    if monitor not in val:
      raise ValueError(f'monitored metric {monitor!r} was not computed (no validation '
                       f'cases?); computed: {sorted(val)}')
    improved = es.update(val[monitor], epoch, step, val)
    record = {'epoch': epoch, 'step': step, 'train/loss': train_loss, **val,
              'train_s': round(train_s, 3), 'eval_s': round(val_s, 3),
              'train/seq_per_s': round(sequences / train_s, 1)}
    meta = dict(epoch=epoch, step=step, early_stopping=es.state(), metrics=record,
                config=config.to_dict(), data_key=data.key,
                num_items=data.num_items, num_behaviors=data.num_behaviors)
    store.save(step, params=state.params,
               train={'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng},
               iterator=iterator, meta=meta, monitor=val[monitor])
    log.append_metrics(record)
    epoch_times.append(time.perf_counter() - t0)
    left = (num_epochs - epoch - 1) * float(np.mean(epoch_times[-5:]))
    _log(f'epoch {epoch:3d}  loss {train_loss:.4f}  {monitor} {val[monitor]:.4f}'
         f'{" *" if improved else "  "} best {es.best:.4f} (epoch {es.best_epoch})  '
         f'{sequences / train_s:,.0f} seq/s  train {train_s:.1f}s eval {val_s:.1f}s  '
         f'eta <= {run_log.format_seconds(left)}')
    if es.should_stop:
      _log(f'early stopping: no improvement of {monitor} for {es.patience} epochs')
  store.wait()

  # ---- summary -------------------------------------------------------------------------
  summary = {'best_epoch': es.best_epoch, 'best_step': es.best_step,
             'monitor': monitor, 'best': es.best if es.best_epoch >= 0 else None,
             'best_val': es.best_metrics, 'epochs_run': len(run_log.read_metrics(workdir))
             if is_main else None, 'early_stopped': es.should_stop,
             'num_params': n_params}
  if data.split == 'val_test' and es.best_step >= 0:
    best_params = store.restore(
        es.best_step, params_target=ckpt_lib.abstract(state.params))['params']
    summary['test'] = evaluator.evaluate(best_params, 'test')
    _log('test (best checkpoint): ' + '  '.join(
        f'{k} {v:.4f}' for k, v in summary['test'].items() if k.endswith('@10')))
  log.write_summary(summary)
  log.close()
  store.close()
  if es.best_epoch >= 0:
    _log(f'best {monitor} {es.best:.4f} at epoch {es.best_epoch} '
         f'(checkpoint step {es.best_step}) -> {workdir}')
  return summary


def _check_finite(loss: float, step: int, epoch: int, store) -> None:
  if math.isfinite(loss):
    return
  store.wait()
  raise FloatingPointError(
      f'training loss is {loss} at step {step} (epoch {epoch}); stopped without '
      f'saving. The last good checkpoints are intact (latest step '
      f'{store.latest_step()}, best step {store.best_step()}) in {store.directory}. '
      'Try a lower train.lr or model.precision=float32.')


# -- the CLI ----------------------------------------------------------------------------

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run_log.quiet_libraries()
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (DataError, FloatingPointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, logs.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
