"""Family registry: name -> builder, parameter counts and training FLOPs per token.

Only the builders here read config objects; every layer takes plain arguments. A family provides
`build(model_cfg, rngs, **options)`, `param_counts(model_cfg) -> {total, active, embedding, non_embedding}` and
`flops_per_token(model_cfg, seq_len)`. Counts are analytic so a sweep can size models without building them;
tests pin them to the built model and to XLA's cost analysis.

Conventions: `embedding` counts every vocabulary-sized matrix (the input table and an untied head);
training FLOPs are 6 x the matmul parameters a token passes through (a tied head is a matmul too) plus
attention's QK^T and AV, 12 * T * heads * head_dim per layer, halved for the causal mask.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from scalezoo.models.attention import Attention
from scalezoo.models.decoder import Decoder
from scalezoo.models.layers import SwiGLU

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Family:
  build: Callable[..., nnx.Module]
  param_counts: Callable[[Any], dict]
  flops_per_token: Callable[..., float]
  keys: frozenset = frozenset()  # the model.* keys the family reads; others are rejected as typos
  describe: Callable[[Any], dict] | None = None  # extra summary.json fields (a hybrid's effective ratio)
  growable: frozenset = frozenset()  # model keys (dotted) that init_from may raise: TokenFormer's token counts


FAMILIES: dict[str, Family] = {}


def register(name: str, family: Family) -> None:
  FAMILIES[name] = family


def family_of(cfg) -> Family:
  if cfg.family not in FAMILIES:
    raise ValueError(f"unknown model family {cfg.family!r}; known: {sorted(FAMILIES)}")
  return FAMILIES[cfg.family]


def build(cfg, *, rngs: nnx.Rngs, compute_dtype: str = "float32", param_dtype: str = "float32",
          scan_layers: bool = False, remat: str = "none", mup_base_width: int = 0) -> nnx.Module:
  """Builds the model of `cfg` (a `config.model` ConfigDict); options come from `config.train`.

  `mup_base_width` > 0 builds the muP forward pass (logits x base/width, attention 1/head_dim); the muP learning
  rates are the optimizer's (train.optim). 0 builds the standard parameterisation.
  """
  return family_of(cfg).build(cfg, rngs=rngs, compute_dtype=DTYPES[compute_dtype], param_dtype=DTYPES[param_dtype],
                              scan_layers=scan_layers, remat=remat, **mup_options(cfg, mup_base_width))


def mup_options(cfg, mup_base_width: int) -> dict:
  """The builder keyword that turns muP on, {} when it is off; ValueError if the family has no muP."""
  if not mup_base_width:
    return {}  # passed only when on, so families written before muP keep their builder signature
  if "mup_base_width" not in inspect.signature(family_of(cfg).build).parameters:
    raise ValueError(f"model family {cfg.family!r} does not support muP (train.mup)")
  return {"mup_base_width": mup_base_width}


def param_counts(cfg) -> dict:
  """{total, active, embedding, non_embedding} parameter counts of `cfg` without building it."""
  return family_of(cfg).param_counts(cfg)


def describe(cfg) -> dict:
  """Family-specific facts about `cfg` for summary.json (e.g. where a hybrid's attention layers are); {} if none."""
  family = family_of(cfg)
  return family.describe(cfg) if family.describe is not None else {}


def flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward) at sequence length `seq_len`."""
  return family_of(cfg).flops_per_token(cfg, seq_len)


# ---------------------------------------------------------------------------------------------------------------
# dense: Llama-style decoder (pre-RMSNorm, RoPE, GQA, SwiGLU)


def head_dim(cfg) -> int:
  return cfg.get("head_dim", 0) or cfg.width // cfg.heads


def attention_factory(cfg, dtypes: dict, mup: bool = False) -> Callable[[nnx.Rngs], nnx.Module]:
  scale = 1.0 / head_dim(cfg) if mup else None  # muP: q.k / head_dim, since q and k align after training
  return lambda rngs: Attention(cfg.width, cfg.heads, cfg.kv_heads, rngs=rngs, head_dim=head_dim(cfg),
                                qk_norm=cfg.qk_norm, rope_theta=cfg.rope_theta,
                                implementation=cfg.attention_impl, depth=cfg.depth, attn_scale=scale, **dtypes)


def mup_logit_scale(cfg, mup_base_width: int) -> float:
  """muP's readout multiplier base_width / width (1.0 when muP is off)."""
  return mup_base_width / cfg.width if mup_base_width else 1.0


def mlp_factory(cfg, dtypes: dict) -> Callable[[nnx.Rngs], nnx.Module]:
  return lambda rngs: SwiGLU(cfg.width, cfg.ffn_width, rngs=rngs, depth=cfg.depth, **dtypes)


def _build_dense(cfg, *, rngs, compute_dtype, param_dtype, scan_layers, remat, mup_base_width: int = 0,
                 streams=None):
  dtypes = dict(compute_dtype=compute_dtype, param_dtype=param_dtype)
  pattern = [(attention_factory(cfg, dtypes, mup=bool(mup_base_width)), mlp_factory(cfg, dtypes))]
  return Decoder(vocab_size=cfg.vocab_size, width=cfg.width, depth=cfg.depth, pattern=pattern, rngs=rngs,
                 tie_embeddings=cfg.tie_embeddings, scan_layers=scan_layers, remat=remat,
                 logit_scale=mup_logit_scale(cfg, mup_base_width), streams=streams, **dtypes)


def attention_matmul_params(cfg) -> int:
  hd = head_dim(cfg)
  return cfg.width * hd * (2 * cfg.heads + 2 * cfg.kv_heads)


def mlp_matmul_params(cfg) -> int:
  return 3 * cfg.width * cfg.ffn_width


def embedding_params(cfg) -> int:
  return cfg.vocab_size * cfg.width * (1 if cfg.tie_embeddings else 2)


def _dense_param_counts(cfg) -> dict:
  norms_per_layer = 2 * cfg.width + (2 * head_dim(cfg) if cfg.qk_norm else 0)
  per_layer = attention_matmul_params(cfg) + mlp_matmul_params(cfg) + norms_per_layer
  embedding = embedding_params(cfg)
  total = embedding + cfg.depth * per_layer + cfg.width
  return dict(total=total, active=total, embedding=embedding, non_embedding=total - embedding)


def attention_flops_per_token(cfg, seq_len: int, n_attention_layers: int) -> float:
  # QK^T and AV: 2 matmuls x 2 FLOPs per MAC x T keys, x3 for forward + backward, halved by the causal mask.
  return n_attention_layers * 6.0 * seq_len * cfg.heads * head_dim(cfg)


def _dense_flops_per_token(cfg, seq_len: int) -> float:
  matmul = cfg.depth * (attention_matmul_params(cfg) + mlp_matmul_params(cfg)) + cfg.vocab_size * cfg.width
  return 6.0 * matmul + attention_flops_per_token(cfg, seq_len, cfg.depth)


DENSE_KEYS = frozenset({"family", "width", "depth", "heads", "kv_heads", "head_dim", "ffn_width", "vocab_size",
                        "qk_norm", "tie_embeddings", "rope_theta", "attention_impl"})

register("dense", Family(_build_dense, _dense_param_counts, _dense_flops_per_token, DENSE_KEYS))
