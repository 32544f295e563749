"""The command lines' flag errors, through the real commands in subprocesses: a
mistyped ``--config.*`` key, a value of the wrong type, a config file that does not
load, a missing required flag are one ``error:`` line on stderr and exit status 2,
before any work (no workdir, data file or JAX needed); an unexpected positional
argument stays absl's usage error (exit 1). All cases run at once in a module
fixture (each command stops while parsing its flags, in about a second).

Also: the config files' model variants (``configs/X.py:sasrec``)."""

from __future__ import annotations

import concurrent.futures

import pytest

from conftest import TEST_CONFIG, config_file, run_module
from gear_jax import defaults

TYPO = '--config.model.d_modle=16'
TYPO_LINE = ('error: --config.model.d_modle=16: no config key model.d_modle; did you '
             'mean model.d_model?')
BAD_FLOAT = '--config.train.lr=abc'
BAD_FLOAT_LINE = "error: --config.train.lr=abc: could not convert string to float: 'abc'"
NO_WORKDIR = '/nonexistent/gear_jax_cli_test'  # never read: parsing fails first

# name: (module, arguments, the one stderr line expected, or a substring of it)
CASES = {
    'train_typo': ('gear_jax.train', ['--config', TEST_CONFIG, '--workdir', NO_WORKDIR,
                                      TYPO], TYPO_LINE),
    'train_bad_float': ('gear_jax.train', ['--config', TEST_CONFIG, '--workdir',
                                           NO_WORKDIR, BAD_FLOAT], BAD_FLOAT_LINE),
    'train_variant_typo': ('gear_jax.train', [
        '--config', config_file('demo:sasrec'), '--workdir', NO_WORKDIR,
        '--config.model.nhead=1'],
        'error: --config.model.nhead=1: no config key model.nhead; did you mean '
        'model.n_head?'),
    'train_missing_file': ('gear_jax.train', ['--config', config_file('no_such'),
                                              '--workdir', NO_WORKDIR],
                           'error: --config: cannot load the config file'),
    'train_no_config': ('gear_jax.train', ['--workdir', NO_WORKDIR],
                        'error: --config=None: Flag --config must have a value'),
    'evaluate_typo': ('gear_jax.evaluate', ['--config', TEST_CONFIG, '--workdir',
                                            NO_WORKDIR, TYPO], TYPO_LINE),
    'evaluate_bad_float': ('gear_jax.evaluate', ['--config', TEST_CONFIG, '--workdir',
                                                 NO_WORKDIR, BAD_FLOAT], BAD_FLOAT_LINE),
    'recommend_typo': ('gear_jax.recommend', ['--workdir', NO_WORKDIR, TYPO], TYPO_LINE),
    'recommend_bad_float': ('gear_jax.recommend', ['--workdir', NO_WORKDIR, BAD_FLOAT],
                            BAD_FLOAT_LINE),
    'recommend_bad_k': ('gear_jax.recommend', ['--workdir', NO_WORKDIR, '--k=abc'],
                        "error: --k=abc: invalid literal for int() with base 10: 'abc'"),
    'export_typo': ('gear_jax.export', ['--workdir', NO_WORKDIR, '--output',
                                        NO_WORKDIR + '.jaxexport', TYPO], TYPO_LINE),
    'sweep_typo': ('gear_jax.sweep', ['--config', TEST_CONFIG, '--workdir', NO_WORKDIR,
                                      TYPO], TYPO_LINE),
    'tune_typo': ('gear_jax.tune', ['--config', TEST_CONFIG, '--workdir', NO_WORKDIR,
                                    TYPO], TYPO_LINE),
    'tune_bad_trials': ('gear_jax.tune', ['--config', TEST_CONFIG, '--workdir', NO_WORKDIR,
                                          '--trials=0'],
                        'error: --trials=0: 0 is not a positive integer'),
    'baselines_bad_float': ('gear_jax.baselines', ['--config', TEST_CONFIG, '--workdir',
                                                   NO_WORKDIR, BAD_FLOAT], BAD_FLOAT_LINE),
    'stats_typo': ('gear_jax.data.stats', ['--config', TEST_CONFIG, TYPO], TYPO_LINE),
    'report_unknown_flag': ('gear_jax.report', ['--workdir', NO_WORKDIR, '--bogus=1'],
                            "error: Unknown command line flag 'bogus'"),
    'serve_no_artifact': ('gear_jax.serve', ['--port', '0'],
                          'error: --artifact=None: Flag --artifact must have a value'),
    'serve_bad_wait': ('gear_jax.serve', ['--artifact', NO_WORKDIR + '.jaxexport',
                                          '--max_wait_ms=-1'],
                       "error: field '--max_wait_ms': must be >= 0, got -1.0"),
    'serve_bad_cache': ('gear_jax.serve', ['--artifact', NO_WORKDIR + '.jaxexport',
                                           '--compile_cache', '/proc/gear_jax_cache'],
                        'error: cannot create --compile_cache /proc/gear_jax_cache'),
    'serve_missing_artifact': ('gear_jax.serve', ['--artifact', NO_WORKDIR + '.jaxexport',
                                                  '--port', '0'],
                               f'error: cannot load --artifact {NO_WORKDIR}.jaxexport'),
    'convert_typo': ('gear_jax.convert', ['--input', NO_WORKDIR + '.npz', '--output',
                                          NO_WORKDIR, '--config', TEST_CONFIG, TYPO],
                     TYPO_LINE),
}
USAGE = ('gear_jax.train', ['--config', TEST_CONFIG, '--workdir', NO_WORKDIR, 'extra'])


def _stderr_lines(stderr: str) -> list[str]:
  """The non-empty lines of stderr, without what absl / XLA may log at start."""
  return [line for line in stderr.splitlines() if line.strip() and not line.startswith(
      ('WARNING: All log messages', 'I0000', 'W0000', 'E0000'))]


@pytest.fixture(scope='module')
def results():
  jobs = {**{name: (module, args) for name, (module, args, _) in CASES.items()},
          'usage': USAGE}
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = {name: pool.submit(run_module, module, *args, timeout=120)
               for name, (module, args) in jobs.items()}
    return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize('name', list(CASES))
def test_flag_error_is_one_line_and_exit_2(results, name):
  _, _, expected = CASES[name]
  proc = results[name]
  lines = _stderr_lines(proc.stderr)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith('error: ') and lines[0].startswith(expected), lines[0]
  assert proc.stdout == ''
  if 'd_modle' in expected:
    assert 'model.d_model' in lines[0]


def test_unexpected_argument_is_a_usage_error(results):
  proc = results['usage']
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "unexpected arguments: ['extra']" in proc.stderr
  assert 'Traceback' not in proc.stderr


# -- model variants of the config files ------------------------------------------------

SASREC = {'model.name': 'sasrec', 'model.n_head': 1, 'model.n_layer': 2,
          'model.mask_padding': True}


@pytest.mark.parametrize('base', ['demo', 'retail'])
def test_sasrec_variant_is_the_base_file_with_sasrec_settings(base):
  gear = defaults.flat_config(defaults.load_config(config_file(base)))
  variant = defaults.flat_config(defaults.load_config(config_file(f'{base}:sasrec')))
  assert gear['model.name'] == 'gear'
  assert set(variant) == set(gear)
  assert {k: variant[k] for k in SASREC} == SASREC
  # the model's own settings and its search space (SASRec's has no train.alpha) differ
  own = {*SASREC, 'tune.space'}
  assert {k: v for k, v in variant.items() if k not in own} == \
      {k: v for k, v in gear.items() if k not in own}
  assert not any('alpha' in entry for entry in variant['tune.space'])
  # the file's own settings hold in the variant too (not the package defaults)
  if base == 'demo':
    assert variant['data.synthetic.preset'] == 'demo' and variant['train.batch_size'] == 64
  else:
    assert variant['train.num_epochs'] == 500 and variant['data.path'] == 'data/retail.txt'
  assert variant['eval.other_protocol'] is True


def test_every_config_file_loads_and_validates():
  from conftest import CONFIGS
  files = sorted(p.stem for p in CONFIGS.glob('*.py'))
  assert {'demo', 'retail', 'test'} <= set(files)
  for name in files:
    for spec in (name, f'{name}:sasrec'):
      config = defaults.load_config(config_file(spec))
      defaults.validate_config(config)
      assert config.model.name == ('sasrec' if spec.endswith(':sasrec') else 'gear')
