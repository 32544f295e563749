"""Seeds and small grids, one run after another, then a comparison report.

  python -m gear_jax.sweep --config configs/demo.py --workdir runs/sweep --seeds 1,2,3
      [--set model.d_model=32,64 --set train.lr=1e-3,3e-4] [--config.train.num_epochs=10]

Every combination of the --set values and the seeds is trained by ``python -m
gear_jax.train`` in a sub-directory of --workdir named after its settings (e.g.
``d_model=32,lr=0.001,seed=1``). A run whose directory holds summary.json is finished
and skipped; any other is started, or resumed from its checkpoints by the trainer's
own resume, so a sweep that was stopped or killed is finished by running the same
command again. ``--config.*`` overrides pass through to every run. At the end
``<workdir>/report.md`` compares all runs (seeds grouped as mean ± std; see
`gear_jax.report`).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

from gear_jax import cli, defaults
from gear_jax.errors import ConfigError, UserError


def parse_sets(specs: list[str]) -> list[tuple[str, list[str]]]:
  """['model.d_model=32,64'] -> [('model.d_model', ['32', '64'])]."""
  out = []
  for spec in specs:
    key, sep, values = spec.partition('=')
    items = [v.strip() for v in values.split(',') if v.strip()]
    if not sep or not key.strip() or not items:
      raise ConfigError(f'--set {spec!r}: expected KEY=V1,V2,...', field='--set',
                        hint='e.g. --set model.d_model=32,64')
    out.append((key.strip(), items))
  return out


def run_name(settings: list[tuple[str, str]]) -> str:
  """A directory name from settings: the last part of each key, '=' and the value."""
  return ','.join(f'{k.rsplit(".", 1)[-1]}={v}' for k, v in settings).replace('/', '_')


def combinations(sets: list[tuple[str, list[str]]], seeds: list[str]
                 ) -> list[list[tuple[str, str]]]:
  keys = [k for k, _ in sets] + ['seed']
  grids = [v for _, v in sets] + [seeds]
  return [list(zip(keys, values)) for values in itertools.product(*grids)]


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory of the sweep; one sub-directory a run.')
  flags.DEFINE_list('seeds', ['42'], 'Seeds; every setting is run with each.')
  flags.DEFINE_multi_string('set', [], 'KEY=V1,V2,...: a config key and its values '
                            '(repeatable; all combinations are run).')
  flags.mark_flags_as_required(['config', 'workdir'])


@cli.main
def main(argv):
  from absl import flags
  from ml_collections import config_flags
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  config = f['config'].value
  sets = parse_sets(f.set)
  flat = defaults.flat_config(config)
  for key, _ in sets:
    if key not in flat:
      raise ConfigError(f'--set {key}: not a config key', field='--set',
                        hint='keys look like model.d_model or train.lr')
  if not f.seeds:
    raise ConfigError('--seeds is empty', field='--seeds')
  passthrough = [f'--config.{k}={_flag_value(v)}'
                 for k, v in config_flags.get_override_values(f['config']).items()]
  config_file = config_flags.get_config_filename(f['config'])
  os.makedirs(f.workdir, exist_ok=True)
  runs = combinations(sets, list(f.seeds))
  start = time.perf_counter()
  for i, settings in enumerate(runs, 1):
    workdir = os.path.join(f.workdir, run_name(settings))
    if os.path.exists(os.path.join(workdir, 'summary.json')):
      print(f'[{i}/{len(runs)}] {workdir}: finished, skipped', file=sys.stderr, flush=True)
      continue
    how = 'resuming' if os.path.isdir(os.path.join(workdir, 'checkpoints')) else 'starting'
    print(f'[{i}/{len(runs)}] {workdir}: {how}', file=sys.stderr, flush=True)
    cmd = [sys.executable, '-m', 'gear_jax.train', '--config', config_file,
           '--workdir', workdir, *passthrough,
           *[f'--config.{k}={v}' for k, v in settings]]
    code = subprocess.call(cmd)
    if code:
      raise UserError(f'run {workdir} failed (exit {code}); its output is above',
                      hint='fix it and run the same sweep command again: finished runs '
                      'are skipped, this one resumes')
  from gear_jax import report
  path = report.write_comparison(
      [os.path.join(f.workdir, run_name(s)) for s in runs], f.workdir)
  print(f'sweep: {len(runs)} runs in {time.perf_counter() - start:.0f}s; wrote {path}',
        file=sys.stderr, flush=True)


def _flag_value(v) -> str:
  """A parsed override as ml_collections parses it back from a flag."""
  return str(tuple(v)) if isinstance(v, (list, tuple)) else str(v)


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
