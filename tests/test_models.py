"""Dense decoder and its layers: shapes, causality, scan == loop, a float64 reference, dtypes, axis metadata.

Tiny configs and few distinct shapes keep jit compile time (which dominates on CPU) small.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalezoo import configs
from scalezoo.models import Attention, SwiGLU, build
from scalezoo.models import layers as layers_module

B, T = 2, 16
# Narrow shapes for the tests that run the real initialisers: on CPU each new parameter shape costs a threefry
# compile of 1-3 s, so q/k/v share a shape (GQA is covered by the tests on `build_random` models) and the
# user-code test reuses the same shapes.
SMALL = dict(width=32, heads=4, kv_heads=4, ffn_width=64, vocab_size=64)


def tiny(**overrides):
  """`dense:tiny` model config (width 64, depth 2, heads 4, kv_heads 2, ffn 192, vocab 256) with overrides."""
  cfg = configs.load("dense:tiny").model
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def tokens(seed: int = 0, shape=(B, T), vocab: int = 256) -> jax.Array:
  # numpy, not jax.random: an eager jax.random call compiles once per shape on CPU, which costs ~1 s.
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def build_random(cfg, seed: int, **options):
  """The model of `cfg` with random weights drawn by numpy instead of its initialisers.

  On CPU every new parameter shape costs a threefry compile (~1-3 s) when initialised eagerly, so tests that
  do not check initialisation build the structure abstractly and fill it: matrices ~ N(0, 1/fan_in) with fan_in
  the input side, norm gains 1 + N(0, 0.3^2) so the place each gain applies matters.
  """
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), **options))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    assert isinstance(var, nnx.Param), path
    if path[-1] == "scale":
      value = 1.0 + 0.3 * rng.standard_normal(var.shape)
    else:
      first_in = [a for a in var.get_metadata()["out_sharding"] if a != "layers"][0]
      fan_in = (cfg.ffn_width if first_in == "mlp" else
                var.shape[-3] * var.shape[-2] if first_in == "heads" else cfg.width)
      value = rng.standard_normal(var.shape) / np.sqrt(fan_in)
    var.set_value(jnp.asarray(value, var.dtype))
  return model


def jit_forward(model):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, tok: nnx.merge(graphdef, s)(tok))
  return lambda tok: fn(state, tok)


def flat_params(model) -> dict:
  return {path: v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def tiny_gqa():
  """dense:tiny (GQA 4:2, tied) with random weights and its jitted forward, shared by tests 1, 2 and 4."""
  cfg = tiny()
  model = build_random(cfg, 0)
  return cfg, model, jit_forward(model)


# ---------------------------------------------------------------------------------------------------------------
# 1. forward


def test_forward_shapes_dtype_finite(tiny_gqa):
  cfg, _, fwd = tiny_gqa
  logits, aux = fwd(tokens())
  assert logits.shape == (B, T, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert isinstance(aux, dict)
  # Logits depend on the tokens (not a constant output).
  assert float(jnp.std(logits)) > 1e-2


def test_forward_of_initialised_model(loop_reference):
  """The real initialisers (the fixture of test 3) give finite, O(1) float32 logits."""
  cfg, _, _, loss, logits, _ = loop_reference
  assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert 0.1 < float(jnp.std(logits)) < 10.0
  assert np.isfinite(float(loss))


# ---------------------------------------------------------------------------------------------------------------
# 2. causality


class _Delta(nnx.Variable):
  """A perturbation added to the embedding output, so we can differentiate w.r.t. the embedded inputs."""


class _PerturbedEmbed(nnx.Module):
  def __init__(self, embed, delta_btd):
    self.inner = embed
    self.delta = _Delta(delta_btd)

  def __call__(self, tokens_bt):
    return self.inner(tokens_bt) + self.delta[...]

  def attend(self, x_btd):
    return self.inner.attend(x_btd)


def test_causal_tokens(tiny_gqa):
  """GQA: changing tokens at positions >= t leaves logits at positions < t bitwise unchanged."""
  cfg, _, fwd = tiny_gqa
  tok = tokens(1)
  logits, _ = fwd(tok)
  t_cut = T // 2
  changed = tok.at[:, t_cut:].set((tok[:, t_cut:] + 17) % cfg.vocab_size)
  logits2, _ = fwd(changed)
  np.testing.assert_array_equal(np.asarray(logits[:, :t_cut]), np.asarray(logits2[:, :t_cut]))
  assert not np.allclose(logits[:, t_cut:], logits2[:, t_cut:])


def test_causal_gradient():
  """GQA + qk-norm: d(logits at positions < t) / d(embedded inputs at positions >= t) == 0 exactly, every t.

  (qk-norm and the norms act per position, so this covers the plain GQA path too; test_causal_tokens checks it.)
  """
  cfg = tiny(qk_norm=True)
  assert cfg.kv_heads < cfg.heads  # grouped-query attention
  model = build_random(cfg, 1)
  tok = tokens(1)
  model.embed = _PerturbedEmbed(model.embed, jnp.zeros((B, T, cfg.width), jnp.float32))
  graphdef, delta, rest = nnx.split(model, _Delta, ...)
  w_btv = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, cfg.vocab_size)), jnp.float32)

  def grad_before(t):
    def f(d):
      logits, _ = nnx.merge(graphdef, d, rest)(tok)
      mask_t = (jnp.arange(T) < t)[None, :, None]
      return jnp.sum(jnp.where(mask_t, logits * w_btv, 0.0))
    (g_btd,) = jax.tree.leaves(jax.grad(f)(delta))
    return g_btd

  grads_tbtd = np.asarray(jax.jit(jax.vmap(grad_before))(jnp.arange(1, T + 1)))  # [t-1, B, T, D]
  for i, t in enumerate(range(1, T + 1)):
    g_btd = grads_tbtd[i]
    assert np.all(g_btd[:, t:] == 0.0), f"logits before {t} depend on inputs at >= {t}"
    # Not vacuous: every position < t influences them.
    assert np.all(np.abs(g_btd[:, :t]).sum(-1) > 0), t


# ---------------------------------------------------------------------------------------------------------------
# 3. scan_layers == loop, with and without remat


def _stack_loop_params(loop_params: dict, depth: int) -> dict:
  """Loop paths ('layers', i, *rest) -> scan paths ('layers', *rest) with the layer index stacked first."""
  out, per_rest = {}, {}
  for path, v in loop_params.items():
    if path[0] == "layers":
      per_rest.setdefault(path[2:], {})[path[1]] = v
    else:
      out[path] = v
  for rest, by_layer in per_rest.items():
    assert sorted(by_layer) == list(range(depth))
    out[("layers",) + rest] = jnp.stack([by_layer[i] for i in range(depth)])
  return out


def _loss_and_grads(model, tok):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(tok)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.roll(tok, -1, axis=1)[..., None], axis=-1)), logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, logits, {path: v[...] for path, v in nnx.to_flat_state(grads)}


@pytest.fixture(scope="module")
def loop_reference():
  cfg = tiny(**SMALL)
  model = build(cfg, rngs=nnx.Rngs(3), scan_layers=False, remat="none")
  tok = tokens(3, vocab=cfg.vocab_size)
  loss, logits, grads = _loss_and_grads(model, tok)
  return cfg, tok, flat_params(model), loss, logits, grads


# Each case is a gradient compile (~5 s on CPU): scan without remat (the trainer's default), scan with full remat,
# loop with dots remat. Remat goes through the same `_layer_fn` in both layouts.
@pytest.mark.parametrize("scan_layers,remat", [(True, "none"), (True, "full"), (False, "dots")])
def test_scan_and_remat_equal_loop(loop_reference, scan_layers, remat):
  cfg, tok, ref_params, ref_loss, ref_logits, ref_grads = loop_reference
  model = build(cfg, rngs=nnx.Rngs(3), scan_layers=scan_layers, remat=remat)
  params = flat_params(model)
  expect_params = _stack_loop_params(ref_params, cfg.depth) if scan_layers else ref_params
  assert params.keys() == expect_params.keys()
  for path in params:
    np.testing.assert_array_equal(np.asarray(params[path]), np.asarray(expect_params[path]), err_msg=str(path))

  if remat != "none":  # the policy is really applied, not silently dropped
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tok))(state)
    assert re.search(r"\b(checkpoint|remat\w*)\b", str(jaxpr))

  loss, logits, grads = _loss_and_grads(model, tok)
  # Scan and loop compile to different fusions, so float32 rounding differs (seen: 1.2e-6 on O(1) logits).
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  expect_grads = _stack_loop_params(ref_grads, cfg.depth) if scan_layers else ref_grads
  assert grads.keys() == expect_grads.keys()
  for path in grads:
    scale = float(jnp.max(jnp.abs(expect_grads[path])))
    np.testing.assert_allclose(grads[path], expect_grads[path], rtol=1e-5, atol=1e-6 * scale, err_msg=str(path))


# ---------------------------------------------------------------------------------------------------------------
# 4. independent float64 reference (numpy), reading the model's weights


def _rmsnorm(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_btnh, theta):
  """Split-half RoPE: the pair (i, i + H/2) rotates by angle pos * theta^(-i / (H/2))."""
  t, h = x_btnh.shape[1], x_btnh.shape[-1]
  half = h // 2
  angle_th = np.arange(t, dtype=np.float64)[:, None] * theta ** (-np.arange(half, dtype=np.float64) / half)
  cos, sin = np.cos(angle_th)[None, :, None, :], np.sin(angle_th)[None, :, None, :]
  x1, x2 = x_btnh[..., :half], x_btnh[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _attention(x_btd, p, cfg):
  q = np.einsum("btd,dnh->btnh", x_btd, p["q"]["kernel"])
  k = np.einsum("btd,dkh->btkh", x_btd, p["k"]["kernel"])
  v = np.einsum("btd,dkh->btkh", x_btd, p["v"]["kernel"])
  if cfg.qk_norm:
    q, k = _rmsnorm(q, p["q_norm"]["scale"]), _rmsnorm(k, p["k_norm"]["scale"])
  q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
  group = cfg.heads // cfg.kv_heads  # query head n reads kv head n // group
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  t, h = x_btd.shape[1], q.shape[-1]
  s_bnqk = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(h)
  s_bnqk = np.where(np.tril(np.ones((t, t), bool)), s_bnqk, -np.inf)
  prob = np.exp(s_bnqk - s_bnqk.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  o_btnh = np.einsum("bnqk,bknh->bqnh", prob, v)
  return np.einsum("btnh,nhd->btd", o_btnh, p["o"]["kernel"])


def _swiglu(x_btd, p):
  g = x_btd @ p["gate"]["kernel"]
  return (g / (1.0 + np.exp(-g)) * (x_btd @ p["up"]["kernel"])) @ p["down"]["kernel"]


def reference_forward(params: dict, tok: np.ndarray, cfg) -> np.ndarray:
  """Llama forward in float64 from a loop-layout `nnx.to_pure_dict` of the model's params."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = p["embed"]["embedding"][tok]
  for i in range(cfg.depth):
    blk = p["layers"][i]["blocks"][0]
    x = x + _attention(_rmsnorm(x, blk["mixer_norm"]["scale"]), blk["mixer"], cfg)
    x = x + _swiglu(_rmsnorm(x, blk["channel_norm"]["scale"]), blk["channel"])
  x = _rmsnorm(x, p["final_norm"]["scale"])
  if cfg.tie_embeddings:
    return x @ p["embed"]["embedding"].T
  return x @ p["head"]["kernel"]


@pytest.mark.parametrize("variant", ["tied_gqa", "untied_qknorm_headdim_mqa"])
def test_matches_reference(tiny_gqa, variant):
  if variant == "tied_gqa":
    cfg, model, fwd = tiny_gqa
  else:  # untied head, qk-norm, head_dim != width / heads, one kv head, another RoPE theta
    cfg = tiny(tie_embeddings=False, qk_norm=True, head_dim=24, kv_heads=1, rope_theta=500.0)
    model = build_random(cfg, 4)
    fwd = jit_forward(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert ("head" in params) == (not cfg.tie_embeddings)
  tok = tokens(4)
  logits, _ = fwd(tok)
  expected = reference_forward(params, np.asarray(tok), cfg)
  np.testing.assert_allclose(np.asarray(logits, np.float64), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 5. bfloat16 compute


def test_bf16_compute_close_to_f32(loop_reference):
  cfg, tok, _, _, logits32, _ = loop_reference  # float32 model from nnx.Rngs(3)
  model16 = build(cfg, rngs=nnx.Rngs(3), compute_dtype="bfloat16")
  for path, v in flat_params(model16).items():
    assert v.dtype == jnp.float32, path
  logits16, _ = jit_forward(model16)(tok)
  assert logits16.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits16)))
  # bf16 has an 8-bit mantissa (relative rounding ~4e-3); a few layers of it stay within a few percent.
  err = float(jnp.max(jnp.abs(logits16 - logits32)))
  assert err < 0.05 * float(jnp.max(jnp.abs(logits32))), err
  assert err > 0.0  # the compute dtype is really used
  # Same argmax almost everywhere.
  assert float(jnp.mean(jnp.argmax(logits16, -1) == jnp.argmax(logits32, -1))) > 0.9


# ---------------------------------------------------------------------------------------------------------------
# 6. logical-axis metadata


def _axis_vocabulary() -> set[str]:
  doc = layers_module.__doc__
  block = doc.split("Axis vocabulary", 1)[1].split("Parameters carry", 1)[0]
  names = {m.group(1) for m in re.finditer(r"^\s+([a-z_]+)\s{2,}", block, re.M)}
  assert {"batch", "seq", "embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers"} <= names, names
  return names


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_param_axis_metadata(scan_layers):
  vocab = _axis_vocabulary()
  # Distinct sizes so every named axis can be checked against its dimension.
  cfg = tiny(depth=3, vocab_size=96, qk_norm=True, tie_embeddings=False, head_dim=8, heads=4, kv_heads=2,
             width=40, ffn_width=112)
  sizes = dict(embed=cfg.width, vocab=cfg.vocab_size, heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=8,
               mlp=cfg.ffn_width, layers=cfg.depth)
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(7), scan_layers=scan_layers))  # metadata only
  n = 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    n += 1
    axes = var.get_metadata().get("out_sharding")
    assert isinstance(axes, tuple) and len(axes) == var.ndim, (path, axes, var.shape)
    assert set(axes) <= vocab, (path, axes)
    for name, dim in zip(axes, var.shape):
      assert dim == sizes[name], (path, axes, var.shape)
    in_layers = path[0] == "layers"
    if scan_layers and in_layers:
      assert axes[0] == "layers" and "layers" not in axes[1:], (path, axes)
    else:
      assert "layers" not in axes, (path, axes)
  assert n > 0


# ---------------------------------------------------------------------------------------------------------------
# 7. single layers in user code, no config and no mesh


def test_layers_in_user_module():
  # --- snippet: what a user writes ---
  class MyBlock(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
      self.attn = Attention(width, heads=4, kv_heads=4, qk_norm=True, rngs=rngs)
      self.mlp = SwiGLU(width, 2 * width, rngs=rngs)

    def __call__(self, x):
      x = x + self.attn(x)
      return x + self.mlp(x)

  block = MyBlock(32, nnx.Rngs(0))
  apply = nnx.jit(lambda block, x: block(x))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 32)), jnp.float32)  # [B, T, D]
  y = apply(block, x)
  # --- end snippet ---
  assert jax.sharding.get_abstract_mesh().empty  # no mesh was needed
  assert y.shape == (2, 8, 32) and y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))
  x2 = x.at[:, 5:].add(1.0)
  y2 = apply(block, x2)
  np.testing.assert_array_equal(np.asarray(y[:, :5]), np.asarray(y2[:, :5]))
  assert not np.allclose(y[:, 5:], y2[:, 5:])
