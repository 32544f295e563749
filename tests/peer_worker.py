"""One process of a two-process run that loops over collectives (tests/test_peers.py).

  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=I \
    python tests/peer_worker.py --mode all --steps 100000 [--heartbeat_timeout_s 10]

What a user of ``python -m gear_jax.train`` gets: the real `gear_jax.cli.run` / `cli.main`
wrapper, the real `parallel.initialize_distributed`, and a loop inside
`parallel.peer_guard` over the collectives the trainer runs, on a mesh of both
processes' CPU devices:
- allgather: `multihost_utils.process_allgather` of a small flag (the trainer's
  per-step check);
- sharded: a jitted step over a batch sharded on 'data' across both processes (its
  gradient-like reduction is an all-reduce over the processes);
- barrier: `multihost_utils.sync_global_devices`;
- all: the three in turn, every step;
- idle: a few steps of `all`, then no collective at all (sleeps inside the guard), so
  that only the runtime can notice a lost process.
Every step prints ``step N`` on stdout (flushed); at the end ``done``. With --fail_at,
process 1 raises a user error (or a bug) at that step instead.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from gear_jax import cli  # noqa: E402
from gear_jax.errors import ConfigError  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_enum('mode', 'all', ['all', 'allgather', 'sharded', 'barrier', 'idle'],
                    'Which collective the loop runs.')
  flags.DEFINE_integer('steps', 100000, 'Steps of the loop.')
  flags.DEFINE_float('sleep', 0.02, 'Seconds between steps.')
  flags.DEFINE_integer('heartbeat_timeout_s', 10, 'distributed.heartbeat_timeout_s')
  flags.DEFINE_integer('shutdown_timeout_s', 30, 'distributed.shutdown_timeout_s')
  flags.DEFINE_integer('init_timeout_s', 60, 'distributed.init_timeout_s')
  flags.DEFINE_integer('fail_at', -1, 'Process 1 raises at this step (see --fail_with).')
  flags.DEFINE_enum('fail_with', 'user', ['user', 'bug'], 'A UserError or a RuntimeError.')
  flags.DEFINE_float('linger', 0, 'Seconds process 0 stays after the loop (outside the '
                     'guard, as the trainer writes its report).')


@cli.main
def main(argv):
  cli.no_arguments(argv)
  from gear_jax import parallel
  parallel.initialize_distributed(init_timeout_s=FLAGS.init_timeout_s,
                                  heartbeat_timeout_s=FLAGS.heartbeat_timeout_s,
                                  shutdown_timeout_s=FLAGS.shutdown_timeout_s)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils

  mesh = parallel.make_mesh()
  rows = 4  # this process's rows of the global batch
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step_fn = jax.jit(lambda w, x: w - 0.01 * jnp.mean(x * w, axis=0),
                    out_shardings=replicated)
  state = {'step': 0, 'checkpoint': 0, 'w': jnp.ones((3,), jnp.float32)}

  def describe(exc):
    return parallel.peer_lost_message(exc, step=state['step'], epoch=0,
                                      resume_step=state['checkpoint'])

  def collectives(step):
    mode = 'all' if FLAGS.mode == 'idle' else FLAGS.mode
    if mode in ('all', 'allgather'):
      flag = multihost_utils.process_allgather(np.array([step % 2], np.int32))
      assert flag.shape[0] == jax.process_count(), flag.shape
    if mode in ('all', 'sharded'):
      x = parallel.put_batch({'x': np.full((rows, 3), step, np.float32)}, mesh)['x']
      state['w'] = step_fn(state['w'], x)
      float(parallel.to_host(state['w'])[0])
    if mode in ('all', 'barrier'):
      multihost_utils.sync_global_devices(f'step {step}')

  with parallel.peer_guard(describe):
    for step in range(FLAGS.steps):
      state['step'] = step
      if step == FLAGS.fail_at and jax.process_index() == 1:
        if FLAGS.fail_with == 'user':
          raise ConfigError('a bad value found by process 1', field='config.x')
        raise RuntimeError('a bug in process 1')
      if FLAGS.mode != 'idle' or step < 5:
        collectives(step)
      if step % 10 == 0:
        state['checkpoint'] = step
      print(f'step {step}', flush=True)
      time.sleep(FLAGS.sleep)
  if jax.process_index() == 0:
    time.sleep(FLAGS.linger)
  print('done', flush=True)


if __name__ == '__main__':
  cli.run(main, define_flags)
