"""Chunked item-head cross-entropy vs the dense reference: values, gradients, memory."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gear_jax import losses

HIGHEST = jax.lax.Precision.HIGHEST
# Prime sizes so that no chunk size divides anything by accident.
B, L, D, V = 3, 13, 7, 101  # N = 39 positions


def _data(seed: int = 0, *, b: int = B, l: int = L, d: int = D, v: int = V, zero_frac: float = 0.3):
  k = jax.random.split(jax.random.key(seed), 5)
  hidden = jax.random.normal(k[0], (b, l, d), jnp.float32)
  embedding = jax.random.normal(k[1], (v, d), jnp.float32) * 0.7
  labels = jax.random.randint(k[2], (b, l), 1, v)
  labels = jnp.where(jax.random.uniform(k[3], (b, l)) < zero_frac, 0, labels)
  weights = jax.random.uniform(k[4], (b, l), minval=0.5, maxval=1.5)
  return hidden, embedding, labels, weights


def _value_and_grads(fn, hidden, embedding, labels, weights):
  f = lambda h, e, w: fn(h, e, labels, w)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(hidden, embedding, weights)


DENSE = functools.partial(losses.dense_linear_cross_entropy, precision=HIGHEST)

# (name, fn): chunk sizes that do not divide N = 39 or V = 101, plus chunks larger than N / V.
IMPLS = [
  ("token5", functools.partial(losses.chunked_linear_cross_entropy, token_chunk=5, precision=HIGHEST)),
  ("token16", functools.partial(losses.chunked_linear_cross_entropy, token_chunk=16, precision=HIGHEST)),
  ("token_gt_n", functools.partial(losses.chunked_linear_cross_entropy, token_chunk=64, precision=HIGHEST)),
  ("vocab17", functools.partial(losses.vocab_chunked_linear_cross_entropy, vocab_chunk=17, precision=HIGHEST)),
  ("vocab32", functools.partial(losses.vocab_chunked_linear_cross_entropy, vocab_chunk=32, precision=HIGHEST)),
  ("vocab_gt_v", functools.partial(losses.vocab_chunked_linear_cross_entropy, vocab_chunk=128, precision=HIGHEST)),
  ("auto", functools.partial(losses.linear_cross_entropy, impl="auto", precision=HIGHEST)),
  # A tiny budget forces small chunks through the front door (token then vocab).
  ("front_token", functools.partial(losses.linear_cross_entropy, impl="token", memory_budget_mb=0.01, precision=HIGHEST)),
  ("front_vocab", functools.partial(losses.linear_cross_entropy, impl="vocab", memory_budget_mb=0.01, precision=HIGHEST)),
]


@pytest.mark.parametrize("name,fn", IMPLS, ids=[n for n, _ in IMPLS])
def test_matches_dense_value_and_gradients(name, fn):
  data = _data(1)
  ref_loss, ref_grads = _value_and_grads(DENSE, *data)
  loss, grads = _value_and_grads(fn, *data)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  for g, rg, what in zip(grads, ref_grads, ("hidden", "embedding", "weights")):
    assert g.shape == rg.shape and g.dtype == rg.dtype, what
    np.testing.assert_allclose(g, rg, rtol=1e-5, atol=1e-5, err_msg=what)
  # The padding item's label positions contribute nothing, whatever their weight.
  labels = data[2]
  assert np.all(np.asarray(grads[0])[np.asarray(labels) == 0] == 0)


def test_dense_matches_optax():
  hidden, embedding, labels, weights = _data(2)
  logits = jnp.einsum("bld,vd->blv", hidden, embedding, precision=HIGHEST)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  expected = jnp.sum(ce * weights * (labels != 0))
  np.testing.assert_allclose(DENSE(hidden, embedding, labels, weights), expected, rtol=1e-6)


def test_flat_inputs_and_default_weights():
  hidden, embedding, labels, _ = _data(3, b=1, l=37)
  h, y = hidden[0], labels[0]  # [37, d], [37]
  ref = DENSE(h, embedding, y)
  for _, fn in IMPLS:
    np.testing.assert_allclose(fn(h, embedding, y), ref, rtol=1e-5)
  np.testing.assert_allclose(DENSE(hidden, embedding, labels, None), ref, rtol=1e-6)


@pytest.mark.parametrize("name,fn", [IMPLS[0], IMPLS[3], IMPLS[6]], ids=["token", "vocab", "auto"])
def test_all_labels_padding(name, fn):
  hidden, embedding, labels, weights = _data(4)
  labels = jnp.zeros_like(labels)
  loss, (gh, ge, gw) = _value_and_grads(fn, hidden, embedding, labels, weights)
  assert float(loss) == 0.0
  for g in (gh, ge, gw):
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("name,fn", [IMPLS[0], IMPLS[3]], ids=["token", "vocab"])
def test_custom_vjp_scales_with_cotangent(name, fn):
  hidden, embedding, labels, weights = _data(5)
  grad = lambda c: jax.grad(lambda h, e: c * fn(h, e, labels, weights), argnums=(0, 1))(hidden, embedding)
  for g1, g25 in zip(grad(1.0), grad(2.5)):
    np.testing.assert_allclose(g25, 2.5 * g1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,fn", [IMPLS[1], IMPLS[4]], ids=["token", "vocab"])
def test_inside_bigger_jitted_model(name, fn):
  """Hidden comes from parameters through a nonlinearity; loss is the masked mean."""
  hidden, embedding, labels, _ = _data(6)
  w_proj = jax.random.normal(jax.random.key(7), (D, D)) / np.sqrt(D)

  def model_loss(params, loss_fn):
    h = jnp.tanh(jnp.einsum("bld,de->ble", hidden, params["proj"], precision=HIGHEST))
    total = loss_fn(h, params["emb"], labels, None)
    return total / jnp.maximum(jnp.sum(labels != 0), 1)

  params = {"proj": w_proj, "emb": embedding}
  ref = jax.jit(jax.value_and_grad(functools.partial(model_loss, loss_fn=DENSE)))(params)
  got = jax.jit(jax.value_and_grad(functools.partial(model_loss, loss_fn=fn)))(params)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  for k in params:
    np.testing.assert_allclose(got[1][k], ref[1][k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("impl", ["token", "vocab", "dense"])
def test_bfloat16_compute(impl):
  hidden, embedding, labels, weights = _data(8)
  fn32 = functools.partial(losses.linear_cross_entropy, impl=impl, memory_budget_mb=0.01)
  fn16 = functools.partial(fn32, compute_dtype=jnp.bfloat16)
  loss32, _ = _value_and_grads(fn32, hidden, embedding, labels, weights)
  loss16, grads16 = _value_and_grads(fn16, hidden, embedding, labels, weights)
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  for g in grads16:
    assert g.dtype == jnp.float32 and np.all(np.isfinite(g))


def _temp_bytes(fn, n: int, v: int, d: int) -> int | None:
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  e = jax.ShapeDtypeStruct((v, d), jnp.float32)
  y = jax.ShapeDtypeStruct((n,), jnp.int32)
  w = jax.ShapeDtypeStruct((n,), jnp.float32)
  grad = jax.grad(lambda h, e, y, w: fn(h, e, y, w), argnums=(0, 1))
  analysis = jax.jit(grad).lower(h, e, y, w).compile().memory_analysis()
  return None if analysis is None else analysis.temp_size_in_bytes


def test_chunked_versions_use_a_fraction_of_dense_memory():
  n, v, d = 2048, 50_000, 32
  dense = _temp_bytes(losses.dense_linear_cross_entropy, n, v, d)
  if dense is None:
    pytest.skip("compiled.memory_analysis() returns None on this platform")
  token = _temp_bytes(functools.partial(losses.chunked_linear_cross_entropy, token_chunk=128), n, v, d)
  vocab = _temp_bytes(functools.partial(losses.vocab_chunked_linear_cross_entropy, vocab_chunk=2048), n, v, d)
  # Dense holds at least the [N, V] float32 logits; the chunked versions must not.
  assert dense >= n * v * 4
  assert token < dense / 4, (token, dense)
  assert vocab < dense / 4, (vocab, dense)
  assert token < n * v * 4 / 4 and vocab < n * v * 4 / 4


def test_plan_chunks():
  plan = losses.plan_chunks(6400, 99_038, 256.0)
  assert plan["impl"] == "token" and plan["vocab_chunk"] is None
  assert 64 <= plan["token_chunk"] <= 4096 and plan["fits_budget"]
  assert plan["token_chunk"] * 99_038 * 12 <= 256 * 2**20
  plan = losses.plan_chunks(6400, 874_307, 64.0)
  assert plan["impl"] == "vocab" and plan["token_chunk"] is None
  assert plan["vocab_chunk"] % 128 == 0 and plan["fits_budget"]
  assert plan["num_chunks"] * plan["vocab_chunk"] >= 874_307
  # Everything fits in one chunk: no padding, a single token chunk.
  plan = losses.plan_chunks(37, 101, 256.0)
  assert plan == dict(plan, impl="token", token_chunk=37, num_chunks=1)
  # Token chunks where the plan wants vocabulary chunks (a sharded table keeps to token
  # chunks): as many tokens as the budget holds, not a fixed 8. ijcai on 2 shards:
  # 874,307 / 2 items per device -> 32 tokens (168 MB) -> 200 scan steps instead of 800.
  assert losses.plan_chunks(6400, 437_154, 256.0)["impl"] == "vocab"
  assert losses.token_chunk_for(6400, 437_154, 256.0) == 32
  assert 32 * 437_154 * 12 <= 256 * 2**20
  assert losses.token_chunk_for(6400, 437_154, 0.01) == 8  # the floor
  # Unknown implementations are rejected.
  with pytest.raises(ValueError):
    losses.linear_cross_entropy(*_data(0), impl="nope")


def test_masked_mean_cross_entropy():
  k = jax.random.split(jax.random.key(9), 2)
  logits = jax.random.normal(k[0], (3, 11, 5))
  labels = jax.random.randint(k[1], (3, 11), 0, 5)
  total, count = losses.masked_mean_cross_entropy(logits, labels)
  ce = -jax.nn.log_softmax(logits)[jnp.arange(3)[:, None], jnp.arange(11)[None, :], labels]
  mask = np.asarray(labels) != 0
  np.testing.assert_allclose(total, np.sum(np.asarray(ce)[mask]), rtol=1e-6)
  assert count.dtype == jnp.float32 and float(count) == mask.sum()
  total0, count0 = losses.masked_mean_cross_entropy(logits, jnp.zeros_like(labels))
  assert float(total0) == 0.0 and float(count0) == 0.0
