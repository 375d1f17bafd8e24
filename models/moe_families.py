"""Families `moe` and `moge`: the dense decoder with every FFN replaced by a routed mixture of experts.

`model.moe` holds the routing and dispatch keys (DESIGN.md: num_experts, top_k, groups, shared_experts,
capacity_factor with 0 = dropless, balance_coef, z_coef, plus expert_width, routing, score, renormalize,
topk_groups, router_scale, route_scale, bias_balancing / bias_rate for aux-loss-free balancing, and
first_dense: that many leading layers keep the dense FFN of ffn_width). `moge` is `moe` with routing fixed to
grouped experts (K/G per group from one global softmax, never renormalised); a family of its own so sweeps can
name it.

Counts: `total` holds every expert; `active` the parameters one token passes through (router, top_k routed
experts, the shared experts, attention, norms, embeddings). Training FLOPs are 6 x the active matmul
parameters (router included) plus attention, so MoE and dense runs of equal active size compare at equal compute.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx

from scalezoo.models.decoder import Decoder
from scalezoo.models.moe import MoE
from scalezoo.models.registry import (DENSE_KEYS, Family, attention_factory, attention_flops_per_token,
                                      attention_matmul_params, embedding_params, head_dim, mlp_factory,
                                      mlp_matmul_params, mup_logit_scale, register)

MOE_KEYS = frozenset({"num_experts", "top_k", "groups", "topk_groups", "shared_experts", "expert_width",
                      "capacity_factor", "balance_coef", "z_coef", "routing", "score", "renormalize",
                      "router_scale", "route_scale", "bias_balancing", "bias_rate", "first_dense"})


def expert_width(cfg) -> int:
  """Hidden width of one routed expert (and of each shared expert): moe.expert_width, or by default
  ffn_width / top_k, so a token passes through as many FFN parameters as in the dense model of ffn_width."""
  return cfg.moe.get("expert_width", 0) or max(1, cfg.ffn_width // cfg.moe.top_k)


def moe_factory(cfg, dtypes: dict, routing: str) -> Callable[[nnx.Rngs], nnx.Module]:
  m = cfg.moe
  return lambda rngs: MoE(
      cfg.width, expert_width(cfg), m.num_experts, m.top_k, rngs=rngs, routing=routing, score=m.score,
      renormalize=m.renormalize and routing != "moge", groups=m.groups, topk_groups=m.topk_groups,
      shared_experts=m.shared_experts, router_scale=m.router_scale, capacity_factor=m.capacity_factor,
      balance_coef=m.balance_coef, z_coef=m.z_coef, route_scale=m.route_scale,
      bias_balancing=m.bias_balancing, bias_rate=m.bias_rate, depth=cfg.depth, **dtypes)


def _builder(routing_of: Callable):
  def build(cfg, *, rngs, compute_dtype, param_dtype, scan_layers, remat, mup_base_width: int = 0, streams=None):
    dtypes = dict(compute_dtype=compute_dtype, param_dtype=param_dtype)
    attention = attention_factory(cfg, dtypes, mup=bool(mup_base_width))
    pattern = [(attention, moe_factory(cfg, dtypes, routing_of(cfg)))]
    prefix = [(attention, mlp_factory(cfg, dtypes))] * first_dense(cfg)
    return Decoder(vocab_size=cfg.vocab_size, width=cfg.width, depth=cfg.depth, pattern=pattern, rngs=rngs,
                   tie_embeddings=cfg.tie_embeddings, scan_layers=scan_layers, remat=remat,
                   logit_scale=mup_logit_scale(cfg, mup_base_width), prefix=prefix, streams=streams, **dtypes)
  return build


def _moe_layer_params(cfg) -> tuple[int, int, int]:
  """(router, one routed expert, all shared experts) matmul parameters of one MoE layer."""
  m, f = cfg.moe, expert_width(cfg)
  return cfg.width * m.num_experts, 3 * cfg.width * f, m.shared_experts * 3 * cfg.width * f


def first_dense(cfg) -> int:
  """How many leading layers keep a dense FFN (DeepSeek's first_k_dense): moe.first_dense, default 0."""
  return cfg.moe.get("first_dense", 0)


def _param_counts(cfg) -> dict:
  m = cfg.moe
  router, expert, shared = _moe_layer_params(cfg)
  norms = 2 * cfg.width + (2 * head_dim(cfg) if cfg.qk_norm else 0)
  scale = m.num_experts if m.router_scale else 0
  common = attention_matmul_params(cfg) + router + shared + norms + scale
  dense_layers = first_dense(cfg) * (attention_matmul_params(cfg) + mlp_matmul_params(cfg) + norms)
  moe_layers = cfg.depth - first_dense(cfg)
  embedding = embedding_params(cfg)
  total = embedding + dense_layers + moe_layers * (common + m.num_experts * expert) + cfg.width
  active = embedding + dense_layers + moe_layers * (common + m.top_k * expert) + cfg.width
  return dict(total=total, active=active, embedding=embedding, non_embedding=total - embedding)


def _flops_per_token(cfg, seq_len: int) -> float:
  router, expert, shared = _moe_layer_params(cfg)
  moe_layer = attention_matmul_params(cfg) + router + cfg.moe.top_k * expert + shared
  dense_layer = attention_matmul_params(cfg) + mlp_matmul_params(cfg)
  matmul = (cfg.depth - first_dense(cfg)) * moe_layer + first_dense(cfg) * dense_layer + cfg.vocab_size * cfg.width
  return 6.0 * matmul + attention_flops_per_token(cfg, seq_len, cfg.depth)


KEYS = DENSE_KEYS | {"moe"}
register("moe", Family(_builder(lambda cfg: cfg.moe.routing), _param_counts, _flops_per_token, KEYS))
register("moge", Family(_builder(lambda cfg: "moge"), _param_counts, _flops_per_token, KEYS))
