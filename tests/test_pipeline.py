"""grain pipelines: windows equal a per-sample reference, one sequence per user per
epoch, the 0.2 random-window rule, padding/masking, and exact resumption."""

import numpy as np
import pytest

from conftest import synthetic_data
from gear_jax.data import negatives, pipeline
from gear_jax.models.gear import time_matrix

L = 12


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  return synthetic_data(tmp_path_factory.mktemp('pipe'), 300, 150, seed=0)


def _reference_window(d, seq_end, length):
  """Slow per-sample version of the spec: the `length` interactions before flat
  position seq_end, left padded to L; the first real gap zeroed."""
  lo = seq_end - min(length, L)
  items = [0] * L
  behs = [0] * L
  gaps = [0] * L
  for k, p in enumerate(range(lo, seq_end)):
    col = L - (seq_end - lo) + k
    items[col], behs[col] = int(d.items[p]), int(d.behavior[p])
    gaps[col] = 0 if k == 0 else int(d.gaps[p])
  return items, behs, gaps


def test_train_windows_match_reference(data):
  tb = pipeline.TrainBatches(data, 32, L, seed=7)
  for index in range(tb.batches_per_epoch * 2):
    batch = tb(index)
    epoch, b = divmod(index, tb.batches_per_epoch)
    users = tb.permutation(epoch)[b * 32:(b + 1) * 32]
    for r, u in enumerate(users):
      n = int(data.train_len[u])
      start = int(data.offsets[u])
      if n > L:  # last L, or the random window; find which one was taken
        ends = [start + e for e in range(L, n + 1)]
        got = batch['items'][r].tolist()
        cands = [e for e in ends if _reference_window(data, e, L)[0] == got]
        assert cands, 'the window is not any length-L window of the training data'
        end = cands[-1]
      else:
        end = start + n
      ref = _reference_window(data, end, n)
      assert batch['items'][r].tolist() == ref[0]
      assert batch['behaviors'][r].tolist() == ref[1]
      assert batch['gaps'][r].tolist() == ref[2]
    assert batch['mask'].sum() == len(users)


def test_one_sequence_per_user_per_epoch_and_padding(data):
  tb = pipeline.TrainBatches(data, 64, L, seed=1)
  n_users = len(tb.users)
  assert tb.batches_per_epoch == -(-n_users // 64)
  seen = []
  shapes = set()
  for b in range(tb.batches_per_epoch):
    batch = tb(b)
    shapes.add(tuple((k, v.shape) for k, v in sorted(batch.items())))
    users = tb.permutation(0)[b * 64:(b + 1) * 64]
    assert batch['mask'][:len(users)].all() and not batch['mask'][len(users):].any()
    seen.extend(users.tolist())
    # padding rows (mask False) are all zero
    assert not batch['items'][~batch['mask']].any()
  assert len(shapes) == 1  # the final partial batch keeps the shape
  assert sorted(seen) == sorted(tb.users.tolist())
  last = tb(tb.batches_per_epoch - 1)
  assert last['mask'].sum() == n_users - 64 * (tb.batches_per_epoch - 1) < 64
  # epochs shuffle differently, the same seed the same way
  assert (tb.permutation(0) != tb.permutation(1)).any()
  np.testing.assert_array_equal(pipeline.TrainBatches(data, 64, L, seed=1).permutation(3),
                                tb.permutation(3))


def test_random_window_rate(data):
  # every long user, many epochs: about 20% of windows are not the last L
  long_users = np.flatnonzero(data.train_len > L + 5)
  assert len(long_users) > 20
  tb = pipeline.TrainBatches(data, len(data.train_len), L, seed=3)
  not_last = total = 0
  for epoch in range(40):
    batch = tb(epoch * tb.batches_per_epoch)
    users = tb.permutation(epoch)
    rows = np.flatnonzero(np.isin(users, long_users))
    for r in rows:
      u = users[r]
      last = _reference_window(data, int(data.offsets[u] + data.train_len[u]), L)[0]
      not_last += batch['items'][r].tolist() != last
      total += 1
  rate = not_last / total
  assert 0.14 < rate < 0.22, rate  # P(random window) 0.2, minus draws of the last one


def test_process_shards_reassemble_the_global_batch(data):
  full = pipeline.TrainBatches(data, 32, L, seed=5)
  parts = [pipeline.TrainBatches(data, 32, L, seed=5, process_index=i, process_count=4)
           for i in range(4)]
  for index in (0, 3, full.batches_per_epoch + 1):
    whole = full(index)
    joined = {k: np.concatenate([p(index)[k] for p in parts]) for k in whole}
    for k in whole:
      np.testing.assert_array_equal(whole[k], joined[k])


def test_grain_iterator_resumes_exactly(data):
  tb = pipeline.TrainBatches(data, 16, L, seed=2)
  it = iter(pipeline.train_pipeline(tb, num_threads=2))
  for _ in range(tb.batches_per_epoch + 3):  # into the second epoch
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  fresh = iter(pipeline.train_pipeline(pipeline.TrainBatches(data, 16, L, seed=2)))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


def test_eval_batches(data):
  neg = negatives.sample(data, data.val_user, mode='random', num=9, seed=0)
  eb = pipeline.EvalBatches(data, 'val', 32, L, neg)
  cases = []
  for b in range(eb.num_batches):
    batch = eb(b)
    real = batch['mask']
    cases.extend(batch['case'][real].tolist())
    assert (batch['case'][~real] == -1).all()
    for r in np.flatnonzero(real):
      c = batch['case'][r]
      u, pos = data.val_user[c], data.val_pos[c]
      ref = _reference_window(data, int(pos) + 1, int(pos - data.offsets[u] + 1))
      assert batch['items'][r, :-1].tolist() == ref[0][:-1]
      assert batch['items'][r, -1] == 0  # the held-out item is hidden
      assert batch['behaviors'][r].tolist() == ref[1]
      assert batch['behaviors'][r, -1] == data.target
      assert batch['gaps'][r].tolist() == ref[2]
      assert batch['target'][r] == data.items[pos]
      assert batch['candidates'][r, 0] == data.items[pos]
      assert batch['candidates'][r, 1:].tolist() == neg[c].tolist()
  assert cases == list(range(len(data.val_user)))  # users in order, each once
  full = pipeline.EvalBatches(data, 'val', 32, L, None)(0)
  assert 'candidates' not in full and full['target'].shape == (32,)


def test_time_matrix_from_gaps_equals_timestamp_differences(data):
  batch = pipeline.TrainBatches(data, 16, L, seed=0)(0)
  t = np.asarray(time_matrix(batch['gaps']))
  for r in range(16):
    g = batch['gaps'][r].astype(np.int64)
    c = np.cumsum(g)
    real = np.flatnonzero(batch['items'][r])
    for i in range(L):
      for j in range(i):
        want = c[i] - c[j]
        assert t[r, i, j] == want
      if len(real) and i in real:
        # to a padded column: t_i minus the window's first real timestamp
        first = real[0]
        for j in range(first):
          assert t[r, i, j] == c[i] - c[first]
