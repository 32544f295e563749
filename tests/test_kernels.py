"""The CPU-tuned kernels against their plain autodiff twins (gear_jax.models.kernels), values
and gradients, at the shapes users run: L = 50 gives T = 99 upper positions in two
query blocks; T = 131 splits unevenly into three. With dropout, the time bias, padding
masks, and in bfloat16.

Tolerances: float32 compares two orderings of the same float32 sums (blocked vs whole
softmax, hand-written vs autodiff backward), so differences are rounding, ~1e-6 of the
values' scale: 5e-5 absolute on O(1) values. bfloat16 operands carry 8 bits of mantissa
(relative step 2^-8 = 0.4 %); the two formulations round intermediate products at
different places, so values and gradients may differ by a few bfloat16 steps: 3e-2
absolute on O(1) values, and the float32 cases hold the math to the tight bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gear_jax.models import kernels

HIGHEST = jax.lax.Precision.HIGHEST
TOL = {'float32': 5e-5, 'bfloat16': 3e-2}


def test_query_blocks_at_user_shapes():
  assert kernels.query_blocks(99) == ((0, 50), (50, 99))  # every published config
  assert kernels.query_blocks(131) == ((0, 44), (44, 88), (88, 131))  # uneven
  assert kernels.query_blocks(49) == ((0, 49),)


def _worst(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('t', [99, 131])
@pytest.mark.parametrize('rate,bias,padding', [(0.0, False, False), (0.2, True, False),
                                               (0.2, True, True), (0.2, False, True)])
def test_attend_equals_autodiff(dtype, t, rate, bias, padding):
  dt = jnp.dtype(dtype)
  bh, dh = 6, 16
  keys = jax.random.split(jax.random.key(t), 6)
  q, k, v = (jax.random.normal(kk, (bh, t, dh), jnp.float32).astype(dt) for kk in keys[:3])
  b = (-0.3 * jnp.log1p(jax.random.uniform(keys[3], (bh, t, t)) * 100.0)) if bias else None
  valid = None
  if padding:  # left padding of varying length, as in the input windows
    pad = jnp.arange(bh) * 9
    valid = jnp.arange(t)[None, :] >= pad[:, None]
  seed = jax.random.bits(keys[4], (2,), jnp.uint32) if rate else None
  spec = kernels.AttnSpec(rate, kernels.query_blocks(t), dt,
                          HIGHEST if dtype == 'float32' else None)
  do = jax.random.normal(keys[5], (bh, t, dh), jnp.float32).astype(dt)

  def run(fn):
    out, vjp = jax.vjp(lambda q, k, v, b: fn(q, k, v, b, valid, seed, spec), q, k, v, b)
    return out, vjp(do)

  out, grads = jax.jit(lambda: run(kernels.attend))()
  ref, ref_grads = jax.jit(lambda: run(kernels.attend_reference))()
  tol = TOL[dtype]
  assert _worst(out, ref) < tol
  for name, g, r in zip(('q', 'k', 'v', 'bias'), grads, ref_grads):
    if r is None:
      continue
    scale = max(1.0, float(jnp.max(jnp.abs(r.astype(jnp.float32)))))
    assert _worst(g, r) < tol * scale, (name, _worst(g, r), scale)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('rate', [0.0, 0.2])
def test_ffn_equals_autodiff(dtype, rate):
  dt = jnp.dtype(dtype)
  n, d = 2 * 99, 32
  keys = jax.random.split(jax.random.key(1), 7)
  x = jax.random.normal(keys[0], (n, d)).astype(dt)
  w1 = (jax.random.normal(keys[1], (d, 4 * d)) / np.sqrt(d)).astype(dt)
  b1 = (0.1 * jax.random.normal(keys[2], (4 * d,))).astype(dt)
  w2 = (jax.random.normal(keys[3], (4 * d, d)) / np.sqrt(4 * d)).astype(dt)
  b2 = (0.1 * jax.random.normal(keys[4], (d,))).astype(dt)
  seed = jax.random.bits(keys[5], (2,), jnp.uint32) if rate else None
  spec = kernels.FFNSpec(rate, HIGHEST if dtype == 'float32' else None)
  dy = jax.random.normal(keys[6], (n, d)).astype(dt)

  def run(fn):
    out, vjp = jax.vjp(lambda *a: fn(*a, seed, spec), x, w1, b1, w2, b2)
    return out, vjp(dy)

  out, grads = jax.jit(lambda: run(kernels.ffn))()
  ref, ref_grads = jax.jit(lambda: run(kernels.ffn_reference))()
  tol = TOL[dtype]
  assert _worst(out, ref) < tol * max(1.0, float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))
  for name, g, r in zip(('x', 'w1', 'b1', 'w2', 'b2'), grads, ref_grads):
    scale = max(1.0, float(jnp.max(jnp.abs(r.astype(jnp.float32)))))
    assert _worst(g, r) < tol * scale, (name, _worst(g, r), scale)


def test_implementation_by_name():
  """The two resolved ``model.kernels`` names map to the custom-VJP functions and their
  autodiff twins; an unknown name is refused (the layers look it up when they run)."""
  assert kernels.implementation('cpu') == (kernels.attend, kernels.ffn)
  assert kernels.implementation('xla') == (kernels.attend_reference, kernels.ffn_reference)
  with pytest.raises(ValueError, match="'fast'"):
    kernels.implementation('fast')
  with pytest.raises(ValueError):
    kernels.implementation('auto')  # 'auto' is resolved per platform before this
