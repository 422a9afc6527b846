"""``batch_norm_train``, ``BatchNorm`` and the channel-sum kernels, against NumPy and flax.

Every BatchNorm test runs twice: with the CPU channel-sum kernels
(``ftjax.ops.channel_sums``) and with plain XLA sums (``conv_impl("xla")``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.models.layers import BatchNorm
from ftjax.ops import channel_sums
from ftjax.ops import conv as conv_lib
from ftjax.ops.batch_norm import batch_norm_train

EPS = 1e-3


@pytest.fixture(params=["kernels", "xla"], autouse=True)
def sums_impl(request):
  if request.param == "xla":
    with conv_lib.conv_impl("xla"):
      yield request.param
  else:
    # Built by scripts/setup.sh: a missing library fails here instead of testing XLA twice.
    assert channel_sums.available(), channel_sums.unavailable_reason()
    yield request.param


def _data(shape=(4, 5, 3, 6), seed=0, mean=1.5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32) * 2.0 + mean
  c = shape[-1]
  return x, rng.normal(size=c).astype(np.float32), rng.normal(size=c).astype(np.float32)


def _numpy_forward(x, scale, bias):
  """Ioffe & Szegedy Algorithm 1 in float64."""
  x = x.astype(np.float64)
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = x.var(axes)  # biased
  y = scale * (x - mean) / np.sqrt(var + EPS) + bias
  return y, mean, var


def _numpy_backward(x, scale, dy):
  """The closed-form gradient (Ioffe & Szegedy Sec. 3) in float64, written independently."""
  x, dy = x.astype(np.float64), dy.astype(np.float64)
  axes = tuple(range(x.ndim - 1))
  n = np.prod(x.shape[:-1])
  mean, var = x.mean(axes), x.var(axes)
  xhat = (x - mean) / np.sqrt(var + EPS)
  dxhat = dy * scale
  dvar = np.sum(dxhat * (x - mean), axes) * -0.5 * (var + EPS) ** -1.5
  dmean = np.sum(-dxhat / np.sqrt(var + EPS), axes) + dvar * np.mean(-2.0 * (x - mean), axes)
  dx = dxhat / np.sqrt(var + EPS) + dvar * 2.0 * (x - mean) / n + dmean / n
  return dx, np.sum(dy * xhat, axes), np.sum(dy, axes)


def _textbook(x, scale, bias):
  """The same forward in plain JAX, differentiated by JAX itself."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.mean(jnp.square(x - mean), axes)
  return scale * (x - mean) * jax.lax.rsqrt(var + EPS) + bias, mean, var


def test_forward_matches_numpy():
  x, scale, bias = _data()
  y, mean, var = jax.jit(lambda x, s, b: batch_norm_train(x, scale=s, bias=b, epsilon=EPS))(
      x, scale, bias)
  y_ref, mean_ref, var_ref = _numpy_forward(x, scale, bias)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var, var_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mean", [0.0, 20.0])
def test_gradients_match_numpy(mean):
  # mean=20 (std 2): off-centre data. Much further out, E[x^2] - E[x]^2 (flax's
  # variance, kept for identical statistics) loses float32 digits in any formulation.
  x, scale, bias = _data(mean=mean)
  dy = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)

  def f(x, s, b):
    return batch_norm_train(x, scale=s, bias=b, epsilon=EPS)[0]

  _, vjp = jax.vjp(f, x, scale, bias)
  dx, dscale, dbias = jax.jit(vjp)(jnp.asarray(dy))
  dx_ref, dscale_ref, dbias_ref = _numpy_backward(x, scale, dy)
  np.testing.assert_allclose(dx, dx_ref, rtol=2e-3, atol=2e-4)
  np.testing.assert_allclose(dscale, dscale_ref, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-5, atol=1e-4)


def test_gradients_through_the_statistics_match_autodiff():
  # Losses that use the returned mean and variance too (their cotangents reach dx).
  x, scale, bias = _data()
  w = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)

  def loss(fn, x, s, b):
    y, mean, var = fn(x, s, b)
    return jnp.sum(jnp.tanh(y) * w) + jnp.sum(mean ** 2 * s) + jnp.sum(jnp.sqrt(var) * b)

  ours = jax.jit(jax.grad(lambda *a: loss(
      lambda x, s, b: batch_norm_train(x, scale=s, bias=b, epsilon=EPS), *a), argnums=(0, 1, 2)))
  ref = jax.grad(lambda *a: loss(_textbook, *a), argnums=(0, 1, 2))
  for got, want in zip(ours(x, scale, bias), ref(x, scale, bias)):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)


def test_second_order_matches_autodiff():
  x, scale, bias = _data(shape=(3, 4, 5))
  w = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)

  def gradient_penalty(fn, x, s, b):
    gx = jax.grad(lambda x: jnp.sum(jnp.sin(fn(x, s, b)[0]) * w))(x)
    return jnp.sum(gx ** 2)

  ours = jax.grad(lambda *a: gradient_penalty(
      lambda x, s, b: batch_norm_train(x, scale=s, bias=b, epsilon=EPS), *a), argnums=(0, 1, 2))
  ref = jax.grad(lambda *a: gradient_penalty(_textbook, *a), argnums=(0, 1, 2))
  for got, want in zip(ours(x, scale, bias), ref(x, scale, bias)):
    np.testing.assert_allclose(got, want, rtol=5e-3, atol=5e-4)


def test_vmap_is_per_element():
  x, scale, bias = _data(shape=(3, 4, 5, 6))
  batched = jax.vmap(lambda x: batch_norm_train(x, scale=scale, bias=bias, epsilon=EPS)[0])(x)
  for i in range(3):
    np.testing.assert_allclose(batched[i], _numpy_forward(x[i], scale, bias)[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_module_matches_flax_batch_norm(train):
  x, scale, bias = _data(shape=(8, 5, 5, 4))
  ours = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS)
  theirs = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS)
  v_ours, v_theirs = ours.init(jax.random.key(0), x), theirs.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_theirs)
  np.testing.assert_array_equal(v_ours["batch_stats"]["var"], v_theirs["batch_stats"]["var"])
  rng = np.random.default_rng(4)
  variables = {"params": {"scale": scale[:4], "bias": bias[:4]},
               "batch_stats": {"mean": rng.normal(size=4).astype(np.float32),
                               "var": rng.uniform(0.5, 2, size=4).astype(np.float32)}}
  y_ours, s_ours = ours.apply(variables, x, mutable=["batch_stats"])
  y_theirs, s_theirs = theirs.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(s_ours["batch_stats"][k], s_theirs["batch_stats"][k],
                               rtol=1e-5, atol=1e-6)
  if train:  # the statistics moved
    assert not np.allclose(s_ours["batch_stats"]["mean"], variables["batch_stats"]["mean"])


def test_use_running_average_at_call_time():
  x, _, _ = _data(shape=(8, 4))
  module = BatchNorm(momentum=0.9, epsilon=EPS)
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  y = module.apply(variables, x, use_running_average=True)
  np.testing.assert_allclose(y, x / np.sqrt(1 + EPS), rtol=1e-6)


def test_bad_shapes_are_named():
  x, scale, bias = _data()
  with pytest.raises(ValueError, match=r"scale and bias must have shape \(6,\)"):
    batch_norm_train(x, scale=scale[:3], bias=bias, epsilon=EPS)
  with pytest.raises(ValueError, match="rank >= 2"):
    batch_norm_train(x[0, 0, 0], scale=scale, bias=bias, epsilon=EPS)


# ----------------------------------------------------------------------------- channel sums


@pytest.mark.parametrize("shape", [(3, 5), (300, 7), (2, 33, 17, 19), (64, 48, 48, 24)])
def test_channel_sums_match_numpy(shape):
  rng = np.random.default_rng(5)
  x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
  dy = rng.normal(size=shape).astype(np.float32)
  mean = rng.normal(size=shape[-1]).astype(np.float32)
  axes = tuple(range(len(shape) - 1))
  x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
  # Fresh lambdas: jit caches traces per function, and the impl is chosen at trace time.
  total, total_sq = jax.jit(lambda x: channel_sums.moments(x))(x)
  np.testing.assert_allclose(total, x64.sum(axes), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(total_sq, (x64 ** 2).sum(axes), rtol=1e-5)
  sum_dy, sum_centred = jax.jit(
      lambda dy, x, mean: channel_sums.centred_sums(dy=dy, x=x, mean=mean))(dy, x, mean)
  np.testing.assert_allclose(sum_dy, dy64.sum(axes), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(sum_centred, (dy64 * (x64 - mean)).sum(axes), rtol=1e-5, atol=1e-3)


def test_channel_sums_gradients_match_autodiff():
  rng = np.random.default_rng(6)
  x, dy = (rng.normal(size=(6, 4, 5)).astype(np.float32) for _ in range(2))
  mean, w1, w2 = (rng.normal(size=5).astype(np.float32) for _ in range(3))

  def objective(sums_fn):
    def f(x, dy, mean):
      a, b = sums_fn(x, dy, mean)
      return jnp.sum(jnp.sin(a) * w1 + jnp.cos(b) * w2)
    return f

  ours = objective(lambda x, dy, mean: (
      channel_sums.moments(x)[1] + channel_sums.centred_sums(dy=dy, x=x, mean=mean)[0],
      channel_sums.moments(x)[0] * channel_sums.centred_sums(dy=dy, x=x, mean=mean)[1]))
  ref = objective(lambda x, dy, mean: (
      jnp.sum(x * x, (0, 1)) + jnp.sum(dy, (0, 1)),
      jnp.sum(x, (0, 1)) * jnp.sum(dy * (x - mean), (0, 1))))
  for order in (1, 2):
    f_ours, f_ref = ours, ref
    if order == 2:  # a gradient penalty: reverse over reverse
      f_ours = lambda x, dy, m, g=jax.grad(ours): jnp.sum(g(x, dy, m) ** 2)
      f_ref = lambda x, dy, m, g=jax.grad(ref): jnp.sum(g(x, dy, m) ** 2)
    got = jax.jit(jax.grad(f_ours, argnums=(0, 1, 2)))(x, dy, mean)
    want = jax.grad(f_ref, argnums=(0, 1, 2))(x, dy, mean)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)


def test_channel_sums_vmap():
  x = np.random.default_rng(7).normal(size=(3, 10, 4)).astype(np.float32)
  total, total_sq = jax.vmap(lambda x: channel_sums.moments(x))(x)
  np.testing.assert_allclose(total, x.sum(1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(total_sq, (x ** 2).sum(1), rtol=1e-5)


def test_channel_sums_errors_are_named(sums_impl):
  x = np.ones((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
    channel_sums.centred_sums(dy=x, x=x, mean=np.ones(4, np.float32))
  with pytest.raises(ValueError, match="shapes differ"):
    channel_sums.centred_sums(dy=x[:2], x=x, mean=np.ones(3, np.float32))
  with pytest.raises(ValueError, match="rank >= 2"):
    channel_sums.moments(np.ones(3, np.float32))
  if sums_impl == "kernels":  # the C++ handler checks shapes too
    with pytest.raises(Exception, match="x must end in the channel axis"):
      channel_sums._centred_sums_kernel(x, x, np.ones(4, np.float32))  # pylint: disable=protected-access
