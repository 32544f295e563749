"""Training: ``python -m gear_jax.train --config configs/retail.py --workdir runs/retail``.

The command line: flags, the workdir lock, clean stops on Ctrl-C / SIGTERM, then one
call to `gear_jax.trainer.train_and_evaluate(config, workdir)`. The lock is taken
before the heavy libraries are imported, so a second process started on the same
workdir is refused at once.

Synthetic data is generated only on purpose: when a config turns
``data.synthetic.enabled`` on (configs/demo.py, configs/test.py) it applies to the
config's own ``data.path``; a ``--config.data.path`` given on the command line must
exist, unless ``--config.data.synthetic.enabled=True`` is given too.
"""

from __future__ import annotations

import os

from absl import flags

from gear_jax import cli
from gear_jax.lock import WorkdirLock

FLAGS = flags.FLAGS


def define_flags():
  cli.define_config_file()
  cli.define_run_flags('Run directory: checkpoints, metrics, logs.', checkpoint=False)


def _first_process(config) -> bool:
  """Whether this is process 0 of a run, known before JAX starts (settings first,
  then the environment that `parallel.initialize_distributed` reads)."""
  pid = int(config.distributed.process_id)
  if pid < 0:
    pid = int(os.environ.get('JAX_PROCESS_ID') or os.environ.get('SLURM_PROCID') or 0)
  return pid == 0


@cli.main
def main(argv):
  cli.no_arguments(argv)
  config = cli.config_from_flag()
  from gear_jax import defaults
  defaults.validate_config(config)
  lock = WorkdirLock(FLAGS.workdir, 'train')
  if _first_process(config):
    lock.acquire()  # before importing JAX: a second run is refused in well under 2 s
  try:
    with cli.GracefulStop() as stop:
      from gear_jax import trainer
      trainer.train_and_evaluate(config, FLAGS.workdir, stop=stop)
  finally:
    lock.release()


if __name__ == '__main__':
  cli.run(main, define_flags)
