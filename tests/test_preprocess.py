"""GEAR preprocessing: the split by hand, min_uc, stable ids, the cache, and the
published synth6k counts through the stats CLI."""

import json
import os

import numpy as np
import pytest

from conftest import SYNTH6K, run_module
from gear_jax.data import preprocess, readers
from gear_jax.data.errors import DataError

# Users 10, 20, 30, 40, 50; items a=7, b=3, c=9, d=1. User 40's lines are out of time
# order; user 30 has 2 interactions (< min_uc 3).
HAND = """\
10\t7\tpv\t100
10\t3\tpv\t110
20\t3\tpv\t50
10\t7\tcart\t130
30\t9\tpv\t10
10\t9\tpv\t200
20\t9\tbuy\t70
40\t1\tpv\t500
40\t3\tbuy\t400
10\t7\tbuy\t260
30\t7\tbuy\t20
20\t3\tpv\t90
40\t1\tbuy\t600
50\t7\tpv\t1000
50\t3\tbuy\t1010
50\t9\tpv\t1020
50\t1\tbuy\t1030
"""


def _load(path, **settings):
  data, _ = preprocess.load(path, readers.TSV, preprocess.Settings(**settings),
                            cache_dir='')
  return data


def test_val_split_by_hand(write):
  d = _load(write('hand.txt', HAND))
  # dense ids: users 10, 20, 40, 50 -> 1..4 (30 dropped); items sorted raw 1,3,7,9 -> d,b,a,c
  assert d.user_ids.tolist() == [10, 20, 40, 50]
  assert d.item_ids.tolist() == [1, 3, 7, 9]
  assert d.behaviors == ('pv', 'fav', 'cart', 'buy') and d.target == 4
  assert d.offsets.tolist() == [0, 5, 8, 11, 15]
  assert d.items.tolist() == [3, 2, 3, 4, 3,  2, 4, 2,  2, 1, 1,  3, 2, 4, 1]
  assert d.behavior.tolist() == [1, 1, 3, 1, 4,  1, 4, 1,  4, 1, 4,  1, 4, 1, 4]
  assert d.gaps.tolist() == [0, 10, 20, 70, 60,  0, 20, 20,  0, 100, 100,  0, 10, 10, 10]
  # users ending on buy give it to validation; user 20 ends on pv and keeps everything
  assert d.val_user.tolist() == [0, 2, 3] and d.val_pos.tolist() == [4, 10, 14]
  assert d.train_len.tolist() == [4, 3, 2, 3]
  assert len(d.test_user) == 0
  assert d.behavior_counts == {'pv': 8, 'fav': 0, 'cart': 1, 'buy': 6}
  s = preprocess.summary(d)
  assert (s['num_users'], s['num_items'], s['num_interactions'], s['num_val_users']) == \
      (4, 4, 15, 3)


def test_val_test_split_by_hand(write):
  d = _load(write('hand.txt', HAND), split='val_test')
  # test: every user ending on buy, input = the whole earlier history
  assert d.test_user.tolist() == [0, 2, 3] and d.test_pos.tolist() == [4, 10, 14]
  # validation: the last earlier buy that has >= 1 interaction before it. User 10 has
  # no earlier buy; user 40's earlier buy is its first interaction; user 50's is row 12.
  assert d.val_user.tolist() == [3] and d.val_pos.tolist() == [12]
  # user 50 trains only on what precedes its validation case
  assert d.train_len.tolist() == [4, 3, 2, 1]
  assert preprocess.summary(d)['num_test_users'] == 3


def test_min_uc(write):
  d = _load(write('hand.txt', HAND), min_uc=4)
  assert d.user_ids.tolist() == [10, 50]
  d = _load(write('hand.txt', HAND), min_uc=1)
  assert d.user_ids.tolist() == [10, 20, 30, 40, 50]
  assert d.train_len[2] == 1  # user 30: [c pv 10, a buy 20] -> validation on the buy


def test_single_behavior_mode(write):
  d = _load(write('hand.txt', HAND), multi_behavior=False, min_uc=2)
  assert d.behaviors == ('buy',) and d.target == 1
  assert d.user_ids.tolist() == [40, 50]  # only they have >= 2 buys
  assert d.gaps.tolist() == [0, 200, 0, 20]  # gaps between buys only


def test_ids_are_stable_under_line_order(write):
  lines = HAND.splitlines()
  rng = np.random.default_rng(0)
  shuffled = [lines[i] for i in rng.permutation(len(lines))]
  a = _load(write('a.txt', HAND))
  b = _load(write('b.txt', '\n'.join(shuffled) + '\n'))
  for field in ('offsets', 'items', 'behavior', 'gaps', 'train_len', 'val_pos',
                'user_ids', 'item_ids'):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_ids_do_not_depend_on_hash_seed(write, tmp_path):
  path = write('s.txt', 'zed\tq\tpv\t1\nann\tp\tpv\t2\nann\tq\tbuy\t3\nzed\tr\tpv\t4\n'
               'ann\tr\tpv\t5\nzed\tp\tbuy\t6\n')
  outs = []
  for seed in ('1', '987'):
    out = run_module('gear_jax.data.stats', '--config', 'configs/test.py',
                     f'--config.data.path={path}', '--config.data.synthetic.enabled=False',
                     f'--config.data.cache_dir={tmp_path / seed}', '--json',
                     env={'PYTHONHASHSEED': seed})
    assert out.returncode == 0, out.stderr
    cache = [f for f in os.listdir(tmp_path / seed) if f.startswith('data-')]
    with np.load(tmp_path / seed / cache[0]) as z:
      outs.append((z['user_ids'].tolist(), z['item_ids'].tolist(), z['items'].tolist()))
  assert outs[0] == outs[1]
  assert outs[0][0] == [b'ann', b'zed'] and outs[0][1] == [b'p', b'q', b'r']


def test_target_behavior_absent(write):
  with pytest.raises(DataError, match="target behavior 'buy' never occurs") as e:
    _load(write('r.txt', '1\t1\tpv\t1\n1\t2\tpv\t2\n1\t3\tfav\t3\n'))
  assert e.value.path.endswith('r.txt')


def test_settings_are_validated(write):
  with pytest.raises(DataError, match='not in data.behaviors'):
    _load(write('hand.txt', HAND), target='purchase')
  with pytest.raises(DataError, match='split'):
    _load(write('hand.txt', HAND), split='test')


# -- the cache ---------------------------------------------------------------------------

def test_cache_roundtrip_rebuild_and_atomicity(write, tmp_path, caplog):
  path = write('hand.txt', HAND)
  cache = tmp_path / 'cache'
  fresh, info = preprocess.load(path, readers.TSV, preprocess.Settings(), str(cache))
  assert not info.from_cache and os.path.exists(info.cache_path)
  cached, info2 = preprocess.load(path, readers.TSV, preprocess.Settings(), str(cache))
  assert info2.from_cache and info2.cache_path == info.cache_path
  for k in preprocess.GearData._ARRAYS:
    np.testing.assert_array_equal(getattr(fresh, k), getattr(cached, k))
  # another setting is another cache entry
  _, info3 = preprocess.load(path, readers.TSV, preprocess.Settings(min_uc=2), str(cache))
  assert not info3.from_cache and info3.cache_path != info.cache_path
  # a corrupt (truncated) cache file is rebuilt, not trusted
  blob = open(info.cache_path, 'rb').read()
  open(info.cache_path, 'wb').write(blob[:len(blob) // 2])
  rebuilt, info4 = preprocess.load(path, readers.TSV, preprocess.Settings(), str(cache))
  assert not info4.from_cache
  np.testing.assert_array_equal(rebuilt.items, fresh.items)
  assert open(info.cache_path, 'rb').read() != blob[:len(blob) // 2]
  # a changed file has another fingerprint: the old entry is never used for it
  write('hand.txt', HAND.replace('10\t7\tbuy\t260', '10\t9\tbuy\t260'))
  changed, info5 = preprocess.load(path, readers.TSV, preprocess.Settings(), str(cache))
  assert not info5.from_cache and info5.cache_path != info.cache_path
  assert changed.items[4] == 4
  # no temporary files left behind: only finished cache entries
  assert all(f.startswith('data-') and f.endswith('.npz') for f in os.listdir(cache))


def test_bad_input_leaves_the_cache_alone(write, tmp_path):
  path = write('hand.txt', HAND)
  cache = tmp_path / 'cache'
  _, info = preprocess.load(path, readers.TSV, preprocess.Settings(), str(cache))
  before = {f: open(cache / f, 'rb').read() for f in os.listdir(cache)}
  write('hand.txt', HAND + '60\t7\tpv\n')
  with pytest.raises(DataError):
    preprocess.load(path, readers.TSV, preprocess.Settings(), str(cache))
  after = {f: open(cache / f, 'rb').read() for f in os.listdir(cache)}
  assert before == after


def test_cache_with_inconsistent_arrays_is_rebuilt(write, tmp_path):
  path = write('hand.txt', HAND)
  cache = str(tmp_path / 'cache')
  data, info = preprocess.load(path, readers.TSV, preprocess.Settings(), cache)
  arrays = data.to_arrays()
  arrays['items'] = arrays['items'][:-1]  # a well-formed npz with wrong content
  preprocess.atomic_save_npz(info.cache_path, arrays)
  again, info2 = preprocess.load(path, readers.TSV, preprocess.Settings(), cache)
  assert not info2.from_cache and len(again.items) == len(data.items)


# -- the published counts -----------------------------------------------------------------

def test_stats_cli_matches_reference_counts_on_synth6k(tmp_path):
  path = SYNTH6K
  out = run_module('gear_jax.data.stats', '--config', 'configs/retail.py',
                   f'--config.data.path={path}', f'--config.data.cache_dir={tmp_path}',
                   '--json')
  assert out.returncode == 0, out.stderr
  s = json.loads(out.stdout)
  # tests/data/README.md, reference preprocessing (min_uc 3, target buy, val)
  assert (s['num_users'], s['num_items'], s['num_interactions'], s['num_val_users']) == \
      (6000, 3988, 178674, 3745)
  assert s['behavior_counts'] == {'pv': 134719, 'fav': 10286, 'cart': 15709, 'buy': 17960}
  assert s['seq_len']['min'] >= 3 and 'preprocess_seconds' in s
  table = run_module('gear_jax.data.stats', '--config', 'configs/retail.py',
                     f'--config.data.path={path}', f'--config.data.cache_dir={tmp_path}')
  assert table.returncode == 0 and 'validation users' in table.stdout
  assert '3,745' in table.stdout


def test_stats_cli_missing_file_is_a_clear_error(tmp_path):
  out = run_module('gear_jax.data.stats', '--config', 'configs/retail.py',
                   f'--config.data.path={tmp_path / "retail.txt"}')
  assert out.returncode == 2
  assert 'Traceback' not in out.stderr
  assert 'not found' in out.stderr and 'config.data.path' in out.stderr
  assert 'configs/demo.py' in out.stderr
