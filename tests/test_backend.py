"""Platform-dependent choices (gear_jax/backend.py), resolved for platforms this machine
does not have by faking them: kernels per platform, the item loss's memory budget from
a device's memory statistics, and XLA's deterministic-ops flag."""

import json
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

from conftest import REPO
from gear_jax import backend, defaults, losses, trainer
from gear_jax.models import registry
from gear_jax.errors import ConfigError, ResumeRefused


class FakeDevice:
  def __init__(self, platform, stats):
    self.platform, self._stats = platform, stats

  def memory_stats(self):
    return self._stats


def test_auto_kernels_follow_the_platform(monkeypatch):
  assert backend.resolve_kernels('auto', 'cpu') == 'cpu'
  assert backend.resolve_kernels('auto', 'gpu') == 'xla'
  assert backend.resolve_kernels('auto', 'tpu') == 'xla'
  for platform in ('cpu', 'gpu'):  # explicit choices hold everywhere
    assert backend.resolve_kernels('xla', platform) == 'xla'
    assert backend.resolve_kernels('cpu', platform) == 'cpu'
  with pytest.raises(ValueError, match='model.kernels'):
    backend.resolve_kernels('cuda', 'gpu')
  config = defaults.get_default_config().model
  assert config.kernels == 'auto'
  # what the trainer, evaluate and recommend build, with JAX's platform faked
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert registry.build(10, 4, config).kernels == 'xla'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert registry.build(10, 4, config).kernels == 'cpu'
  config.kernels = 'xla'
  assert registry.build(10, 4, config).kernels == 'xla'


def test_kernels_setting_is_validated():
  config = defaults.get_default_config()
  config.model.kernels = 'fast'
  with pytest.raises(ConfigError, match='model.kernels'):
    defaults.validate_config(config)
  config.model.kernels = 'cpu'
  config.train.loss_memory_mb = -1
  with pytest.raises(ConfigError, match='loss_memory_mb'):
    defaults.validate_config(config)


def test_loss_budget_from_device_memory():
  h100 = FakeDevice('gpu', {'bytes_limit': 60 * 2**30, 'bytes_in_use': 0})
  budget, how = backend.loss_budget_mb(0, h100)
  assert budget == 60 * 1024 / 8 and 'bytes_limit 60.0 GiB' in how
  # retail shape (128 x 50 positions, 99,038 rows): two token chunks, not 50 of 128
  plan = losses.plan_chunks(128 * 50, 99_038, budget, max_token_chunk=4096)
  assert (plan['impl'], plan['token_chunk'], plan['num_chunks']) == ('token', 3200, 2)
  cpu_plan = losses.plan_chunks(128 * 50, 99_038, backend.loss_budget_mb(
      0, FakeDevice('cpu', None))[0], max_token_chunk=512)
  assert (cpu_plan['token_chunk'], cpu_plan['num_chunks']) == (128, 50)
  assert backend.loss_budget_mb(0, FakeDevice('cpu', None)) == (256.0, 'auto: cpu')
  assert backend.loss_budget_mb(0, FakeDevice('gpu', None))[0] == 256.0  # no statistics
  assert backend.loss_budget_mb(0, FakeDevice('tpu', {'bytes_limit': 16 * 2**30}))[0] == 2048
  assert backend.loss_budget_mb(300, h100) == (300.0, 'set')
  # the trainer reads the first device of its mesh
  config = defaults.get_default_config()
  mesh = types.SimpleNamespace(devices=np.array([h100, h100]))
  assert trainer.loss_budget(config, mesh)[0] == budget
  assert trainer.loss_budget(config, types.SimpleNamespace(
      devices=np.array(jax.devices()[:1])))[0] == 256.0  # this machine: a CPU


DETERMINISM = """
import json, os
from gear_jax import backend
out = {}
os.environ.pop('XLA_FLAGS', None)
out['off'] = [backend.configure_determinism(False), os.environ.get('XLA_FLAGS', '')]
out['on'] = [backend.configure_determinism(True), os.environ['XLA_FLAGS']]
os.environ['XLA_FLAGS'] = '--xla_gpu_deterministic_ops=false'
out['user'] = [backend.configure_determinism(True), os.environ['XLA_FLAGS']]
os.environ['XLA_FLAGS'] = ''
import jax.numpy as jnp
jnp.ones(2).block_until_ready()
out['late'] = [backend.configure_determinism(True), os.environ['XLA_FLAGS']]
print(json.dumps(out))
"""


def test_deterministic_ops_flag():
  proc = subprocess.run([sys.executable, '-c', DETERMINISM], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['off'] == ['off (train.deterministic_ops=False)', '']
  assert out['on'] == ['on', '--xla_gpu_deterministic_ops=true']
  assert out['user'] == ['as set in XLA_FLAGS', '--xla_gpu_deterministic_ops=false']
  assert out['late'][0].startswith('not applied') and out['late'][1] == ''


def test_resuming_on_another_backend_is_allowed():
  """kernels, the loss budget and the flag change how, not what, is computed: a resume
  may change them; a change of what is computed is refused, naming the key."""
  how = ('model.kernels', 'train.loss_memory_mb', 'train.deterministic_ops')
  for key in how:
    assert defaults.resumable(key) and defaults.TABLE[key].resumable, key
  for key in ('model.d_model', 'train.lr', 'data.max_len', 'no.such_key'):
    assert not defaults.resumable(key), key
  assert set(defaults.choices('model.kernels')) == {'auto', 'xla', 'cpu'}
  old = defaults.get_default_config()
  new = ml_collections.ConfigDict(old.to_dict())
  new.model.kernels, new.train.loss_memory_mb = 'xla', 4096
  new.train.deterministic_ops = False
  trainer.check_resumable(old.to_dict(), new)  # accepted: returns without raising
  for key, value in (('model.kernels', 'cpu'), ('train.loss_memory_mb', 1),
                     ('train.deterministic_ops', True)):
    one = ml_collections.ConfigDict(old.to_dict())
    section, field = key.split('.')
    one[section][field] = value
    trainer.check_resumable(old.to_dict(), one)
  refused = ml_collections.ConfigDict(new.to_dict())
  refused.model.d_model = 64
  with pytest.raises(ResumeRefused, match='model.d_model') as e:
    trainer.check_resumable(old.to_dict(), refused)
  # only the key that may not change is named
  assert not any(k in str(e.value) for k in how), str(e.value)


def test_config_saved_before_new_keys_still_resumes():
  """A run's config.json from before model.name / data.synthetic.preset existed: the
  missing keys count with their defaults, so resuming is not refused."""
  saved = defaults.get_default_config().to_dict()
  del saved['model']['name'], saved['data']['synthetic']['preset']
  trainer.check_resumable(saved, defaults.get_default_config())
  changed = defaults.get_default_config()
  changed.model.name = 'sasrec'
  with pytest.raises(ResumeRefused, match='model.name'):
    trainer.check_resumable(saved, changed)
