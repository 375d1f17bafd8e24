"""TokenFormer: `configs/tokenformer.py:SIZE` (`tokenformer:tiny`, `tokenformer:size=150M,steps=100`).

Sizes 150M to 1.5B are the paper's Pile models (Wang et al. 2024): n_qkv = n_proj = width, n_ffn = 4 width,
GPT-NeoX vocabulary padded to 50304; tiny and quickstart are CPU-sized with the byte vocabulary. Each tau is
sqrt of its token count here; a grown run (`--config.init_from`, more `model.tokenformer.*_tokens`) keeps the
source run's tau, which is what keeps its function unchanged. Other `key=value` pairs set train keys.
"""

from __future__ import annotations

import math

from scalezoo.configs import dense
from scalezoo.configs.base import parse_arg
from scalezoo.configs.loader import apply_overrides

# size: (width, depth, heads, qkv_tokens = proj_tokens, ffn_tokens, vocab_size)
SIZES = {
    "tiny": (64, 2, 4, 64, 256, 256),
    "quickstart": (128, 4, 4, 128, 512, 256),
    "150M": (768, 12, 12, 768, 3072, 50304),
    "450M": (1024, 24, 16, 1024, 4096, 50304),
    "900M": (1280, 32, 16, 1280, 5120, 50304),
    "1.5B": (1536, 40, 16, 1536, 6144, 50304),
}


def model_config(size: str) -> dict:
  if size not in SIZES:
    raise ValueError(f"unknown tokenformer size {size!r}; known: {', '.join(SIZES)}")
  width, depth, heads, qkv_tokens, ffn_tokens, vocab_size = SIZES[size]
  tokens = dict(qkv_tokens=qkv_tokens, proj_tokens=qkv_tokens, ffn_tokens=ffn_tokens)
  return dict(family="tokenformer", width=width, depth=depth, heads=heads, vocab_size=vocab_size,
              rope_theta=10000.0, attention_impl="auto", tie_embeddings=True,
              rotary_pct=0.25,  # RoPE on the first quarter of each head's dims
              tokenformer=dict(**tokens,
                               norm="l2_norm_gelu",  # or gelu_l2_norm, softmax (models/pattention.py)
                               # A constant, not a function of the token count: growth must not change it.
                               tau=dict(qkv=math.sqrt(qkv_tokens), proj=math.sqrt(qkv_tokens),
                                        ffn=math.sqrt(ffn_tokens))))


def get_config(arg: str | None = None):
  """TokenFormer config of size `arg` (default `tiny`); extra `key=value` pairs in `arg` set train keys."""
  args = parse_arg(arg, "tiny")
  size = args.pop("size")
  model = model_config(size)
  c = dense.get_config(size if size in dense.TRAIN else "1B")  # train defaults by size, as the dense family's
  c.model = model
  apply_overrides(c, {f"train.{k}": v for k, v in args.items()})
  return c
