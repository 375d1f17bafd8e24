"""Linear-attention token mixers (spec `linear_attention.md` sections 2-3): RetNet, GLA, HGRN, HGRN-2 here,
DeltaNet and Gated DeltaNet in `delta_layers.py`; plus the HGRN lower bound and the size/cost functions the model
family uses (`mixer_dims`, `make_linear_mixer`, `mixer_param_count`, `mixer_matmul_params`, `mixer_op_flops`).

Every mixer has the decoder's interface:
  __call__(x_btd, positions_bt, *, context=None) -> y_btd          training form, the chunked op
  init_cache(batch, max_len) -> dict                               zero state (float32) and conv caches
  step(x_btd, positions_bt, cache, *, context=None) -> (y, cache)  continues from `cache`; T == 1 runs the
                                                                   recurrent op, T > 1 the chunked one
  stream_params(streams, rngs) -> StreamState                      ParScale: a learnable initial state per
                                                                   stream, passed back as `streams=`
`context` is the layer's lower bound lb_d (float32 [width]) for the mixers with `takes_context = True` (HGRN,
HGRN-2) and is ignored by the others. The recurrent state is constant in sequence length, so `max_len` is unused.

Shape letters: B batch, T seq, D width, H heads, K key head_dim, V value head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scalezoo.models.layers import Linear, RMSNorm, constrain, param, rope
from scalezoo.models.linear import ops
from scalezoo.models.streams import Streams, StreamState

__all__ = ["LINEAR_MIXERS", "mixer_dims", "make_linear_mixer", "mixer_param_count", "mixer_matmul_params",
           "mixer_op_flops", "LowerBound", "RetNetMixer", "GLAMixer", "HGRNMixer", "HGRN2Mixer"]

INIT = jax.nn.initializers.normal(0.02)  # spec 2: every Linear and conv weight ~ N(0, 0.02), no o-proj rescale
GLA_GATE_RANK = 16
GLA_GATE_NORMALIZER = 16.0
BHTK = ("batch", "seq", "heads", "head_dim")


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / sqrt(sum x^2 + 1e-6) over the last dim, in float32 (the delta-rule ops expect unit keys)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + 1e-6)


def bounded_log_alpha(f_logit: jax.Array, lb: jax.Array | None) -> jax.Array:
  """log(lb + (1 - lb) sigmoid(f)) in float32; lb None or 0 gives exactly log_sigmoid(f).

  Double where: the lb == 0 entries (layer 0) take a dummy 0.5 inside the logs, so neither the value nor the
  gradient ever sees log(0) or 0 * inf.
  """
  log_sig = jax.nn.log_sigmoid(f_logit.astype(jnp.float32))
  if lb is None:
    return log_sig
  lb = jnp.asarray(lb, jnp.float32)
  bounded = lb > 0
  safe_lb = jnp.where(bounded, lb, 0.5)
  log_alpha = jnp.logaddexp(jnp.log(safe_lb), jnp.log1p(-safe_lb) + log_sig)
  return jnp.where(bounded, log_alpha, log_sig)


class LowerBound(nnx.Module):
  """HGRN's learned forget-gate lower bounds for all layers: lb_l = cumsum_l(softmax_l(Lambda)) - p_0.

  Lambda [depth, width] starts at zero, so lb_l = l / depth at init: deeper layers keep longer memories, and
  layer 0 is exactly unbounded. The softmax spans every layer, attention layers of a hybrid included (spec 1).
  """

  def __init__(self, depth: int, width: int, *, param_dtype=jnp.float32):
    self.lambdas = nnx.Param(jnp.zeros((depth, width), param_dtype), out_sharding=(None, "embed"),
                             eager_sharding=False)

  def __call__(self) -> jax.Array:
    """float32 [depth, width]: row l is layer l's lower bound."""
    p_ld = jax.nn.softmax(self.lambdas[...].astype(jnp.float32), axis=0)
    return jnp.cumsum(p_ld, axis=0) - p_ld[0]


class LinearMixer(nnx.Module):
  """Shared driver: subclasses define `_inputs` (projections, convs, gates) and may override `_mix` (the op, here
  gated linear attention) and `_output` (here W_o of the per-head RMSNorm, times swish(gate) when there is one)."""

  takes_context = False
  conv_names: tuple[str, ...] = ()

  def _setup(self, width: int, heads: int, key_dim: int, value_dim: int, chunk_size: int, compute_dtype,
             param_dtype, rngs: nnx.Rngs):
    self.width, self.heads, self.key_dim, self.value_dim = width, heads, key_dim, value_dim
    self.chunk_size, self.compute_dtype, self.param_dtype = chunk_size, compute_dtype, param_dtype
    # Not kept on the module: an Rngs attribute would become part of the module's state.
    return dict(rngs=rngs, init=INIT, compute_dtype=compute_dtype, param_dtype=param_dtype)

  def _gated_projections(self, kw: dict, param_dtype) -> None:
    """q, k: D -> [H, K]; v, g: D -> [H, V]; o: [H, V] -> D; the per-head output norm (RetNet, GLA)."""
    hk = ((self.heads, self.key_dim), ("heads", "head_dim"))
    hv = ((self.heads, self.value_dim), ("heads", "head_dim"))
    self.q, self.k = self._in_proj(kw, *hk), self._in_proj(kw, *hk)
    self.v, self.g = self._in_proj(kw, *hv), self._in_proj(kw, *hv)
    self.o = self._out_proj(kw, *hv)
    self.norm = RMSNorm(self.value_dim, axis_name="head_dim", param_dtype=param_dtype)

  def _in_proj(self, kw: dict, out_shape, out_axes) -> Linear:
    return Linear(self.width, out_shape, in_axes=("embed",), out_axes=out_axes, **kw)

  def _out_proj(self, kw: dict, in_shape, in_axes) -> Linear:
    return Linear(in_shape, self.width, in_axes=in_axes, out_axes=("embed",), **kw)

  def _state_shape(self, batch: int) -> tuple[int, ...]:
    return (batch, self.heads, self.key_dim, self.value_dim)

  def _conv(self, name: str, x: jax.Array, convs: dict | None, new_convs: dict) -> jax.Array:
    y, new_convs[name] = getattr(self, name)(x, None if convs is None else convs[name])
    return y

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, *, context: jax.Array | None = None,
               streams: StreamState | None = None) -> jax.Array:
    """Training form: the chunked op from a zero state, or from each row's ParScale `streams` initial state."""
    inputs, gate, _ = self._inputs(x_btd, positions_bt, None, context)
    state = None if streams is None else streams.rows(x_btd.shape[0])
    o, _ = self._mix(inputs, state, recurrent=False)
    return self._output(o, gate)

  def stream_params(self, streams: Streams, rngs: nnx.Rngs) -> StreamState:
    """ParScale for a linear layer: a learnable initial state per stream instead of a KV prefix."""
    return StreamState(streams, self._state_shape(1)[1:], rngs=rngs, param_dtype=self.param_dtype)

  def init_cache(self, batch: int, max_len: int, *, streams: StreamState | None = None) -> dict[str, jax.Array]:
    """The start-of-sequence cache: the float32 state (zero, or the `streams` initial states) and zero conv
    caches; `max_len` is unused."""
    del max_len
    state = jnp.zeros(self._state_shape(batch), jnp.float32) if streams is None else streams.rows(batch)
    cache = {"state": state}
    for name in self.conv_names:
      cache[name] = getattr(self, name).init_cache(batch, self.compute_dtype)
    return cache

  def step(self, x_btd: jax.Array, positions_bt: jax.Array, cache: dict[str, jax.Array], *,
           context: jax.Array | None = None, streams: StreamState | None = None) -> tuple[jax.Array, dict]:
    """Continues from `cache` over T >= 1 new tokens (prefill is a step from `init_cache`, which holds the
    `streams` initial states)."""
    del streams
    convs = {name: cache[name] for name in self.conv_names}
    inputs, gate, new_convs = self._inputs(x_btd, positions_bt, convs, context)
    o, state = self._mix(inputs, cache["state"], recurrent=x_btd.shape[1] == 1)
    return self._output(o, gate), {"state": state, **new_convs}

  def _mix(self, inputs: dict, state: jax.Array | None, recurrent: bool) -> tuple[jax.Array, jax.Array]:
    """The gated-linear-attention op (RetNet, GLA, HGRN-2), q scaled by K^-1/2 (HGRN-2 too: fla's default)."""
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["log_alpha"])
    if recurrent:
      return ops.recurrent_gla(*args, initial_state=state)
    return ops.chunk_gla(*args, initial_state=state, chunk_size=self.chunk_size)

  def _output(self, o_bthv: jax.Array, g_bthv: jax.Array | None) -> jax.Array:
    """W_o[RMSNorm_head(o) * w (* swish(g))], the norm and gate in float32."""
    y = self.norm(o_bthv.astype(jnp.float32))
    if g_bthv is not None:
      y = y * jax.nn.silu(g_bthv.astype(jnp.float32))
    return self.o(constrain(y.astype(self.compute_dtype), BHTK))


class RetNetMixer(LinearMixer):
  """Multi-scale retention: S_t = gamma_h S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(K), gamma_h = 1 - 2^(-5-h),
  q and k rotated by RoPE; y = W_o[RMSNorm_head(o) * swish(W_g x)] (spec 3.1)."""

  def __init__(self, width: int, heads: int, key_dim: int, value_dim: int, *, rngs: nnx.Rngs, chunk_size: int = 64,
               compute_dtype=jnp.float32, param_dtype=jnp.float32):
    kw = self._setup(width, heads, key_dim, value_dim, chunk_size, compute_dtype, param_dtype, rngs)
    self._gated_projections(kw, param_dtype)

  def _inputs(self, x_btd, positions_bt, convs, context):
    b, t, _ = x_btd.shape
    q = rope(constrain(self.q(x_btd), BHTK), positions_bt, 10000.0)
    k = rope(constrain(self.k(x_btd), BHTK), positions_bt, 10000.0)
    v, g = constrain(self.v(x_btd), BHTK), constrain(self.g(x_btd), BHTK)
    # log(1 - 2^(-5-h)) in float64: gamma rounds to 1 in float32 from about h = 19 on, its log does not.
    log_gamma_h = np.log1p(-np.exp2(-5.0 - np.arange(self.heads))).astype(np.float32)
    log_alpha = jnp.broadcast_to(jnp.asarray(log_gamma_h), (b, t, self.heads))
    return dict(q=q, k=k, v=v, log_alpha=log_alpha), g, {}


class GLAMixer(LinearMixer):
  """Gated linear attention: S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(K), with
  log alpha_t = log_sigmoid(W_2 W_1 x + b) / 16 (rank 16); y = W_o[RMSNorm_head(o) * swish(W_g x)] (spec 3.2)."""

  def __init__(self, width: int, heads: int, key_dim: int, value_dim: int, *, rngs: nnx.Rngs, chunk_size: int = 64,
               compute_dtype=jnp.float32, param_dtype=jnp.float32):
    kw = self._setup(width, heads, key_dim, value_dim, chunk_size, compute_dtype, param_dtype, rngs)
    self._gated_projections(kw, param_dtype)
    self.gate_down = self._in_proj(kw, GLA_GATE_RANK, (None,))
    self.gate_up = Linear(GLA_GATE_RANK, (heads, key_dim), in_axes=(None,), out_axes=("heads", "head_dim"),
                          **kw)
    self.gate_bias = param(jax.nn.initializers.zeros, rngs.params(), (heads, key_dim), ("heads", "head_dim"),
                           param_dtype)

  def _inputs(self, x_btd, positions_bt, convs, context):
    q, k = constrain(self.q(x_btd), BHTK), constrain(self.k(x_btd), BHTK)
    v, g = constrain(self.v(x_btd), BHTK), constrain(self.g(x_btd), BHTK)
    gk = self.gate_up(self.gate_down(x_btd)).astype(jnp.float32) + self.gate_bias[...].astype(jnp.float32)
    log_alpha = constrain(jax.nn.log_sigmoid(gk) / GLA_GATE_NORMALIZER, BHTK)
    return dict(q=q, k=k, v=v, log_alpha=log_alpha), g, {}


class HGRNMixer(LinearMixer):
  """HGRN (gen 1): h_t = alpha_t * h_{t-1} + silu(W_i x_t) * (1 - alpha_t), alpha_t = lb + (1 - lb) sigmoid(W_f x_t),
  a vector state of size D; y = W_o[RMSNorm(h) * swish(W_g x)] (spec 3.4).

  The hidden channels carry the `mlp` axis: the recurrence is elementwise, so they shard like an MLP's hidden.
  """

  takes_context = True

  def __init__(self, width: int, *, rngs: nnx.Rngs, chunk_size: int = 64, compute_dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = self._setup(width, 1, width, width, chunk_size, compute_dtype, param_dtype, rngs)
    self.i, self.f, self.g = (self._in_proj(kw, width, ("mlp",)) for _ in range(3))
    self.o = self._out_proj(kw, width, ("mlp",))
    self.norm = RMSNorm(width, axis_name="mlp", param_dtype=param_dtype)

  def _state_shape(self, batch):
    return (batch, self.width)

  def _inputs(self, x_btd, positions_bt, convs, context):
    log_alpha = bounded_log_alpha(self.f(x_btd), context)
    # silu(i) * (1 - alpha) in float32; -expm1 keeps 1 - alpha accurate when alpha is close to 1.
    x_in = jax.nn.silu(self.i(x_btd).astype(jnp.float32)) * -jnp.expm1(log_alpha)
    x_in = constrain(x_in, ("batch", "seq", "mlp"))
    return dict(x=x_in, log_alpha=log_alpha), constrain(self.g(x_btd), ("batch", "seq", "mlp")), {}

  def _mix(self, inputs, state, recurrent):
    fn = ops.recurrent_hgrn if recurrent else ops.hgrn_scan
    return fn(inputs["x"], inputs["log_alpha"], initial_state=state)

  def _output(self, h_btd, g_btd):
    y = self.norm(h_btd.astype(jnp.float32)) * jax.nn.silu(g_btd.astype(jnp.float32))
    return self.o(constrain(y.astype(self.compute_dtype), ("batch", "seq", "mlp")))


class HGRN2Mixer(LinearMixer):
  """HGRN-2: S_t = Diag(alpha_t) S_{t-1} + (1 - alpha_t) i_t^T, o_t = S_t^T swish(W_q x_t) / sqrt(K), alpha_t as in
  HGRN per channel of the H*K = D forget width; y = W_o RMSNorm over the full hidden (no gate) (spec 3.3)."""

  takes_context = True

  def __init__(self, width: int, heads: int, key_dim: int, value_dim: int, *, rngs: nnx.Rngs, chunk_size: int = 64,
               compute_dtype=jnp.float32, param_dtype=jnp.float32):
    if heads * key_dim != width or value_dim != key_dim:
      raise ValueError(f"hgrn2 needs heads * head_dim == width and value_dim == key_dim, got heads={heads}, "
                       f"key_dim={key_dim}, value_dim={value_dim}, width={width}")
    kw = self._setup(width, heads, key_dim, value_dim, chunk_size, compute_dtype, param_dtype, rngs)
    hk = ((heads, key_dim), ("heads", "head_dim"))
    self.q, self.f, self.i = self._in_proj(kw, *hk), self._in_proj(kw, *hk), self._in_proj(kw, *hk)
    self.o = self._out_proj(kw, *hk)
    # One gain over the whole hidden, kept [H, V] so it shards with the heads it scales.
    self.norm_scale = param(jax.nn.initializers.ones, rngs.params(), (heads, value_dim), ("heads", "head_dim"),
                            param_dtype)

  def _inputs(self, x_btd, positions_bt, convs, context):
    q = constrain(jax.nn.silu(self.q(x_btd)), BHTK)
    lb = None if context is None else jnp.reshape(context, (self.heads, self.key_dim))
    log_alpha = constrain(bounded_log_alpha(self.f(x_btd), lb), BHTK)
    k = (-jnp.expm1(log_alpha)).astype(q.dtype)  # tied input gate 1 - alpha
    v = constrain(self.i(x_btd), BHTK)
    return dict(q=q, k=k, v=v, log_alpha=log_alpha), None, {}

  def _output(self, o_bthv, gate):
    o32 = o_bthv.astype(jnp.float32)
    ms = jnp.mean(o32 * o32, axis=(-2, -1), keepdims=True)
    y = o32 * jax.lax.rsqrt(ms + 1e-6) * self.norm_scale[...].astype(jnp.float32)
    return self.o(constrain(y.astype(self.compute_dtype), BHTK))


LINEAR_MIXERS = ("retnet", "gla", "hgrn", "hgrn2", "deltanet", "gated_deltanet")
# expand_k, expand_v of the spec's defaults (key width H*K = expand_k * D, V = K * expand_v / expand_k) and heads.
_EXPAND = {"retnet": (1.0, 2.0, 8), "gla": (0.5, 1.0, 4), "deltanet": (1.0, 1.0, 8),
           "gated_deltanet": (0.75, 1.5, 6)}
_CONV_MIXERS = ("deltanet", "gated_deltanet")


def _divide(name: str, what: str, num: float, den: int) -> int:
  if den <= 0 or num != int(num) or int(num) % den:
    raise ValueError(f"linear mixer {name!r}: {what} = {num:g} is not divisible by {den}; choose a width, "
                     f"heads or head_dim that divide")
  return int(num) // den


def mixer_dims(name: str, width: int, heads: int = 0, head_dim: int = 0) -> dict[str, int]:
  """Heads H, key head_dim K and value head_dim V of mixer `name` at `width` (heads/head_dim 0: spec defaults).

  A given head_dim sets K (V follows the variant's expand_v ratio); a given heads sets H; with only one given the
  other keeps the spec's total key width expand_k * width. hgrn has no heads: it reports H = 1, K = V = width
  (its state is the width-vector, not a K x V matrix) and ignores heads/head_dim. hgrn2 needs H * K == width.
  """
  if name not in LINEAR_MIXERS:
    raise ValueError(f"unknown linear mixer {name!r}; choose one of {', '.join(LINEAR_MIXERS)}")
  if name == "hgrn":
    return dict(heads=1, key_dim=width, value_dim=width)
  if name == "hgrn2":
    k = head_dim or (_divide(name, "width", width, heads) if heads else min(128, width))
    h = heads or _divide(name, "width", width, k)
    if h * k != width:
      raise ValueError(f"linear mixer 'hgrn2': heads * head_dim = {h} * {k} must equal width {width}")
    return dict(heads=h, key_dim=k, value_dim=k)
  expand_k, expand_v, default_heads = _EXPAND[name]
  key_width = expand_k * width
  if head_dim:
    k, h = head_dim, heads or _divide(name, "key width (expand_k * width)", key_width, head_dim)
  else:
    h = heads or default_heads
    k = _divide(name, "key width (expand_k * width)", key_width, h)
  v = _divide(name, "value head_dim (expand_v / expand_k * K)", k * expand_v / expand_k, 1)
  if name == "retnet" and k % 2:
    raise ValueError(f"linear mixer 'retnet': key head_dim {k} must be even for rotary embeddings")
  return dict(heads=h, key_dim=k, value_dim=v)


def mixer_matmul_params(name: str, width: int, heads: int = 0, head_dim: int = 0) -> int:
  """Weights of the projections every token passes through (2 FLOPs each per token forward); no conv or norms."""
  d = mixer_dims(name, width, heads, head_dim)
  h, k, v = d["heads"], d["key_dim"], d["value_dim"]
  hk, hv = h * k, h * v
  return {
      "retnet": width * (2 * hk + 2 * hv) + hv * width,  # q k v g, o
      "gla": width * (2 * hk + 2 * hv) + GLA_GATE_RANK * (width + hk) + hv * width,  # + low-rank gate
      "hgrn": 4 * width * width,  # i f g o
      "hgrn2": width * (2 * hk + hv) + hv * width,  # q f i, o
      "deltanet": width * (2 * hk + hv + h) + hv * width,  # q k v beta, o
      "gated_deltanet": width * (2 * hk + 2 * hv + 2 * h) + hv * width,  # q k v g a beta, o
  }[name]


def mixer_param_count(name: str, width: int, heads: int = 0, head_dim: int = 0, conv_size: int = 4) -> int:
  """All parameters of the module `make_linear_mixer` builds (pinned to the module by a test)."""
  d = mixer_dims(name, width, heads, head_dim)
  h, k, v = d["heads"], d["key_dim"], d["value_dim"]
  extra = {
      "retnet": v,  # norm gain
      "gla": h * k + v,  # gate bias, norm gain
      "hgrn": width,  # norm gain
      "hgrn2": h * v,  # norm gain over the full hidden
      "deltanet": conv_size * h * (2 * k + v) + v,  # q k v convs, norm gain
      "gated_deltanet": conv_size * h * (2 * k + v) + v + 2 * h,  # convs, norm gain, A_log, dt_bias
  }[name]
  return mixer_matmul_params(name, width, heads, head_dim) + extra


def _chunk_flops(kind: str, c: int, k: int, v: int) -> float:
  """Forward FLOPs of one chunk of c rows and one head as the ops compute it: full c x c products, masks after,
  and every chunk-local prefix sum as a matmul with a 0/1 [c, c] mask (2c FLOPs per summed element)."""
  if kind == "scalar":
    # Segment sums of the decays [c, c] (2c^3); QK^T, (A)V, read-out (Q e^g) S_0, update (K e^{g_C - g})^T V;
    # prefix and suffix sums, decay exp and product, q/k decay, output sum, state decay and add.
    return 2 * c ** 3 + 2 * c * c * (k + v) + 4 * c * k * v + 6 * c * c + 2 * c * k + c * v + 2 * k * v
  if kind == "vector":
    sc = max(s for s in range(1, ops.SUB_CHUNK + 1) if c % s == 0)
    # QK^T over every sub-block pair, (A)V, read-out, update; prefix and suffix sums of the [c, K] gates (4c^2K);
    # the diagonal sub-blocks' [c, sc, K] segment sums (2c sc^2 K), exp, q * k * decay summed over K and the
    # reference-row sums; off-diagonal key decay for every block pair (diff, exp, product); q/k decays, diagonal
    # merge, output sum, state decay and add.
    return (2 * c * c * (k + v) + 4 * c * k * v + 4 * c * c * k + 2 * c * sc * sc * k + 6 * c * sc * k
            + 3 * (c // sc) * c * k + 6 * c * k + 2 * c * c + c * v + 2 * k * v)
  # Delta rule: segment sums (2c^3); KK^T, QK^T and (QK^T * M) W (2c^2K each), triangular solve of [W U]
  # (c^2(K + V)), (QK^T * M) U (2c^2V); W S_0, the state update and the read-out (2cKV each); masks, gates, sums.
  return 2 * c ** 3 + 7 * c * c * k + 3 * c * c * v + 6 * c * k * v + 9 * c * c + 4 * c * k + 3 * c * v + 2 * k * v


def mixer_op_flops(name: str, width: int, seq_len: int, heads: int = 0, head_dim: int = 0,
                   chunk_size: int = 64, conv_size: int = 4) -> float:
  """Forward FLOPs per token of the token-mixing op beyond the projections, for the chunked (training) form.

  With c = ops.chunk_len(T, chunk_size), N = ceil(T / c) chunks (padding included) and H heads, per token
  H * N * F(c) / T, where F (`_chunk_flops`, per chunk and head) has the leading terms
    retnet (scalar decay):  2c^3 + 2c^2(K + V) + 4cKV
    gla, hgrn2 (vector):    2c^2(K + V) + 4cKV + 4c^2K + 2c*sc^2*K + 6c*sc*K + 3(c/sc)cK   (sc: 16-row sub-chunk)
    deltanet, gdn (delta):  2c^3 + 7c^2K + 3c^2V + 6cKV                    (the solve is c^2(K + V) of it)
  (the c^3 and c^2K sum terms are the ops' prefix sums, done as matmuls with triangular 0/1 masks), plus for
  deltanet and gdn the three short convs: 2 * conv_size * H(2K + V) per token.
  hgrn: the associative scan does about 2 combines of 3 FLOPs per token and channel, plus the gate's exp: 7D.
  A multiply-add is 2 FLOPs, an exp 1; selects (masks) are not counted. Over one chunk this is within a few
  percent of XLA's cost analysis of the compiled op, which however counts a scan body once (so reads less for
  several chunks) and, on CPU, a triangular solve as nothing.
  """
  d = mixer_dims(name, width, heads, head_dim)
  h, k, v = d["heads"], d["key_dim"], d["value_dim"]
  if name == "hgrn":
    return 7.0 * width
  c = ops.chunk_len(seq_len, chunk_size)
  n = -(-seq_len // c)
  kind = {"retnet": "scalar", "gla": "vector", "hgrn2": "vector"}.get(name, "delta")
  flops = h * n * _chunk_flops(kind, c, k, v) / seq_len
  if name in _CONV_MIXERS:
    flops += 2 * conv_size * h * (2 * k + v)
  return float(flops)


def make_linear_mixer(name: str, width: int, *, heads: int = 0, head_dim: int = 0, rngs: nnx.Rngs,
                      chunk_size: int = 64, conv_size: int = 4, compute_dtype=jnp.float32,
                      param_dtype=jnp.float32) -> nnx.Module:
  """Builds linear mixer `name` (one of LINEAR_MIXERS) at `width`; heads/head_dim 0 take the spec defaults."""
  from scalezoo.models.linear import delta_layers  # it imports this module
  dims = mixer_dims(name, width, heads, head_dim)
  kw = dict(rngs=rngs, chunk_size=chunk_size, compute_dtype=compute_dtype, param_dtype=param_dtype)
  if name == "hgrn":
    return HGRNMixer(width, **kw)
  hkv = (dims["heads"], dims["key_dim"], dims["value_dim"])
  if name == "deltanet":
    return delta_layers.DeltaNetMixer(width, *hkv, conv_size=conv_size, **kw)
  if name == "gated_deltanet":
    return delta_layers.GatedDeltaNetMixer(width, *hkv, conv_size=conv_size, **kw)
  cls = {"retnet": RetNetMixer, "gla": GLAMixer, "hgrn2": HGRN2Mixer}[name]
  return cls(width, *hkv, **kw)

