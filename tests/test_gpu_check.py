"""scripts/gpu_check.py end to end in its CPU dry run (issue 14, part 5): every step of
the GPU check runs at small shapes, so the script cannot rot before a GPU is lent."""

import json
import subprocess
import sys

from conftest import REPO


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
  assert steps['parity']['status'] == 'ok' and 'passed' in steps['parity']['result']
  # every precision, kernel and loss value ran a timed train step
  runs = steps['matrix']['runs']
  for key, values in (('precision', {'float32', 'default', 'bfloat16'}),
                      ('kernels', {'xla', 'cpu'}), ('loss', {'dense', 'token', 'vocab'})):
    assert {r[key] for r in runs} == values
  assert all(r['step_s'] > 0 for r in runs)
  det = steps['determinism']
  assert det['on']['xla_gpu_deterministic_ops'] == 'on'
  assert det['off']['xla_gpu_deterministic_ops'].startswith('off')
  assert det['on']['kernels'] == 'cpu' and det['cost'] > 0  # 'auto' on this CPU
  assert det['on']['eval_users_per_s'] > 0 and det['on']['eval_full_users_per_s'] > 0
  train = steps['train']
  assert [e['epoch'] for e in train['epochs']] == [0, 1]
  assert 0 < train['best'] <= 1 and train['xla_gpu_deterministic_ops'] == 'on'


def test_matrix_of_the_real_check_is_the_product():
  sys.path.insert(0, str(REPO / 'scripts'))
  try:
    import gpu_check
  finally:
    sys.path.pop(0)
  combos = [c.split(':') for c in gpu_check.matrix_combos(dry_run=False)]
  assert len(combos) == len({tuple(c) for c in combos}) == 15
  assert {(p, k) for p, k, loss in combos if loss == 'auto'} == {
      (p, k) for p in ('float32', 'default', 'bfloat16') for k in ('xla', 'cpu')}
  assert {(p, loss) for p, k, loss in combos if k == 'auto'} == {
      (p, loss) for p in ('float32', 'default', 'bfloat16')
      for loss in ('dense', 'token', 'vocab')}
