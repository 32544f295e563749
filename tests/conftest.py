"""Shared test fixtures. Tests run on CPU; caches go to a per-session temp dir."""

import os
import pathlib
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / 'tests' / 'fixtures' / 'gear_reference_small.npz'
SYNTH6K = REPO / 'tests' / 'data' / 'synth6k' / 'retail.txt.gz'
MARKOV3K = REPO / 'tests' / 'data' / 'markov3k' / 'retail.txt.gz'

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Tests compile many small programs: LLVM at -O0 halves XLA:CPU compile time (results
# differ only in float rounding), and the persistent compilation cache lets the
# subprocess runs of the same tiny config reuse each other's executables.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='gear_xla_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')


@pytest.fixture(autouse=True, scope='session')
def _session_cache(tmp_path_factory):
  # nothing a test does may touch the user's ~/.cache/gear_jax
  os.environ['GEAR_JAX_CACHE'] = str(tmp_path_factory.mktemp('gear_cache'))
  yield


@pytest.fixture
def write(tmp_path):
  """write('name.txt', text) -> path of a file in tmp_path."""
  def _write(name: str, text: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
      path.write_bytes(text)
    else:
      path.write_text(text)
    return str(path)
  return _write


@pytest.fixture(scope='module')
def data_file(tmp_path_factory):
  """configs/test.py's synthetic data set (300 users, 150 items) in a temp dir, once per
  test module (the multi-process tests of test_parallel.py and test_parallel_faults.py)."""
  from gear_jax.data import synthetic
  path = tmp_path_factory.mktemp('pdata') / 'synthetic_test.txt'
  synthetic.write_tsv(path, synthetic.generate(300, 150, seed=0))
  return path


CONFIGS = REPO / 'configs'
TEST_CONFIG = str(CONFIGS / 'test.py')


def config_file(name: str = 'test') -> str:
  """The path of configs/<name>.py; 'demo:sasrec' gives that file's variant."""
  file, _, variant = name.partition(':')
  return str(CONFIGS / f'{file}.py') + (f':{variant}' if variant else '')


def run_module(module: str, *args: str, env: dict | None = None, cwd=REPO,
               timeout: float = 600):
  """Runs `python -m module args` in a subprocess; returns the CompletedProcess."""
  import subprocess
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def synthetic_data(directory, num_users: int, num_items: int, seed: int, *,
                   cache_dir: str = '', **settings):
  """Writes a synthetic data set into `directory` and preprocesses it (GearData)."""
  from gear_jax.data import preprocess, readers, synthetic
  path = pathlib.Path(directory) / 'syn.txt'
  synthetic.write_tsv(path, synthetic.generate(num_users, num_items, seed=seed))
  data, _ = preprocess.load(str(path), readers.TSV, preprocess.Settings(**settings),
                            cache_dir=cache_dir)
  return data
