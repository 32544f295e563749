"""Training and evaluation end to end on configs/test.py: the workdir record,
checkpoints, evaluation reproducing summary.json, exact resumption (SIGKILL mid-epoch,
extension of a finished run), NaN handling, one compile per run, the optimizer."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TEST_CONFIG, run_module
from gear_jax import checkpoint as ckpt_lib
from gear_jax import defaults, evaluator, rundir, run_log, steps, trainer
from gear_jax.data import DataError
from gear_jax.errors import ConfigError, TrainingDiverged

TIMING_KEYS = ('train_s', 'eval_s', 'train/seq_per_s')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


def make_config(data_dir, **overrides):
  config = defaults.load_config(TEST_CONFIG)
  config.data.path = str(data_dir / 'synthetic_test.txt')
  config.data.cache_dir = str(data_dir / 'cache')
  config.train.num_epochs = 4
  for key, value in overrides.items():
    section, field = key.split('__')
    config[section][field] = value
  return config


def cli_args(config) -> list[str]:
  """The command-line overrides that turn configs/test.py into `config`."""
  return [f'--config.data.path={config.data.path}',
          f'--config.data.cache_dir={config.data.cache_dir}',
          f'--config.train.num_epochs={config.train.num_epochs}',
          f'--config.data.split={config.data.split}']


def metrics_without_timing(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
          for r in run_log.read_metrics(str(workdir))]


@pytest.fixture(scope='module')
def baseline(data_dir, tmp_path_factory):
  """One uninterrupted 4-epoch run that the other tests compare with."""
  workdir = tmp_path_factory.mktemp('baseline')
  summary = trainer.train_and_evaluate(make_config(data_dir), str(workdir))
  return workdir, summary


def test_workdir_record(baseline):
  workdir, summary = baseline
  records = run_log.read_metrics(str(workdir))
  assert [r['epoch'] for r in records] == [0, 1, 2, 3]
  steps_per_epoch = records[0]['step']
  assert [r['step'] for r in records] == [steps_per_epoch * (e + 1) for e in range(4)]
  for r in records:
    assert np.isfinite(r['train/loss']) and r['train/seq_per_s'] > 0
    assert {'val/Recall@10', 'val/NDCG@10', 'val/MRR', 'val/NDCG@1'} <= set(r)
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['data']['max_len'] == 12 and saved['model']['d_model'] == 8
  best = max(records, key=lambda r: (r['val/NDCG@10'], -r['epoch']))
  assert summary['best_epoch'] == best['epoch']
  assert summary['best_val'] == {k: v for k, v in best.items() if k.startswith('val/')}
  assert json.loads((workdir / 'summary.json').read_text()) == json.loads(
      json.dumps(summary))
  # orbax keeps exactly the best, the latest and the one before it (its fallback)
  store = ckpt_lib.CheckpointStore(str(workdir), read_only=True)
  assert store.latest_step() == records[-1]['step']
  assert store.best_step() == best['step']
  assert sorted(store.all_steps()) == sorted(
      {best['step'], records[-1]['step'], records[-2]['step']})
  meta = store.read_meta(store.latest_step())
  assert meta['epoch'] == 3 and meta['config']['seed'] == 0
  # TensorBoard events
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'))
  acc.Reload()
  assert 'val/NDCG@10' in acc.Tags()['scalars']
  assert [e.step for e in acc.Scalars('val/NDCG@10')] == [r['step'] for r in records]


def test_evaluate_reproduces_summary(baseline):
  workdir, summary = baseline
  config = json.loads((workdir / 'config.json').read_text())
  out = evaluator.evaluate_run(rundir.read_config(str(workdir)), str(workdir),
                                checkpoint='best')
  assert out['epoch'] == summary['best_epoch']
  assert out['metrics'] == summary['best_val']  # exactly
  cli = run_module('gear_jax.evaluate', '--workdir', str(workdir), '--json')
  assert cli.returncode == 0, cli.stderr
  assert json.loads(cli.stdout)['metrics'] == summary['best_val']
  full = evaluator.evaluate_run(rundir.read_config(str(workdir)), str(workdir),
                                 checkpoint='latest', protocol='full')
  assert set(full['metrics']) >= {'val/NDCG@10', 'val/Recall@10'}
  assert config['eval']['protocol'] == 'sampled'


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch(baseline, data_dir, tmp_path):
  workdir, summary = baseline
  config = make_config(data_dir)
  steps_per_epoch = run_log.read_metrics(str(workdir))[0]['step']
  kill_at = 2 * steps_per_epoch + steps_per_epoch // 2  # in the middle of epoch 2
  killed = run_module('tests.fault_runner', '--at_step', str(kill_at), '--signal', 'KILL',
                      'gear_jax.train', '--', '--config', 'configs/test.py', '--workdir',
                      str(tmp_path), *cli_args(config))
  assert killed.returncode == -9, killed.stderr[-2000:]
  done = [r['epoch'] for r in run_log.read_metrics(str(tmp_path))]
  assert done and done[-1] <= 1  # epoch 2 never finished
  resumed = run_module('gear_jax.train', '--config', 'configs/test.py', '--workdir',
                       str(tmp_path), *cli_args(config))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'resuming from checkpoint' in resumed.stdout
  assert metrics_without_timing(tmp_path) == metrics_without_timing(workdir)
  assert json.loads((tmp_path / 'summary.json').read_text())['best_val'] == \
      summary['best_val']


@pytest.mark.slow
def test_extend_a_finished_run(baseline, data_dir, tmp_path):
  workdir, summary = baseline
  short = trainer.train_and_evaluate(make_config(data_dir, train__num_epochs=2),
                                   str(tmp_path))
  assert short['epochs_run'] == 2
  longer = trainer.train_and_evaluate(make_config(data_dir), str(tmp_path))
  assert metrics_without_timing(tmp_path) == metrics_without_timing(workdir)
  assert longer['best_val'] == summary['best_val']
  assert longer['best_epoch'] == summary['best_epoch']


@pytest.mark.slow
def test_resume_refuses_a_different_config(baseline, data_dir, tmp_path):
  trainer.train_and_evaluate(make_config(data_dir, train__num_epochs=1), str(tmp_path))
  with pytest.raises(ValueError, match='model.d_model'):
    trainer.train_and_evaluate(make_config(data_dir, model__d_model=16), str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize('poison', ['loss', 'grad_norm'])
def test_nan_stops_and_keeps_good_checkpoints(data_dir, tmp_path, monkeypatch, poison):
  # a non-finite gradient with a finite loss must not be saved either
  config = make_config(data_dir)
  real_step = steps.train_step
  nan_from = 13  # in epoch 1 (10 steps per epoch)

  def poisoned(state, batch, **kw):
    new_state, aux = real_step(state, batch, **kw)
    aux[poison] = jnp.where(state.step == nan_from, jnp.nan, aux[poison])
    return new_state, aux

  monkeypatch.setattr(steps, 'train_step', poisoned)
  match = 'loss is nan' if poison == 'loss' else '1 step.* non-finite gradient norm'
  with pytest.raises(TrainingDiverged, match=match) as e:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert 'intact' in str(e.value)
  records = run_log.read_metrics(str(tmp_path))
  assert [r['epoch'] for r in records] == [0]
  store = ckpt_lib.CheckpointStore(str(tmp_path), read_only=True)
  assert store.all_steps() == [records[0]['step']]
  meta = store.read_meta(records[0]['step'])
  assert meta['epoch'] == 0
  out = evaluator.evaluate_run(config, str(tmp_path), checkpoint='latest')
  assert all(np.isfinite(v) for v in out['metrics'].values())


@pytest.mark.slow
def test_steps_compile_once(data_dir, tmp_path, monkeypatch):
  traces = {'train': 0, 'eval': 0}
  real_train, real_eval = steps.train_step, steps.eval_step

  def counted_train(*a, **kw):
    traces['train'] += 1
    return real_train(*a, **kw)

  def counted_eval(*a, **kw):
    traces['eval'] += 1
    return real_eval(*a, **kw)

  monkeypatch.setattr(steps, 'train_step', counted_train)
  monkeypatch.setattr(steps, 'eval_step', counted_eval)
  config = make_config(data_dir, train__num_epochs=3)
  config.eval.batch_size = 48  # the last evaluation batch is partial too
  trainer.train_and_evaluate(config, str(tmp_path))
  # 300 users / batch 32: every epoch ends with a partial batch, padded, no retrace
  assert traces == {'train': 1, 'eval': 1}


@pytest.mark.slow
def test_val_test_split(data_dir, tmp_path):
  config = make_config(data_dir, data__split='val_test', train__num_epochs=2)
  summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert set(summary['test']) >= {'test/NDCG@10', 'test/Recall@10', 'test/MRR'}
  out = evaluator.evaluate_run(config, str(tmp_path), checkpoint='best', split='test')
  assert out['metrics'] == summary['test']


def test_missing_data_file_is_a_clear_error(tmp_path):
  out = run_module('gear_jax.train', '--config', 'configs/retail.py', '--workdir',
                   str(tmp_path / 'run'), f'--config.data.path={tmp_path / "retail.txt"}')
  assert out.returncode == 2
  assert 'Traceback' not in out.stderr
  assert 'config.data.path' in out.stderr and 'configs/demo.py' in out.stderr
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_config_is_validated():
  config = defaults.load_config(TEST_CONFIG)
  config.eval.monitor = 'val/NDCG@7'
  with pytest.raises(ConfigError, match='monitor') as e:
    defaults.validate_config(config)
  assert not isinstance(e.value, DataError)  # a config error is not a data error
  config = defaults.load_config(TEST_CONFIG)
  config.model.precision = 'fp8'
  with pytest.raises(ConfigError, match='precision'):
    defaults.validate_config(config)


# -- the optimizer -------------------------------------------------------------------------

def test_optax_chain_equals_pytorch_adam_with_l2():
  lr, wd, b1, b2, eps = 1e-2, 1e-2, 0.9, 0.999, 1e-8
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5, 3))
  grads = [rng.normal(size=(5, 3)) for _ in range(6)]
  tx = steps.make_optimizer(lr, wd)
  w = jnp.asarray(w0, jnp.float64) if jax.config.jax_enable_x64 else jnp.asarray(w0)
  state = tx.init(w)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g, w.dtype), state, w)
    w = optax.apply_updates(w, updates)
  # torch.optim.Adam(lr, weight_decay=wd), written out
  p, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
  for t, g in enumerate(grads, start=1):
    g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr / (1 - b1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps)
  np.testing.assert_allclose(np.asarray(w), p, atol=1e-6)
  # AdamW (decoupled) would differ
  adamw = optax.adamw(lr, weight_decay=wd)
  w2, s2 = jnp.asarray(w0), adamw.init(jnp.asarray(w0))
  for g in grads:
    u, s2 = adamw.update(jnp.asarray(g), s2, w2)
    w2 = optax.apply_updates(w2, u)
  assert np.abs(np.asarray(w2) - p).max() > 1e-4


def test_gradient_accumulation_averages_micro_batches():
  tx1 = steps.make_optimizer(1e-2, 1e-3)
  tx4 = steps.make_optimizer(1e-2, 1e-3, grad_accum=4)
  w = jnp.arange(6.0).reshape(2, 3)
  grads = [jnp.full((2, 3), float(i)) for i in range(4)]
  s4 = tx4.init(w)
  w4 = w
  for i, g in enumerate(grads):
    u, s4 = tx4.update(g, s4, w4)
    w4 = optax.apply_updates(w4, u)
    if i < 3:
      np.testing.assert_array_equal(w4, w)  # no update before the 4th micro-batch
  u, _ = tx1.update(sum(grads) / 4, tx1.init(w), w)
  np.testing.assert_allclose(w4, optax.apply_updates(w, u), atol=1e-7)
