"""scripts/gpu_check.py end to end in its CPU dry run: every step of the GPU check runs
at small shapes, so the script cannot rot before a GPU is lent."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO


def _gpu_check():
  sys.path.insert(0, str(REPO / 'scripts'))
  try:
    import gpu_check
  finally:
    sys.path.pop(0)
  return gpu_check


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
  out = tmp_path / 'summary.json'
  proc = subprocess.run([sys.executable, 'scripts/gpu_check.py', '--dry_run', '--out',
                         str(out), '--workdir', str(tmp_path / 'work')], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary == json.loads(out.read_text())
  assert summary['ok'] and summary['failed'] == []
  steps = summary['steps']
  assert steps['install']['status'] == 'skipped'
  assert steps['device']['platform'] == 'cpu'
  assert steps['parity']['status'] == 'ok'
  assert steps['parity']['result'].startswith('1 passed'), steps['parity']['result']
  # the matrix: exactly the dry run's combinations, in order, each without an error
  matrix = steps['matrix']
  assert matrix['status'] == 'ok', matrix
  runs = matrix['runs']
  combos = [tuple(c.split(':')) for c in _gpu_check().matrix_combos(dry_run=True)]
  assert [(r['precision'], r['kernels'], r['loss']) for r in runs] == combos
  for key, values in (('precision', {'float32', 'default', 'bfloat16'}),
                      ('kernels', {'xla', 'cpu'}), ('loss', {'dense', 'token', 'vocab'})):
    assert {r[key] for r in runs} == values  # every value of each setting once
  assert not any('error' in r for r in runs), runs
  # the same model, data and steps: the loss is the same function whichever kernels
  # and item loss compute it; float32 and 'default' (float32 on a CPU) agree to
  # rounding, bfloat16 to its 8-bit mantissa
  loss = {r['precision']: r['final_loss'] for r in runs}
  assert all(math.isfinite(v) and v > 0 for v in loss.values()), loss
  assert abs(loss['float32'] - loss['default']) < 1e-4, loss
  assert abs(loss['float32'] - loss['bfloat16']) < 2e-2 * loss['float32'], loss
  # the deterministic-ops flag: both settings ran, with the kernels 'auto' picks on a
  # CPU, and the flag recorded as set
  det = steps['determinism']
  assert det['status'] == 'ok' and det['on']['status'] == det['off']['status'] == 'ok'
  assert det['on']['xla_gpu_deterministic_ops'] == 'on'
  assert det['off']['xla_gpu_deterministic_ops'].startswith('off')
  assert det['on']['kernels'] == det['off']['kernels'] == 'cpu'
  assert det['on']['loss_memory_mb'] == det['off']['loss_memory_mb'] == 256.0
  assert det['cost'] == round(det['on']['step_s'] / det['off']['step_s'], 3)
  assert 'eval_users_per_s' not in det['off']  # --skip_eval
  # XLA:CPU ignores the flag: the same steps give the same loss to the last bit
  assert det['on']['final_loss'] == det['off']['final_loss']
  # the short real run: two epochs, a best that is the best epoch's metric
  train = steps['train']
  epochs = train['epochs']
  assert [e['epoch'] for e in epochs] == [0, 1]
  assert all(math.isfinite(e['train/loss']) for e in epochs)
  assert epochs[1]['train/loss'] < epochs[0]['train/loss']  # it learns
  assert train['best'] == max(e['val/NDCG@10'] for e in epochs)
  assert 0 < train['best'] <= 1 and train['xla_gpu_deterministic_ops'] == 'on'
  assert train['kernels'] == 'cpu' and train['device'].startswith('cpu')


def test_matrix_of_the_real_check_is_the_product():
  gpu_check = _gpu_check()
  combos = [c.split(':') for c in gpu_check.matrix_combos(dry_run=False)]
  assert len(combos) == len({tuple(c) for c in combos}) == 15
  assert {(p, k) for p, k, loss in combos if loss == 'auto'} == {
      (p, k) for p in ('float32', 'default', 'bfloat16') for k in ('xla', 'cpu')}
  assert {(p, loss) for p, k, loss in combos if k == 'auto'} == {
      (p, loss) for p in ('float32', 'default', 'bfloat16')
      for loss in ('dense', 'token', 'vocab')}
