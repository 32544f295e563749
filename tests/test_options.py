"""The option matrix: every documented option through the command lines users call.

Each case trains configs/test.py for one epoch (`gear_jax.train`), resumes it to two,
then evaluates the best checkpoint (`gear_jax.evaluate --checkpoint best`), which must
reproduce summary.json. Every documented option appears in at least one case:
data.format tsv / taobao / csv, data.split val / val_test, eval.protocol sampled / full
and eval.other_protocol, eval.negatives random / popularity, model.precision float32 /
default / bfloat16, train.loss auto / token / vocab / dense, model.mask_padding,
train.grad_accum=2, data.multi_behavior=False, model.kernels auto / xla,
train.deterministic_ops True / False, model.name sasrec (which is also asked for
recommendations), and meshes 8x1 and 4x2 with mesh.shard_items on 8 forced CPU devices.
The mesh cases must equal the one-device run within 1e-5 (4x2 with the 'xla' kernels
against the default's 'cpu' ones). Cases run two at a time (the machine has 2 cores;
the persistent XLA cache of conftest.py shares compiled programs between the three
commands of a case).
"""

import concurrent.futures
import json
import os

import pytest

from conftest import TEST_CONFIG, run_module
from gear_jax import defaults, run_log

# minutes: the module fixture trains, resumes and evaluates every case
pytestmark = pytest.mark.slow

TOL = 1e-5
EIGHT = {'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '') +
                       ' --xla_force_host_platform_device_count=8').strip()}

CASES = {
    'default': [],
    # the dense loss and both protocols here too: one run fewer
    'mesh8x1_dense_other_protocol': ['--config.mesh.data=8', '--config.mesh.model=1',
                                     '--config.train.loss=dense',
                                     '--config.eval.other_protocol=True'],
    # the plain 'xla' kernels here, held to the default run's 'cpu' kernels on 1 device
    'mesh4x2_shard_xla': ['--config.mesh.data=4', '--config.mesh.model=2',
                          '--config.mesh.shard_items=True', '--config.model.kernels=xla',
                          '--config.train.deterministic_ops=False'],
    # SASRec reads only items: here with another format, split, sampler and loss
    'sasrec_taobao_valtest_popularity_token_default_masked': [
        '--config.model.name=sasrec', '--config.data.format=taobao',
        '--config.data.split=val_test', '--config.eval.negatives=popularity',
        '--config.train.loss=token', '--config.model.precision=default',
        '--config.model.mask_padding=True'],
    'csv_full_bf16_vocab_accum2_single_behavior': [
        '--config.data.format=csv', '--config.data.csv.delimiter=;',
        '--config.data.csv.columns.user=visitor', '--config.data.csv.columns.item=product',
        '--config.data.csv.columns.behavior=event',
        '--config.data.csv.columns.timestamp=ts_ms',
        '--config.data.csv.behavior_map=view:pv,like:fav,basket:cart,order:buy',
        '--config.data.csv.timestamp_unit=ms', '--config.eval.protocol=full',
        '--config.eval.other_protocol=True', '--config.model.precision=bfloat16',
        '--config.train.loss=vocab', '--config.train.grad_accum=2',
        '--config.data.multi_behavior=False'],
}
FORMAT_FILES = {'taobao': 'syn_taobao.csv', 'csv': 'syn_events.csv'}


def _write_formats(tsv_path, directory) -> dict[str, str]:
  """The synthetic data in the taobao and a custom csv layout (same interactions)."""
  rows = [line.split('\t') for line in open(tsv_path).read().splitlines()]
  taobao = directory / FORMAT_FILES['taobao']
  taobao.write_text(''.join(f'{u},{i},{int(i) % 7},{b},{t}\n' for u, i, b, t in rows))
  names = {'pv': 'view', 'fav': 'like', 'cart': 'basket', 'buy': 'order'}
  events = directory / FORMAT_FILES['csv']
  events.write_text('ts_ms;visitor;event;product\n' + ''.join(
      f'{int(t) * 1000 + 7};{u};{names[b]};{i}\n' for u, i, b, t in rows))
  return {'tsv': str(tsv_path), 'taobao': str(taobao), 'csv': str(events)}


def _config_with(flags: list[str], path, cache_dir):
  """configs/test.py with the --config.data.* flags of a case applied (parsed as the
  command line parses them)."""
  data_flags = [f[len('--config.'):] for f in flags if f.startswith('--config.data.')]
  return defaults.load_config(TEST_CONFIG, [f'data.path={path}',
                                            f'data.cache_dir={cache_dir}', *data_flags])


def _run_case(name: str, flags: list[str], paths: dict, root) -> dict:
  fmt = next((f.split('=')[1] for f in flags if f.startswith('--config.data.format=')),
             'tsv')
  workdir = root / name
  env = EIGHT if name.startswith('mesh') else None
  common = ['--config', 'configs/test.py', f'--config.data.path={paths[fmt]}',
            f'--config.data.cache_dir={root / "cache"}', *flags, '--workdir',
            str(workdir)]
  out = {'name': name}
  for label, args in (('epoch1', ['--config.train.num_epochs=1']),
                      ('resume2', ['--config.train.num_epochs=2'])):
    proc = run_module('gear_jax.train', *common, *args, env=env)
    out[label] = (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    if proc.returncode:
      return out
  ev = run_module('gear_jax.evaluate', '--workdir', str(workdir), '--checkpoint', 'best',
                  '--json', env=env)
  out['evaluate'] = (ev.returncode, ev.stdout[-6000:], ev.stderr[-3000:])
  out['metrics'] = run_log.read_metrics(str(workdir))
  out['run'] = json.loads((workdir / 'run.json').read_text())
  if '--config.model.name=sasrec' in flags:  # the second model is recommendable too
    rec = run_module('gear_jax.recommend', '--workdir', str(workdir), '--user', '1,2',
                     '--k', '3', env=env)
    out['recommend'] = (rec.returncode, rec.stdout[-3000:], rec.stderr[-3000:])
  summary = workdir / 'summary.json'
  out['summary'] = json.loads(summary.read_text()) if summary.exists() else None
  return out


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  from gear_jax.data import synthetic
  root = tmp_path_factory.mktemp('options')
  tsv = root / 'syn.txt'
  synthetic.write_tsv(tsv, synthetic.generate(300, 150, seed=0))
  paths = _write_formats(tsv, root)
  # the caches of the three formats are made once, before the cases run in parallel
  from gear_jax.data import load_dataset
  for fmt, path in paths.items():
    flags = next(f for f in CASES.values() if f'--config.data.format={fmt}' in f) \
        if fmt != 'tsv' else []
    config = _config_with(flags, path, root / 'cache')
    load_dataset(config.data)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {name: pool.submit(_run_case, name, flags, paths, root)
               for name, flags in CASES.items()}
    return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize('name', list(CASES))
def test_option_case(results, name):
  r = results[name]
  for label in ('epoch1', 'resume2', 'evaluate'):
    assert label in r and r[label][0] == 0, (label, r.get(label))
  assert 'resuming from checkpoint' in r['resume2'][1]
  assert 'Traceback' not in r['resume2'][2]
  assert [m['epoch'] for m in r['metrics']] == [0, 1]
  summary = r['summary']
  evaluated = json.loads(r['evaluate'][1].strip().splitlines()[-1])
  assert evaluated['metrics'] == summary['best_val']  # exactly
  flags = CASES[name]
  keys = set(summary['best_val'])
  if '--config.eval.protocol=full' in flags:
    assert 'val/NDCG@10' in keys and 'val_sampled/NDCG@10' in keys
  elif '--config.eval.other_protocol=True' in flags:
    assert 'val_full/NDCG@10' in keys
  if '--config.data.split=val_test' in flags:
    assert {'test/NDCG@10', 'test/Recall@10'} <= set(summary['test'])
  if '--config.model.name=sasrec' in flags:
    assert 'model: SASRec' in r['epoch1'][1]
    code, stdout, stderr = r['recommend']
    assert code == 0, stderr
    assert stdout.splitlines()[0] == 'user,rank,item,score'
    assert len(stdout.splitlines()) == 1 + 2 * 3
  # the platform-dependent choices as resolved on this CPU, recorded in run.json
  env = r['run']['environment']
  assert env['kernels'] == ('xla' if '--config.model.kernels=xla' in flags else 'cpu')
  assert (env['loss_memory_mb'], env['loss_memory_mb_from']) == (256.0, 'auto: cpu')
  if '--config.train.deterministic_ops=False' in flags:
    assert env['xla_gpu_deterministic_ops'].startswith('off')
    assert 'xla_gpu_deterministic_ops' not in env['xla_flags']
  else:
    assert env['xla_gpu_deterministic_ops'] == 'on'
    assert '--xla_gpu_deterministic_ops=true' in env['xla_flags']


@pytest.mark.parametrize('name', [n for n in CASES if n.startswith('mesh')])
def test_meshes_match_one_device(results, name):
  one, many = results['default'], results[name]
  assert 'epoch1' in many and many['epoch1'][0] == 0, many.get('epoch1')
  devices = "on 8 cpu device(s)"
  assert devices in many['epoch1'][1]
  for a, b in zip(one['metrics'], many['metrics']):
    for k, v in a.items():
      if k.startswith(('val/', 'train/loss')):
        assert abs(v - b[k]) < TOL, (name, k, v, b[k])
