"""scripts/bench_scale.py --tiny end to end: every figure is there and sensible, the
preprocessed counts are the generated file's, and the checkpoint is a real orbax step."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = str(REPO / 'scripts' / 'bench_scale.py')


def _positive(section: dict, *keys: str) -> None:
  for key in keys:
    value = section[key]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (
        key, value)


@pytest.mark.slow
def test_tiny_run_reports_every_figure(tmp_path):
  data_dir = tmp_path / 'bench'
  proc = subprocess.run([sys.executable, SCRIPT, '--tiny', '--json', '--data_dir',
                         str(data_dir)], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])

  d = r['data']
  assert not d['reused'] and os.path.isfile(d['path'])
  assert d['interactions'] == d['params']['interactions']
  assert sum(d['behaviors'].values()) == d['interactions']
  assert d['seq_len']['min'] >= 3
  with open(d['path']) as f:
    lines = f.read().splitlines()
  assert len(lines) == d['interactions']
  fields = [line.split('\t') for line in lines]
  assert all(len(x) == 4 for x in fields)
  assert len({x[0] for x in fields}) == d['users']
  assert len({x[1] for x in fields}) == d['items']
  assert {x[2] for x in fields} <= {'pv', 'fav', 'cart', 'buy'}

  p = r['preprocess']
  _positive(p, 'seconds', 'parse_s', 'peak_rss_mb', 'cache_write_s')
  # the counts after min_uc are the generated file's; every user has a validation case
  assert (p['users'], p['items'], p['interactions']) == (
      d['users'], d['items'], d['interactions'])
  assert p['val_users'] == p['users']

  c = r['cached_start']
  assert c['from_cache']
  _positive(c, 'seconds', 'peak_rss_mb')

  t = r['train']
  _positive(t, 'compile_s', 'startup_s', 'warmup_step_s', 'step_s', 'step_s_min',
            'micro_batches_per_s', 'sequences_per_s', 'peak_rss_mb', 'params',
            'loss')
  assert (t['batch_size'], t['grad_accum'], t['max_len'], t['d_model'],
          t['n_layer']) == (32, 4, 50, 32, 4)  # configs/ijcai.py
  assert t['steps'] >= 1

  k = r['checkpoint']
  _positive(k, 'blocking_s', 'total_s', 'size_mb', 'size_bytes')
  assert k['total_s'] >= k['blocking_s']
  assert k['step'] == t['steps'] + 1  # the warm-up step and the timed ones
  step_dir = k['dir']
  assert os.path.basename(step_dir) == str(k['step'])
  for item in ('params', 'train', 'data_iter', 'meta'):
    assert os.path.isdir(os.path.join(step_dir, item)), item
  assert os.path.isfile(os.path.join(step_dir, '_CHECKPOINT_METADATA'))  # committed
  # and it reads back through the store like a run's checkpoint
  reader = ('import sys; from gear_jax import checkpoint as c\n'
            's = c.CheckpointStore(sys.argv[1], read_only=True)\n'
            'print(s.all_steps(), s.read_meta(int(sys.argv[2]))["num_items"])')
  check = subprocess.run([sys.executable, '-c', reader,
                          os.path.dirname(os.path.dirname(step_dir)), str(k['step'])],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
  assert check.returncode == 0, check.stderr[-2000:]
  assert check.stdout.split()[-1] == str(d['items'])

  assert r['date'] and r['loadavg']['start'] and r['wall_s'] > 0
