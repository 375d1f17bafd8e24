"""Flax NNX modules for scalezoo: no training, no I/O.

`build(cfg.model, rngs=nnx.Rngs(seed))` returns a model called as `logits, aux = model(tokens)`.
The axis vocabulary shared by all modules is in `scalezoo.models.layers`.
"""

from scalezoo.models.attention import Attention
from scalezoo.models.decoder import Block, Decoder
from scalezoo.models.layers import Embed, Linear, RMSNorm, SwiGLU, axis_rules, constrain, rope
from scalezoo.models.registry import FAMILIES, build, describe, flops_per_token, param_counts
from scalezoo.models import hybrid, moe_families, tokenformer  # noqa: F401  (register hybrid, moe, moge, tokenformer)
from scalezoo.models import parscale  # noqa: F401  (registers parscale, which wraps the families above)

__all__ = ["Attention", "Block", "Decoder", "Embed", "Linear", "RMSNorm", "SwiGLU", "axis_rules", "constrain",
           "rope", "FAMILIES", "build", "describe", "flops_per_token", "param_counts"]
