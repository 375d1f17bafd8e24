"""Basic layers with logical axes: Linear, Embed, RMSNorm, RoPE, SwiGLU MLP, and `constrain()`.

Axis vocabulary (the one place it is written; every module in scalezoo.models uses these names):

  batch       examples in a batch (activations only)
  seq         sequence positions (activations only)
  embed       model width d
  vocab       vocabulary entries
  heads       query heads
  kv_heads    key/value heads (grouped-query attention)
  head_dim    per-head width
  mlp         hidden width of a feed-forward layer
  experts     routed experts of a mixture-of-experts layer
  layers      the stacked layer axis of a scanned decoder
  param_tokens  key/value parameter tokens of a TokenFormer Pattention
  streams     parallel streams of ParScale

Parameters carry their axes as `out_sharding` metadata (a tuple of names above, one per array dim); activations
are pinned with `constrain(x, axes)`. Models never name mesh axes: the trainer installs a rules table that maps
these logical names to mesh axes (`axis_rules`), and outside of it `constrain` is the identity, so every layer runs
unchanged in plain JAX code on one device.

Tensor names end in their shape letters: B batch, T seq, D embed, V vocab, N heads, K kv_heads, H head_dim,
F mlp, E experts, L layers.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]

# Maps a logical-axes tuple and a shape to a PartitionSpec; installed by the trainer (see axis_rules).
_RULES: contextvars.ContextVar = contextvars.ContextVar("scalezoo_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(to_spec: Callable[[Axes, Sequence[int]], jax.sharding.PartitionSpec]):
  """Installs a logical->mesh mapping for `constrain` while tracing under a mesh."""
  token = _RULES.set(to_spec)
  try:
    yield
  finally:
    _RULES.reset(token)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Pins activation `x` to the sharding its logical `axes` map to; identity when no rules are installed."""
  to_spec = _RULES.get()
  if to_spec is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, to_spec(tuple(axes), x.shape))


def logical_spec(axes: Axes, shape: Sequence[int]) -> jax.sharding.PartitionSpec | None:
  """The PartitionSpec the installed rules give logical `axes` on the current mesh; None outside a mesh."""
  to_spec = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if to_spec is None or mesh is None or mesh.empty:
    return None
  return to_spec(tuple(axes), tuple(shape))


def param(init: Initializer, key: jax.Array, shape: Sequence[int], axes: Axes, dtype=jnp.float32) -> nnx.Param:
  """A parameter tagged with its logical axes.

  `eager_sharding=False`: placement is the trainer's job (it maps the axes through its rules table); a layer
  built outside any mesh, e.g. in a user's own code, must not need one.
  """
  assert len(axes) == len(shape), (axes, shape)
  return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


def scaled_normal(fan_in: int, scale: float = 1.0) -> Initializer:
  """Normal init with std scale/sqrt(fan_in)."""
  return jax.nn.initializers.normal(stddev=scale / math.sqrt(fan_in))


class Linear(nnx.Module):
  """y = x @ W over one or more trailing input dims into one or more output dims (no bias).

  The kernel has shape in_shape + out_shape and axes in_axes + out_axes, so attention projections keep
  their head structure ([D, N, H]) and shard along heads.
  """

  def __init__(self, in_shape, out_shape, *, in_axes: Axes, out_axes: Axes, rngs: nnx.Rngs,
               init: Initializer | None = None, compute_dtype=jnp.float32, param_dtype=jnp.float32):
    self.in_shape, self.out_shape = _as_tuple(in_shape), _as_tuple(out_shape)
    fan_in = math.prod(self.in_shape)
    init = init or scaled_normal(fan_in)
    self.kernel = param(init, rngs.params(), self.in_shape + self.out_shape, tuple(in_axes) + tuple(out_axes),
                        param_dtype)
    self.compute_dtype = compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    w = self.kernel[...].astype(self.compute_dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x.astype(self.compute_dtype), w, (contract, ((), ())))


class Embed(nnx.Module):
  """Token embedding [V, D]; `attend` gives tied-output logits x @ E^T."""

  def __init__(self, vocab_size: int, width: int, *, rngs: nnx.Rngs, compute_dtype=jnp.float32,
               param_dtype=jnp.float32):
    # std 1/sqrt(D): rows have unit norm, so tied logits x @ E^T of a unit-RMS x are O(1) for unrelated rows
    # (a token's own row, still close to x at init, gives about sqrt(D)).
    self.embedding = param(scaled_normal(width), rngs.params(), (vocab_size, width),
                           ("vocab", "embed"), param_dtype)
    self.compute_dtype = compute_dtype

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_bt, axis=0).astype(self.compute_dtype)

  def attend(self, x_btd: jax.Array) -> jax.Array:
    return jnp.einsum("btd,vd->btv", x_btd.astype(self.compute_dtype),
                      self.embedding[...].astype(self.compute_dtype))


class RMSNorm(nnx.Module):
  """RMS normalisation over the last dim, computed in float32, with a learned gain."""

  def __init__(self, width: int, *, eps: float = 1e-6, axis_name: str = "embed", param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((width,), param_dtype), out_sharding=(axis_name,), eager_sharding=False)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary position embedding on the last dim (split-half convention), computed in float32."""
  head_dim = x_btnh.shape[-1]
  half = head_dim // 2
  freq_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_bth = positions_bt[..., None].astype(jnp.float32) * freq_h
  sin, cos = jnp.sin(angle_bth)[:, :, None, :], jnp.cos(angle_bth)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)


class SwiGLU(nnx.Module):
  """Feed-forward y = W_down(silu(W_gate x) * W_up x)."""

  def __init__(self, width: int, ffn_width: int, *, rngs: nnx.Rngs, depth: int = 1, compute_dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype)
    self.gate = Linear(width, ffn_width, in_axes=("embed",), out_axes=("mlp",), **kw)
    self.up = Linear(width, ffn_width, in_axes=("embed",), out_axes=("mlp",), **kw)
    # Output projections are scaled down with depth so the residual stream's variance stays O(1).
    self.down = Linear(ffn_width, width, in_axes=("mlp",), out_axes=("embed",),
                       init=scaled_normal(ffn_width, 1.0 / math.sqrt(2 * depth)), **kw)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    h_btf = jax.nn.silu(self.gate(x_btd)) * self.up(x_btd)
    h_btf = constrain(h_btf, ("batch", "seq", "mlp"))
    return self.down(h_btf)
