"""ParScale's layers: P parallel streams through one set of weights (Chen et al. 2025, spec variants.md 2).

The streams of a batch of B sequences run as one stream-major batch of P * B rows (row p * B + b is stream p of
sequence b): `fold` repeats the embeddings, every layer sees P * B rows, and `Aggregator` folds the streams back
into B rows after the final norm. Streams differ only by their per-layer learnable inputs:

- softmax attention: a prefix of `prefix_len` keys and values per stream and layer (`KVPrefix`), raw K/V-space
  parameters without projection or RoPE, which every query sees (the causal mask applies among real tokens only);
- linear attention: a learnable initial recurrent state per stream and layer (`StreamState`), the linear layers'
  counterpart of a prefix (a prefix run through the recurrence would only ever reach the layer as a state).

`Streams(n, prefix_len, smoothing, init_std)` describes them; the decoder creates none of this when n is 1, so one
stream is the base model exactly. Parameters carry the `streams` axis. The reference releases only inference code,
so the inits are ours: the aggregator's matrices N(0, 0.02) with zero biases (HF's `_init_weights` defaults), the
prefixes and initial states N(0, init_std), 0.02 by default. Streams that start nearly equal get nearly equal
gradients and stay nearly equal (see the README's ParScale study); a larger init_std starts them apart.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from scalezoo.models.layers import constrain, param

INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class Streams:
  """P streams with `prefix_len` prefix tokens per attention layer; aggregation weights smoothed by `smoothing`;
  prefixes and initial states drawn from N(0, `init_std`), which sets how different the streams start."""
  n: int
  prefix_len: int = 48
  smoothing: float = 0.01
  init_std: float = INIT_STD

  def __post_init__(self):
    if not isinstance(self.n, int) or self.n < 1:
      raise ValueError(f"streams={self.n!r} must be a positive integer")
    if not isinstance(self.prefix_len, int) or self.prefix_len < 1:
      raise ValueError(f"prefix_len={self.prefix_len!r} must be a positive integer")
    if not 0 <= self.smoothing < 1:
      raise ValueError(f"smoothing={self.smoothing!r} must lie in [0, 1)")
    if not self.init_std >= 0:
      raise ValueError(f"init_std={self.init_std!r} must be >= 0")


def fold(x_b_: jax.Array, n: int) -> jax.Array:
  """[B, ...] -> [n * B, ...]: every sequence repeated once per stream, stream-major (row p * B + b)."""
  return jnp.broadcast_to(x_b_[None], (n,) + x_b_.shape).reshape((n * x_b_.shape[0],) + x_b_.shape[1:])


def per_row(x_p_: jax.Array, rows: int) -> jax.Array:
  """A per-stream parameter [P, ...] -> one copy per row of a stream-major batch of `rows` = P * B rows."""
  n = x_p_.shape[0]
  if rows % n:
    raise ValueError(f"a batch of {rows} rows is not {n} streams of equal size")
  b = rows // n
  return jnp.broadcast_to(x_p_[:, None], (n, b) + x_p_.shape[1:]).reshape((rows,) + x_p_.shape[1:])


class KVPrefix(nnx.Module):
  """One attention layer's prefix: keys and values [P, T_p, K, H] (K kv_heads, H head_dim)."""

  def __init__(self, streams: Streams, kv_heads: int, head_dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    init = jax.nn.initializers.normal(streams.init_std)
    shape = (streams.n, streams.prefix_len, kv_heads, head_dim)
    axes = ("streams", None, "kv_heads", "head_dim")
    self.k = param(init, rngs.params(), shape, axes, param_dtype)
    self.v = param(init, rngs.params(), shape, axes, param_dtype)

  @property
  def length(self) -> int:
    return self.k.shape[1]

  def rows(self, rows: int, dtype) -> tuple[jax.Array, jax.Array]:
    """(k, v) [rows, T_p, K, H] for a stream-major batch of `rows` rows, in `dtype`."""
    axes = ("batch", "seq", "kv_heads", "head_dim")
    return tuple(constrain(per_row(p[...].astype(dtype), rows), axes) for p in (self.k, self.v))


def prefix_mask(t: int, prefix_len: int) -> jax.Array:
  """bool [1, 1, T, T_p + T]: every query sees the T_p prefix slots and the real tokens up to itself."""
  q = jnp.arange(t)[:, None]
  s = jnp.arange(prefix_len + t)[None, :]
  return (s < prefix_len) | (s - prefix_len <= q)


class StreamState(nnx.Module):
  """One linear-attention layer's learnable initial state per stream: [P, *state] (the layer's state shape)."""

  def __init__(self, streams: Streams, state_shape: tuple[int, ...], *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    shape = (streams.n,) + tuple(state_shape)
    self.state = param(jax.nn.initializers.normal(streams.init_std), rngs.params(), shape,
                       ("streams",) + (None,) * len(state_shape), param_dtype)

  def rows(self, rows: int) -> jax.Array:
    """float32 [rows, *state]: the initial state of every row of a stream-major batch."""
    return per_row(self.state[...].astype(jnp.float32), rows)


class Aggregator(nnx.Module):
  """Dynamic weighted sum of the P streams' final hidden states (after the final norm).

  z = W2 silu(W1 c + b1) + b2 with c the P streams of one token concatenated (feature index i * P + p, the
  reference's order, so its weights load unchanged); w = (1 - eps) softmax(z) + eps / P in float32, which keeps every
  stream's weight >= eps / P; h = sum_p w_p H_p.
  """

  def __init__(self, width: int, streams: Streams, *, rngs: nnx.Rngs, compute_dtype=jnp.float32,
               param_dtype=jnp.float32):
    n = streams.n
    init, zeros = jax.nn.initializers.normal(INIT_STD), jax.nn.initializers.zeros
    # W1 kept [D, P, D'] rather than [P * D, D'] so it carries the streams axis; flattened it is the reference's.
    self.w1 = param(init, rngs.params(), (width, n, width), ("embed", "streams", "mlp"), param_dtype)
    self.b1 = param(zeros, rngs.params(), (width,), ("mlp",), param_dtype)
    self.w2 = param(init, rngs.params(), (width, n), ("mlp", "streams"), param_dtype)
    self.b2 = param(zeros, rngs.params(), (n,), ("streams",), param_dtype)
    self.n, self.smoothing, self.compute_dtype = n, streams.smoothing, compute_dtype

  def _unfold(self, h_rtd: jax.Array) -> jax.Array:
    rows = h_rtd.shape[0]
    return h_rtd.reshape((self.n, rows // self.n) + h_rtd.shape[1:])

  def weights(self, h_rtd: jax.Array) -> jax.Array:
    """float32 [B, T, P]: each token's smoothed stream weights, from the stream-major hidden states [P * B, T, D]."""
    h_pbtd = self._unfold(h_rtd).astype(self.compute_dtype)
    cd = self.compute_dtype
    hidden = jnp.einsum("pbtd,dpe->bte", h_pbtd, self.w1[...].astype(cd)) + self.b1[...].astype(cd)
    hidden = constrain(jax.nn.silu(hidden), ("batch", "seq", "mlp"))
    z = jnp.einsum("bte,ep->btp", hidden, self.w2[...].astype(cd)).astype(jnp.float32)
    w = jax.nn.softmax(z + self.b2[...].astype(jnp.float32), axis=-1)
    return (1.0 - self.smoothing) * w + self.smoothing / self.n

  def __call__(self, h_rtd: jax.Array) -> jax.Array:
    """[P * B, T, D] stream-major -> [B, T, D]."""
    w_btp = self.weights(h_rtd)
    out = jnp.einsum("pbtd,btp->btd", self._unfold(h_rtd).astype(jnp.float32), w_btp)
    return constrain(out.astype(h_rtd.dtype), ("batch", "seq", "embed"))


def aggregator_params(width: int, n: int) -> int:
  """W1, b1, W2, b2: P d^2 + d + d P + P (spec variants.md 2)."""
  return n * width * width + width + width * n + n


def aggregator_flops(width: int, n: int) -> float:
  """Training FLOPs per token of the aggregator's two matmuls (6 per weight) and the weighted sum."""
  return 6.0 * (n * width * width + width * n) + 3.0 * 2 * n * width
