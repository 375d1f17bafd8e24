"""Hybrid linear attention: `configs/hybrid.py:SIZE` (`hybrid:tiny`, `hybrid:size=340M,mixer=gla,ratio=6`).

The argument takes a size, `mixer=` (retnet, gla, hgrn, hgrn2, deltanet, gated_deltanet, or attention for the
all-attention twin) and `ratio=` (linear layers per softmax-attention layer; 0 = pure linear); other `key=value`
pairs set train keys. Defaults: Gated DeltaNet, 3:1. The 340M and 1.3B sizes follow the paper's fla models
(hidden 1024 / 2048, 24 layers, SwiGLU of 256 * ceil(8/3 * hidden / 256), untied head).
"""

from __future__ import annotations

from scalezoo.configs import dense
from scalezoo.configs.base import parse_arg
from scalezoo.configs.loader import apply_overrides

# size: (width, depth, heads, kv_heads, ffn_width); heads and kv_heads are the softmax-attention layers'.
SIZES = {
    "tiny": (64, 4, 4, 2, 192),
    "quickstart": (128, 4, 4, 4, 384),
    "340M": (1024, 24, 16, 16, 2816),
    "1.3B": (2048, 24, 16, 16, 5632),
}


def model_config(size: str, mixer: str = "gated_deltanet", ratio: int = 3) -> dict:
  if size not in SIZES:
    raise ValueError(f"unknown hybrid size {size!r}; known: {', '.join(SIZES)}")
  width, depth, heads, kv_heads, ffn_width = SIZES[size]
  return dict(family="hybrid", width=width, depth=depth, heads=heads, kv_heads=kv_heads, head_dim=0,
              ffn_width=ffn_width, vocab_size=256, qk_norm=False, tie_embeddings=False, rope_theta=10000.0,
              attention_impl="auto",
              mixer=mixer, hybrid_ratio=ratio,
              attn_layers=[],  # explicit attention layer indices; overrides hybrid_ratio when non-empty
              chunk_size=64,  # the chunked linear-attention ops' block length (16, 32 or 64)
              linear_heads=0, linear_head_dim=0,  # 0: the mixer's reference default (linear/layers.py)
              conv_size=4)  # short convolution kernel of DeltaNet / Gated DeltaNet


def get_config(arg: str | None = None):
  """Hybrid config of size `arg` (default `tiny`); `mixer=` and `ratio=` pick the layer mix."""
  args = parse_arg(arg, "tiny")
  size = args.pop("size")
  mixer = args.pop("mixer", "gated_deltanet")
  ratio = args.pop("ratio", "3")
  if not ratio.isdigit():
    raise ValueError(f"ratio={ratio!r} must be an integer >= 0 (linear layers per attention layer)")
  model = model_config(size, mixer, int(ratio))
  c = dense.get_config(size if size in dense.TRAIN else "1B")  # train defaults by size, as the dense family's
  c.model.update(model)
  apply_overrides(c, {f"train.{k}": v for k, v in args.items()})
  return c
