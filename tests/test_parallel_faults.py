"""Faults in a two-process run on CPU: SIGTERM to one process stops both at the same
step, SIGKILL of one makes the other exit 75 with one line; a rerun of both ends with
the metrics of an uninterrupted two-process run. (In a file of its own, apart from
tests/test_parallel.py, so that the two files run on different test workers.)
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from gear_jax import run_log
from test_parallel import _free_port

pytestmark = pytest.mark.slow  # two-process runs, tens of seconds each


def _two(common, workdir, fault=None):
  """Runs train as two processes; `fault` = fault_runner arguments for process 1."""
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{_free_port()}',
             JAX_NUM_PROCESSES='2')
  cmds = [['-m', 'gear_jax.train'], ['-m', 'gear_jax.train']]
  if fault:
    cmds[1] = ['-m', 'tests.fault_runner', *fault, 'gear_jax.train', '--']
  procs = [subprocess.Popen([sys.executable, *cmd, *common, '--workdir', str(workdir)],
                            cwd=REPO, env=dict(env, JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i, cmd in enumerate(cmds)]
  return [(p.wait(timeout=600), *p.communicate()) for p in procs]


def _common(data_file, tmp_path, *extra):
  return ['--config', 'configs/test.py', f'--config.data.path={data_file}',
          f'--config.data.cache_dir={tmp_path / "cache"}', '--config.train.num_epochs=2',
          *extra]


TIMING = ('train_s', 'eval_s', 'train/seq_per_s')


def _rows(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING}
          for r in run_log.read_metrics(str(workdir))]


@pytest.fixture(scope='module')
def two_process_reference(data_file, tmp_path_factory):
  """An uninterrupted two-epoch two-process run: the metrics every fault must end with."""
  tmp_path = tmp_path_factory.mktemp('ref2')
  ref = _two(_common(data_file, tmp_path), tmp_path / 'ref')
  assert [r[0] for r in ref] == [0, 0], ref[0][2][-2000:]
  return _rows(tmp_path / 'ref')


def test_sigterm_to_one_process_stops_both_at_the_same_step(data_file, tmp_path,
                                                             two_process_reference):
  common = _common(data_file, tmp_path)
  stopped = _two(common, tmp_path / 'run', fault=['--at_step', '15', '--signal', 'TERM'])
  assert [r[0] for r in stopped] == [143, 143], (stopped[0][2][-2000:], stopped[1][2][-2000:])
  lines = [[l for l in err.splitlines() if l.startswith('interrupted')] for _, _, err in stopped]
  assert lines[0] == lines[1] == [
      'interrupted at epoch 1 step 15; rerun the same command to resume from step 15']
  again = _two(common, tmp_path / 'run')
  assert [r[0] for r in again] == [0, 0], again[0][2][-2000:]
  assert 'resuming from checkpoint step 15 (in epoch 1' in again[0][1]
  assert _rows(tmp_path / 'run') == two_process_reference


def test_sigkill_of_one_process_then_a_rerun_of_both(data_file, tmp_path,
                                                     two_process_reference):
  """The survivor of a killed peer exits 75 with one line; a rerun ends as if uninterrupted."""
  # a short heartbeat timeout: the survivor may notice the loss by the missing heartbeats
  common = _common(data_file, tmp_path, '--config.train.checkpoint_every_steps=4',
                   '--config.distributed.heartbeat_timeout_s=3')
  killed = _two(common, tmp_path / 'run', fault=['--at_step', '14', '--signal', 'KILL'])
  assert [r[0] for r in killed] == [75, -9], killed[0][2][-2000:]
  err = killed[0][2]
  for bad in ('Traceback', 'Fatal Python error', 'Check failure'):
    assert bad not in err, err[-3000:]
  errors = [l for l in err.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, err[-3000:]
  assert errors[0].startswith('error: lost process 1 of the run at step ')
  # the newest committed save: the end of epoch 0 (step 10) or the mid-epoch one at 12
  resume = int(re.search(r'resume from step (\d+)$', errors[0]).group(1))
  assert resume in (10, 12), errors[0]
  again = _two(common, tmp_path / 'run')
  assert [r[0] for r in again] == [0, 0], again[0][2][-2000:]
  assert f'resuming from checkpoint step {resume} ' in again[0][1]
  assert _rows(tmp_path / 'run') == two_process_reference
