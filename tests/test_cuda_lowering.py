"""Every compiled program lowers for CUDA, checked on a CPU-only machine:
tests/cuda_lowering_worker.py exports them with jax.export for platform
'cuda' on 8 forced CPU devices, with the kernels 'auto' picks on a GPU ('xla') and,
for the train step, the CPU-tuned ones too."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# lowers some 30 programs in a subprocess (about 40 s)
pytestmark = pytest.mark.slow


def test_every_program_lowers_for_cuda():
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=8').strip()
  out = subprocess.run([sys.executable, 'tests/cuda_lowering_worker.py'], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  failed = {k: v for k, v in result.items() if v != 'ok'}
  assert not failed, failed
  # 3 meshes x 2 precisions x (3 train losses + eval) with the 'xla' kernels, + recommend
  # and the train step with the 'cpu' kernels, x 2 precisions
  assert len(result) == 3 * 2 * 4 + 2 + 2
  assert sum('cpu-kernels' in k for k in result) == 2
  assert {k.split()[1] for k in result} == {'1x1', '8x1', '4x2+shard_items'}
