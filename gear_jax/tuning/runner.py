"""The trial loop of ``python -m gear_jax.tune`` (the command describes the layout).

Each trial is an ordinary training run (`gear_jax.trainer.train_and_evaluate`) in
``<workdir>/trial_<n>``, in this process, with the trial's settings and seed
``config.seed + n``. Its per-epoch monitored metric is reported to the study; the
pruner may end it at an epoch boundary (its checkpoint is kept; summary.json says
``stopped_by``).

Who runs what, with several workers on one study:
- a worker holds a trial's run-directory lock (`gear_jax.lock`, a flock the system
  drops when its holder dies) for as long as it trains it;
- choosing the next trial happens under ``<workdir>/.tune.lock``: first a trial the
  study lists as running whose directory is in this workdir and whose lock is free (its
  worker was killed: it is resumed from its checkpoint), else a new trial while the
  study holds fewer than ``--trials``. Workers on one machine (or sharing the workdir
  on one file system) therefore never run a trial twice, and the total stays exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shlex
import socket
import sys
import time
from typing import Any

import optuna

from gear_jax import run_log
from gear_jax.errors import ConfigError, Interrupted, RunLocked, TrainingDiverged
from gear_jax.lock import WorkdirLock
from gear_jax.tuning import space as space_lib
from gear_jax.tuning import study as study_lib

TUNE_RECORD = 'tune.json'  # how this workdir's study was run (for report and reruns)
BEST = 'best.json'


@dataclasses.dataclass
class Options:
  """What the command line gives."""
  config_spec: str  # 'configs/demo.py' or 'configs/demo.py:sasrec'
  overrides: list[str]  # the --config.* flags given, as 'key=value'
  workdir: str
  trials: int
  storage: str
  study: str
  sampler: str = 'tpe'
  pruner: str = 'median'
  timeout_minutes: float = 0.0


@dataclasses.dataclass
class _Context:
  opts: Options
  base: Any  # the base ConfigDict
  dims: list[space_lib.Dimension]
  study: Any
  stop: Any
  started: float = dataclasses.field(default_factory=time.monotonic)
  durations: list = dataclasses.field(default_factory=list)

  @property
  def monitor(self) -> str:
    return self.base.eval.monitor


def trial_dir(workdir: str, number: int) -> str:
  return os.path.join(os.path.abspath(workdir), f'trial_{number}')


def short(params: dict) -> str:
  """'d_model=64 lr=0.00123': the last part of each key, values to 4 digits."""
  def fmt(v):
    return f'{v:.4g}' if isinstance(v, float) else str(v)
  return ' '.join(f'{k.rsplit(".", 1)[-1]}={fmt(v)}' for k, v in params.items())


@contextlib.contextmanager
def _choosing(workdir: str):
  """The workdir's choosing lock (blocking: workers take turns for milliseconds)."""
  fd = os.open(os.path.join(workdir, '.tune.lock'), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _claim_abandoned(ctx: _Context):
  """A running trial of this workdir whose worker is gone, with its lock now held."""
  workdir = os.path.abspath(ctx.opts.workdir)
  for t in ctx.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    path = t.user_attrs.get('workdir')
    if not path or os.path.dirname(path) != workdir:
      continue  # another workdir's (or another host's) trial
    lock = WorkdirLock(path, 'tune')
    try:
      lock.acquire()
    except RunLocked:
      continue  # its worker is alive
    return optuna.trial.Trial(ctx.study, t._trial_id), lock, True
  return None


def _claim_new(ctx: _Context):
  """A new trial (None when the study holds --trials trials)."""
  if len(ctx.study.get_trials(deepcopy=False)) >= ctx.opts.trials:
    return None
  trial = ctx.study.ask()
  path = trial_dir(ctx.opts.workdir, trial.number)
  trial.set_user_attr('workdir', path)
  trial.set_user_attr('host', socket.gethostname())
  trial.set_user_attr('seed', int(ctx.base.seed) + trial.number)
  lock = WorkdirLock(path, 'tune')
  lock.acquire()  # a new directory: nobody else can hold it
  return trial, lock, False


def _timed_out(ctx: _Context) -> bool:
  limit = ctx.opts.timeout_minutes * 60
  return limit > 0 and time.monotonic() - ctx.started >= limit


def _suggest(ctx: _Context, trial) -> dict:
  """The trial's settings (a resumed trial gets back the values it was given). TPE and
  random sampling are seeded from config.seed and the trial number, so the same storage
  state proposes the same trial whichever worker asks."""
  if ctx.opts.sampler != 'grid':
    ctx.study.sampler = study_lib.make_sampler(
        ctx.opts.sampler, int(ctx.base.seed) * 1000 + trial.number,
        int(ctx.base.tune.startup_trials))
  try:
    return {d.key: d.suggest(trial) for d in ctx.dims}
  except ValueError as e:
    raise ConfigError(f'trial {trial.number} was started with another search space '
                      f'({e})', field=space_lib.FIELD,
                      hint='use the space the study was made with, or a new --study') from None


def _pruning_hook(ctx: _Context, trial):
  def on_epoch(record: dict):
    epoch, value = int(record['epoch']), float(record[ctx.monitor])
    trial.report(value, epoch)
    if trial.should_prune():
      return (f'pruned by the {ctx.opts.pruner} pruner ({ctx.monitor} {value:.4f} at '
              f'epoch {epoch})')
    return None
  return on_epoch


def _train(ctx: _Context, trial, params: dict, resumed: bool) -> dict:
  """The trial's run (or the summary it already wrote: killed before it was told).
  The trainer validates the trial's config first (a `ConfigError` for a combination
  that is invalid only together, e.g. d_model 32 with 3 heads)."""
  path = trial_dir(ctx.opts.workdir, trial.number)
  done = os.path.join(path, 'summary.json')
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  config = space_lib.with_values(ctx.base, params, int(ctx.base.seed) + trial.number)
  how = 'resuming' if resumed else 'starting'
  print(f'trial {trial.number}: {how} in {path}: {short(params)}', file=sys.stderr,
        flush=True)
  from gear_jax import trainer
  return trainer.train_and_evaluate(config, path, stop=ctx.stop,
                                    on_epoch=_pruning_hook(ctx, trial))


def _finish(ctx: _Context, trial, params: dict, resumed: bool) -> str:
  """Trains the trial and tells the study how it ended; returns the state's name."""
  state = optuna.trial.TrialState
  try:
    summary = _train(ctx, trial, params, resumed)
  except (ConfigError, TrainingDiverged) as e:
    trial.set_user_attr('error', e.message)
    ctx.study.tell(trial.number, state=state.FAIL)
    return f'failed ({e.message})'
  trial.set_user_attr('epochs', summary.get('epochs_run'))
  trial.set_user_attr('best_epoch', summary.get('best_epoch'))
  if summary.get('stopped_by'):
    ctx.study.tell(trial.number, state=state.PRUNED)
    return f'pruned after {summary.get("epochs_run")} epochs'
  if summary.get('best') is None:
    trial.set_user_attr('error', 'no epoch was run')
    ctx.study.tell(trial.number, state=state.FAIL)
    return 'failed (no epoch was run)'
  ctx.study.tell(trial.number, float(summary['best']))
  return f'complete after {summary.get("epochs_run")} epochs'


def _progress(ctx: _Context, trial, params: dict, outcome: str, seconds: float) -> None:
  """One line a finished trial: settings, value, the best so far, the ETA."""
  st = optuna.trial.TrialState
  frozen = ctx.study.get_trials(deepcopy=False)
  finished = [t for t in frozen if t.state in (st.COMPLETE, st.PRUNED, st.FAIL)]
  running = max(1, sum(t.state == st.RUNNING for t in frozen))
  mine = next((t for t in frozen if t.number == trial.number), None)
  value = f'{mine.value:.4f}' if mine is not None and mine.value is not None else '-'
  complete = [t for t in frozen if t.state == st.COMPLETE]
  best = (max(complete, key=lambda t: t.value) if complete else None)
  best_text = f'best {best.value:.4f} (trial {best.number})' if best else 'no best yet'
  ctx.durations.append(seconds)
  left = max(0, ctx.opts.trials - len(finished))
  eta = sum(ctx.durations) / len(ctx.durations) * math.ceil(left / running)
  if ctx.opts.timeout_minutes > 0:
    elapsed = time.monotonic() - ctx.started
    eta = min(eta, max(0.0, ctx.opts.timeout_minutes * 60 - elapsed))
  print(f'trial {trial.number} {outcome}: {short(params)} -> {ctx.monitor} {value}; '
        f'{best_text}; {len(finished)}/{ctx.opts.trials} trials, {seconds:.0f}s, '
        f'eta {run_log.format_seconds(eta) if left else "0s"}', file=sys.stderr, flush=True)


def _next(ctx: _Context):
  with _choosing(ctx.opts.workdir):
    return _claim_abandoned(ctx) or _claim_new(ctx)


def run_trials(ctx: _Context) -> None:
  """Claims and trains trials until the study holds --trials finished or running
  trials (or --timeout_minutes has passed)."""
  while True:
    if ctx.stop is not None and ctx.stop.requested:
      raise Interrupted(ctx.stop.signum, 'interrupted between trials; rerun the same '
                        'command to continue the study')
    claim = None if _timed_out(ctx) else _next(ctx)
    if claim is None:
      return
    trial, lock, resumed = claim
    try:
      t0 = time.monotonic()
      params = _suggest(ctx, trial)
      outcome = _finish(ctx, trial, params, resumed)
      _progress(ctx, trial, params, outcome, time.monotonic() - t0)
    finally:
      lock.release()


def reproduce_command(record: dict, params: dict, seed: int, workdir: str) -> str:
  """The ``gear_jax.train`` command line that trains a trial again."""
  def flag(k, v):
    return shlex.quote(f'--config.{k}={v!r}' if isinstance(v, float) else
                       f'--config.{k}={v}')
  searched = set(params)
  base = [shlex.quote(f'--config.{o}') for o in record['overrides']
          if o.split('=', 1)[0] not in searched | {'seed'}
          and not o.startswith('tune.')]  # tune.* does not change a run
  return ' '.join(['python -m gear_jax.train', '--config', shlex.quote(record['config']),
                   *base, flag('seed', seed), *(flag(k, v) for k, v in params.items()),
                   '--workdir', shlex.quote(workdir)])


def write_record(opts: Options) -> dict:
  record = dict(config=opts.config_spec, overrides=list(opts.overrides),
                storage=opts.storage, study=opts.study, trials=opts.trials,
                sampler=opts.sampler, pruner=opts.pruner)
  run_log.write_json(os.path.join(opts.workdir, TUNE_RECORD), record)
  return record


def read_record(workdir: str) -> dict:
  with open(os.path.join(workdir, TUNE_RECORD)) as f:
    return json.load(f)


def run_study(opts: Options, base, stop=None) -> dict:
  """Checks everything (space, sampler, storage, an existing study) before the study
  is touched, then runs trials and writes best.json and report.md. Returns the counts
  of trials by state."""
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line a trial
  dims = space_lib.parse_space(tuple(base.tune.space), base)
  grid = space_lib.grid_space(dims) if opts.sampler == 'grid' else None
  points = math.prod(len(v) for v in grid.values()) if grid is not None else None
  if points is not None and opts.trials > points:
    print(f'notice: the grid has {points} points; the study stops there, not at '
          f'--trials {opts.trials}', file=sys.stderr, flush=True)
    opts = dataclasses.replace(opts, trials=points)
  os.makedirs(opts.workdir, exist_ok=True)
  sampler = study_lib.make_sampler(opts.sampler, int(base.seed),
                                   int(base.tune.startup_trials), grid)
  pruner = study_lib.make_pruner(opts.pruner, int(base.tune.startup_trials),
                                 int(base.tune.warmup_epochs), int(base.train.num_epochs))
  values = study_lib.base_values(base)
  with _choosing(opts.workdir):  # workers of one workdir create the tables and study in turn
    storage = study_lib.open_storage(opts.storage)
    existed = study_lib.check_existing(storage, opts.study, base.eval.monitor, values, dims)
    study = study_lib.open_study(storage, opts.study, sampler, pruner, base.eval.monitor,
                                 values, dims)
    write_record(opts)
  held = len(study.get_trials(deepcopy=False))
  joined = f'joined, {held} trials so far' if existed else 'new'
  print(f'tune: study {opts.study!r} ({joined}) '
        f'in {study_lib.redacted(opts.storage)}; {len(dims)} settings searched, '
        f'{opts.trials} trials, sampler {opts.sampler}, pruner {opts.pruner}',
        file=sys.stderr, flush=True)
  ctx = _Context(opts, base, dims, study, stop)
  run_trials(ctx)
  from gear_jax.tuning import report
  path, best_path = report.write(opts.workdir)
  counts = report.state_counts(study)
  best = ('; best ' + f'{study.best_value:.4f} (trial {study.best_trial.number}) -> '
          f'{best_path}' if best_path else '; no trial complete')
  print(f'tune: {sum(counts.values())} trials (' + ', '.join(
      f'{n} {s}' for s, n in sorted(counts.items())) + f') in '
        f'{run_log.format_seconds(time.monotonic() - ctx.started)}{best}; wrote {path}',
        file=sys.stderr, flush=True)
  return counts
