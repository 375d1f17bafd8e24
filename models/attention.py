"""Causal softmax self-attention: multi-head or grouped-query, optional qk-norm, RoPE.

The kernel is `jax.nn.dot_product_attention`: `implementation="xla"` everywhere, `"cudnn"` for the fused
flash kernel on NVIDIA GPUs (bf16/fp16 only), `"auto"` lets JAX pick.

Decoding: `init_cache(batch, max_len)` gives a zero KV cache of `max_len` slots and `step(x, positions, cache)` writes
the new tokens' keys and values at their positions and attends over the cache, for a prefill of many tokens or one
token at a time. Rows of a batch share positions (one cache index for the whole batch).

`rope_fraction` < 1 rotates only the first `rotary_dims(head_dim, rope_fraction)` dims of each head (GPT-NeoX's
`rotary_pct`, with the frequencies of a head that wide); the rest pass through unrotated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from scalezoo.models.layers import Linear, RMSNorm, constrain, rope, scaled_normal

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def rotary_dims(head_dim: int, rope_fraction: float) -> int:
  """How many leading dims of a head RoPE rotates: int(head_dim * rope_fraction), which must be even and > 0."""
  dims = int(head_dim * rope_fraction)
  if not 0 < rope_fraction <= 1 or dims < 2 or dims % 2:
    raise ValueError(f"rope_fraction={rope_fraction} of head_dim={head_dim} gives {dims} rotary dims; they must be "
                     f"a positive even number")
  return dims


class Attention(nnx.Module):
  """Causal self-attention with `heads` query heads sharing `kv_heads` key/value heads."""

  def __init__(self, width: int, heads: int, kv_heads: int, *, rngs: nnx.Rngs, head_dim: int | None = None,
               qk_norm: bool = False, rope_theta: float = 10000.0, implementation: str = "auto", depth: int = 1,
               attn_scale: float | None = None, rope_fraction: float = 1.0, compute_dtype=jnp.float32,
               param_dtype=jnp.float32):
    """`attn_scale` multiplies q.k before the softmax; None is 1/sqrt(head_dim), muP uses 1/head_dim.
    `rope_fraction`: the share of each head's dims that RoPE rotates (1.0: all)."""
    if heads % kv_heads:
      raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    head_dim = head_dim or width // heads
    self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
    self.rope_theta, self.implementation, self.attn_scale = rope_theta, implementation, attn_scale
    self.rope_dims = rotary_dims(head_dim, rope_fraction)
    kw = dict(rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype)
    self.q = Linear(width, (heads, head_dim), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
    self.k = Linear(width, (kv_heads, head_dim), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
    self.v = Linear(width, (kv_heads, head_dim), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), **kw)
    self.o = Linear((heads, head_dim), width, in_axes=("heads", "head_dim"), out_axes=("embed",),
                    init=scaled_normal(heads * head_dim, 1.0 / math.sqrt(2 * depth)), **kw)
    if qk_norm:
      self.q_norm = RMSNorm(head_dim, axis_name="head_dim", param_dtype=param_dtype)
      self.k_norm = RMSNorm(head_dim, axis_name="head_dim", param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None

  def _qkv(self, x_btd: jax.Array, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q_btnh = constrain(self.q(x_btd), ("batch", "seq", "heads", "head_dim"))
    k_btkh = constrain(self.k(x_btd), ("batch", "seq", "kv_heads", "head_dim"))
    v_btkh = constrain(self.v(x_btd), ("batch", "seq", "kv_heads", "head_dim"))
    if self.q_norm is not None:
      q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
    return self._rope(q_btnh, positions_bt), self._rope(k_btkh, positions_bt), v_btkh

  def _rope(self, x_btnh: jax.Array, positions_bt: jax.Array) -> jax.Array:
    if self.rope_dims == x_btnh.shape[-1]:  # the whole head: the program of plain RoPE, unchanged
      return rope(x_btnh, positions_bt, self.rope_theta)
    r = self.rope_dims
    return jnp.concatenate([rope(x_btnh[..., :r], positions_bt, self.rope_theta), x_btnh[..., r:]], axis=-1)

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array | None = None) -> jax.Array:
    b, t, _ = x_btd.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q_btnh, k_btkh, v_btkh = self._qkv(x_btd, positions_bt)
    impl = None if self.implementation == "auto" else self.implementation
    out_btnh = jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, is_causal=True, implementation=impl,
                                             scale=self.attn_scale)
    out_btnh = constrain(out_btnh, ("batch", "seq", "heads", "head_dim"))
    return self.o(out_btnh)

  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    """A zero KV cache of `max_len` positions: {"k", "v"} [B, S, K, H] in the compute dtype."""
    shape = (batch, max_len, self.kv_heads, self.head_dim)
    dtype = self.q.compute_dtype
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  def step(self, x_btd: jax.Array, positions_bt: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Decoding: writes the keys/values of `x` at `positions` (consecutive, equal across rows) into the cache,
    then attends over every cached position <= each query's position; returns (y, updated cache)."""
    q_btnh, k_btkh, v_btkh = self._qkv(x_btd, positions_bt)
    start = positions_bt[0, 0]
    k_bskh = jax.lax.dynamic_update_slice(cache["k"], k_btkh.astype(cache["k"].dtype), (0, start, 0, 0))
    v_bskh = jax.lax.dynamic_update_slice(cache["v"], v_btkh.astype(cache["v"].dtype), (0, start, 0, 0))
    key_pos_s = jnp.arange(k_bskh.shape[1], dtype=positions_bt.dtype)
    mask_b1ts = (key_pos_s[None, None, :] <= positions_bt[:, :, None])[:, None]
    # The plain XLA kernel: a boolean mask over a fixed-size cache, which the fused kernels do not take.
    out_btnh = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, implementation="xla",
                                             scale=self.attn_scale)
    return self.o(out_btnh), dict(k=k_bskh, v=v_bskh)
