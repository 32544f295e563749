"""The config table of gear_jax.defaults: one row a key, read by the config, validation,
the resume check and docs/configs.md."""

import os
import re

import pytest

from conftest import REPO
from gear_jax import defaults
from gear_jax.errors import ConfigError


def test_docs_hold_the_generated_table():
  with open(os.path.join(REPO, 'docs', 'configs.md')) as f:
    text = f.read()
  m = re.search(r'<!-- config-table[^>]*-->\n(.*?)<!-- /config-table -->', text, re.S)
  assert m, 'docs/configs.md lost its config-table markers'
  assert m.group(1).strip() == defaults.markdown_table().strip(), (
      'docs/configs.md is out of date: paste python -c "from gear_jax import defaults; '
      'print(defaults.markdown_table())" between its config-table markers')


def test_every_key_of_the_default_config_has_one_row():
  flat = defaults.flat_config(defaults.get_default_config())
  assert sorted(flat) == sorted(k.name for k in defaults.KEYS)
  for k in defaults.KEYS:
    default = list(k.default) if isinstance(k.default, tuple) else k.default
    assert flat[k.name] == default
    if k.allowed() is not None:
      assert k.default in k.allowed(), k.name


@pytest.mark.parametrize('key,value', [('data.format', 'xml'), ('model.kernels', 'gpu'),
                                       ('train.loss', 'sparse'), ('model.n_head', 0),
                                       ('train.num_epochs', -1), ('data.max_len', 1),
                                       ('model.name', 'bert4rec')])
def test_validation_reads_the_table(key, value):
  config = defaults.get_default_config()
  with config.unlocked():
    section, field = key.split('.')
    config[section][field] = value
  with pytest.raises(ConfigError, match=re.escape(f'config.{key}')):
    defaults.validate_config(config)


def test_resumable_keys_come_from_the_table():
  assert defaults.resumable('train.num_epochs') and defaults.resumable('mesh.model')
  assert defaults.resumable('distributed.coordinator')
  assert not defaults.resumable('model.d_model') and not defaults.resumable('seed')
  assert not defaults.resumable('no.such.key')


def test_load_config_parses_like_the_command_line():
  c = defaults.load_config('configs/test.py', {'model.d_model': 16, 'eval.ks': (1, 5),
                                               'data.cache_dir': ''})
  assert (c.model.d_model, c.eval.ks, c.data.cache_dir) == (16, (1, 5), '')
  assert c.data.synthetic.enabled  # the file's own data.path: generated on purpose
  c = defaults.load_config('configs/test.py', ['data.path=/no/such/file'])
  assert not c.data.synthetic.enabled  # a data.path given must exist
  with pytest.raises(ConfigError, match='did you mean model.d_model'):
    defaults.load_config('configs/test.py', ['model.d_modle=16'])
  with pytest.raises(ConfigError, match="could not convert string to float: 'abc'"):
    defaults.load_config('configs/test.py', {'train.lr': 'abc'})
  with pytest.raises(ConfigError, match='no_such.py'):
    defaults.load_config('configs/no_such.py')
  with pytest.raises(ConfigError, match="'bert4rec' is not a registered model"):
    defaults.load_config('configs/test.py:bert4rec')


def test_a_saved_config_round_trips():
  c = defaults.load_config('configs/demo.py:sasrec')
  back = defaults.config_from_dict(c.to_dict())
  assert defaults.flat_config(back) == defaults.flat_config(c)
