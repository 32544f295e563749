"""Run reports and comparisons, made from what a run directory holds (the library
behind ``python -m gear_jax.report``).

One workdir: ``report.md`` and its figures (``report_curves.png``, ``report_at_k.png``)
from config.json, metrics.jsonl, summary.json and run.json (environment, data
statistics and model size, written by the trainer when a run starts). Several: one
comparison table and overlaid curves; runs whose configs differ only in ``seed`` are
grouped and reported as mean ± std (sample standard deviation, ddof = 1). Numbers in
tables are printed with 4 decimals; the consistency checks flag impossible numbers (a
metric@K falling as K grows, NDCG@K above Recall@K, a best value that is not the best
epoch's) instead of printing them silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import time
from typing import Any

from gear_jax import defaults, rundir, run_log
from gear_jax.errors import UserError

CURVES = 'report_curves.png'
AT_K = 'report_at_k.png'
COMPARE_CURVES = 'compare_curves.png'
_METRIC = re.compile(r'^(?P<prefix>[a-z_]+)/(?P<name>Recall|NDCG)@(?P<k>\d+)$')


@dataclasses.dataclass
class RunRecord:
  """Everything a report reads from one workdir."""
  workdir: str
  config: dict  # flat 'section.key' -> value
  metrics: list[dict]  # one row per epoch
  summary: dict | None  # None while the run is going
  info: dict  # run.json ({} for runs made before it existed)
  notices: list[str]

  @property
  def partial(self) -> bool:
    return self.summary is None

  @property
  def learned(self) -> bool:
    """False for a non-learned baseline (gear_jax.baselines): no epochs, no parameters."""
    return (self.summary or {}).get('learned', True)

  @property
  def monitor(self) -> str:
    return str(self.config.get('eval.monitor', 'val/NDCG@10'))

  def best_row(self) -> dict:
    """The best epoch's metrics row (from summary.json, else the best row so far)."""
    if self.summary and self.summary.get('best_epoch', -1) >= 0:
      for row in self.metrics:
        if row['epoch'] == self.summary['best_epoch']:
          return row
    scored = [r for r in self.metrics if _finite(r.get(self.monitor))]
    return max(scored, key=lambda r: (r[self.monitor], -r['epoch'])) if scored else {}


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def load_run(workdir: str) -> RunRecord:
  """Reads a run directory; a clear error when it holds no metrics."""
  config = rundir.read_flat_config(workdir)
  notices = []
  metrics, torn = run_log.read_metrics_checked(workdir)
  if torn:
    notices.append(f'metrics.jsonl: a torn last line ({torn} bytes) was ignored')
  if not metrics:
    raise UserError(f'{workdir} holds no metrics yet (metrics.jsonl is missing or empty)',
                    hint='a run writes one line per finished epoch; wait for the first '
                    'epoch to end')
  summary = rundir.read_json(os.path.join(workdir, rundir.SUMMARY))
  info = rundir.read_json(os.path.join(workdir, rundir.RUN)) or {}
  if summary is None:
    notices.append(f'partial: no summary.json yet (run in progress or stopped); '
                   f'{len(metrics)} epochs so far')
  return RunRecord(workdir=workdir, config=config, metrics=metrics, summary=summary,
                   info=info, notices=notices)


# -- analysis -----------------------------------------------------------------------------

def metrics_at_k(row: dict) -> dict[str, dict[str, dict[int, float]]]:
  """{'val': {'Recall': {1: .., 5: ..}, 'NDCG': {...}}, 'val_full': ...} of a row."""
  out: dict[str, dict[str, dict[int, float]]] = {}
  for key, value in row.items():
    m = _METRIC.match(key)
    if m and _finite(value):
      out.setdefault(m['prefix'], {}).setdefault(m['name'], {})[int(m['k'])] = value
  return out


def consistency(record: RunRecord) -> list[str]:
  """Problems with the numbers (empty when all hold)."""
  problems = []
  for row in record.metrics:
    for prefix, names in metrics_at_k(row).items():
      for name, by_k in names.items():
        ks = sorted(by_k)
        for a, b in zip(ks, ks[1:]):
          if by_k[b] < by_k[a] - 1e-12:
            problems.append(f'epoch {row["epoch"]}: {prefix}/{name}@{b} = {by_k[b]:.4f} '
                            f'< {prefix}/{name}@{a} = {by_k[a]:.4f} (cannot fall as K grows)')
      recall, ndcg = names.get('Recall', {}), names.get('NDCG', {})
      for k in sorted(set(recall) & set(ndcg)):
        if ndcg[k] > recall[k] + 1e-12:
          problems.append(f'epoch {row["epoch"]}: {prefix}/NDCG@{k} = {ndcg[k]:.4f} > '
                          f'{prefix}/Recall@{k} = {recall[k]:.4f} (NDCG@K <= Recall@K)')
  s = record.summary
  if s and s.get('best_epoch', -1) >= 0:
    row = record.best_row()
    if not row:
      problems.append(f'summary.json: best epoch {s["best_epoch"]} has no row in '
                      'metrics.jsonl')
    else:
      monitor = s.get('monitor', record.monitor)
      if not _same(row.get(monitor), s.get('best')):
        problems.append(f'summary.json: best {monitor} {s.get("best")} != epoch '
                        f'{s["best_epoch"]} row {row.get(monitor)}')
      for key, value in (s.get('best_val') or {}).items():
        if not _same(row.get(key), value):
          problems.append(f'summary.json: best_val {key} {value} != epoch '
                          f'{s["best_epoch"]} row {row.get(key)}')
      scored = [r[monitor] for r in record.metrics if _finite(r.get(monitor))]
      if scored and _finite(s.get('best')) and max(scored) > s['best'] + 1e-12:
        problems.append(f'summary.json: best {monitor} {s["best"]:.4f} is below the '
                        f'best epoch row value {max(scored):.4f}')
  return problems


def _same(a, b) -> bool:
  return _finite(a) and _finite(b) and abs(a - b) <= 1e-9 * max(1.0, abs(a))


def phases(record: RunRecord) -> dict[str, Any]:
  """When the monitored metric first reached 50 / 90 / 99 % of its best, the gain in
  each phase, and its mean and std over the last 30 epochs (or all)."""
  rows = [r for r in record.metrics if _finite(r.get(record.monitor))]
  if not rows:
    return {}
  values = [r[record.monitor] for r in rows]
  best = max(values)
  reached, previous = [], (rows[0]['epoch'], values[0])
  for frac in (0.5, 0.9, 0.99):
    at = next((i for i, v in enumerate(values) if v >= frac * best), None)
    if at is None:
      continue
    epoch, value = rows[at]['epoch'], values[at]
    reached.append(dict(fraction=frac, epoch=epoch, value=value,
                        gain=value - previous[1], epochs=epoch - previous[0]))
    previous = (epoch, value)
  last = values[-30:]
  return dict(best=best, reached=reached, last_n=len(last),
              last_mean=statistics.fmean(last),
              last_std=statistics.stdev(last) if len(last) > 1 else 0.0)


def training_figures(record: RunRecord) -> dict[str, Any]:
  rows = record.metrics
  epoch_s = [r.get('train_s', 0.0) + r.get('eval_s', 0.0) for r in rows]
  steps = [b['step'] - a['step'] for a, b in zip(rows, rows[1:])]
  out = dict(epochs=len(rows), total_steps=rows[-1]['step'],
             steps_per_epoch=(statistics.median(steps) if steps else rows[0]['step']),
             epoch_s_mean=statistics.fmean(epoch_s), epoch_s_min=min(epoch_s),
             epoch_s_max=max(epoch_s), total_s=sum(epoch_s),
             train_seq_per_s=statistics.fmean(r.get('train/seq_per_s', 0.0) for r in rows),
             eval_s_mean=statistics.fmean(r.get('eval_s', 0.0) for r in rows))
  s = record.summary or {}
  out['early_stopped'] = bool(s.get('early_stopped'))
  out['patience'] = record.config.get('train.patience')
  return out


# -- figures ------------------------------------------------------------------------------

def _pyplot():
  import matplotlib
  matplotlib.use('Agg')  # headless: files only
  import matplotlib.pyplot as plt
  return plt


def plot_curves(record: RunRecord, path: str) -> None:
  plt = _pyplot()
  rows = record.metrics
  epochs = [r['epoch'] for r in rows]
  best = record.best_row().get('epoch')
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  ax1.plot(epochs, [r.get('train/loss', math.nan) for r in rows], color='C0')
  ax1.set(xlabel='epoch', ylabel='training loss', title='training loss')
  ax2.plot(epochs, [r.get(record.monitor, math.nan) for r in rows], color='C1')
  ax2.set(xlabel='epoch', ylabel=record.monitor, title=record.monitor)
  from matplotlib.ticker import MaxNLocator
  for ax in (ax1, ax2):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if best is not None:
      ax.axvline(best, color='grey', linestyle='--', linewidth=1,
                 label=f'best epoch {best}')
    ax.grid(alpha=0.3)
  ax2.legend(loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_at_k(record: RunRecord, path: str) -> None:
  plt = _pyplot()
  by_prefix = metrics_at_k(record.best_row())
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for i, (prefix, names) in enumerate(sorted(by_prefix.items())):
    for name, style in (('Recall', '-o'), ('NDCG', '--s')):
      if name in names:
        ks = sorted(names[name])
        ax.plot(ks, [names[name][k] for k in ks], style, color=f'C{i}',
                label=f'{prefix}/{name}@K')
  ks = sorted({k for names in by_prefix.values() for v in names.values() for k in v})
  ax.set(xlabel='K', ylabel='value', xscale='log',
         title=f'best epoch {record.best_row().get("epoch")}')
  if ks:
    ax.minorticks_off()
    ax.set_xticks(ks, [str(k) for k in ks])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# -- the single-run report ------------------------------------------------------------------

def _fmt(v) -> str:
  """Table cells: metrics (floats) with 4 decimals, counts with thousands separators,
  text as it is ('|' escaped for Markdown)."""
  if isinstance(v, str):
    return v.replace('|', '\\|')
  if isinstance(v, bool) or v is None:
    return str(v)
  if isinstance(v, float):
    return f'{v:.4f}'
  if isinstance(v, int):
    return f'{v:,}'
  if isinstance(v, (list, tuple)):
    return ', '.join(str(x) for x in v)
  return str(v)


def _value(v) -> str:
  """A config value as written in a config file."""
  return ', '.join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
  out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  out += ['| ' + ' | '.join(_fmt(c) for c in row) + ' |' for row in rows]
  return out + ['']


def build_report(record: RunRecord, figures: dict[str, str]) -> str:
  """The Markdown text; `figures` maps 'curves' / 'at_k' to relative file names.

  One helper per section, in the order of the report."""
  best = record.best_row()
  lines = _summary_section(record, best)
  lines += _config_section(record)
  lines += _environment_section(record)
  lines += _data_section(record)
  lines += _model_section(record)
  lines += _training_section(record, best)
  lines += _best_epoch_section(record, best)
  lines += _curves_section(record, figures)
  lines += _phases_section(record)
  lines += _checks_section(record)
  return '\n'.join(lines)


def _summary_section(record: RunRecord, best: dict) -> list[str]:
  """The title, when and from what the report was made, notices, and the summary."""
  lines = [f'# Run report: {record.workdir}', '']
  lines.append(f'Made {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} by '
               '`python -m gear_jax.report` from config.json, metrics.jsonl, '
               'summary.json and run.json.')
  lines.append('')
  for notice in record.notices:
    lines += [f'> **Note:** {notice}', '']
  s = record.summary or {}
  lines += ['## Summary', '']
  lines += _table(['monitor', 'best', 'best epoch', 'epochs run', 'early stopped',
                   'parameters'],
                  [[record.monitor, best.get(record.monitor), best.get('epoch'),
                    len(record.metrics), s.get('early_stopped', 'not yet'),
                    s.get('num_params', record.info.get('model', {}).get('params'))]])
  return lines


def _config_section(record: RunRecord) -> list[str]:
  """The configuration: the keys that differ from the defaults first, then the rest."""
  default = defaults.flat_config(defaults.get_default_config())
  changed = [[k, _value(v), _value(default[k]) if k in default else '(none)']
             for k, v in sorted(record.config.items()) if default.get(k) != v]
  same = [[k, _value(v)] for k, v in sorted(record.config.items())
          if default.get(k) == v]
  lines = ['## Configuration', '', 'Keys that differ from the defaults:', '']
  lines += _table(['key', 'value', 'default'], changed) if changed else ['(none)', '']
  return lines + ['The other keys:', ''] + _table(['key', 'value'], same)


def _environment_section(record: RunRecord) -> list[str]:
  """The environment recorded in run.json."""
  env = record.info.get('environment')
  lines = ['## Environment', '']
  if env:
    return lines + _table(['item', 'value'], [[k, v] for k, v in env.items()])
  return lines + ['Not recorded (run.json is missing: a run made before it existed).', '']


def _data_section(record: RunRecord) -> list[str]:
  """The data set's statistics recorded in run.json."""
  data = record.info.get('data')
  lines = ['## Data', '']
  if not data:
    return lines + ['Not recorded (run.json is missing).', '']
  rows = [['users', data['num_users']], ['items', data['num_items']],
          ['interactions', data['num_interactions']],
          ['training interactions', data.get('num_train_interactions')],
          ['validation cases', data['num_val_users']]]
  if 'num_test_users' in data:
    rows.append(['test cases', data['num_test_users']])
  rows += [[f'behavior {b}', c] for b, c in data.get('behavior_counts', {}).items()]
  rows += [[f'sequence length {k}', f'{v:,.2f}' if isinstance(v, float) else v]
           for k, v in data.get('seq_len', {}).items()]
  return lines + _table(['', 'count'], rows)


def _model_section(record: RunRecord) -> list[str]:
  """The model's size (run.json, else summary.json)."""
  model = record.info.get('model')
  lines = ['## Model', '']
  params = (model or {}).get('params', (record.summary or {}).get('num_params'))
  if params is not None:
    lines += _table(['parameters', 'size (MB, float32)'],
                    [[int(params), f'{params * 4 / 2**20:.2f}']])
  return lines


def _training_section(record: RunRecord, best: dict) -> list[str]:
  """Epochs, steps and times of training, and why it stopped."""
  t = training_figures(record)
  lines = ['## Training', '']
  lines += _table(['epochs run', 'steps per epoch', 'total steps', 'epoch s (mean)',
                   'epoch s (min)', 'epoch s (max)', 'total s', 'train seq/s (mean)',
                   'eval s (mean)'],
                  [[t['epochs'], int(t['steps_per_epoch']), t['total_steps']]
                   + [f'{t[k]:,.2f}' for k in ('epoch_s_mean', 'epoch_s_min',
                                               'epoch_s_max', 'total_s')]
                   + [f'{t["train_seq_per_s"]:,.0f}', f'{t["eval_s_mean"]:,.2f}']])
  if record.partial:
    lines += ['Early stopping: the run has not finished.', '']
  elif t['early_stopped']:
    lines += [f'Early stopping fired after epoch {record.metrics[-1]["epoch"]}: no new '
              f'best {record.monitor} for {t["patience"]} epochs (best at epoch '
              f'{best.get("epoch")}).', '']
  else:
    lines += [f'Early stopping did not fire: the run ended at its epoch limit '
              f'(train.num_epochs = {record.config.get("train.num_epochs")}).', '']
  return lines


def _best_epoch_section(record: RunRecord, best: dict) -> list[str]:
  """Metrics@K (and MRR) of the best epoch, and the test metrics of its checkpoint."""
  lines = [f'## Best epoch ({best.get("epoch")})', '']
  lines += _at_k_tables(best, with_mrr=True)
  test = (record.summary or {}).get('test')
  if test:
    lines += ['Test metrics of the best checkpoint:', '']
    lines += _at_k_tables(test, with_mrr=False)
  return lines


def _at_k_tables(row: dict, with_mrr: bool) -> list[str]:
  """One Recall@K / NDCG@K table per metric prefix of `row` (and its MRR if asked)."""
  lines = []
  for prefix, names in sorted(metrics_at_k(row).items()):
    ks = sorted(set(names.get('Recall', {})) | set(names.get('NDCG', {})))
    lines += [f'`{prefix}`:', '']
    lines += _table(['K', 'Recall@K', 'NDCG@K'],
                    [[k, names.get('Recall', {}).get(k), names.get('NDCG', {}).get(k)]
                     for k in ks])
    if with_mrr and _finite(row.get(f'{prefix}/MRR')):
      lines += [f'`{prefix}/MRR`: {row[f"{prefix}/MRR"]:.4f}', '']
  return lines


def _curves_section(record: RunRecord, figures: dict[str, str]) -> list[str]:
  """Links to the figures."""
  lines = ['## Learning curves', '']
  if 'curves' in figures:
    lines += [f'![training loss and {record.monitor} per epoch]({figures["curves"]})', '']
  if 'at_k' in figures:
    lines += [f'![Recall@K and NDCG@K at the best epoch]({figures["at_k"]})', '']
  return lines


def _phases_section(record: RunRecord) -> list[str]:
  """When the monitored metric reached 50 / 90 / 99 % of its best, and its last epochs."""
  p = phases(record)
  lines = ['## Phases', '']
  if p:
    lines += _table(['reached', 'epoch', record.monitor, 'gain in the phase',
                     'epochs in the phase'],
                    [[f'{int(r["fraction"] * 100)} % of best', r['epoch'], r['value'],
                      r['gain'], r['epochs']] for r in p['reached']])
    lines += _table([f'last {p["last_n"]} epochs', 'mean', 'std'],
                    [[record.monitor, p['last_mean'], p['last_std']]])
  return lines


def _checks_section(record: RunRecord) -> list[str]:
  """The consistency checks: each failure, or that all hold."""
  problems = consistency(record)
  lines = ['## Consistency checks', '']
  if problems:
    return lines + [f'- **FAILED**: {m}' for m in problems] + ['']
  return lines + ['All hold: Recall@K and NDCG@K never fall as K grows, NDCG@K <= '
                  'Recall@K, and summary.json matches the best epoch row.', '']


def write_report(workdir: str, output: str | None = None,
                 record: RunRecord | None = None) -> str:
  """Writes report.md and its figures into `output` (default: the workdir); returns
  the report's path."""
  record = record or load_run(workdir)
  out = output or workdir
  os.makedirs(out, exist_ok=True)
  plot_curves(record, os.path.join(out, CURVES))
  plot_at_k(record, os.path.join(out, AT_K))
  text = build_report(record, {'curves': CURVES, 'at_k': AT_K})
  path = os.path.join(out, 'report.md')
  run_log.atomic_write_text(path, text)
  return path


# -- comparison -----------------------------------------------------------------------------

def group_by_seed(records: list[RunRecord]) -> list[list[RunRecord]]:
  """Runs whose configs are equal except for `seed` share a group (input order)."""
  groups: dict[str, list[RunRecord]] = {}
  for r in records:
    key = json.dumps({k: v for k, v in r.config.items() if k != 'seed'}, sort_keys=True,
                     default=str)
    groups.setdefault(key, []).append(r)
  return list(groups.values())


def _mean_std(values: list[float]) -> tuple[float, float]:
  values = [v for v in values if _finite(v)]
  if not values:
    return math.nan, math.nan
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def comparison_rows(records: list[RunRecord]) -> tuple[list[str], list[list], list[str]]:
  """(header, rows, notes) of the comparison table."""
  notes = []
  monitors = sorted({r.monitor for r in records})
  if len(monitors) > 1:
    notes.append(f'the runs monitor different metrics ({", ".join(monitors)}): compared '
                 'on val/Recall@10 and val/NDCG@10 of each run\'s best epoch, which they '
                 'share')
    monitor = None
  else:
    monitor = monitors[0]
  shared_test = all(r.summary and r.summary.get('test') for r in records)
  header = ['run', 'seeds', 'best ' + (monitor or 'monitor'), 'val/Recall@10',
            'val/NDCG@10']
  if shared_test:
    header += ['test/Recall@10', 'test/NDCG@10']
  header += ['epochs', 's per epoch', 'parameters']
  cols = [('metric', lambda r: r.best_row().get(monitor) if monitor else math.nan),
          ('metric', lambda r: r.best_row().get('val/Recall@10')),
          ('metric', lambda r: r.best_row().get('val/NDCG@10'))]
  if shared_test:
    cols += [('metric', lambda r: r.summary['test'].get('test/Recall@10')),
             ('metric', lambda r: r.summary['test'].get('test/NDCG@10'))]
  cols += [('count', lambda r: float(len(r.metrics)) if r.learned else 0.0),
           ('seconds', lambda r: training_figures(r)['epoch_s_mean'] if r.learned
            else math.nan),
           ('count', lambda r: float((r.summary or {}).get('num_params', math.nan)))]
  digits = {'metric': 4, 'seconds': 2, 'count': 0}
  rows = []
  for group in group_by_seed(records):
    name = os.path.basename(os.path.normpath(group[0].workdir))
    if len(group) > 1:  # a sweep's 'lr=0.001,seed=1' -> 'lr=0.001'; 'seed=1' -> its sweep
      name = (re.sub(r'(^|,)seed=[^,]*', '', name).strip(',') or
              os.path.basename(os.path.dirname(os.path.normpath(group[0].workdir))))
    row = [name, ', '.join(str(r.config.get('seed')) for r in group)]
    for kind, get in cols:
      mean, std = _mean_std([get(r) for r in group])
      d = digits[kind]
      if not _finite(mean):
        row.append('-')
      elif len(group) == 1:
        row.append(f'{mean:,.{d}f}')
      else:
        row.append(f'{mean:,.{max(d, 1)}f} ± {std:,.{max(d, 1)}f}')
    rows.append(row)
  for r in records:
    if r.partial:
      notes.append(f'{r.workdir} is partial (no summary.json yet)')
  return header, rows, notes


def plot_comparison(records: list[RunRecord], path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  metric = records[0].monitor if len({r.monitor for r in records}) == 1 else 'val/NDCG@10'
  for i, r in enumerate(records):
    rows = [x for x in r.metrics if _finite(x.get(metric))]
    label = os.path.basename(os.path.normpath(r.workdir))
    if not r.learned and rows:  # a baseline: one level
      ax.axhline(rows[0][metric], color=f'C{i % 10}', ls='--', label=label)
      continue
    ax.plot([x['epoch'] for x in rows], [x[metric] for x in rows], color=f'C{i % 10}',
            label=label)
  ax.set(xlabel='epoch', ylabel=metric, title=f'{metric} per epoch')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_comparison(workdirs: list[str], output: str) -> str:
  records = [load_run(w) for w in workdirs]
  os.makedirs(output, exist_ok=True)
  header, rows, notes = comparison_rows(records)
  plot_comparison(records, os.path.join(output, COMPARE_CURVES))
  lines = ['# Comparison', '',
           f'{len(records)} runs; runs that differ only in `seed` are one row, mean ± '
           'std (sample std, ddof = 1) over their seeds. Values at each run\'s best epoch.',
           '']
  lines += [f'> **Note:** {n}' for n in notes] + ([''] if notes else [])
  lines += _table(header, rows)
  lines += [f'![validation metric per epoch]({COMPARE_CURVES})', '']
  lines += ['Runs:', ''] + [f'- `{r.workdir}`' for r in records] + ['']
  path = os.path.join(output, 'report.md')
  run_log.atomic_write_text(path, '\n'.join(lines))
  return path
