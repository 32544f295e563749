"""Multi-device and multi-process training on CPU: the same numbers on every mesh.

The 8-device checks run tests/multidevice_worker.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before JAX
starts); the multi-process check starts two trainer processes that meet through
jax.distributed on 127.0.0.1.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_module
from gear_jax import run_log

# each test starts 8-device or two-process runs (tens of seconds each)
pytestmark = pytest.mark.slow

TOL = 1e-5


def _worker(*args: str) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=8').strip()
  out = subprocess.run([sys.executable, 'tests/multidevice_worker.py', *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_meshes_match_single_device():
  result = _worker('steps')
  # with the table on 'model', neither the table nor the logits are ever gathered
  assert result.pop('all_gathers') == {'64.0': [], '0.05': []}
  for catalog, meshes in result.items():
    assert meshes['2x4']['devices'] == 8 and meshes['4x2']['devices'] == 8
    assert meshes['4x2']['table_sharding'].startswith("P('model'")  # rows over 'model'
    for name, r in meshes.items():
      assert r['loss_diff'] < TOL, (catalog, name, r)
      assert r['param_diff'] < TOL, (catalog, name, r)


@pytest.fixture(scope='module')
def data_file(tmp_path_factory):
  from gear_jax.data import synthetic
  path = tmp_path_factory.mktemp('pdata') / 'synthetic_test.txt'
  synthetic.write_tsv(path, synthetic.generate(300, 150, seed=0))
  return path


def test_checkpoint_restores_on_other_meshes(data_file, tmp_path):
  result = _worker('checkpoint', str(tmp_path / 'run'), str(data_file),
                   str(tmp_path / 'cache'))
  summary = result.pop('summary')
  for name, metrics in result.items():
    assert metrics.keys() == summary.keys(), name
    for k, v in metrics.items():
      assert abs(v - summary[k]) < 1e-6, (name, k, v, summary[k])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(data_file, tmp_path):
  common = ['--config', 'configs/test.py', f'--config.data.path={data_file}',
            f'--config.data.cache_dir={tmp_path / "cache"}', '--config.train.num_epochs=2']
  single = run_module('gear_jax.train', *common, '--workdir', str(tmp_path / 'one'))
  assert single.returncode == 0, single.stderr[-2000:]
  port = _free_port()
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
             JAX_NUM_PROCESSES='2')
  procs = [subprocess.Popen([sys.executable, '-m', 'gear_jax.train', *common,
                             '--workdir', str(tmp_path / 'two')], cwd=REPO,
                            env=dict(env, JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "mesh {'data': 2, 'model': 1} on 2 cpu" in outs[0][0]
  assert 'epoch' not in outs[1][0]  # only process 0 reports (gloo may say hello)
  one = run_log.read_metrics(str(tmp_path / 'one'))
  two = run_log.read_metrics(str(tmp_path / 'two'))
  assert [r['epoch'] for r in two] == [0, 1]
  for a, b in zip(one, two):
    for k, v in a.items():
      if k.startswith(('val/', 'train/loss')):
        assert abs(v - b[k]) < TOL, (k, v, b[k])
  assert (tmp_path / 'two' / 'summary.json').exists()
  assert not np.isnan(two[-1]['train/loss'])


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
