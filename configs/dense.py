"""Dense Llama-style decoder: `configs/dense.py:SIZE` (`dense:tiny`, `dense:size=M`)."""

from __future__ import annotations

from scalezoo.configs.base import base_config, parse_arg
from scalezoo.configs.loader import apply_overrides

# size: (width, depth, heads, kv_heads, ffn_width); ffn ~ 8/3 width rounded to a multiple of 64.
SIZES = {
    "tiny": (64, 2, 4, 2, 192),
    "quickstart": (128, 4, 4, 4, 384),
    "XS": (256, 4, 4, 4, 704),
    "S": (512, 8, 8, 8, 1408),
    "M": (768, 12, 12, 12, 2048),
    "L": (1024, 24, 16, 16, 2816),
    "1B": (2048, 22, 16, 8, 5632),
}

# Training defaults by size: (steps, batch_size, seq_len, lr, warmup).
TRAIN = {
    "tiny": (20, 8, 64, 3e-3, 2),
    "quickstart": (300, 16, 128, 3e-3, 20),
}
TRAIN_DEFAULT = (2000, 32, 1024, 1e-3, 200)


def model_config(size: str) -> dict:
  if size not in SIZES:
    raise ValueError(f"unknown dense size {size!r}; known: {', '.join(SIZES)}")
  width, depth, heads, kv_heads, ffn_width = SIZES[size]
  return dict(family="dense", width=width, depth=depth, heads=heads, kv_heads=kv_heads, head_dim=0,
              ffn_width=ffn_width, vocab_size=256, qk_norm=False, tie_embeddings=True, rope_theta=10000.0,
              attention_impl="auto")


def get_config(arg: str | None = None):
  """Dense config of size `arg` (default `tiny`); extra `key=value` pairs in `arg` set train keys."""
  args = parse_arg(arg, "tiny")
  size = args.pop("size")
  c = base_config()
  c.model.update(model_config(size))
  steps, batch, seq, lr, warmup = TRAIN.get(size, TRAIN_DEFAULT)
  c.train.update(dict(steps=steps, batch_size=batch, seq_len=seq, lr=lr, warmup=warmup))
  if size in ("tiny", "quickstart"):
    # CPU-sized configs: XLA:CPU emulates bfloat16 matmuls, so float32 is both faster and exact there.
    c.train.compute_dtype = "float32"
  if size == "tiny":
    c.train.update(dict(log_every=1, eval_batches=2))
    c.checkpoint.every = 10
  if size == "quickstart":
    # A 4-layer model compiles quickly unrolled, and unrolled runs ~20% faster than scanned on CPU.
    c.train.update(dict(log_every=10, eval_batches=16, eval_every=100, scan_layers=False))
    c.checkpoint.every = 100
  apply_overrides(c, {f"train.{k}": v for k, v in args.items()})
  return c
