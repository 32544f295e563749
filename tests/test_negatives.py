"""Evaluation negatives: untouched, distinct, seeded, cached, and distributed as stated."""

import os

import numpy as np
import pytest

from conftest import synthetic_data
from gear_jax.data import negatives
from gear_jax.data.errors import DataError


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  return synthetic_data(tmp_path_factory.mktemp('neg'), 400, 300, seed=3)


def _touched(d, users, neg):
  keys = d.touched_keys()
  return np.isin(users[:, None] * (d.num_items + 1) + neg, keys)


@pytest.mark.parametrize('mode', ['random', 'popularity'])
def test_untouched_distinct_seeded(data, mode):
  users = data.val_user
  neg = negatives.sample(data, users, mode=mode, num=99, seed=5)
  assert neg.shape == (len(users), 99) and neg.dtype == np.int32
  assert neg.min() >= 1 and neg.max() <= data.num_items
  assert not _touched(data, users, neg).any()  # never an item of the user's history
  assert all(len(set(row)) == 99 for row in neg)  # no repeats within a case
  again = negatives.sample(data, users, mode=mode, num=99, seed=5)
  np.testing.assert_array_equal(neg, again)
  other = negatives.sample(data, users, mode=mode, num=99, seed=6)
  assert (neg != other).mean() > 0.5


def test_random_is_uniform_over_untouched_items(data):
  users = np.repeat(data.val_user[:1], 4000)  # one user, many independent draws
  neg = negatives.sample(data, users, mode='random', num=20, seed=0)
  counts = np.bincount(neg.ravel(), minlength=data.num_items + 1)[1:]
  pool = ~_touched(data, users[:1], np.arange(1, data.num_items + 1)[None])[0]
  assert (counts[~pool] == 0).all()
  expected = neg.size / pool.sum()
  # every untouched item is drawn, with counts close to uniform (Poisson spread)
  assert counts[pool].min() > 0
  assert abs(counts[pool].mean() - expected) < 1e-9
  assert counts[pool].std() < 3 * np.sqrt(expected)


def test_popularity_follows_training_frequency(data):
  users = np.repeat(data.val_user[:1], 3000)
  neg = negatives.sample(data, users, mode='popularity', num=5, seed=0)
  counts = np.bincount(neg.ravel(), minlength=data.num_items + 1)
  freq = np.bincount(data.train_items(), minlength=data.num_items + 1)
  assert counts[freq == 0].sum() == 0  # never an item absent from training
  pool = ~_touched(data, users[:1], np.arange(data.num_items + 1)[None])[0] & (freq > 0)
  corr = np.corrcoef(counts[pool], freq[pool])[0, 1]
  assert corr > 0.8
  uniform = negatives.sample(data, users, mode='random', num=5, seed=0)
  ucounts = np.bincount(uniform.ravel(), minlength=data.num_items + 1)
  assert np.corrcoef(ucounts[pool], freq[pool])[0, 1] < corr - 0.3


def test_too_few_items_is_a_clear_error(data):
  with pytest.raises(DataError, match='items left to draw') as e:
    negatives.sample(data, data.val_user, mode='random', num=data.num_items, seed=0)
  assert e.value.field == 'eval.num_negatives' and 'protocol=full' in str(e.value)


def test_cached_once_and_reused(tmp_path):
  cache = str(tmp_path / 'cache')
  d = synthetic_data(tmp_path, 200, 150, seed=1, cache_dir=cache)
  a, _, cached = negatives.load_or_sample(d, 'val', mode='random', num=30, seed=1,
                                          cache_dir=cache)
  assert not cached
  b, _, cached = negatives.load_or_sample(d, 'val', mode='random', num=30, seed=1,
                                          cache_dir=cache)
  assert cached
  np.testing.assert_array_equal(a, b)
  files = [f for f in os.listdir(cache) if f.startswith('neg-')]
  assert len(files) == 1
  # a corrupt negatives file is regenerated identically
  with open(os.path.join(cache, files[0]), 'wb') as f:
    f.write(b'not a zip')
  c, _, cached = negatives.load_or_sample(d, 'val', mode='random', num=30, seed=1,
                                          cache_dir=cache)
  assert not cached
  np.testing.assert_array_equal(a, c)


def test_val_and_test_draw_independently(tmp_path):
  d = synthetic_data(tmp_path, 300, 200, seed=2, split='val_test')
  val, _, _ = negatives.load_or_sample(d, 'val', mode='random', num=10, seed=0, cache_dir='')
  test, _, _ = negatives.load_or_sample(d, 'test', mode='random', num=10, seed=0,
                                        cache_dir='')
  assert val.shape[0] == len(d.val_user) and test.shape[0] == len(d.test_user)
  assert not _touched(d, d.test_user, test).any()
