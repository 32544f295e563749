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

from absl import flags

from gear_jax import cli
from gear_jax.errors import ConfigError


def define_flags():
  cli.define_config_file()
  cli.define_run_flags('Directory of the sweep; one sub-directory a run.', checkpoint=False)
  flags.DEFINE_list('seeds', ['42'], 'Seeds; every setting is run with each.')
  flags.DEFINE_multi_string('set', [], 'KEY=V1,V2,...: a config key and its values '
                            '(repeatable; all combinations are run).')


@cli.main
def main(argv):
  cli.no_arguments(argv)
  from ml_collections import config_flags
  from gear_jax import defaults, sweeper
  f = flags.FLAGS
  sets = sweeper.parse_sets(f.set)
  flat = defaults.flat_config(f['config'].value)
  for key, _ in sets:
    if key not in flat:
      raise ConfigError(f'--set {key}: not a config key', field='--set',
                        hint='keys look like model.d_model or train.lr')
  if not f.seeds:
    raise ConfigError('--seeds is empty', field='--seeds')
  passthrough = [f'--config.{k}={sweeper.flag_value(v)}'
                 for k, v in cli.override_values().items()]
  sweeper.run_all(config_flags.get_config_filename(f['config']), f.workdir,
                  sweeper.combinations(sets, list(f.seeds)), passthrough)


if __name__ == '__main__':
  cli.run(main, define_flags)
