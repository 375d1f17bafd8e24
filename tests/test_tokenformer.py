"""Family `tokenformer`: Pattention's invariants, growth by parameter tokens, counts, decoding and sharding.

Models are initialised inside one jit (each eager initialiser would compile on its own) and each comparison is one
jitted function, so each config costs a compile or two.
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalezoo import configs
from scalezoo.configs import ConfigError
from scalezoo.models import build, flops_per_token, param_counts
from scalezoo.models.attention import Attention
from scalezoo.models.layers import rope
from scalezoo.models.pattention import NORMS, Pattention, pattention
from scalezoo.models.tokenformer import check_config, grow_params
from scalezoo.train.validate import validate
from tests.test_hybrid import _forward_and_decode
from tests.test_registry import xla_flops_per_token
from tests.test_trainer import ONE_DEVICE, _run_steps, tiny_cfg, train_batches

pytestmark = pytest.mark.usefixtures("fast_compile")


def tf_cfg(tau=None, **tokens):
  """tokenformer:tiny's model config with other token counts; `tau` None keeps tiny's (sqrt of 64, 64, 256)."""
  cfg = configs.load("tokenformer:tiny").model
  cfg.tokenformer.update(tokens)
  if tau is not None:
    cfg.tokenformer.tau.update(tau)
  return cfg


def built(cfg, **options):
  """The model with its initialisers' weights, initialised in one compiled program."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), **options)))
  state = jax.jit(lambda: nnx.state(build(cfg, rngs=nnx.Rngs(0), **options)))()
  return nnx.merge(graphdef, state)


def abstract_params(cfg, **options):
  return nnx.state(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), **options)), nnx.Param)


def tokens(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape), jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# Pattention


def test_pattention_invariants():
  """Shapes as Linear(24, (3, 8)); permuting (key, value) token pairs together changes nothing (every norm);
  Patt(cX) = Patt(X) for l2_norm_gelu (eps tiny next to sum A^2); `grow` with zero keys keeps the output of both
  l2 variants while tau stays, and changes it with tau = sqrt(n_new) or with softmax (exp(0) takes mass)."""
  rngs = nnx.Rngs(0)
  layers = {norm: Pattention(24, (3, 8), 32, tau=math.sqrt(32), norm=norm, rngs=rngs, value_std=0.1, eps=1e-12,
                             in_axis="embed", out_axes=("heads", "head_dim")) for norm in NORMS}
  grown = {}
  for norm, p in layers.items():
    grown[norm] = copy.deepcopy(p)
    grown[norm].grow(8, nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 5, 24))
  perm = np.random.default_rng(0).permutation(32)

  @jax.jit
  def run(layers, grown, x):
    out = {}
    for norm, p in layers.items():
      k, v = p.key_tokens[...], p.value_tokens[...]
      call = lambda x, k, v, tau=p.tau: pattention(x, k, v, n_in=1, tau=tau, norm=norm, eps=p.eps)
      out[norm] = dict(y=p(x), permuted=call(x, k[perm], v[perm]), scaled=[call(c * x, k, v) for c in (0.3, 7.0)],
                       grown=grown[norm](x), grown_retau=call(x, grown[norm].key_tokens[...],
                                                          grown[norm].value_tokens[...], tau=math.sqrt(40)))
    return out

  out = run(layers, grown, x)
  for norm in NORMS:
    o = out[norm]
    assert o["y"].shape == (2, 5, 3, 8)
    np.testing.assert_allclose(o["permuted"], o["y"], rtol=1e-5, atol=1e-6, err_msg=norm)
  for scaled in out["l2_norm_gelu"]["scaled"]:
    np.testing.assert_allclose(scaled, out["l2_norm_gelu"]["y"], rtol=1e-5, atol=1e-6)
  g = grown["l2_norm_gelu"]
  assert g.n_tokens == 40 and g.value_tokens.shape == (40, 3, 8)
  np.testing.assert_array_equal(g.key_tokens[32:], 0.0)
  np.testing.assert_array_equal(g.key_tokens[:32], layers["l2_norm_gelu"].key_tokens[...])
  for norm in ("l2_norm_gelu", "gelu_l2_norm"):
    np.testing.assert_allclose(out[norm]["grown"], out[norm]["y"], rtol=0, atol=1e-6, err_msg=norm)
    assert np.max(np.abs(out[norm]["grown_retau"] - out[norm]["y"])) > 1e-3, norm
  assert np.max(np.abs(out["softmax"]["grown"] - out["softmax"]["y"])) > 1e-3


def test_partial_rope_rotates_only_the_leading_dims():
  """rope_fraction 0.25 of head_dim 16: the first 4 dims as RoPE of a 4-wide head, the other 12 untouched; the
  default 1.0 is plain RoPE over the whole head."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 3, 16))
  pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32) + 5, (2, 6))
  quarter = nnx.eval_shape(lambda: Attention(48, 3, 3, rngs=nnx.Rngs(0), rope_fraction=0.25))
  whole = nnx.eval_shape(lambda: Attention(48, 3, 3, rngs=nnx.Rngs(0)))
  assert quarter.rope_dims == 4 and whole.rope_dims == 16
  y = quarter._rope(x, pos)
  np.testing.assert_array_equal(y[..., 4:], x[..., 4:])
  np.testing.assert_allclose(y[..., :4], rope(x[..., :4], pos), rtol=1e-6)
  np.testing.assert_array_equal(whole._rope(x, pos), rope(x, pos))
  with pytest.raises(ValueError, match="rotary dims"):
    Attention(48, 3, 3, rngs=nnx.Rngs(0), rope_fraction=0.1)  # int(16 x 0.1) = 1 is odd


# ---------------------------------------------------------------------------------------------------------------
# growth


def test_growth_keeps_the_logits_only_with_tau_kept():
  """Every Pattention grows (+16 qkv/proj, +64 ffn tokens) through grow_params on a scanned model: old tokens
  first, new key tokens exactly 0, new value tokens their fresh init; the logits are identical with tau kept at
  sqrt(n_old) and differ when tau is recomputed as sqrt(n_new), the public code's trap."""
  small, big = tf_cfg(), tf_cfg(qkv_tokens=80, proj_tokens=80, ffn_tokens=320)
  retau = tf_cfg(qkv_tokens=80, proj_tokens=80, ffn_tokens=320, tau=dict(qkv=math.sqrt(80), proj=math.sqrt(80),
                                                                         ffn=math.sqrt(320)))
  old_model = built(small, scan_layers=True)
  old = nnx.state(old_model, nnx.Param)
  graphdef, fresh, rest = nnx.split(built(big, scan_layers=True), nnx.Param, ...)
  grown = grow_params(old, fresh)

  old_flat, fresh_flat = dict(nnx.to_flat_state(old)), dict(nnx.to_flat_state(fresh))
  for path, v in nnx.to_flat_state(grown):
    new, before = np.asarray(v.get_value()), np.asarray(old_flat[path].get_value())
    if new.shape == before.shape:
      np.testing.assert_array_equal(new, before)
      continue
    n = before.shape[1]  # [layers, param_tokens, ...]
    np.testing.assert_array_equal(new[:, :n], before)
    expected_rest = 0.0 if path[-1] == "key_tokens" else np.asarray(fresh_flat[path].get_value())[:, n:]
    np.testing.assert_array_equal(new[:, n:], expected_rest)
  assert {p[-2:] for p, v in nnx.to_flat_state(grown) if v.shape != old_flat[p].shape} >= {
      ("q", "key_tokens"), ("k", "value_tokens"), ("o", "key_tokens"), ("channel", "value_tokens")}

  retau_graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(retau, rngs=nnx.Rngs(0), scan_layers=True)))
  toks = tokens((2, 24))

  @jax.jit
  def logits(old_model, grown, rest, toks):
    return (old_model(toks)[0], nnx.merge(graphdef, grown, rest)(toks)[0],
            nnx.merge(retau_graphdef, grown, rest)(toks)[0])

  before, after, after_retau = logits(old_model, grown, rest, toks)
  # Identical in exact arithmetic; float32 sums over 80 / 320 instead of 64 / 256 tokens reassociate, and two layers
  # of LayerNorm carry that to logits of size ~2 as ~3e-6 (a float64 run of the same test differs by 7e-7, the
  # float32 rounding of its logits). The recomputed tau moves them by ~0.1.
  np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=0, atol=1e-5)
  assert np.max(np.abs(np.asarray(after_retau) - np.asarray(before))) > 1e-2


BAD_GROWTH = [
    pytest.param(dict(ffn_tokens=128), {}, "channel/key_tokens.*model.tokenformer.ffn_tokens shrinks \\(256 -> 128\\)",
                 id="fewer_ffn_tokens"),
    pytest.param(dict(proj_tokens=32), {}, "mixer/o/key_tokens.*model.tokenformer.proj_tokens shrinks",
                 id="fewer_proj"),
    pytest.param(dict(width=96, heads=4), {}, "embed/embedding: old shape \\(256, 64\\), new shape \\(256, 96\\)",
                 id="other_width"),
    pytest.param(dict(depth=3), dict(scan_layers=False), "layers/2/.* missing from the old one", id="deeper"),
]


@pytest.mark.parametrize("new,options,needle", BAD_GROWTH)
def test_grow_params_rejects_what_is_not_token_growth(new, options, needle):
  """Abstract states suffice: every leaf is checked before anything is computed."""
  fresh_cfg = tf_cfg()
  for k, v in new.items():
    (fresh_cfg.tokenformer if k.endswith("_tokens") else fresh_cfg)[k] = v
  options = options or dict(scan_layers=True)
  old, fresh = abstract_params(tf_cfg(), **options), abstract_params(fresh_cfg, **options)
  with pytest.raises(ValueError, match=needle) as e:
    grow_params(old, fresh)
  assert "\n" not in str(e.value) and "only appends parameter tokens" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# counts


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_param_counts_match_built_model(scan_layers):
  cfg = tf_cfg(qkv_tokens=48, proj_tokens=40, ffn_tokens=200)
  params = nnx.to_flat_state(abstract_params(cfg, scan_layers=scan_layers))
  counts = param_counts(cfg)
  assert counts["total"] == sum(math.prod(v.shape) for _, v in params)
  assert counts["embedding"] == sum(math.prod(v.shape) for _, v in params
                                    if "vocab" in v.get_metadata()["out_sharding"])
  assert counts["active"] == counts["total"] == counts["embedding"] + counts["non_embedding"]
  # Spec: 2 width (3 n_qkv + n_proj + n_ffn) per layer, no block-norm parameters; the final norm has 2 width.
  assert counts["non_embedding"] == cfg.depth * 2 * 64 * (3 * 48 + 40 + 200) + 2 * 64


# The paper's Pile models: (total, non-embedding) in millions, as the spec's table gives them.
PAPER = {"150M": (151.9, 113.2), "450M": (454.2, 402.7), "900M": (903.2, 838.9), "1.5B": (1587.2, 1509.9)}


@pytest.mark.parametrize("size", list(PAPER))
def test_paper_sizes_match_the_table(size):
  """The table rounds to 0.1M and leaves out the final norm's 2 width parameters (900M: 903.2499M without them,
  903.2525M with them), so the count without that norm lies within half the last digit of each entry."""
  cfg = configs.load(f"tokenformer:{size}").model
  counts = param_counts(cfg)
  total, non_embedding = PAPER[size]
  final_norm = 2 * cfg.width
  assert abs(counts["total"] - final_norm - total * 1e6) <= 0.05e6, counts
  assert abs(counts["non_embedding"] - final_norm - non_embedding * 1e6) <= 0.05e6, counts
  assert cfg.tokenformer.qkv_tokens == cfg.tokenformer.proj_tokens == cfg.width
  assert cfg.tokenformer.ffn_tokens == 4 * cfg.width and cfg.vocab_size == 50304


def test_flops_per_token_matches_xla():
  """6 x (every key and value token matrix and the tied head) + causal attention, against XLA's count.

  Width 1024 (compiled, never run) keeps the elementwise work XLA also counts (Theta's l2 norm and exact GeLU per
  score, next to 4 x width matmul FLOPs per score; LayerNorms, RoPE, softmaxes) small: seen +1.7% train, +2.2%
  forward. The matmul count is exact, so XLA may not fall below it. Attention is 18% of the total and the 64 key
  tokens of one projection 4.5% (over both layers), so a [0.999, 1.03] band catches a wrong attention factor or a
  token matrix left out.
  """
  cfg = tf_cfg(qkv_tokens=64, proj_tokens=64, ffn_tokens=256)
  cfg.update(dict(width=1024, heads=8))
  batch, seq = 2, 128
  xla_train, xla_fwd = xla_flops_per_token(cfg, batch, seq)
  # XLA computes the full T x T scores and AV, not the causal half the formula counts: add the masked half.
  formula_train = flops_per_token(cfg, seq) + 6.0 * cfg.depth * seq * cfg.width
  assert 0.999 <= xla_train / formula_train <= 1.03, (xla_train, formula_train)
  assert 0.999 <= xla_fwd / (formula_train / 3.0) <= 1.03, (xla_fwd, formula_train / 3.0)


# ---------------------------------------------------------------------------------------------------------------
# decoding


def test_prefill_and_decode_equal_the_forward_pass():
  """A 13-token prefill then 11 single-token steps through the KV cache give the forward pass's logits.

  The prefill's logits see only the first 13 tokens, so equality also shows the model is causal (the mask and
  Pattention, which mixes no positions)."""
  model = built(tf_cfg(), scan_layers=True)
  graphdef, state = nnx.split(model)
  full, decoded, index = _forward_and_decode(graphdef, state, tokens((2, 24)), 13)
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), atol=2e-5, rtol=2e-5)
  assert int(index) == 24


# ---------------------------------------------------------------------------------------------------------------
# sharding


def test_sharded_equals_single_device():
  """Two train steps with param_tokens over `tensor` (fsdp=4, tensor=2, default rules) and over `fsdp`
  (mesh.rules param_tokens=fsdp) give one device's losses; the token axis really is split."""
  cfg = configs.load("tokenformer:tiny")
  cfg.train.update(tiny_cfg().train.to_dict())
  cfg.checkpoint.every = 0
  batches = train_batches(cfg, 2)
  _, ref, _ = _run_steps(cfg, ONE_DEVICE, batches)
  for mesh_axis, rules in (("tensor", ""), ("fsdp", "param_tokens=fsdp")):
    c = copy.deepcopy(cfg)
    c.mesh.update(dict(data=1, fsdp=4, tensor=2, rules=rules))
    validate(c, 8)
    _, losses, state = _run_steps(c, jax.devices(), batches)
    np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=rules)
    ffn_keys = state["params"]["layers"]["blocks"][0]["channel"]["key_tokens"]
    assert ffn_keys.sharding.spec[1] == mesh_axis, ffn_keys.sharding.spec  # [layers, param_tokens, embed]
  assert ref[1] != ref[0]


# ---------------------------------------------------------------------------------------------------------------
# config


BAD_CONFIGS = [
    (dict(tau=0.0), "model.tokenformer.tau.qkv=0.0"),
    (dict(norm="relu"), "model.tokenformer.norm='relu'"),
    (dict(ffn_tokens=0), "model.tokenformer.ffn_tokens=0"),
    (dict(tie_embeddings=False), "model.tie_embeddings=False"),
    (dict(rotary_pct=0.1), "model.rotary_pct=0.1"),
    (dict(heads=3), "model.heads=3"),
]


@pytest.mark.parametrize("change,needle", BAD_CONFIGS, ids=[n.split("=")[0] for _, n in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_key(change, needle):
  cfg = configs.load("tokenformer:tiny")
  validate(cfg, 1)
  for k, v in change.items():
    if k == "tau":
      cfg.model.tokenformer.tau.qkv = v
    elif k in ("norm", "ffn_tokens"):
      cfg.model.tokenformer[k] = v
    else:
      cfg.model[k] = v
  with pytest.raises(ValueError, match=needle) as e:
    check_config(cfg.model)
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match=needle):
    validate(cfg, 1)
