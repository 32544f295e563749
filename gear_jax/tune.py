"""Hyper-parameter search on Optuna: every trial an ordinary training run.

  python -m gear_jax.tune --config configs/demo.py --workdir runs/tune --trials 30
      [--storage URL] [--study NAME] [--sampler tpe|random|grid]
      [--pruner median|hyperband|none] [--timeout_minutes M] [--config.* overrides]

The search space is the config's ``tune.space`` (docs/tuning.md); the objective is
``eval.monitor``, maximised. Trial n trains in ``<workdir>/trial_<n>/`` with seed
``config.seed + n`` and may be pruned at an epoch boundary (its checkpoint kept). The
study lives in --storage (default ``sqlite:///<workdir>/study.db``): running the same
command again finishes a killed or interrupted study (a trial that was running resumes
from its checkpoint, finished ones are not rerun, the total stays --trials), and
several processes given the same --storage and --workdir share one study. At the end
``<workdir>/best.json`` and ``report.md`` say what was found (``python -m
gear_jax.report --workdir <workdir>`` writes them again at any time). The library is
`gear_jax.tuning`.
"""

from __future__ import annotations

import os

from absl import flags

from gear_jax import cli
from gear_jax.errors import ConfigError

FLAGS = flags.FLAGS
SAMPLERS, PRUNERS = ('tpe', 'random', 'grid'), ('median', 'hyperband', 'none')


def define_flags():
  cli.define_config_file()
  cli.define_run_flags('Directory of the study: trial_<n>/ runs, study.db, report.md.',
                       checkpoint=False)
  flags.DEFINE_integer('trials', 20, 'Trials in the study (all workers together).',
                       lower_bound=1)
  flags.DEFINE_string('storage', None, 'Optuna storage URL (default: '
                      'sqlite:///<workdir>/study.db; postgresql://... for many hosts).')
  flags.DEFINE_string('study', None, 'Study name (default: the workdir\'s name).')
  flags.DEFINE_enum('sampler', 'tpe', SAMPLERS, 'How trials are proposed.')
  flags.DEFINE_enum('pruner', 'median', PRUNERS, 'How bad trials are stopped early.')
  flags.DEFINE_float('timeout_minutes', 0.0, 'Start no trial after this long (0: no '
                     'limit); running trials finish.', lower_bound=0.0)


@cli.main
def main(argv):
  cli.no_arguments(argv)
  from ml_collections import config_flags
  from gear_jax import defaults, sweeper
  from gear_jax.tuning import runner, study
  config = cli.config_from_flag()
  defaults.validate_config(config)
  if FLAGS.study is not None and not FLAGS.study.strip():
    raise ConfigError('--study is empty', field='--study')
  workdir = os.path.abspath(FLAGS.workdir)
  opts = runner.Options(
      config_spec=config_flags.get_config_filename(FLAGS['config']),
      overrides=[f'{k}={sweeper.flag_value(v)}' for k, v in cli.override_values().items()],
      workdir=workdir, trials=FLAGS.trials,
      storage=FLAGS.storage or study.default_storage(workdir),
      study=FLAGS.study or os.path.basename(workdir.rstrip('/')),
      sampler=FLAGS.sampler, pruner=FLAGS.pruner, timeout_minutes=FLAGS.timeout_minutes)
  with cli.GracefulStop() as stop:
    runner.run_study(opts, config, stop)


if __name__ == '__main__':
  cli.run(main, define_flags)
