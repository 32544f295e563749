"""Run reports, comparisons and sweeps (gear_jax.reporting and its command line
gear_jax.report, gear_jax.sweep)."""

import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time

import pytest

from conftest import REPO, TEST_CONFIG, run_module
from gear_jax import lock as lock_lib


def _tables(text: str, heading: str) -> list[list[list[str]]]:
  """The Markdown tables under '## heading' (up to the next '## '), as rows of cells
  (header row first)."""
  section = text.split(f'## {heading}', 1)[1].split('\n## ', 1)[0]
  tables, current = [], []
  for line in section.splitlines():
    if line.startswith('|'):
      cells = [c.strip() for c in line.strip().strip('|').split('|')]
      if not all(set(c) <= {'-'} for c in cells):
        current.append(cells)
    elif current:
      tables.append(current)
      current = []
  if current:
    tables.append(current)
  return tables


def _assert_figure(path, size: tuple[int, int]) -> None:
  """`path` is a PNG of `size` (width, height) pixels with a drawing on it: many
  colours, and a good share of the pixels not the background's."""
  import matplotlib.image
  import numpy as np
  with open(path, 'rb') as f:
    head = f.read(24)
  assert head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR', head
  assert struct.unpack('>II', head[16:24]) == size
  pixels = matplotlib.image.imread(path)
  assert pixels.shape[:2] == (size[1], size[0]) and pixels.shape[2] in (3, 4)
  flat = pixels[..., :3].reshape(-1, 3)
  colours, counts = np.unique(flat, axis=0, return_counts=True)
  assert len(colours) > 20, len(colours)  # lines, text, anti-aliasing: not one colour
  assert counts.max() < 0.97 * len(flat)  # the background is not everything


def _num(cell: str) -> float:
  return float(cell.replace(',', ''))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A finished tiny run with a test split and both protocols (the trainer wrote its
  report)."""
  workdir = tmp_path_factory.mktemp('report') / 'run'
  out = run_module('gear_jax.train', '--config', TEST_CONFIG, '--workdir', str(workdir),
                   '--config.train.num_epochs=3', '--config.data.split=val_test',
                   '--config.eval.other_protocol=True')
  assert out.returncode == 0, out.stderr[-3000:]
  return str(workdir)


def test_report_numbers_equal_the_run_record(run):
  """Every number in the trainer's report.md, parsed back, equals metrics.jsonl /
  summary.json / run.json; the figures exist."""
  text = open(os.path.join(run, 'report.md')).read()
  for fig, size in (('report_curves.png', (1100, 396)), ('report_at_k.png', (605, 396))):
    _assert_figure(os.path.join(run, fig), size)
    assert f']({fig})' in text  # linked by relative path
  rows = [json.loads(line) for line in open(os.path.join(run, 'metrics.jsonl'))]
  summary = json.load(open(os.path.join(run, 'summary.json')))
  info = json.load(open(os.path.join(run, 'run.json')))
  best = next(r for r in rows if r['epoch'] == summary['best_epoch'])
  (header, values), = _tables(text, 'Summary')
  got = dict(zip(header, values))
  assert abs(_num(got['best']) - summary['best']) < 5e-5
  assert int(got['best epoch']) == summary['best_epoch']
  assert int(got['epochs run']) == len(rows) == summary['epochs_run']
  assert _num(got['parameters']) == summary['num_params']
  # best epoch, both protocols, then the test metrics of the best checkpoint
  tables = _tables(text, f'Best epoch ({summary["best_epoch"]})')
  sources = [best, best, summary['test'], summary['test']]
  prefixes = ['val', 'val_full', 'test', 'test_full']
  checked = 0
  for table, source, prefix in zip(tables, sources, prefixes):
    assert table[0] == ['K', 'Recall@K', 'NDCG@K']
    for k, recall, ndcg in table[1:]:
      assert abs(_num(recall) - source[f'{prefix}/Recall@{k}']) < 5e-5, (prefix, k)
      assert abs(_num(ndcg) - source[f'{prefix}/NDCG@{k}']) < 5e-5, (prefix, k)
      checked += 2
  assert checked == 4 * 2 * 3  # 4 tables x (Recall, NDCG) x K in (1, 5, 10)
  assert f'`val/MRR`: {best["val/MRR"]:.4f}' in text
  (header, values), = _tables(text, 'Training')
  got = dict(zip(header, values))
  assert int(got['epochs run']) == len(rows)
  assert _num(got['total steps']) == rows[-1]['step']
  assert _num(got['steps per epoch']) == rows[1]['step'] - rows[0]['step']
  epoch_s = [r['train_s'] + r['eval_s'] for r in rows]
  # printed with two decimals: off by up to half a cent (0.845 may print as 0.84)
  assert abs(_num(got['epoch s (max)']) - max(epoch_s)) <= 5e-3 + 1e-9
  assert abs(_num(got['total s']) - sum(epoch_s)) <= 5e-3 + 1e-9
  (_, *data_rows), = _tables(text, 'Data')
  data = {k: _num(v) for k, v in data_rows}
  assert data['users'] == info['data']['num_users']
  assert data['test cases'] == info['data']['num_test_users']
  assert data['behavior buy'] == info['data']['behavior_counts']['buy']
  phase_table, last_table = _tables(text, 'Phases')
  monitor = [r['val/NDCG@10'] for r in rows]
  for _, epoch, value, *_ in phase_table[1:]:
    assert abs(monitor[int(epoch)] - _num(value)) < 5e-5
  assert abs(_num(last_table[1][1]) - statistics.fmean(monitor)) < 5e-5
  assert abs(_num(last_table[1][2]) - statistics.stdev(monitor)) < 5e-5
  assert 'All hold' in text and 'FAILED' not in text
  env = dict(_tables(text, 'Environment')[0][1:])
  assert env['precision'] == 'float32' and env['jax'] == info['environment']['jax']


def test_consistency_checks_and_bad_input(run, tmp_path):
  """Doctored numbers are flagged; a torn last line is ignored with a notice; a run
  without summary.json is reported as partial; a workdir without metrics is refused."""
  doctored = tmp_path / 'doctored'
  shutil.copytree(run, doctored, ignore=shutil.ignore_patterns('checkpoints'))
  rows = [json.loads(line) for line in open(doctored / 'metrics.jsonl')]
  rows[0]['val/Recall@10'] = rows[0]['val/Recall@5'] - 0.01  # falls as K grows
  rows[1]['val/NDCG@5'] = rows[1]['val/Recall@5'] + 0.01  # NDCG above Recall
  summary = json.load(open(doctored / 'summary.json'))
  summary['best'] += 0.05  # not the best epoch's value
  (doctored / 'summary.json').write_text(json.dumps(summary))
  text = ''.join(json.dumps(r) + '\n' for r in rows) + '{"epoch": 3, "st'  # torn
  (doctored / 'metrics.jsonl').write_text(text)
  out = run_module('gear_jax.report', '--workdir', str(doctored))
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'notice: metrics.jsonl: a torn last line' in out.stderr
  report = open(doctored / 'report.md').read()
  failed = [line for line in report.splitlines() if line.startswith('- **FAILED**')]
  assert any('epoch 0: val/Recall@10' in f and 'cannot fall as K grows' in f
             for f in failed), failed
  assert any('epoch 1: val/NDCG@5' in f and 'NDCG@K <= Recall@K' in f for f in failed)
  assert any('summary.json: best val/NDCG@10' in f for f in failed)
  assert 'a torn last line' in report
  # in progress: no summary.json yet
  (doctored / 'summary.json').unlink()
  out = run_module('gear_jax.report', '--workdir', str(doctored), '--output',
                   str(tmp_path / 'partial'))
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'partial: no summary.json yet' in open(tmp_path / 'partial' / 'report.md').read()
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text((doctored / 'config.json').read_text())
  out = run_module('gear_jax.report', '--workdir', str(empty))
  assert out.returncode == 2 and 'holds no metrics yet' in out.stderr
  assert 'Traceback' not in out.stderr


def _fake_run(path, seed: int, best: float, monitor='val/NDCG@10', lr=1e-3):
  """A run directory with known numbers (config, 3 epochs of metrics, summary)."""
  path.mkdir(parents=True)
  config = {'seed': seed, 'train': {'lr': lr, 'patience': 5, 'num_epochs': 3},
            'eval': {'monitor': monitor}}
  (path / 'config.json').write_text(json.dumps(config))
  rows = []
  for epoch, frac in enumerate((0.5, 0.9, 1.0)):
    v = best * frac
    rows.append({'epoch': epoch, 'step': 10 * (epoch + 1), 'train/loss': 5 - epoch,
                 'val/NDCG@10': v, 'val/Recall@10': min(1.0, 2 * v),
                 'val/Recall@5': v, 'train_s': 1.0 + seed, 'eval_s': 0.5})
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (path / 'summary.json').write_text(json.dumps(
      {'best_epoch': 2, 'best_step': 30, 'monitor': monitor, 'best': rows[-1][monitor],
       'best_val': rows[-1], 'epochs_run': 3, 'early_stopped': False,
       'num_params': 1000}))
  return str(path)


def test_comparison_groups_seeds_with_mean_and_std(tmp_path):
  from gear_jax import reporting
  bests = {1: 0.31, 2: 0.35, 3: 0.36}
  runs = [_fake_run(tmp_path / f'lr=0.001,seed={s}', s, b) for s, b in bests.items()]
  runs.append(_fake_run(tmp_path / 'lr=0.01,seed=1', 1, 0.20, lr=1e-2))
  path = reporting.write_comparison(runs, str(tmp_path / 'cmp'))
  text = open(path).read()
  header, *rows = _tables('## T\n' + text.split('\n', 1)[1].split('![')[0], 'T')[0]
  assert len(rows) == 2
  got = dict(zip(header, rows[0]))
  assert got['run'] == 'lr=0.001' and got['seeds'] == '1, 2, 3'
  mean, std = (float(x) for x in got['val/NDCG@10'].split(' ± '))
  assert abs(mean - statistics.fmean(bests.values())) < 5e-5
  assert abs(std - statistics.stdev(bests.values())) < 5e-5
  s_mean = float(got['s per epoch'].split(' ± ')[0])
  assert abs(s_mean - statistics.fmean([2.5, 3.5, 4.5])) < 5e-3
  single = dict(zip(header, rows[1]))
  assert single['val/NDCG@10'] == '0.2000' and single['seeds'] == '1'
  _assert_figure(tmp_path / 'cmp' / 'compare_curves.png', (770, 440))
  # different monitored metrics: compared on what they share, with a note
  other = _fake_run(tmp_path / 'other', 1, 0.4, monitor='val/Recall@10')
  text = open(reporting.write_comparison([runs[0], other], str(tmp_path / 'cmp2'))).read()
  assert 'monitor different metrics' in text


@pytest.mark.slow
def test_sweep_runs_the_settings_and_compares(tmp_path):
  """A one-run sweep (one --set value, one seed): the run's directory is named after
  its settings, its config holds them and the pass-through override, and the
  comparison report lists it; run again, it is skipped. (train.patience changes no
  compiled program: the run reuses the programs the fixture's run compiled.)"""
  workdir = tmp_path / 'sweep'
  args = ['gear_jax.sweep', '--config', TEST_CONFIG, '--workdir', str(workdir),
          '--set', 'train.patience=4', '--seeds', '3', '--config.train.num_epochs=1']
  out = run_module(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  run = workdir / 'patience=4,seed=3'
  assert re.search(r'\[1/1\] \S+patience=4,seed=3: starting', out.stderr), out.stderr[-3000:]
  config = json.loads((run / 'config.json').read_text())
  assert (config['train']['patience'], config['seed'], config['train']['num_epochs']) == \
      (4, 3, 1)
  summary = json.loads((run / 'summary.json').read_text())
  text = (workdir / 'report.md').read_text()
  assert f'`{run}`' in text and '| 3 |' in text
  assert f'{summary["best"]:.4f}' in text
  again = run_module(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert re.search(r'\[1/1\] \S+patience=4,seed=3: finished, skipped', again.stderr)


@pytest.mark.slow
def test_sweep_killed_and_restarted_skips_finished_runs(tmp_path):
  """A sweep killed during its second run finishes when started again, without
  running the first one again; the comparison report covers both."""
  workdir = tmp_path / 'sweep'
  args = ['-m', 'gear_jax.sweep', '--config', TEST_CONFIG, '--workdir', str(workdir),
          '--seeds', '1,2', '--config.train.num_epochs=2']
  proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, start_new_session=True)
  first = workdir / 'seed=1' / 'summary.json'
  deadline = time.time() + 300
  while not first.exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  assert first.exists(), proc.communicate()[1][-3000:]
  # into the second run: its trainer holds the lock of seed=2 (taken at its start;
  # the run then still imports JAX, compiles and trains for seconds)
  lock = workdir / 'seed=2' / lock_lib.LOCK_NAME
  while not (lock.exists() and lock.read_text().strip()):
    assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (workdir / 'seed=2' / 'summary.json').exists()
  stamp = first.stat().st_mtime_ns
  metrics = (workdir / 'seed=1' / 'metrics.jsonl').read_text()
  out = run_module(*args[1:])
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r'\[1/2\] \S+seed=1: finished, skipped', out.stderr)
  assert re.search(r'\[2/2\] \S+seed=2: (starting|resuming)', out.stderr)
  assert first.stat().st_mtime_ns == stamp
  assert (workdir / 'seed=1' / 'metrics.jsonl').read_text() == metrics
  assert (workdir / 'seed=2' / 'summary.json').exists()
  text = (workdir / 'report.md').read_text()
  assert '| 1, 2 |' in text  # the two seeds grouped in one row
