"""The non-learned baselines (gear_jax/heuristics.py) through their command line
(gear_jax.baselines): the numbers of scripts/baselines.py as it was before they moved
into the package (recorded in tests/fixtures/baselines_test_preset.json), the
full-catalogue protocol against brute force, the test split, and their place in a
`gear_jax.report` comparison."""

import json

import numpy as np

from conftest import REPO, TEST_CONFIG, run_module
from gear_jax import defaults, heuristics

RECORDED = REPO / 'tests' / 'fixtures' / 'baselines_test_preset.json'
KS = '(1,5,10,20,50)'


def _data(tmp_path):
  from gear_jax.data import synthetic
  path = tmp_path / 'syn.txt'
  synthetic.write_tsv(path, synthetic.generate(300, 150, seed=0))
  return path


def test_cli_reproduces_the_recorded_numbers_and_brute_force(tmp_path):
  path = _data(tmp_path)
  common = ['--config', 'configs/test.py', f'--config.data.path={path}',
            f'--config.data.cache_dir={tmp_path / "cache"}', f'--config.eval.ks={KS}',
            '--config.eval.other_protocol=True']
  proc = run_module('gear_jax.baselines', *common, '--workdir', str(tmp_path / 'bl'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'transition' in proc.stdout and 'val/NDCG@10' in proc.stdout
  recorded = json.loads(RECORDED.read_text())
  got = {n: json.loads((tmp_path / 'bl' / n / 'summary.json').read_text())
         for n in heuristics.NAMES}
  for name in heuristics.NAMES:
    summary = got[name]
    assert summary['best_epoch'] == 0 and summary['num_params'] == 0
    assert summary['best'] == summary['best_val']['val/NDCG@10']
    for key, value in recorded[name].items():
      assert summary['best_val'][f'val/{key}'] == value, (name, key)  # exactly
    config = json.loads((tmp_path / 'bl' / name / 'config.json').read_text())
    assert config['model']['name'] == name
  # full-catalogue ranks by brute force: dense scores of every item for every case
  config = defaults.load_config(TEST_CONFIG, {'data.path': str(path),
                                              'data.cache_dir': str(tmp_path / 'cache')})
  from gear_jax.data import load_dataset
  data, _ = load_dataset(config.data)
  v1 = data.num_items + 1
  pop = np.bincount(data.train_items(), minlength=v1).astype(float)
  pairs = np.zeros((v1, v1))
  for u in range(data.num_users):
    seq = data.items[data.offsets[u]:data.offsets[u] + data.train_len[u]]
    np.add.at(pairs, (seq[:-1], seq[1:]), 1.0)
  _, pos = data.eval_cases('val')
  target, prev = data.items[pos], data.items[pos - 1]
  for name, scores in (('popularity', np.broadcast_to(pop, (len(pos), v1))),
                       ('transition', pairs[prev] + pop / (pop.max() + 1))):
    own = scores[np.arange(len(pos)), target]
    rank = (scores[:, 1:] >= own[:, None]).sum(axis=1) - 1  # items 1..V, not the target
    for k in (1, 10, 50):
      want = float(np.mean(np.where(rank < k, 1 / np.log2(rank + 2), 0.0)))
      assert abs(got[name]['best_val'][f'val_full/NDCG@{k}'] - want) < 1e-12, (name, k)
    assert abs(got[name]['best_val']['val_full/MRR'] - float(np.mean(1 / (rank + 1)))) \
        < 1e-12
  # with a test split: test metrics in summary.json, as the trainer writes them
  proc = run_module('gear_jax.baselines', *common, '--config.data.split=val_test',
                    '--workdir', str(tmp_path / 'bl_test'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  test = json.loads((tmp_path / 'bl_test' / 'transition' / 'summary.json').read_text())
  assert {'test/NDCG@10', 'test_full/NDCG@10'} <= set(test['test'])
  # both in one comparison table
  proc = run_module('gear_jax.report', '--workdir', str(tmp_path / 'bl' / 'popularity'),
                    str(tmp_path / 'bl' / 'transition'), '--output', str(tmp_path / 'cmp'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = (tmp_path / 'cmp' / 'report.md').read_text()
  rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
          for line in table.splitlines() if line.startswith('| ') and 'seeds' not in line}
  assert set(rows) == set(heuristics.NAMES)
  for name in heuristics.NAMES:
    val = got[name]['best_val']
    assert rows[name][2:4] == [f'{val["val/Recall@10"]:.4f}', f'{val["val/NDCG@10"]:.4f}']
    assert rows[name][-3:] == ['0', '-', '0']  # epochs, s per epoch, parameters


def test_bad_config_key_is_one_line(tmp_path):
  proc = run_module('gear_jax.baselines', '--config', 'configs/test.py',
                    f'--config.data.path={tmp_path / "missing.txt"}', '--workdir',
                    str(tmp_path / 'bl'))
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr and 'missing.txt' in proc.stderr
