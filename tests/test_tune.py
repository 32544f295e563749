"""Hyper-parameter search: the search space, and what the tune command line refuses.

The runs of studies (kill and resume, two workers, pruning, reproduction) are in
tests/test_tune_runs.py.
"""

import json
import sqlite3

import pytest

from conftest import TEST_CONFIG, run_module
from gear_jax import defaults
from gear_jax.errors import ConfigError
from gear_jax.tuning import space as space_lib


def _base(**values):
  return space_lib.with_values(defaults.load_config(TEST_CONFIG), values)


def test_entries_parse_to_dimensions():
  dims = space_lib.parse_space((
      'model.d_model: choice(16, 32)', ' train.lr : loguniform(1e-4, 3e-3) ',
      'model.dropout: uniform(0, 0.3)', 'model.n_layer: int(1, 5, 2)',
      'model.mask_padding: choice(True, False)', "eval.negatives: choice('random', "
      "'popularity')"), _base())
  assert [(d.key, d.kind, d.args) for d in dims] == [
      ('model.d_model', 'choice', (16, 32)), ('train.lr', 'loguniform', (1e-4, 3e-3)),
      ('model.dropout', 'uniform', (0.0, 0.3)), ('model.n_layer', 'int', (1, 5, 2)),
      ('model.mask_padding', 'choice', (True, False)),
      ('eval.negatives', 'choice', ('random', 'popularity'))]
  assert dims[3].grid() == [1, 3, 5] and dims[1].grid() is None
  with pytest.raises(ConfigError, match='needs discrete dimensions'):
    space_lib.grid_space(dims)


@pytest.mark.parametrize('entry,message', [
    ('model.d_modle: choice(16, 32)', 'no config key model.d_modle; did you mean '
     'model.d_model?'),
    ('train.lr: loguniform(3e-3, 1e-4)', 'the range is empty'),
    ('model.d_model: int(32, 32)', 'the range is empty'),
    ('train.lr: loguniform(0, 1e-3)', 'loguniform needs lo > 0'),
    ('model.d_model: uniform(16, 32)', 'use int(lo, hi)'),
    ('model.d_model: choice(16, 32.5)', '32.5 is not a int'),
    ('model.dropout: uniform(0.0, 1.0)', '1.0 is not a valid model.dropout'),
    ('model.n_head: choice(2, 3)', '3 is not a valid model.n_head'),
    ('train.loss: choice("dense", "sparse")', "'sparse' is not a valid train.loss"),
    ('seed: int(1, 9)', 'seed cannot be searched'),
    ('tune.warmup_epochs: int(1, 3)', 'configures the search itself'),
    ('eval.ks: choice(1, 2)', 'a tuple-valued key cannot be searched'),
    ('train.lr: normal(0, 1)', "unknown distribution 'normal'"),
    ('train.lr = 1e-3', "not of the form 'key: distribution(arguments)'"),
    ('model.d_model: choice(16, 16)', 'a value is given twice'),
    ('train.lr: uniform(a, b)', 'are not literals'),
])
def test_bad_entries_name_the_entry(entry, message):
  with pytest.raises(ConfigError) as e:
    space_lib.parse_space((entry,), _base())
  assert message in str(e.value) and repr(entry) in str(e.value)
  assert e.value.field == 'config.tune.space'


def test_a_key_searched_twice_and_an_empty_space():
  with pytest.raises(ConfigError, match='searched twice'):
    space_lib.parse_space(('train.lr: uniform(0.1, 0.2)', 'train.lr: uniform(0.1, 0.3)'),
                          _base())
  with pytest.raises(ConfigError, match='the search space is empty'):
    space_lib.parse_space((), _base())


def test_default_spaces_follow_the_model():
  gear, sasrec = (defaults.get_default_config(m) for m in ('gear', 'sasrec'))
  assert 'train.alpha: uniform(0.0, 0.5)' in gear.tune.space
  assert not any('alpha' in e for e in sasrec.tune.space)
  for config in (gear, sasrec):  # both valid as shipped
    assert len(space_lib.parse_space(config.tune.space, config)) >= 5
  demo = defaults.load_config('configs/demo.py')
  assert space_lib.parse_space(demo.tune.space, demo)


def _study_rows(db):
  with sqlite3.connect(db) as c:
    return (c.execute('select count(*) from trials').fetchone()[0],
            sorted(c.execute('select key, value_json from study_user_attributes')))


def _tune(workdir, *args):
  return run_module('gear_jax.tune', '--config', TEST_CONFIG, '--workdir', str(workdir),
                    '--trials', '2', *args)


@pytest.mark.parametrize('args,message', [
    (["--config.tune.space=('model.d_modle: choice(8, 16)',)"],
     "'model.d_modle: choice(8, 16)': no config key model.d_modle; did you mean"),
    (["--config.tune.space=('train.lr: uniform(0.01, 0.001)',)"], 'the range is empty'),
    (['--storage', 'sqlite:////nonexistent/dir/study.db'], 'cannot be opened: '
     'OperationalError'),
    (['--storage', 'postgresql://me:secret@127.0.0.1:1/db'], "field '--storage': storage "
     'postgresql://me:***@127.0.0.1:1/db cannot be opened'),
    (['--config.eval.monitor=val/Recall@10'], "study 'tune' exists and maximises "
     'val/NDCG@10; this config maximises val/Recall@10'),
    (["--config.tune.space=('train.lr: uniform(0.001, 0.01)',)"], "study 'tune' exists "
     'with another search space'),
    (['--config.train.batch_size=16'], "study 'tune' exists with another base config "
     '(train.batch_size: 32 -> 16)'),
    (['--sampler', 'grid'], '--sampler grid needs discrete dimensions'),
])
def test_bad_input_is_one_line_and_leaves_the_study_alone(tmp_path, args, message):
  workdir = tmp_path / 'tune'
  db = workdir / 'study.db'
  # a study as `tune` makes it, with no trial yet (--timeout_minutes: start none)
  made = _tune(workdir, '--timeout_minutes=1e-9')
  assert made.returncode == 0, made.stderr[-2000:]
  before = _study_rows(db)
  out = _tune(workdir, *args)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[0].startswith('error: ') and message in lines[0], out.stderr
  assert len(lines) == 2 and lines[1].startswith('  -> '), out.stderr
  assert 'Traceback' not in out.stderr
  assert _study_rows(db) == before
  assert json.loads(dict(before[1])['gear_jax.objective']) == 'val/NDCG@10'
