"""What a study found: ``best.json`` and ``report.md`` with its figures, in the tune
workdir (written at the end of ``gear_jax.tune`` and by ``gear_jax.report --workdir``).

report.md holds the best trial (settings, metrics, the command that trains it again),
a table of every trial (state, settings, value, epochs, seconds) and two figures drawn
with matplotlib: the optimisation history (each trial's value, the best so far) and
the hyper-parameter importances of Optuna's own analysis (``optuna.importance`` with
its PED-ANOVA evaluator, which needs no scikit-learn), once two trials are complete.
"""

from __future__ import annotations

import os
from typing import Any

import optuna

from gear_jax import reporting, run_log
from gear_jax.rundir import read_json
from gear_jax.tuning import runner
from gear_jax.tuning import study as study_lib

HISTORY_PNG, IMPORTANCE_PNG = 'tune_history.png', 'tune_importance.png'


def load(workdir: str):
  """(tune.json's record, the study) of a tune workdir."""
  record = runner.read_record(workdir)
  storage = study_lib.open_storage(record['storage'])
  return record, optuna.load_study(study_name=record['study'], storage=storage)


def _states(study) -> dict[str, list]:
  out: dict[str, list] = {}
  for t in study.get_trials(deepcopy=False):
    out.setdefault(t.state.name.lower(), []).append(t)
  return out


def state_counts(study) -> dict[str, int]:
  """{'complete': 9, 'pruned': 3}: the study's trials by state."""
  return {state: len(trials) for state, trials in _states(study).items()}


def best_record(record: dict, study, workdir: str) -> dict | None:
  """best.json: the best complete trial, its settings and value, and the config and
  command that reproduce it."""
  complete = _states(study).get('complete', [])
  if not complete:
    return None
  best = max(complete, key=lambda t: (t.value, -t.number))
  path = best.user_attrs.get('workdir') or runner.trial_dir(workdir, best.number)
  seed = best.user_attrs.get('seed')
  config = read_json(os.path.join(path, 'config.json'))
  from gear_jax import defaults
  return dict(study=record['study'], number=best.number, value=best.value,
              monitor=study.user_attrs.get(study_lib.OBJECTIVE_ATTR),
              params=dict(best.params), seed=seed, trial_dir=path,
              command=runner.reproduce_command(
                  record, dict(best.params), seed,
                  os.path.join(workdir, f'best_trial_{best.number}')),
              config=defaults.flat_config(config) if config else None)


def _seconds(t) -> float | None:
  if t.datetime_start and t.datetime_complete:
    return (t.datetime_complete - t.datetime_start).total_seconds()
  return None


def _value(t) -> float | None:
  if t.value is not None:
    return t.value
  steps = t.intermediate_values
  return steps[max(steps)] if steps else None


def plot_history(study, path: str) -> None:
  plt = reporting._pyplot()
  trials = [t for t in study.get_trials(deepcopy=False) if _value(t) is not None]
  fig, ax = plt.subplots(figsize=(6.4, 3.8), layout='constrained')
  for state, marker in (('COMPLETE', 'o'), ('PRUNED', 'x')):
    chosen = [t for t in trials if t.state.name == state]
    ax.scatter([t.number for t in chosen], [_value(t) for t in chosen], marker=marker,
               label=state.lower() + (' (last epoch)' if state == 'PRUNED' else ''))
  complete = sorted((t for t in trials if t.state.name == 'COMPLETE'),
                    key=lambda t: t.number)
  if complete:
    best, xs, ys = -float('inf'), [], []
    for t in complete:
      best = max(best, t.value)
      xs.append(t.number)
      ys.append(best)
    ax.step(xs, ys, where='post', label='best so far')
  ax.set_xlabel('trial')
  ax.set_ylabel(study.user_attrs.get(study_lib.OBJECTIVE_ATTR, 'value'))
  fig.legend(loc='outside upper center', ncols=3, fontsize='small')
  fig.savefig(path, dpi=110)
  plt.close(fig)


def importances(study) -> dict[str, float] | None:
  """Optuna's PED-ANOVA importances (None with fewer than two complete trials)."""
  complete = _states(study).get('complete', [])
  if len(complete) < 2:
    return None
  try:
    return optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
  except (ValueError, RuntimeError):
    return None  # e.g. every complete trial has the same settings


def plot_importances(values: dict[str, float], path: str) -> None:
  plt = reporting._pyplot()
  names = list(values)[::-1]
  fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.4 * len(names)))
  ax.barh(names, [values[n] for n in names])
  ax.set_xlabel('importance (PED-ANOVA, sums to 1)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt(v: Any) -> str:
  if v is None:
    return '-'
  if isinstance(v, float):
    return f'{v:.4g}' if abs(v) < 1e-2 else f'{v:.4f}'
  return str(v)


def _trials_table(study) -> list[str]:
  trials = study.get_trials(deepcopy=False)
  keys = sorted({k for t in trials for k in t.params})
  header = ['trial', 'state', *(k.rsplit('.', 1)[-1] for k in keys), 'value',
            'best epoch', 'epochs', 'seconds']
  rows = [[t.number, t.state.name.lower(), *(_fmt(t.params.get(k)) for k in keys),
           _fmt(_value(t)), _fmt(t.user_attrs.get('best_epoch')),
           _fmt(t.user_attrs.get('epochs')), _fmt(_seconds(t) and round(_seconds(t)))]
          for t in trials]
  return reporting._table(header, rows)


def _best_section(best: dict | None, workdir: str) -> list[str]:
  if best is None:
    return ['## Best trial', '', 'No trial has completed yet.', '']
  summary = read_json(os.path.join(best['trial_dir'], 'summary.json')) or {}
  metrics = summary.get('best_val', {})
  lines = ['## Best trial', '',
           f"Trial {best['number']}: {best['monitor']} **{best['value']:.4f}** "
           f"(epoch {summary.get('best_epoch', '-')}, seed {best['seed']}; "
           f"run directory `{os.path.relpath(best['trial_dir'], workdir)}`).", '',
           *reporting._table(['setting', 'value'],
                             [[k, _fmt(v)] for k, v in best['params'].items()])]
  at10 = [[k, f'{v:.4f}'] for k, v in metrics.items() if k.endswith('@10') or k.endswith('MRR')]
  if at10:
    lines += reporting._table(['metric', 'value'], at10)
  lines += ['Train it again (the same value, exactly):', '', '```', best['command'], '```', '']
  return lines


def write(workdir: str) -> tuple[str, str | None]:
  """best.json (once a trial is complete), report.md and its figures; their paths."""
  record, study = load(workdir)
  best = best_record(record, study, workdir)
  best_path = None
  if best is not None:
    best_path = os.path.join(workdir, runner.BEST)
    run_log.write_json(best_path, best)
  states = state_counts(study)
  lines = [f"# Study {record['study']}", '',
           f"Storage `{study_lib.redacted(record['storage'])}`; objective: maximise "
           f"{study.user_attrs.get(study_lib.OBJECTIVE_ATTR)}; sampler {record['sampler']}, "
           f"pruner {record['pruner']}; {sum(states.values())} of {record['trials']} "
           'trials (' + ', '.join(f'{n} {s}' for s, n in sorted(states.items())) + ').',
           '', *_best_section(best, workdir), '## Trials', '', *_trials_table(study)]
  if any(_value(t) is not None for t in study.get_trials(deepcopy=False)):
    plot_history(study, os.path.join(workdir, HISTORY_PNG))
    lines += ['## Optimisation history', '', f'![history]({HISTORY_PNG})', '']
  values = importances(study)
  if values:
    plot_importances(values, os.path.join(workdir, IMPORTANCE_PNG))
    lines += ['## Hyper-parameter importances', '', f'![importances]({IMPORTANCE_PNG})',
              '', *reporting._table(['setting', 'importance'],
                                    [[k, f'{v:.3f}'] for k, v in values.items()])]
  path = os.path.join(workdir, 'report.md')
  run_log.atomic_write_text(path, '\n'.join(lines))
  return path, best_path
