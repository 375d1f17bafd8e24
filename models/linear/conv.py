"""Short causal depthwise convolution over the sequence, with a decode cache (spec 2, `ShortConvolution`).

y_t[c] = sum_{i<W} w[i, c] x_{t-W+1+i}[c], inputs before the sequence start being zero; optional SiLU. The cache
holds the last W-1 inputs, so a sequence split anywhere (prefill, chunks, single tokens) gives the same outputs
as one pass over the whole.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from scalezoo.models.layers import Axes, param


class ShortConv(nnx.Module):
  """Depthwise causal conv over T with kernel [W, *channel_shape] (no bias), optionally followed by SiLU.

  `channel_shape` may be multi-dimensional, e.g. (heads, head_dim), so the kernel shards like the projection
  feeding it. Computed in float32, returned in the input's dtype.
  """

  def __init__(self, channel_shape: int | Sequence[int], *, channel_axes: Axes, rngs: nnx.Rngs,
               kernel_size: int = 4, activation: bool = True, param_dtype=jnp.float32):
    self.channel_shape = (channel_shape,) if isinstance(channel_shape, int) else tuple(channel_shape)
    if len(channel_axes) != len(self.channel_shape):
      raise ValueError(f"channel_axes {channel_axes} do not match channel_shape {self.channel_shape}")
    if kernel_size < 1:
      raise ValueError(f"conv kernel_size must be >= 1, got {kernel_size}")
    self.kernel_size, self.activation = kernel_size, activation
    self.weight = param(jax.nn.initializers.normal(0.02), rngs.params(), (kernel_size, *self.channel_shape),
                        (None, *channel_axes), param_dtype)

  def init_cache(self, batch: int, dtype=jnp.float32) -> jax.Array:
    """Zeros [B, W-1, *channels]: the state at the start of a sequence."""
    return jnp.zeros((batch, self.kernel_size - 1, *self.channel_shape), dtype)

  def __call__(self, x: jax.Array, cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [B, T, *channels], cache [B, W-1, *channels] or None (start of sequence) -> (y like x, new cache)."""
    b, t = x.shape[:2]
    w = self.kernel_size
    if cache is None:
      cache = self.init_cache(b, x.dtype)
    xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, W-1+T, ...]
    xp32 = xp.astype(jnp.float32)
    kernel = self.weight[...].astype(jnp.float32)
    # W shifted slices instead of lax.conv: W is tiny, and this works for any channel rank and any T.
    y = sum(xp32[:, i:i + t] * kernel[i] for i in range(w))
    if self.activation:
      y = jax.nn.silu(y)
    # The cache keeps its own dtype so a decode loop's carry is stable.
    new_cache = xp[:, t:].astype(cache.dtype)
    return y.astype(x.dtype), new_cache
