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


K_FULL = 150  # the catalogue of `shop_run` (checked there)


def _raw_id(u: int) -> str:
  return '7' if u == 8 else (f'{u:03d}' if u < 100 else str(u))


def shop_run(root, *train_flags: str) -> dict:
  """A tiny run trained through the CLI (one epoch, configs/test.py, plus `train_flags`)
  on a data file in `root` whose ids are text with leading zeros ('007' and '7' are two
  users, items '0001'..'0150'), with a shopper below min_uc ('short'). Returns the
  workdir, the data path, `root` and the raw columns as text."""
  from gear_jax.data import synthetic
  cols = synthetic.generate(300, 150, seed=0)
  users = [_raw_id(int(u)) for u in cols['user']]
  items = [f'{int(i):04d}' for i in cols['item']]
  behaviors = [synthetic.BEHAVIORS[int(b)] for b in cols['behavior']]
  stamps = [int(t) for t in cols['timestamp']]
  # a shopper below min_uc (3): not trained on, still recommended for
  users += ['short', 'short']
  items += ['0001', '0002']
  behaviors += ['pv', 'cart']
  stamps += [1501137700, 1501137760]
  data = pathlib.Path(root) / 'shop.tsv'
  data.write_text(''.join(f'{u}\t{i}\t{b}\t{t}\n'
                          for u, i, b, t in zip(users, items, behaviors, stamps)))
  workdir = pathlib.Path(root) / 'run'
  out = run_module('gear_jax.train', '--config', TEST_CONFIG,
                   '--workdir', str(workdir), f'--config.data.path={data}',
                   '--config.train.num_epochs=1', *train_flags)
  assert out.returncode == 0, out.stderr[-3000:]
  assert len(set(items)) == K_FULL
  return dict(workdir=str(workdir), data=str(data), root=root, users=users, items=items,
              behaviors=behaviors, stamps=stamps)
