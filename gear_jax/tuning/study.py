"""Opening a study: its storage (any SQLAlchemy URL), its sampler and pruner, and the
checks that make a shared study safe to join.

A study created by `gear_jax.tune` records in its user attributes what it maximises
(``eval.monitor``), its search space (``gear_jax.space``) and the base config's values
of every key a resumed run may not change (``gear_jax.base``). Joining an existing
study with another objective, another space or a base config that computes something
else is refused before anything is written.
"""

from __future__ import annotations

import os
import time
from typing import Any

import optuna

from gear_jax import defaults
from gear_jax.errors import ConfigError

OBJECTIVE_ATTR, BASE_ATTR = 'gear_jax.objective', 'gear_jax.base'
SPACE_ATTR = 'gear_jax.space'
SQLITE_TIMEOUT_S = 60  # how long a writer waits for another process's SQLite write
SCHEMA_RACE_RETRIES = 3  # reopenings after another worker created the tables at once


def default_storage(workdir: str) -> str:
  return 'sqlite:///' + os.path.join(os.path.abspath(workdir), 'study.db')


def open_storage(url: str):
  """An Optuna RDB storage for `url`; a URL that cannot be opened (a bad scheme, a
  missing driver, an unreachable server, a directory that does not exist) is one
  `ConfigError`. Workers that open a new database at the same moment both create its
  tables; the one that loses that race opens it again (the tables are there then)."""
  import sqlalchemy.exc
  kwargs = ({'connect_args': {'timeout': SQLITE_TIMEOUT_S}} if url.startswith('sqlite')
            else {'pool_pre_ping': True})
  for attempt in range(SCHEMA_RACE_RETRIES + 1):
    try:
      return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except sqlalchemy.exc.IntegrityError as e:
      if attempt == SCHEMA_RACE_RETRIES:
        raise _unopenable(url, e) from None
      time.sleep(0.2 * (attempt + 1))
    except Exception as e:  # noqa: BLE001 - sqlalchemy and drivers raise many kinds
      raise _unopenable(url, e) from None


def _unopenable(url: str, e: Exception) -> ConfigError:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ''
  return ConfigError(f'storage {redacted(url)} cannot be opened: {type(e).__name__}: '
                     f'{first[:200]}', field='--storage',
                     hint='e.g. sqlite:///runs/tune/study.db, or '
                     'postgresql://user:pass@host/db with its driver installed '
                     '(docs/tuning.md)')


def redacted(url: str) -> str:
  """`url` without its password."""
  scheme, sep, rest = url.partition('://')
  if sep and '@' in rest and ':' in rest.rpartition('@')[0]:
    creds, _, host = rest.rpartition('@')
    return f'{scheme}://{creds.split(":", 1)[0]}:***@{host}'
  return url


def make_sampler(kind: str, seed: int, startup_trials: int, grid: dict | None = None):
  if kind == 'tpe':
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
  if kind == 'random':
    return optuna.samplers.RandomSampler(seed=seed)
  return Grid(grid, seed=seed)


class Grid(optuna.samplers.GridSampler):
  """Optuna's grid sampler without its stop at the end of the grid (that needs
  `study.optimize`; `gear_jax.tune` asks and tells, and caps --trials at the grid)."""

  def after_trial(self, study, trial, state, values):
    del study, trial, state, values


def make_pruner(kind: str, startup_trials: int, warmup_epochs: int, max_epochs: int):
  """'median': a trial whose epoch-E value is below the median of the trials before
  it at epoch E (after `startup_trials` finished trials and `warmup_epochs` epochs);
  'hyperband': successive halving brackets over 1..`max_epochs` epochs."""
  if kind == 'median':
    # optuna counts steps from 0: epoch E is step E, so W warm-up epochs are steps < W
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                       n_warmup_steps=warmup_epochs)
  if kind == 'hyperband':
    return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs),
                                          max_resource=max(2, max_epochs))
  return optuna.pruners.NopPruner()


def base_values(config) -> dict[str, Any]:
  """The base config's keys that define what a trial computes (not the searched ones,
  which each trial sets, nor resumable ones, nor the seed)."""
  return {k: v for k, v in defaults.flat_config(config).items()
          if k != 'seed' and not defaults.resumable(k) and k in defaults.TABLE}


def space_record(dims) -> list:
  """The space as the study records it: [key, kind, arguments] a dimension."""
  return [[d.key, d.kind, list(d.args)] for d in dims]


def check_existing(storage, name: str, monitor: str, base: dict, dims) -> bool:
  """Whether study `name` exists; refuses it when it maximises something else, searches
  another space or was created from a base config that computes something else."""
  try:
    study_id = storage.get_study_id_from_name(name)
  except KeyError:
    return False
  attrs = storage.get_study_user_attrs(study_id)
  directions = storage.get_study_directions(study_id)
  objective = attrs.get(OBJECTIVE_ATTR)
  if directions != [optuna.study.StudyDirection.MAXIMIZE] or objective != monitor:
    what = (f'maximises {objective}' if objective else
            'was not made by gear_jax.tune' if directions[0].name == 'MAXIMIZE' else
            f'{directions[0].name.lower()}s its objective')
    raise ConfigError(f'study {name!r} exists and {what}; this config maximises {monitor}',
                      field='--study', hint='use another --study name, or the config '
                      'the study was made with')
  space = attrs.get(SPACE_ATTR)
  if space is not None and space != space_record(dims):
    theirs = ', '.join(f'{k}: {kind}{tuple(a)}' for k, kind, a in space)
    raise ConfigError(f'study {name!r} exists with another search space ({theirs})',
                      field='--study', hint='use another --study name, or the space the '
                      'study was made with (config.tune.space)')
  searched = {d.key for d in dims}
  saved = attrs.get(BASE_ATTR, {})
  changed = sorted(k for k in set(saved) | set(base) if k not in searched
                   and saved.get(k, base.get(k)) != base.get(k, saved.get(k)))
  if changed:
    detail = ', '.join(f'{k}: {saved.get(k)!r} -> {base.get(k)!r}' for k in changed[:4])
    raise ConfigError(f'study {name!r} exists with another base config ({detail})',
                      field='--study', hint='use another --study name, or the config '
                      'and overrides the study was made with')
  return True


def open_study(storage, name: str, sampler, pruner, monitor: str, base: dict, dims):
  """Creates study `name` (or loads it; `check_existing` first) and records its
  objective, space and base config."""
  study = optuna.create_study(storage=storage, study_name=name, direction='maximize',
                              sampler=sampler, pruner=pruner, load_if_exists=True)
  if OBJECTIVE_ATTR not in study.user_attrs:
    study.set_user_attr(OBJECTIVE_ATTR, monitor)
    study.set_user_attr(BASE_ATTR, base)
    study.set_user_attr(SPACE_ATTR, space_record(dims))
  return study
