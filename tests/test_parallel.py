"""Multi-device and multi-process training on CPU: the same numbers on every mesh.

The 8-device checks run tests/multidevice_worker.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before JAX
starts); the multi-process check starts two trainer processes that meet through
jax.distributed on 127.0.0.1.
"""

import json
import os
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
