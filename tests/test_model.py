"""The Flax GEAR: parity with the reference fixture, PyTorch import, and structure
(shapes, causality, where the time bias enters, dropout, gradient flow)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import FIXTURE, run_module
from gear_jax import converter, retrieval, steps
from gear_jax.models import gear, layers, registry
from gear_jax.data import DataError

HIGHEST = jax.lax.Precision.HIGHEST
TOL = 1e-4


@pytest.fixture(scope='module')
def ref():
  with np.load(FIXTURE) as z:
    arrays = {k: z[k] for k in z.files}
  state, inputs, outputs, grads, cfg = converter.split_arrays(arrays)
  return dict(params=converter.torch_to_params(state), inputs=inputs, outputs=outputs,
              grads=grads, adam=converter.torch_to_params(
                  {k: v for k, v in arrays.items() if k.startswith('adam_step/')}
                  and {k[len('adam_step/'):]: v for k, v in arrays.items()
                       if k.startswith('adam_step/')}),
              cfg=cfg)


def _model(cfg, **kw):
  return gear.GEAR(num_items=cfg['num_items'], num_behaviors=cfg['n_b'],
                d_model=cfg['d_model'], n_head=cfg['n_head'], n_layer=cfg['n_layer'],
                dropout=cfg['dropout'], precision=HIGHEST, **kw)


def _batch(inputs):
  return {'items': jnp.asarray(inputs['items'], jnp.int32),
          'behaviors': jnp.asarray(inputs['behaviors'], jnp.int32),
          'gaps': jnp.asarray(inputs['time_gaps'], jnp.int32)}


@pytest.mark.parametrize('kernels', ['cpu', 'xla'])
def test_fixture_outputs_and_gradients(ref, kernels):
  """Every implementation (kernels x item losses) against the reference."""
  cfg, params, batch = ref['cfg'], ref['params'], _batch(ref['inputs'])
  model = _model(cfg, kernels=kernels)
  np.testing.assert_array_equal(np.asarray(gear.time_matrix(batch['gaps']), np.float32),
                                ref['inputs']['time_bias'])
  h_beh, h_item = model.apply({'params': params}, batch['items'], batch['behaviors'],
                              batch['gaps'], deterministic=True)
  out = ref['outputs']
  np.testing.assert_allclose(retrieval.item_logits(params, h_beh, HIGHEST), out['logits_item'],
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(gear.behavior_logits(params, h_item, HIGHEST),
                             out['logits_behavior'], atol=TOL, rtol=0)
  scores = retrieval.score_candidates(params, h_beh[:, -1],
                              jnp.asarray(ref['inputs']['candidates'], jnp.int32), HIGHEST)
  np.testing.assert_allclose(scores, out['scores'], atol=TOL, rtol=0)
  # the evaluation path: only the last position in the last upper block
  h_last = model.apply({'params': params}, batch['items'], batch['behaviors'], batch['gaps'],
                       method=gear.GEAR.last_state)
  scores = retrieval.score_candidates(params, h_last,
                              jnp.asarray(ref['inputs']['candidates'], jnp.int32), HIGHEST)
  np.testing.assert_allclose(scores, out['scores'], atol=TOL, rtol=0)
  for impl in ('dense', 'token', 'vocab'):
    def loss_fn(p, impl=impl):
      return gear.gear_loss(p, batch, None, model=model, alpha=cfg['alpha'],
                             loss_impl=impl, loss_memory_mb=0.01)[0]
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert abs(float(loss) - float(out['loss'])) < TOL
    want = converter.torch_to_params(ref['grads'])
    errors = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads,
                                    want)
    assert max(jax.tree_util.tree_leaves(errors)) < TOL, (kernels, impl, errors)
    # row 0 of the item table is trained through the tied head, as in the reference
    assert float(jnp.abs(grads['item_emb']['embedding'][0]).max()) > 1e-4


def test_fixture_adam_step(ref):
  cfg, params, batch = ref['cfg'], ref['params'], _batch(ref['inputs'])
  model = _model(cfg)
  tx = steps.make_optimizer(1e-3, 1e-6)
  grads = jax.jit(jax.grad(lambda p: gear.gear_loss(
      p, batch, None, model=model, alpha=cfg['alpha'], loss_impl='dense')[0]))(params)
  new = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(
      grads, params)
  ref_grads = converter.torch_to_params(ref['grads'])
  checked = 0
  for got, want, g in zip(jax.tree_util.tree_leaves(new),
                          jax.tree_util.tree_leaves(ref['adam']),
                          jax.tree_util.tree_leaves(ref_grads)):
    sel = np.abs(np.asarray(g)) > 1e-5
    np.testing.assert_allclose(np.asarray(got)[sel], np.asarray(want)[sel], atol=TOL, rtol=0)
    checked += int(sel.sum())
  assert checked > 10000


@pytest.mark.slow
def test_convert_cli_verify(tmp_path):
  out = run_module('gear_jax.convert', '--input', str(FIXTURE),
                   '--output', str(tmp_path / 'conv'), '--verify')
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report['ok'] is True
  assert set(report['max_abs_error']) == {'logits_item', 'logits_behavior', 'scores',
                                          'loss', 'grad'}
  assert max(report['max_abs_error'].values()) < TOL
  assert (tmp_path / 'conv' / 'checkpoints' / '0').is_dir()
  # a second conversion into the same directory refuses to overwrite it
  again = run_module('gear_jax.convert', '--input', str(FIXTURE),
                     '--output', str(tmp_path / 'conv'))
  assert again.returncode == 2 and 'already holds checkpoints' in again.stderr


@pytest.mark.slow
def test_convert_verify_fails_on_wrong_weights(tmp_path):
  with np.load(FIXTURE) as z:
    arrays = {k: z[k] for k in z.files}
  # one element (a shift of the whole bias would vanish in the LayerNorm after it)
  arrays['param/upper_transformer.1.linear2.bias'][3] += 0.01
  arrays['backbone_note'] = np.array(0)  # an unknown key is reported, not ignored
  bad = tmp_path / 'bad.npz'
  np.savez(bad, **arrays)
  out = run_module('gear_jax.convert', '--input', str(bad), '--output', str(tmp_path / 'o'))
  assert out.returncode == 2 and 'backbone_note' in out.stderr
  del arrays['backbone_note']
  np.savez(bad, **arrays)
  out = run_module('gear_jax.convert', '--input', str(bad), '--output',
                   str(tmp_path / 'o2'), '--verify')
  assert out.returncode == 1
  assert json.loads(out.stdout.strip().splitlines()[-1])['ok'] is False


def test_lightning_prefixes_are_accepted():
  params = {'backbone.item_emb.weight': np.zeros((5, 4)),
            'backbone.behavior_emb.weight': np.zeros((3, 4)),
            'backbone.LayerNorm.weight': np.ones(4), 'backbone.LayerNorm.bias': np.zeros(4)}
  for block in ('item_attention_blocks.0', 'behavior_attention_blocks.0'):
    for name, shape in (('self_attn.in_proj_weight', (12, 4)), ('self_attn.in_proj_bias', (12,)),
                        ('self_attn.out_proj.weight', (4, 4)), ('self_attn.out_proj.bias', (4,)),
                        ('linear1.weight', (16, 4)), ('linear1.bias', (16,)),
                        ('linear2.weight', (4, 16)), ('linear2.bias', (4,)),
                        ('norm1.weight', (4,)), ('norm1.bias', (4,)),
                        ('norm2.weight', (4,)), ('norm2.bias', (4,))):
      params[f'backbone.{block}.{name}'] = np.zeros(shape)
  tree = converter.torch_to_params(params)
  assert tree['item_attention_blocks_0']['self_attn']['in_proj']['kernel'].shape == (4, 12)
  assert tree['behavior_attention_blocks_0']['linear1']['kernel'].shape == (4, 16)


def test_ckpt_without_torch_explains_the_export(tmp_path):
  pytest.importorskip('numpy')
  try:
    import torch  # noqa: F401
    pytest.skip('torch is installed here')
  except ImportError:
    pass
  fake = tmp_path / 'model.ckpt'
  fake.write_bytes(b'not really')
  with pytest.raises(DataError, match='needs torch') as e:
    converter.read_reference(str(fake))
  assert 'np.savez' in e.value.hint and str(fake) in str(e.value)


# -- structure, with prime sizes -----------------------------------------------------------

B, L, V, NB, D, H = 3, 7, 13, 5, 10, 2


@pytest.fixture(scope='module')
def small():
  model = gear.GEAR(num_items=V, num_behaviors=NB, d_model=D, n_head=H, n_layer=2,
                 dropout=0.3, precision=HIGHEST)
  params = registry.init_params(model, jax.random.PRNGKey(0), L)
  rng = np.random.default_rng(0)
  items = rng.integers(1, V + 1, (B, L)).astype(np.int32)
  behaviors = rng.integers(1, NB + 1, (B, L)).astype(np.int32)
  items[0, :3] = behaviors[0, :3] = 0  # left padding in one row
  gaps = rng.integers(0, 5000, (B, L)).astype(np.int32)
  gaps[0, :4] = 0
  return model, params, items, behaviors, gaps


def test_shapes_and_param_count(small):
  model, params, items, behaviors, gaps = small
  h_beh, h_item = model.apply({'params': params}, items, behaviors, gaps)
  assert h_beh.shape == (B, L, D) and h_item.shape == (B, L - 1, D)
  assert retrieval.item_logits(params, h_beh).shape == (B, L, V + 1)
  assert gear.behavior_logits(params, h_item).shape == (B, L - 1, NB + 1)
  assert params['item_emb']['embedding'].shape == (V + 1, D)
  assert not params['behavior_emb']['embedding'][0].any()  # zero padding row at init
  assert params['item_emb']['embedding'][0].any()  # Xavier, row 0 included
  # the retail configuration (99,037 items, d 32, 4 upper layers): the item table plus
  # the behavior table, the shared LayerNorm and 6 encoder layers of 12 d^2 + 13 d each
  def count(model):
    shapes = jax.eval_shape(lambda k: registry.init_params(model, k, 50),
                            jax.random.PRNGKey(0))
    return shapes, layers.count_params(shapes)
  d = 32
  shapes, n = count(gear.GEAR(num_items=99037, num_behaviors=4, d_model=d, n_head=2,
                              n_layer=4))
  assert n == (99037 + 1) * d + 5 * d + 2 * d + 6 * (12 * d * d + 13 * d) == 3_245_664
  # a table padded to shard evenly: the padding rows are parameters of the array but
  # not of the model
  padded, n_padded = count(gear.GEAR(num_items=99037, num_behaviors=4, d_model=d,
                                     n_head=2, n_layer=4, table_rows=99040))
  assert padded['item_emb']['embedding'].shape == (99040, d)
  assert n_padded == n + 2 * d
  assert layers.count_params(padded, num_items=99037) == n
  assert layers.count_params(shapes, num_items=99037) == n


@pytest.mark.parametrize('mask_padding', [False, True])
@pytest.mark.parametrize('dtype', [jnp.float32,
                                   pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_last_state_is_the_last_output(small, mask_padding, dtype):
  model, params, items, behaviors, gaps = small
  model = model.clone(mask_padding=mask_padding, dtype=dtype)
  full = model.apply({'params': params}, items, behaviors, gaps)[0][:, -1]
  last = model.apply({'params': params}, items, behaviors, gaps, method=gear.GEAR.last_state)
  assert last.shape == (B, D) and last.dtype == full.dtype
  np.testing.assert_allclose(np.asarray(last, np.float32), np.asarray(full, np.float32),
                             atol=1e-5 if dtype == jnp.float32 else 2e-2)
  # and it still depends on the whole sequence (row 0 is left-padded)
  moved = model.apply({'params': params}, items, behaviors, gaps + 1000,
                      method=gear.GEAR.last_state)
  assert float(jnp.abs(moved.astype(jnp.float32) - last.astype(jnp.float32)).max()) > 1e-3


def test_last_needs_inference_mode():
  layer = layers.EncoderLayer(D, H, 0.3)
  x = jnp.zeros((2, 5, D))
  variables = layer.init(jax.random.PRNGKey(0), x, None, None, True)
  with pytest.raises(ValueError, match='deterministic=True'):
    layer.apply(variables, x, None, None, False, last=1,
                rngs={'dropout': jax.random.PRNGKey(1)})


def test_causality(small):
  model, params, items, behaviors, gaps = small
  base = model.apply({'params': params}, items, behaviors, gaps)
  for t in range(1, L - 1):
    it, be, ga = items.copy(), behaviors.copy(), gaps.copy()
    it[:, t:] = (it[:, t:] % V) + 1  # change items i_{t+1}.. (0-based column t)
    be[:, t + 1:] = (be[:, t + 1:] % NB) + 1
    ga[:, t + 1:] += 777
    h_beh, h_item = model.apply({'params': params}, it, be, ga)
    # behavior slots b_1..b_{t+1} and item slots i_1..i_t saw nothing that changed
    np.testing.assert_allclose(h_beh[:, :t + 1], base[0][:, :t + 1], atol=1e-6)
    np.testing.assert_allclose(h_item[:, :t], base[1][:, :t], atol=1e-6)
    assert np.abs(np.asarray(h_beh[:, t + 1:]) - np.asarray(base[0][:, t + 1:])).max() > 1e-4


def test_time_bias_only_in_the_behavior_block(small):
  model, params, items, behaviors, gaps = small
  def blocks(g):
    _, state = model.apply({'params': params}, items, behaviors, g,
                           capture_intermediates=True)
    inter = state['intermediates']
    return (inter['item_attention_blocks_0']['__call__'][0],
            inter['behavior_attention_blocks_0']['__call__'][0])
  item_a, beh_a = blocks(gaps)
  item_b, beh_b = blocks(gaps * 3 + 11)
  np.testing.assert_array_equal(item_a, item_b)
  assert np.abs(np.asarray(beh_a) - np.asarray(beh_b)).max() > 1e-3
  # with all gaps 0 the bias is 0: the behavior block equals a plain causal block
  bias = gear.time_bias(jnp.zeros_like(gaps), H)
  assert float(jnp.abs(bias).max()) == 0.0
  slopes = np.asarray(gear.alibi_slopes(2))
  np.testing.assert_allclose(slopes, [1.0, 1.0 / 16.0])


def test_dropout_only_in_training(small):
  model, params, items, behaviors, gaps = small
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  det_a = model.apply({'params': params}, items, behaviors, gaps, deterministic=True,
                      rngs={'dropout': k1})
  det_b = model.apply({'params': params}, items, behaviors, gaps, deterministic=True,
                      rngs={'dropout': k2})
  np.testing.assert_array_equal(det_a[0], det_b[0])
  tr_a = model.apply({'params': params}, items, behaviors, gaps, deterministic=False,
                     rngs={'dropout': k1})
  tr_b = model.apply({'params': params}, items, behaviors, gaps, deterministic=False,
                     rngs={'dropout': k2})
  tr_a2 = model.apply({'params': params}, items, behaviors, gaps, deterministic=False,
                      rngs={'dropout': k1})
  assert np.abs(np.asarray(tr_a[0]) - np.asarray(tr_b[0])).max() > 1e-3
  assert np.abs(np.asarray(tr_a[0]) - np.asarray(det_a[0])).max() > 1e-3
  np.testing.assert_array_equal(tr_a[0], tr_a2[0])  # same key, same masks
  # the mask keeps 1 - rate of the units and rescales them
  d = layers.Dropout(0.3)
  y = d.apply({}, jnp.ones((400, 500)), False, rngs={'dropout': k1})
  assert abs(float((y != 0).mean()) - 0.7) < 0.005
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.7], rtol=1e-6)


def test_gradients_reach_every_parameter_except_index0_lookups(small):
  model, params, items, behaviors, gaps = small
  batch = {'items': jnp.asarray(items), 'behaviors': jnp.asarray(behaviors),
           'gaps': jnp.asarray(gaps)}
  grads = jax.jit(jax.grad(lambda p: gear.gear_loss(
      p, batch, jax.random.PRNGKey(3), model=model, alpha=0.1, loss_impl='dense')[0]))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  # through the lookups alone (no heads), padding rows get exactly nothing
  probe = jax.random.normal(jax.random.PRNGKey(4), (B, L, D))
  def hidden_only(p):
    return jnp.sum(model.apply({'params': p}, items, behaviors, gaps)[0] * probe)
  g = jax.jit(jax.grad(hidden_only))(params)
  assert float(jnp.abs(g['item_emb']['embedding'][0]).max()) == 0.0
  assert float(jnp.abs(g['behavior_emb']['embedding'][0]).max()) == 0.0
  used = np.unique(items[:, :L - 1][items[:, :L - 1] > 0])
  assert (np.abs(np.asarray(g['item_emb']['embedding'][used])).max(axis=1) > 0).all()


def test_mask_padding_hides_padded_positions(small):
  model, params, items, behaviors, gaps = small
  masked = model.clone(mask_padding=True)
  def run(m, p):
    return m.apply({'params': p}, items, behaviors, gaps)[0]
  # changing what a padded position holds (row 0 of both tables) moves the real
  # positions' outputs only when padding is attended to (the reference behavior)
  noise = jax.random.normal(jax.random.PRNGKey(5), (2, D))  # not a constant: LN removes it
  p2 = dict(params)
  p2['item_emb'] = {'embedding': params['item_emb']['embedding'].at[0].add(noise[0])}
  p2['behavior_emb'] = {'embedding': params['behavior_emb']['embedding'].at[0].add(noise[1])}
  real = behaviors[0] != 0
  diff_ref = np.abs(np.asarray(run(model, params) - run(model, p2)))[0][real].max()
  diff_masked = np.abs(np.asarray(run(masked, params) - run(masked, p2)))[0][real].max()
  assert diff_ref > 1e-3 and diff_masked < 1e-6
  # rows without padding are unaffected by the switch
  np.testing.assert_allclose(run(model, params)[1:], run(masked, params)[1:], atol=1e-6)


def test_catalogue_scoring_helpers(small):
  model, params, items, behaviors, gaps = small
  h_last = model.apply({'params': params}, items, behaviors, gaps)[0][:, -1]
  full = retrieval.score_catalogue(params, h_last, chunk=4, precision=HIGHEST)
  dense = jnp.einsum('bd,vd->bv', h_last, params['item_emb']['embedding'],
                     precision=HIGHEST)
  np.testing.assert_allclose(full, dense, atol=1e-6)
  target = jnp.asarray([1, 5, 13], jnp.int32)
  ranks = retrieval.rank_in_catalogue(params, h_last, target, chunk=4, precision=HIGHEST)
  s = np.asarray(dense)
  for b in range(B):
    others = [v for v in range(1, V + 1) if v != int(target[b])]
    assert int(ranks[b]) == int((s[b, others] >= s[b, int(target[b])]).sum())
  cand = jnp.asarray([[1, 2, 3], [5, 6, 7], [13, 12, 11]], jnp.int32)
  np.testing.assert_allclose(retrieval.score_candidates(params, h_last, cand, HIGHEST),
                             np.take_along_axis(s, np.asarray(cand), 1), atol=1e-6)


# -- top-K over the whole catalogue (recommendation) --------------------------------------

@pytest.mark.parametrize('chunk,group,k', [(8, 4, 7), (64, 4, 7), (64, 32, 7), (8, 2, 37),
                                           (16, 4, 1)])
def test_top_k_in_catalogue_equals_brute_force(chunk, group, k):
  """Ids equal a stable sort of the brute-force scores (ties: lower id first) for k < V
  and k = V (the whole ranking), with per-row exclusions."""
  rng = np.random.default_rng(0)
  v, d, b = 37, 6, 5
  table = rng.normal(size=(v + 1, d)).astype(np.float32)
  table[[5, 9, 30]] = table[2]  # exact ties across chunks and groups: lower id first
  table[[12, 13]] = table[11]
  params = {'item_emb': {'embedding': jnp.asarray(table)}}
  h = jnp.asarray(rng.normal(size=(b, d)).astype(np.float32))
  h = h.at[0].set(jnp.asarray(table[2]))  # row 0 ranks the tied items 2/5/9/30 first
  exclude = np.zeros((b, 4), np.int32)
  exclude[1] = [36, 17, 3, 0]
  exclude[2] = [2, 5, 0, 0]
  hp = jax.lax.Precision.HIGHEST
  scores, ids = jax.jit(lambda p, x, ex: retrieval.top_k_in_catalogue(
      p, x, k, chunk, hp, num_items=v, exclude=ex, group=group))(
          params, h, jnp.asarray(exclude))
  full = np.asarray(retrieval.score_catalogue(params, h, chunk, hp, num_items=v))  # [b, v + 1]
  for r in range(b):
    allowed = [i for i in range(1, v + 1) if i not in set(exclude[r]) - {0}]
    order = sorted(allowed, key=lambda i: (-full[r, i], i))[:k]
    got = list(np.asarray(ids[r]))
    assert got[:len(order)] == order, (r, got, order)
    assert got[len(order):] == [0] * (k - len(order))  # fewer allowed items than k
    np.testing.assert_allclose(np.asarray(scores[r])[:len(order)], full[r, order],
                               rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(scores[r])[len(order):] == -np.inf)
  if k >= 4:
    assert list(np.asarray(ids[0])[:4]) == [2, 5, 9, 30]
  assert not set(np.asarray(ids[1])) & {3, 17, 36}
  assert not set(np.asarray(ids[2])) & {2, 5}
