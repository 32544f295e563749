"""The glibc allocator settings of gear_jax/hostalloc.py: their effect, when they apply."""

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
    reason='the settings apply to glibc only')

# A worker thread allocates 256 MB, frees it and allocates it again, as XLA:CPU does with
# a step's scratch memory; the second allocation's page faults are counted.
PROBE = '''
import json, os, resource, threading
import numpy as np
from gear_jax import hostalloc
if os.environ.get('PROBE_CONFIGURE') == '1':
  hostalloc.configure()
faults = []
def work():
  np.ones(2**25)  # 256 MB, freed at once
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  np.ones(2**25)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
import jax
print(json.dumps({'applied': hostalloc._applied, 'faults': faults[0],
                  'async_dispatch': jax.config.read('jax_cpu_enable_async_dispatch')}))
'''


def probe(**env) -> dict:
  import os
  full = {k: v for k, v in os.environ.items()
          if not k.startswith('MALLOC_') and k not in ('GLIBC_TUNABLES',
                                                        'GEAR_JAX_HOST_ALLOCATOR')}
  full['NUMPY_MADVISE_HUGEPAGE'] = '0'  # 4 KB pages, as XLA's buffers get
  full.update(env)
  out = subprocess.run([sys.executable, '-c', PROBE], env=full, capture_output=True,
                       text=True, timeout=120, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow  # probe processes
def test_scratch_memory_is_reused_without_page_faults():
  on = probe(PROBE_CONFIGURE='1')
  assert on['applied'] == {'M_ARENA_MAX': 1, 'M_MMAP_MAX': 0,
                           'M_TRIM_THRESHOLD': 2**31 - 1,
                           'jax_cpu_enable_async_dispatch': 0}
  off = probe(PROBE_CONFIGURE='1', GEAR_JAX_HOST_ALLOCATOR='0')
  assert off['applied'] == {}
  # steps run inline exactly when the allocator settings apply
  assert on['async_dispatch'] is False and off['async_dispatch'] is True
  pages = 2**28 // 4096
  assert off['faults'] > pages // 2  # glibc's default: a fresh mmap, every page faulted
  assert on['faults'] < pages // 50  # the freed heap memory is reused


@pytest.mark.slow  # probe processes
def test_user_malloc_settings_win():
  assert probe(PROBE_CONFIGURE='1', MALLOC_ARENA_MAX='4')['applied'] == {}
  assert probe(PROBE_CONFIGURE='1', GLIBC_TUNABLES='glibc.malloc.mmap_max=0')['applied'] == {}


def test_import_changes_nothing():
  untouched = probe()  # imports gear_jax (and its hostalloc) without calling configure()
  assert untouched['applied'] is None
  assert untouched['faults'] > 2**28 // 4096 // 2


def test_train_and_evaluate_configures_first(monkeypatch, tmp_path):
  """The settings are applied before anything else of a run (config checks, devices)."""
  from gear_jax import defaults, hostalloc, trainer
  calls = []

  def validate(config):
    calls.append('validate')
    raise ValueError('stop here')

  monkeypatch.setattr(hostalloc, 'configure', lambda: calls.append('configure') or {})
  monkeypatch.setattr(defaults, 'validate_config', validate)
  with pytest.raises(ValueError, match='stop here'):
    trainer.train_and_evaluate(defaults.get_default_config(), str(tmp_path))
  assert calls == ['configure', 'validate']


@pytest.mark.slow  # four probe processes
def test_only_when_computing_on_cpu(tmp_path):
  """A CPU remedy: off when JAX_PLATFORMS names an accelerator first, or when a GPU
  plugin is installed (faked here by an importable jax_cuda12_plugin package)."""
  assert probe(PROBE_CONFIGURE='1', JAX_PLATFORMS='cuda,cpu')['applied'] == {}
  assert probe(PROBE_CONFIGURE='1', JAX_PLATFORMS='cpu')['applied'] != {}
  fake = tmp_path / 'jax_cuda12_plugin'
  fake.mkdir()
  (fake / '__init__.py').write_text('')
  import os
  path = os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')])
  assert probe(PROBE_CONFIGURE='1', JAX_PLATFORMS='', PYTHONPATH=path)['applied'] == {}
  assert probe(PROBE_CONFIGURE='1', JAX_PLATFORMS='cpu', PYTHONPATH=path)['applied'] != {}
