"""Evaluation of a trained run's checkpoint.

  python -m gear_jax.evaluate --workdir runs/retail [--config configs/retail.py]
      [--checkpoint best|latest|STEP] [--split val|test] [--protocol sampled|full]
      [--json]

Without --config the run's own ``config.json`` is used (overrides still apply with
--config). On ``--checkpoint best`` it reproduces the best validation metrics recorded
in ``summary.json`` exactly. Checkpoints written by `gear_jax.convert` load the same
way. The work is `gear_jax.evaluator.evaluate_run`.
"""

from __future__ import annotations

import json

from absl import flags

from gear_jax import cli

FLAGS = flags.FLAGS


def define_flags():
  cli.define_config_file("Config file; default: the run's config.json in --workdir.",
                         required=False)
  cli.define_run_flags('Run directory holding checkpoints/.')
  flags.DEFINE_enum('split', 'val', ['val', 'test'], 'Which held-out cases.')
  flags.DEFINE_enum('protocol', None, ['sampled', 'full'],
                    "Ranking protocol; default: the config's eval.protocol.")
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')


@cli.main
def main(argv):
  cli.no_arguments(argv)
  import jax
  from gear_jax import evaluator, rundir
  config = cli.config_from_flag() or rundir.read_config(FLAGS.workdir)
  out = evaluator.evaluate_run(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                               split=FLAGS.split, protocol=FLAGS.protocol)
  if jax.process_index() != 0:
    return
  if FLAGS.json:
    print(json.dumps(out))
    return
  print(f'checkpoint step {out["checkpoint"]} (epoch {out["epoch"]}), split '
        f'{out["split"]}, {out["seconds"]:.1f}s')
  for k, v in out['metrics'].items():
    print(f'  {k:<24} {v:.4f}')


if __name__ == '__main__':
  cli.run(main, define_flags)
