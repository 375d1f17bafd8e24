"""Top-k mixture of experts: `configs/moe.py:SIZE` (`moe:tiny`, `moe:size=S`).

Each size is a dense size (configs/dense.py) whose FFN becomes `num_experts` experts of width
ffn_width / top_k, so a token passes through as many FFN parameters as in the dense model: dense, moe and moge
of one size have equal active parameters and equal training FLOPs per token.
"""

from __future__ import annotations

import ml_collections

from scalezoo.configs import dense
from scalezoo.configs.base import parse_arg
from scalezoo.configs.loader import apply_overrides

# size: (num_experts, top_k, groups); the attention, width and depth come from the dense size of the same name.
SIZES = {
    "tiny": (8, 2, 2),
    "quickstart": (8, 2, 2),
    "XS": (16, 2, 2),
    "S": (32, 4, 4),
    "M": (64, 8, 8),
    "L": (64, 8, 8),
    "1B": (64, 8, 8),
}


def moe_config(size: str, family: str) -> ml_collections.ConfigDict:
  """The `model` ConfigDict of `family` (moe or moge) at `size`."""
  if size not in SIZES:
    raise ValueError(f"unknown {family} size {size!r}; known: {', '.join(SIZES)}")
  num_experts, top_k, groups = SIZES[size]
  m = ml_collections.ConfigDict(dense.model_config(size))
  m.family = family
  m.moe = ml_collections.ConfigDict(dict(
      num_experts=num_experts, top_k=top_k, groups=groups if family == "moge" else 1, topk_groups=1,
      shared_experts=0, expert_width=0,  # 0: ffn_width / top_k, the dense model's active FFN parameters
      capacity_factor=0.0,  # 0: dropless (sort + ragged_dot); > 0: capacity buffers, overflow dropped
      balance_coef=1e-2, z_coef=1e-3,  # Switch balance loss over the global batch, ST-MoE router z-loss
      routing="moge" if family == "moge" else "topk",  # topk | moge | group_limited
      score="softmax", renormalize=family != "moge", router_scale=False, route_scale=1.0,
      bias_balancing=False, bias_rate=1e-3,  # aux-loss-free balancing (DeepSeek-V3): the bias moves by rate
      first_dense=0))  # the first N layers keep the dense FFN (DeepSeek-V3: 3 of 61)
  return m


def get_config(arg: str | None = None, family: str = "moe"):
  """MoE config of size `arg` (default `tiny`); extra `key=value` pairs in `arg` set train keys."""
  args = parse_arg(arg, "tiny")
  size = args.pop("size")
  model = moe_config(size, family)  # first: an unknown size is reported under this family's name
  c = dense.get_config(size)
  c.model = model
  apply_overrides(c, {f"train.{k}": v for k, v in args.items()})
  return c
