"""Power schedule, Step Law and muP: exact schedule and law values, muP parameter groups and model hooks, and
a coordinate check (activation changes flat across widths under muP, growing under the standard
parameterisation).

Compiles dominate on CPU: the coordinate check builds one program per (width, parameterisation), five in all
(SP at widths 64 and 256 is enough to show growth); everything else is abstract or a tiny jitted function.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalezoo import configs, models
from scalezoo.configs import ConfigError
from scalezoo.models import registry
from scalezoo.models.attention import Attention
from scalezoo.train import sharding
from scalezoo.train.coord_check import coord_check, plot_coord_check
from scalezoo.train.optim import (apply_step_law, data_parallel_size, is_hidden_matrix, make_optimizer,
                                  make_schedule, mup_lr_multipliers, power_lr, step_law)
from scalezoo.train.step import abstract_split
from scalezoo.train.validate import validate

pytestmark = pytest.mark.usefixtures("fast_compile")


def tiny_cfg(**train):
  cfg = configs.load("dense:tiny")
  cfg.train.update(dict(steps=10, batch_size=8, seq_len=32, compute_dtype="float32", schedule="constant",
                        warmup=0))
  cfg.train.update(train)
  return cfg


# --------------------------------------------------------------------------------------------------------------
# Power schedule


def test_power_schedule_exact_values():
  # 256 tokens per step; curve(n) = min(1e-3, 8 * 4e-3 * (256 n)^-0.51) is capped for n <= 3 and free after.
  cfg = tiny_cfg(schedule="power", lr=1e-3, power_a=4e-3, power_b=-0.51, warmup=2, decay_fraction=0.2,
                 min_lr_ratio=0.1)
  schedule = make_schedule(cfg.train)
  lrs = [float(schedule(c)) for c in range(10)]
  curve = lambda n: min(1e-3, 8 * 4e-3 * (256.0 * n) ** -0.51)
  # warmup to the curve at n = 2, the power curve through n = 8, then linear to curve(8) * 0.1 over 2 updates.
  expected = [curve(2) / 2, curve(2)] + [curve(n) for n in range(3, 9)] + [curve(8) * 0.55, curve(8) * 0.1]
  np.testing.assert_allclose(lrs, expected, rtol=1e-5)
  np.testing.assert_allclose(lrs[:4], [5e-4, 1e-3, 1e-3, 9.33033e-4], rtol=1e-5)
  np.testing.assert_allclose(lrs[-1], 6.55197e-5, rtol=1e-5)
  # Under jit with an int32 counter, as the train step calls it.
  assert float(jax.jit(schedule)(jnp.int32(5))) == pytest.approx(lrs[5], rel=1e-6)


def test_power_lr_batch_in_sequences():
  # The paper's scale: 1024 sequences x 4096 tokens, 1T tokens seen -> 1024 * 4 * 1e12^-0.51 = 3.107e-3.
  cfg = tiny_cfg(schedule="power", lr=0.02, batch_size=1024, seq_len=4096)
  n = 1e12 / (1024 * 4096)
  assert float(power_lr(cfg.train, n)) == pytest.approx(1024 * 4 * 1e12 ** -0.51, rel=1e-5)
  assert float(power_lr(cfg.train, n)) == pytest.approx(3.1071e-3, rel=1e-4)
  assert float(power_lr(cfg.train, 1)) == pytest.approx(0.02)  # capped at lr early on


def test_power_keys_validated():
  validate(tiny_cfg(schedule="power"), 8)
  with pytest.raises(ConfigError, match="train.power_b"):
    validate(tiny_cfg(schedule="power", power_b=0.5), 8)
  with pytest.raises(ConfigError, match="train.power_a"):
    validate(tiny_cfg(schedule="power", power_a=-1.0), 8)
  with pytest.raises(ConfigError, match="train.mup_base_width"):
    validate(tiny_cfg(mup=True, mup_base_width=0), 8)


# --------------------------------------------------------------------------------------------------------------
# Step Law


def test_step_law_formula():
  lr, batch_tokens = step_law(1e9, 2e10)
  assert lr == pytest.approx(1.79 * 1e9 ** -0.713 * 2e10 ** 0.307, rel=1e-12)
  assert lr == pytest.approx(9.96023e-4, rel=1e-5)
  assert batch_tokens == pytest.approx(0.58 * 2e10 ** 0.571, rel=1e-12)
  assert batch_tokens == pytest.approx(441892.0, rel=1e-5)


def test_apply_step_law():
  cfg = configs.load("dense:quickstart")  # 300 steps x 16 x 128 = 614400 tokens, warmup 20
  assert apply_step_law(cfg, 8) is cfg  # off by default
  cfg.train.step_law = True
  n = models.param_counts(cfg.model)["non_embedding"]
  assert n == 853120
  out = apply_step_law(cfg, data_parallel_size(cfg, 8))
  assert out.train.lr == pytest.approx(1.79 * 853120 ** -0.713 * 614400 ** 0.307, rel=1e-12)
  assert out.train.lr == pytest.approx(6.32554e-3, rel=1e-5)
  # B = 0.58 * 614400^0.571 = 1171 tokens = 9.15 sequences of 128 -> 9 -> multiple of 8 devices -> 8.
  assert (out.train.batch_size, out.train.steps, out.train.warmup) == (8, 600, 40)
  assert out.train.steps * out.train.batch_size * out.train.seq_len == 614400  # D kept
  assert (cfg.train.lr, cfg.train.batch_size, cfg.train.steps) == (3e-3, 16, 300)  # input untouched
  validate(out, 8)
  assert apply_step_law(out, 8).train.to_dict() == out.train.to_dict()  # a fixed point here
  # Microbatches join the rounding unit: 9 sequences -> a multiple of 2 x 4 = 8; a tiny run still gets one unit.
  cfg.train.microbatches = 4
  assert apply_step_law(cfg, 2).train.batch_size == 8
  with pytest.raises(ConfigError, match="train.seq_len"):
    cfg.train.seq_len = 0
    apply_step_law(cfg, 1)


# --------------------------------------------------------------------------------------------------------------
# muP: parameter groups, optimizer, model hooks


def _canonical(path) -> str:
  keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return "/".join(k for k in keys if k != "value")


def test_hidden_matrix_axes():
  assert is_hidden_matrix(("embed", "mlp")) and is_hidden_matrix(("layers", "mlp", "embed"))
  assert is_hidden_matrix(("embed", "heads", "head_dim")) and is_hidden_matrix(("heads", "head_dim", "embed"))
  assert is_hidden_matrix(("experts", "embed", "mlp"))
  for axes in (("vocab", "embed"), ("embed", "vocab"), ("embed",), ("head_dim",), ("heads", "head_dim"),
               ("embed", "experts"), ("layers", "embed")):
    assert not is_hidden_matrix(axes), axes


def test_mup_optimizer_scales_hidden_matrices_only():
  cfg = tiny_cfg(lr=1e-2, weight_decay=0.5, grad_clip=0.0, mup_base_width=32)  # width 64: hidden x 0.5
  _, abs_params, _ = abstract_split(cfg)
  mults = {_canonical(p): m for p, m in jax.tree_util.tree_leaves_with_path(mup_lr_multipliers(abs_params, 32))}
  hidden = {k for k, m in mults.items() if m != 1.0}
  assert hidden == {f"layers/blocks/0/{k}/kernel" for k in
                    ("mixer/q", "mixer/k", "mixer/v", "mixer/o", "channel/gate", "channel/up", "channel/down")}
  assert all(mults[k] == 0.5 for k in hidden)

  params = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype), abs_params)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3, p.dtype), params)
  run = lambda tx: jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])(params, grads)
  sp = run(make_optimizer(cfg.train, abs_params)[0])
  cfg.train.mup = True
  tx_mup, _ = make_optimizer(cfg.train, abs_params)
  mup = run(tx_mup)
  for (path, u_sp), u_mup in zip(jax.tree_util.tree_leaves_with_path(sp), jax.tree.leaves(mup)):
    name = _canonical(path)
    if name in hidden:  # the whole AdamW step, decoupled decay included, at lr * base / width
      np.testing.assert_allclose(np.asarray(u_mup), 0.5 * np.asarray(u_sp), rtol=1e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(np.asarray(u_mup), np.asarray(u_sp), err_msg=name)
  # The optimizer state still maps onto the mesh like the standard one.
  mesh = sharding.make_mesh(cfg.mesh)
  specs = sharding.state_specs(abs_params, mesh, sharding.parse_rules(cfg.mesh.rules))
  sharding.opt_state_specs(tx_mup, jax.eval_shape(tx_mup.init, abs_params), specs)


def test_mup_model_hooks():
  m = configs.load("dense:tiny").model  # width 64, 4 heads of 16
  m.depth = 1
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)

  def logits(model, logit_scale, attn_scale):
    model.logit_scale = logit_scale
    for period in model.layers:
      period.blocks[0].mixer.attn_scale = attn_scale
    return model(tokens)[0]

  @jax.jit
  def run():
    # Built inside jit: eager init dispatches op by op. Python-level asserts run while tracing.
    sp = models.build(m, rngs=nnx.Rngs(0))
    assert sp.logit_scale == 1.0 and sp.layers[0].blocks[0].mixer.attn_scale is None
    mup = models.build(m, rngs=nnx.Rngs(0), mup_base_width=32)
    assert mup.logit_scale == 0.5 and mup.layers[0].blocks[0].mixer.attn_scale == 1 / 16
    # Same weights: muP's logits are SP's with attention at 1/head_dim and the readout x base/width.
    return mup(tokens)[0], logits(mup, 1.0, 1 / 16), logits(mup, 1.0, None), sp(tokens)[0]

  mup, mup_unscaled, mup_as_sp, sp = run()
  np.testing.assert_array_equal(mup_as_sp, sp)
  np.testing.assert_allclose(mup, 0.5 * mup_unscaled, rtol=1e-6)
  assert not np.allclose(mup_unscaled, sp, atol=1e-4)

  @jax.jit
  def attention(x):
    attn = Attention(32, 2, 2, rngs=nnx.Rngs(0))
    outs = [attn(x)]
    for scale in (1 / math.sqrt(16), 1 / 16):
      attn.attn_scale = scale
      outs.append(attn(x))
    return outs

  default, explicit, mup_scale = attention(jax.random.normal(jax.random.key(1), (1, 5, 32)))
  np.testing.assert_allclose(explicit, default, rtol=1e-6, atol=1e-6)
  assert not np.allclose(mup_scale, default, atol=1e-4)


def test_mup_needs_family_support(monkeypatch):
  dense = registry.FAMILIES["dense"]
  legacy = lambda cfg, *, rngs, compute_dtype, param_dtype, scan_layers, remat: dense.build(
      cfg, rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat)
  monkeypatch.setitem(registry.FAMILIES, "dense", registry.Family(legacy, dense.param_counts, dense.flops_per_token,
                                                                   dense.keys))
  m = configs.load("dense:tiny").model
  build = lambda **kw: jax.eval_shape(lambda: nnx.state(models.build(m, rngs=nnx.Rngs(0), **kw)))
  build()  # families without muP still build the standard model
  with pytest.raises(ValueError, match="does not support muP"):
    build(mup_base_width=32)


# --------------------------------------------------------------------------------------------------------------
# Coordinate check


# ~20 s; the muP forward hooks and learning rates have the fast tests above: `pytest -m slow` runs it.
@pytest.mark.slow
def test_coord_check(tmp_path):
  def run(mup, widths):
    cfg = tiny_cfg(batch_size=4, seq_len=16, lr=1e-2, weight_decay=0.0, grad_clip=0.0, mup=mup, mup_base_width=64)
    return coord_check(cfg, widths, steps=5)

  # Two widths each: one compile per (width, parameterisation) is most of this test's time.
  sp, mup = run(False, [64, 256]), run(True, [64, 256])
  assert set(mup) == {64, 256} and all(len(v) == 3 for v in mup.values())  # 2 layers + logits
  for layer in range(2):  # residual stream after each layer: ~1.0x under muP, ~4-5x under SP
    mup_ratio = mup[256][layer] / mup[64][layer]
    sp_ratio = sp[256][layer] / sp[64][layer]
    assert 1 / 1.5 < mup_ratio < 1.5, (layer, mup)
    assert sp_ratio > 2.5 and sp_ratio > 2 * mup_ratio, (layer, sp, mup)
  assert mup[256][-1] / mup[64][-1] < 1.5  # the logits' change does not grow either
  path = tmp_path / "coord.png"
  plot_coord_check({str(k): v for k, v in mup.items()}, str(path))
  assert path.stat().st_size > 0
