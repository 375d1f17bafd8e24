"""Registry: analytic parameter counts against the built model, FLOPs per token against XLA's cost analysis."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from scalezoo import configs
from scalezoo.models import build, flops_per_token, param_counts


def tiny(**overrides):
  cfg = configs.load("dense:tiny").model
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def abstract_model(cfg, **options):
  """The model's structure with ShapeDtypeStructs for weights: counting and lowering need no values."""
  return nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), **options))


# ---------------------------------------------------------------------------------------------------------------
# parameter counts


VARIANTS = {
    "tied_gqa": dict(),
    "untied": dict(tie_embeddings=False),
    "mha": dict(kv_heads=4),
    "mqa_qknorm": dict(kv_heads=1, qk_norm=True),
    "head_dim_override": dict(head_dim=24, qk_norm=True, tie_embeddings=False),
    "deeper_wider": dict(width=96, depth=3, heads=6, kv_heads=3, ffn_width=256, vocab_size=300),
}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_param_counts_match_built_model(name, scan_layers):
  cfg = tiny(**VARIANTS[name])
  counts = param_counts(cfg)
  params = nnx.to_flat_state(nnx.state(abstract_model(cfg, scan_layers=scan_layers), nnx.Param))
  total = sum(math.prod(v.shape) for _, v in params)
  # `embedding` is every vocabulary-sized matrix: the parameters with a `vocab` axis.
  vocab_sized = sum(math.prod(v.shape) for _, v in params if "vocab" in v.get_metadata()["out_sharding"])
  assert counts["total"] == total
  assert counts["embedding"] == vocab_sized
  assert counts["embedding"] + counts["non_embedding"] == counts["total"]
  assert counts["active"] == counts["total"]  # dense: every parameter is active
  assert all(isinstance(v, int) for v in counts.values()), counts


# ---------------------------------------------------------------------------------------------------------------
# FLOPs per token against XLA


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()  # jax 0.10: a dict; older versions: a list with one dict per computation
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def xla_flops_per_token(cfg, batch: int, seq: int) -> tuple[float, float]:
  """(training, forward) FLOPs per token by XLA's cost analysis of the compiled loss and its gradient (compiled for
  the abstract model, never run)."""
  graphdef, params = nnx.split(abstract_model(cfg))
  tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

  def loss(p, tok_bt):
    logits, _ = nnx.merge(graphdef, p)(tok_bt)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.roll(tok_bt, -1, axis=1)[..., None], axis=-1))

  n_tokens = batch * seq
  return (_cost_flops(jax.jit(jax.grad(loss)).lower(params, tok).compile()) / n_tokens,
          _cost_flops(jax.jit(loss).lower(params, tok).compile()) / n_tokens)


def test_flops_per_token_matches_xla():
  # Matmuls dominate: width 256, ffn 704, seq 128. Full MHA so no repeat of kv heads confuses the count.
  cfg = tiny(width=256, depth=2, heads=4, kv_heads=4, ffn_width=704, vocab_size=256)
  batch, seq = 2, 128
  xla_train, xla_fwd = xla_flops_per_token(cfg, batch, seq)

  # XLA computes the full T x T scores and AV, not the causal half the formula counts: add the masked half.
  head_dim = cfg.width // cfg.heads
  masked_half = 6.0 * cfg.depth * seq * cfg.heads * head_dim
  formula_train = flops_per_token(cfg, seq) + masked_half
  formula_fwd = formula_train / 3.0

  # XLA also counts elementwise work the formula leaves out: RMSNorms, RoPE, SiLU * up, residual adds, the softmax
  # over T x T scores and the log-softmax over the vocabulary, in forward and backward. Per token per layer that is
  # O(10 * (4 * width + 3 * ffn + heads * seq)) ~ 5e4 FLOPs against ~4e6 of matmuls (seen: +0.8% train,
  # +0.7% forward). The matmul count itself is exact, so XLA may not fall below the formula; the attention term
  # alone is 7% of the total, so a 2% band still catches a wrong attention factor (e.g. 12 for 6 moves it ~3.5%).
  assert 0.999 <= xla_train / formula_train <= 1.02, (xla_train, formula_train)
  assert 0.999 <= xla_fwd / formula_fwd <= 1.02, (xla_fwd, formula_fwd)


def test_flops_per_token_formula_structure():
  """Causal attention term grows linearly with seq_len and is half of the unmasked 12 * T * heads * head_dim."""
  cfg = tiny(head_dim=24)
  f1, f2 = flops_per_token(cfg, 128), flops_per_token(cfg, 256)
  per_layer_per_t = (f2 - f1) / 128 / cfg.depth
  assert per_layer_per_t == pytest.approx(6.0 * cfg.heads * 24)
  # The seq-independent part is 6 x matmul params: every non-norm parameter (tied: the embedding is the head).
  norms = cfg.depth * 2 * cfg.width + cfg.width  # two RMSNorm gains per layer and the final one (no qk-norm)
  n_matmul = param_counts(cfg)["total"] - norms
  assert f1 - 128 * per_layer_per_t * cfg.depth == pytest.approx(6.0 * n_matmul)


# ---------------------------------------------------------------------------------------------------------------
# unknown family


def test_unknown_family_raises():
  cfg = tiny(family="no_such_family")
  with pytest.raises(ValueError, match="no_such_family"):
    build(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no_such_family"):
    param_counts(cfg)
  with pytest.raises(ValueError, match="no_such_family"):
    flops_per_token(cfg, 128)
