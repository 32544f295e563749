"""Runs a gear_jax command line with a fault injected at a training step (test side).

  python tests/fault_runner.py --at_step N [--in_eval] --signal KILL|INT|TERM [--twice]
      [--after_saves] [--run R] -- gear_jax.train --config configs/test.py --workdir DIR ...

The trainer's compiled step is wrapped (by patching `trainer._build`; nothing in the
package reads an environment variable for this) so that right after the N-th training
step this process runs, it sends itself the signal: SIGKILL to test resumption after a hard kill,
SIGINT / SIGTERM to test the clean stop (with --twice, a second SIGINT right after).
With --in_eval the N-th evaluation batch is the moment instead; with --after_saves the
signal waits until the checkpoints being written have committed (a kill at a moment
when the newest save is on disk). With --run R the fault is in the R-th run this process
builds (gear_jax.tune trains its trials one after another in one process).
"""

import argparse
import os
import runpy
import signal
import sys


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--at_step', type=int, required=True)
  parser.add_argument('--signal', default='KILL', choices=['KILL', 'INT', 'TERM'])
  parser.add_argument('--twice', action='store_true')
  parser.add_argument('--in_eval', action='store_true')
  parser.add_argument('--after_saves', action='store_true')
  parser.add_argument('--run', type=int, default=1)
  parser.add_argument('module')
  parser.add_argument('args', nargs=argparse.REMAINDER)
  opts = parser.parse_args()
  signum = getattr(signal, f'SIG{opts.signal}')

  from gear_jax import trainer
  real_build, builds = trainer._build, [0]

  def build(*args, **kwargs):
    run = real_build(*args, **kwargs)
    builds[0] += 1
    if builds[0] != opts.run:
      return run
    owner, name = (run.evaluator, '_step') if opts.in_eval else (run, 'train_step')
    step_fn, done = getattr(owner, name), [0]

    def step(*a):
      out = step_fn(*a)
      done[0] += 1
      if done[0] == opts.at_step:
        if opts.after_saves:
          run.store.wait()
        os.kill(os.getpid(), signum)
        if opts.twice:
          os.kill(os.getpid(), signum)
      return out

    setattr(owner, name, step)
    return run

  trainer._build = build
  sys.argv = [opts.module] + [a for a in opts.args if a != '--']
  runpy.run_module(opts.module, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
