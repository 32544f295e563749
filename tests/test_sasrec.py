"""SASRec (gear_jax/models/sasrec.py): what it reads, causality, the next-item loss, and that
its inference path equals its training outputs. The command lines (train, resume,
evaluate, recommend) run it in tests/test_options.py ('sasrec' case)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import run_module
from gear_jax import defaults, retrieval
from gear_jax.models import layers, registry, sasrec
from gear_jax.errors import ConfigError

B, L, V = 3, 9, 23
HIGHEST = jax.lax.Precision.HIGHEST


@pytest.fixture(scope='module')
def setup():
  config = ml_collections.ConfigDict(dict(name='sasrec', d_model=8, n_head=2, n_layer=2,
                                          dropout=0.2, mask_padding=True, kernels='xla'))
  model = registry.build(V, 4, config)
  assert isinstance(model, sasrec.SASRec)
  assert registry.spec_of(model).name == 'sasrec'
  assert registry.spec_of(model).loss is sasrec.sasrec_loss
  params = jax.jit(lambda k: registry.init_params(model, k, L))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  items = rng.integers(1, V + 1, (B, L)).astype(np.int32)
  items[0, :4] = 0  # left padding
  behaviors = np.where(items > 0, rng.integers(1, 5, (B, L)), 0).astype(np.int32)
  gaps = np.where(items > 0, rng.integers(0, 9999, (B, L)), 0).astype(np.int32)
  return model, params, items, behaviors, gaps


def test_reads_items_only_and_is_causal(setup):
  model, params, items, behaviors, gaps = setup
  run = jax.jit(lambda i, b, g: model.apply({'params': params}, i, b, g))
  h = np.asarray(run(items, behaviors, gaps))
  assert h.shape == (B, L - 1, 8)
  assert set(params) >= {'item_emb', 'pos_emb', 'blocks_0', 'blocks_1'}
  # behaviors and times are ignored
  np.testing.assert_array_equal(h, run(items, behaviors[:, ::-1] * 0 + 1, gaps * 7))
  # the last slot (the label) is never read; position t sees tokens <= t only
  later = items.copy()
  later[:, -1] = 1
  later[:, 6] = (later[:, 6] % V) + 1
  h2 = np.asarray(run(later, behaviors, gaps))
  np.testing.assert_allclose(h2[:, :6], h[:, :6], atol=1e-6)
  assert np.abs(h2[:, 6:] - h[:, 6:]).max() > 1e-4
  # padded tokens are hidden: their ids do not matter to real positions
  padded = items.copy()
  padded[0, :4] = 0
  other = layers.item_embedding(params).at[0].set(5.0)
  h3 = np.asarray(jax.jit(lambda p: model.apply({'params': p}, padded, behaviors, gaps))(
      {**params, 'item_emb': {'embedding': other}}))
  np.testing.assert_allclose(h3[0, 4:], h[0, 4:], atol=1e-5)
  # inference on the newest item equals the training output there
  last = jax.jit(lambda i: model.apply({'params': params}, i, behaviors, gaps,
                                       method='last_state'))(items)
  np.testing.assert_allclose(last, h[:, -1], atol=1e-5)


@pytest.mark.slow
def test_loss_is_next_item_cross_entropy(setup):
  model, params, items, behaviors, gaps = setup
  batch = {'items': jnp.asarray(items), 'behaviors': jnp.asarray(behaviors),
           'gaps': jnp.asarray(gaps)}
  h = jax.jit(lambda p: model.apply({'params': p}, items, behaviors, gaps))(params)
  logits = retrieval.item_logits(params, h, HIGHEST)  # [B, L-1, V+1]
  labels = items[:, 1:]
  real = (labels != 0) & (items[:, :-1] != 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  want = float((ce * real).sum() / real.sum())
  for impl in ('dense', 'token', 'vocab'):
    loss, aux = jax.jit(lambda p, impl=impl: registry.spec_of(model).loss(
        p, batch, None, model=model, alpha=0.1, loss_impl=impl, loss_memory_mb=0.01))(
            params)
    assert abs(float(loss) - want) < 1e-5, impl
    assert float(aux['positions']) == real.sum()
  # with dropout on, gradients reach the position table
  grads = jax.jit(jax.grad(lambda p: registry.spec_of(model).loss(
      p, batch, jax.random.PRNGKey(3), model=model, alpha=0.1)[0]))(params)
  assert float(jnp.abs(grads['pos_emb']['embedding']).max()) > 0


def test_model_name_is_validated(tmp_path):
  config = defaults.get_default_config()
  config.model.name = 'bert4rec'
  with pytest.raises(ConfigError, match="model.name"):
    defaults.validate_config(config)
  out = run_module('gear_jax.train', '--config', 'configs/test.py', '--workdir',
                   str(tmp_path / 'w'), '--config.model.name=bert4rec')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert "config.model.name" in out.stderr and "'gear', 'sasrec'" in out.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()
