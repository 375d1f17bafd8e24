"""Linear-attention mixers (models/linear/layers.py, delta_layers.py, conv.py): each layer against a float64 NumPy
token-by-token reference written from the spec, split decoding (prefill, a chunk, single tokens) against the
training form, causality, parameter counts, dims, lower bounds, gate inits and the op FLOP formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalezoo.models.linear import delta, ops
from scalezoo.models.linear import layers as L

B, T, WIDTH, CHUNK = 2, 36, 32, 32  # chunk 32: T spans two chunks of two 16-row sub-chunks
SPLIT = 13  # step over [0, 13), then [13, 26) as one chunk, then single tokens
T0 = 21  # causality: inputs at t >= T0 are changed
EXTRA = {"hgrn2": dict(heads=2)}  # two heads, so the full-hidden norm differs from a per-head one


def _rng(seed):
  return np.random.default_rng(seed)


def _build(name, seed=0):
  """The mixer with random parameters well away from its init (weights std 0.2, random gains, biases and decay
  parameters), so gates vary across tokens and channels. Built abstractly and filled from NumPy: cheap."""
  m = nnx.eval_shape(lambda: L.make_linear_mixer(name, WIDTH, rngs=nnx.Rngs(0), chunk_size=CHUNK,
                                                 **EXTRA.get(name, {})))
  rng = _rng(seed)

  def fill(path, v):
    key, shape = str(getattr(path[-1], "key", path[-1])), v.shape
    if key in ("kernel", "weight"):
      x = 0.2 * rng.standard_normal(shape)
    elif key in ("scale", "norm_scale"):
      x = 1.0 + 0.3 * rng.standard_normal(shape)
    elif key == "a_log":
      x = np.log(rng.uniform(0.5, 4.0, shape))
    elif key == "dt_bias":
      x = rng.normal(-3.0, 1.0, shape)
    else:  # gate bias
      x = rng.standard_normal(shape)
    return jnp.asarray(x, jnp.float32)

  nnx.update(m, jax.tree.map_with_path(fill, nnx.state(m, nnx.Param)))
  return m


# ---- float64 NumPy reference, from the spec's equations ----

def _lin(x, w, n_in=1):
  return np.tensordot(x, w, axes=(list(range(x.ndim - n_in, x.ndim)), list(range(n_in))))


def _p(module_attr):
  return np.asarray(module_attr[...], np.float64)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _silu(x):
  return x * _sigmoid(x)


def _rms(x, w, axes=(-1,)):
  return x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + 1e-6) * w


def _rope(x, pos):
  half = x.shape[-1] // 2
  ang = pos[..., None] * 10000.0 ** (-np.arange(half) / half)
  sin, cos = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _conv(x, w):
  xp = np.concatenate([np.zeros((x.shape[0], w.shape[0] - 1) + x.shape[2:]), x], 1)
  return _silu(sum(xp[:, i:i + x.shape[1]] * w[i] for i in range(w.shape[0])))


def _l2(x):
  return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)


def _recurrence(q, k, v, alpha, beta=None):
  """S_t = alpha_t (I - beta_t k k^T) S_{t-1} + beta_t k v^T (beta None: S_t = alpha_t S_{t-1} + k v^T);
  o_t = S_t^T q_t / sqrt(K); alpha [B, T, H] or [B, T, H, K]."""
  b, t, h, kd = q.shape
  s = np.zeros((b, h, kd, v.shape[-1]))
  out = []
  for i in range(t):
    a = alpha[:, i] if alpha.ndim == 4 else alpha[:, i, :, None]
    s = a[..., None] * s
    if beta is None:
      s = s + k[:, i, :, :, None] * v[:, i, :, None, :]
    else:
      u = beta[:, i, :, None] * (v[:, i] - np.einsum("bhk,bhkv->bhv", k[:, i], s))
      s = s + k[:, i, :, :, None] * u[:, :, None, :]
    out.append(np.einsum("bhk,bhkv->bhv", q[:, i] * kd ** -0.5, s))
  return np.stack(out, 1)


def reference(name, m, x, lb=None):
  """The mixer's output for x [B, T, D] (positions 0..T-1) in float64."""
  pos = np.broadcast_to(np.arange(x.shape[1], dtype=np.float64), x.shape[:2])
  lin = lambda mod: _lin(x, _p(mod.kernel))  # noqa: E731
  out = lambda o, mod: _lin(o, _p(mod.kernel), n_in=o.ndim - 2)  # noqa: E731
  if name in ("hgrn", "hgrn2"):
    lb = np.zeros(WIDTH) if lb is None else np.asarray(lb, np.float64)
    alpha = lb + (1 - lb) * _sigmoid(_lin(x, _p(m.f.kernel).reshape(WIDTH, WIDTH)))  # [B, T, D]
  if name == "hgrn":
    h, hs = np.zeros((x.shape[0], WIDTH)), []
    for t in range(x.shape[1]):
      h = alpha[:, t] * h + _silu(lin(m.i))[:, t] * (1 - alpha[:, t])
      hs.append(h)
    return out(_rms(np.stack(hs, 1), _p(m.norm.scale)) * _silu(lin(m.g)), m.o)
  if name == "hgrn2":
    hd = alpha.reshape(alpha.shape[:2] + (m.heads, m.key_dim))
    o = _recurrence(_silu(lin(m.q)), 1 - hd, lin(m.i), hd)
    return out(_rms(o, _p(m.norm_scale), axes=(-2, -1)), m.o)
  if name == "retnet":
    gamma_bth = np.broadcast_to(1 - 2.0 ** (-5.0 - np.arange(m.heads)), pos.shape + (m.heads,))
    o = _recurrence(_rope(lin(m.q), pos), _rope(lin(m.k), pos), lin(m.v), gamma_bth)
  elif name == "gla":
    gk = _lin(_lin(x, _p(m.gate_down.kernel)), _p(m.gate_up.kernel)) + _p(m.gate_bias)
    o = _recurrence(lin(m.q), lin(m.k), lin(m.v), np.exp(-np.logaddexp(0, -gk) / 16))
  else:
    q, k = (_l2(_conv(lin(p), _p(c.weight))) for p, c in ((m.q, m.conv_q), (m.k, m.conv_k)))
    v, beta = _conv(lin(m.v), _p(m.conv_v.weight)), _sigmoid(lin(m.b))
    alpha = np.ones(beta.shape)
    if name == "gated_deltanet":
      alpha = np.exp(-np.exp(_p(m.a_log)) * np.logaddexp(0, lin(m.a) + _p(m.dt_bias)))
    o = _recurrence(q, k, v, alpha, beta)
  y = _rms(o, _p(m.norm.scale))
  if name != "deltanet":
    y = y * _silu(lin(m.g))
  return out(y, m.o)


# ---- tests ----

def _split_decode(m, x, pos, context):
  """step() from init_cache over [0, 13), then [13, 26) (one scan over two 13-token steps: the first a prefill from
  zero state, the second a chunk continuing from a nonzero state and conv cache), then single tokens."""
  cache = m.init_cache(x.shape[0], x.shape[1])
  span = 2 * SPLIT

  def step(cache, xs):
    y, cache = m.step(xs[0], xs[1], cache, context=context)
    return cache, y

  def steps(cache, x_btd, pos_bt, n):  # n steps of T / n tokens each: [B, T, ...] -> [n, B, T / n, ...]
    xs = [jnp.moveaxis(a.reshape(a.shape[0], n, -1, *a.shape[2:]), 1, 0) for a in (x_btd, pos_bt)]
    cache, y_nbtd = jax.lax.scan(step, cache, xs)
    return cache, jnp.moveaxis(y_nbtd, 0, 1).reshape(x_btd.shape[0], -1, x_btd.shape[-1])

  cache, y_chunks = steps(cache, x[:, :span], pos[:, :span], 2)
  _, y_tokens = steps(cache, x[:, span:], pos[:, span:], x.shape[1] - span)
  return jnp.concatenate([y_chunks, y_tokens], axis=1)


@pytest.mark.parametrize("name", L.LINEAR_MIXERS)
def test_mixer_matches_reference_split_decoding_and_is_causal(name):
  """One compile per mixer: the training form on [x; x with t >= T0 changed] and split decoding of x."""
  m = _build(name)
  rng = _rng(1)
  x = rng.standard_normal((B, T, WIDTH)).astype(np.float32)
  x_changed = x.copy()
  x_changed[:, T0:] = rng.standard_normal((B, T - T0, WIDTH))
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  lb = None
  if m.takes_context:  # a bound in (0, 0.9) with some channels exactly 0, as layer 0 has
    lb = rng.uniform(0.0, 0.9, WIDTH).astype(np.float32)
    lb[::5] = 0.0
  graphdef, state = nnx.split(m)

  @jax.jit
  def run(state, x2, pos2, lb):
    mod = nnx.merge(graphdef, state)
    full = mod(x2, pos2, context=lb)
    return full, _split_decode(mod, x2[:B], pos2[:B], lb)

  full, split = jax.device_get(run(state, np.concatenate([x, x_changed]), np.concatenate([pos, pos]), lb))
  ref = reference(name, m, x.astype(np.float64), lb)
  scale = np.abs(ref).max()
  assert 1e-2 < scale < 1e3 and np.all(np.isfinite(full)) and np.all(np.isfinite(split))
  np.testing.assert_allclose(full[:B], ref, atol=2e-5 * scale, rtol=1e-4, err_msg="training form vs reference")
  np.testing.assert_allclose(split, full[:B], atol=1e-5 * scale, rtol=1e-4, err_msg="split decoding vs training form")
  np.testing.assert_allclose(full[B:, :T0], full[:B, :T0], atol=1e-6 * scale, rtol=0, err_msg="not causal")
  assert np.abs(full[B:, T0:] - full[:B, T0:]).min(axis=-1).max() > 1e-3 * scale
  # The built module holds exactly the parameters mixer_param_count says.
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert n_params == L.mixer_param_count(name, WIDTH, **EXTRA.get(name, {}))
  cache = m.init_cache(B, 1000)
  assert cache["state"].dtype == jnp.float32 and not np.any(np.asarray(cache["state"]))


def test_mixer_dims_defaults_and_errors():
  dims = lambda *a, **k: tuple(L.mixer_dims(*a, **k).values())  # noqa: E731
  # The spec's stated sizes: hidden 1024 (retnet, gla, hgrn2, deltanet), 2048 (gated_deltanet).
  assert dims("retnet", 1024) == (8, 128, 256)
  assert dims("gla", 1024) == (4, 128, 256)
  assert dims("hgrn2", 1024) == (8, 128, 128)
  assert dims("hgrn2", 64) == (1, 64, 64)
  assert dims("deltanet", 1024) == (8, 128, 128)
  assert dims("gated_deltanet", 2048) == (6, 256, 512)
  assert dims("hgrn", 96, heads=5, head_dim=7) == (1, 96, 96)
  # Overrides: head_dim sets K (V by expand_v), heads sets H, one alone keeps the spec's key width.
  assert dims("gated_deltanet", 2048, head_dim=128) == (12, 128, 256)
  assert dims("gated_deltanet", 2048, heads=4) == (4, 384, 768)
  assert dims("gla", 1024, heads=8, head_dim=32) == (8, 32, 64)
  assert dims("retnet", 1024, head_dim=64) == (16, 64, 128)
  assert dims("hgrn2", 1024, heads=4) == (4, 256, 256)
  for args in (("retnet", 100), ("gla", 72, 5), ("deltanet", 1024, 0, 48), ("gated_deltanet", 30),
               ("hgrn2", 96, 2, 32), ("retnet", 24, 8), ("attention", 64)):
    with pytest.raises(ValueError):
      L.mixer_dims(*args)
  # Gated DeltaNet at 2048 with the defaults: about 6 width^2 parameters per layer (spec 3.6).
  n = L.mixer_param_count("gated_deltanet", 2048)
  assert n == 25_215_500 and abs(n / 2048 ** 2 - 6) < 0.02  # 6.012 width^2
  assert L.mixer_matmul_params("gated_deltanet", 2048) == 25_190_400  # 6.006 width^2


def test_lower_bound_and_hgrn2_gradients():
  depth = 4
  lbs = np.asarray(L.LowerBound(depth, WIDTH)())
  assert lbs.dtype == np.float32 and lbs.shape == (depth, WIDTH)
  np.testing.assert_allclose(lbs, np.broadcast_to(np.arange(depth)[:, None] / depth, lbs.shape), atol=1e-6)
  assert np.all(lbs[0] == 0.0) and np.all(np.diff(lbs, axis=0) > 0)
  # HGRN-2 at layer 0 of a random-Lambda LowerBound: context exactly zeros, the double-where branch.
  bound = L.LowerBound(depth, WIDTH)
  bound.lambdas[...] = jnp.asarray(_rng(3).standard_normal((depth, WIDTH)), jnp.float32)
  graphdef, params = nnx.split((_build("hgrn2"), bound), nnx.Param)
  x = jnp.asarray(_rng(2).standard_normal((1, 16, WIDTH)), jnp.float32)

  @jax.jit
  def grads(params):
    def loss(params):
      mixer, lower_bound = nnx.merge(graphdef, params)
      lb_d = lower_bound()[0]
      return jnp.sum(mixer(x, jnp.arange(16)[None], context=lb_d) ** 2), lb_d
    return jax.grad(loss, has_aux=True)(params)

  g, lb_d = jax.device_get(grads(params))
  assert np.all(lb_d == 0)
  g_mixer, g_bound = jax.tree.leaves(g[0]), jax.tree.leaves(g[1])
  assert len(g_mixer) == 5 and all(np.all(np.isfinite(a)) and np.abs(a).max() > 0 for a in g_mixer)
  assert np.all(g_bound[0] == 0)  # layer 0 is unbounded whatever Lambda is


def test_gated_deltanet_gate_init():
  from scalezoo.models.linear import delta_layers

  @jax.jit
  def draw():
    m = L.make_linear_mixer("gated_deltanet", WIDTH, rngs=nnx.Rngs(0))
    many = delta_layers.a_log_init(jax.random.key(0), (4096,)), delta_layers.dt_bias_init(jax.random.key(1), (4096,))
    return (m.a_log[...], m.dt_bias[...]), many

  for a_log, dt_bias in jax.device_get(draw()):  # the module's 6 heads, then 4096 draws for the statistics
    a, dt = np.exp(a_log), np.asarray(jax.nn.softplus(dt_bias))
    assert np.all((a > 0) & (a < 16)) and np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))
  assert abs(a.mean() - 8) < 0.3 and abs(a.std() - 16 / 12 ** 0.5) < 0.2  # U(0, 16)
  assert abs(np.log(dt).mean() - np.log(1e-3 * 0.1) / 2) < 0.1  # log-uniform: mean log at the geometric middle
  assert abs(np.log(dt).std() - np.log(100) / 12 ** 0.5) < 0.1


@pytest.mark.parametrize("kind", ["retnet", "gla", "deltanet"])
def test_op_flops_against_xla_cost_analysis(kind):
  """mixer_op_flops over one 64-token chunk is within a few percent of XLA's count of the compiled op (which also
  counts selects, so reads a little more; it counts a scan body once, hence a single chunk)."""
  h, k, t = 2, 16, 64
  v = k if kind == "deltanet" else 2 * k
  rng = _rng(4)
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
  q, kk, vv, s0 = arr(1, t, h, k), arr(1, t, h, k), arr(1, t, h, v), arr(1, h, k, v)
  gate = arr(1, t, h, k) if kind == "gla" else arr(1, t, h)
  if kind == "deltanet":
    fn = lambda q, k, v, g, s: delta.chunk_delta_rule(q, k, v, g, initial_state=s)  # noqa: E731
  else:
    fn = lambda q, k, v, g, s: ops.chunk_gla(q, k, v, g, initial_state=s)  # noqa: E731
  cost = jax.jit(fn).lower(q, kk, vv, gate, s0).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
  ours = L.mixer_op_flops(kind, WIDTH, t, heads=h, head_dim=k) * t
  candidates = [ours]
  if kind == "deltanet":
    ours -= 2 * 4 * h * (2 * k + v) * t  # the convs are not part of the op
    candidates = [ours, ours - h * t * t * (k + v)]  # XLA on CPU counts the triangular solve as nothing
  assert any(0.97 < xla / c < 1.1 for c in candidates), (xla, candidates)
