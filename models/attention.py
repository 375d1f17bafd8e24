"""Causal softmax self-attention: multi-head or grouped-query, optional qk-norm, RoPE.

The kernel is `jax.nn.dot_product_attention`: `implementation="xla"` everywhere, `"cudnn"` for the fused
flash kernel on NVIDIA GPUs (bf16/fp16 only), `"auto"` lets JAX pick.

Decoding: `init_cache(batch, max_len)` gives a zero KV cache of `max_len` slots and `step(x, positions, cache)` writes
the new tokens' keys and values at their positions and attends over the cache, for a prefill of many tokens or one
token at a time. Rows of a batch share positions (one cache index for the whole batch).

ParScale streams (`models.streams`): `stream_params(streams, rngs)` makes the layer's per-stream KV prefix; given it
as `streams=`, the call, `init_cache` and `step` prepend the prefix to every row's keys and values (the cache holds it
in its first slots) and every query attends to it.

`rope_fraction` < 1 rotates only the first `rotary_dims(head_dim, rope_fraction)` dims of each head (GPT-NeoX's
`rotary_pct`, with the frequencies of a head that wide); the rest pass through unrotated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from scalezoo.models.layers import Linear, RMSNorm, constrain, rope, scaled_normal
from scalezoo.models.streams import KVPrefix, Streams, prefix_mask

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
    self.param_dtype = param_dtype
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

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array | None = None, *,
               streams: KVPrefix | None = None) -> jax.Array:
    b, t, _ = x_btd.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q_btnh, k_btkh, v_btkh = self._qkv(x_btd, positions_bt)
    impl = None if self.implementation == "auto" else self.implementation
    if streams is None:
      out_btnh = jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, is_causal=True, implementation=impl,
                                               scale=self.attn_scale)
    else:
      pk, pv = streams.rows(b, k_btkh.dtype)
      k_btkh, v_btkh = jnp.concatenate([pk, k_btkh], axis=1), jnp.concatenate([pv, v_btkh], axis=1)
      # The prefix breaks the square causal mask the fused kernels take, so this path is the masked XLA kernel.
      out_btnh = jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=prefix_mask(t, streams.length),
                                               implementation="xla", scale=self.attn_scale)
    out_btnh = constrain(out_btnh, ("batch", "seq", "heads", "head_dim"))
    return self.o(out_btnh)

  def stream_params(self, streams: Streams, rngs: nnx.Rngs) -> KVPrefix:
    """This layer's ParScale prefix: P x prefix_len keys and values per kv head."""
    return KVPrefix(streams, self.kv_heads, self.head_dim, rngs=rngs, param_dtype=self.param_dtype)

  def init_cache(self, batch: int, max_len: int, *, streams: KVPrefix | None = None) -> dict[str, jax.Array]:
    """A KV cache of `max_len` positions, {"k", "v"} [B, S, K, H] in the compute dtype: zeros, after the
    `streams` prefix (S = prefix_len + max_len) when given."""
    shape = (batch, max_len, self.kv_heads, self.head_dim)
    dtype = self.q.compute_dtype
    cache = dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
    if streams is not None:
      pk, pv = streams.rows(batch, dtype)
      cache = dict(k=jnp.concatenate([pk, cache["k"]], axis=1), v=jnp.concatenate([pv, cache["v"]], axis=1))
    return cache

  def step(self, x_btd: jax.Array, positions_bt: jax.Array, cache: dict, *,
           streams: KVPrefix | None = None) -> tuple[jax.Array, dict]:
    """Decoding: writes the keys/values of `x` at `positions` (consecutive, equal across rows) into the cache,
    then attends over every cached position <= each query's position (and the `streams` prefix, which the
    cache holds in its first slots); returns (y, updated cache)."""
    q_btnh, k_btkh, v_btkh = self._qkv(x_btd, positions_bt)
    offset = 0 if streams is None else streams.length
    start = positions_bt[0, 0] + offset
    k_bskh = jax.lax.dynamic_update_slice(cache["k"], k_btkh.astype(cache["k"].dtype), (0, start, 0, 0))
    v_bskh = jax.lax.dynamic_update_slice(cache["v"], v_btkh.astype(cache["v"].dtype), (0, start, 0, 0))
    key_pos_s = jnp.arange(k_bskh.shape[1], dtype=positions_bt.dtype)
    mask_b1ts = (key_pos_s[None, None, :] <= positions_bt[:, :, None] + offset)[:, None]
    # The plain XLA kernel: a boolean mask over a fixed-size cache, which the fused kernels do not take.
    out_btnh = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, implementation="xla",
                                             scale=self.attn_scale)
    return self.o(out_btnh), dict(k=k_bskh, v=v_bskh)
