"""Delta-rule token mixers (spec 3.5, 3.6): DeltaNet and Gated DeltaNet. The shared driver, the other four mixers
and the size/cost functions are in `layers.py`.

Shape letters: B batch, T seq, D width, H heads, K key head_dim, V value head_dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from scalezoo.models.layers import RMSNorm, constrain, param
from scalezoo.models.linear import delta
from scalezoo.models.linear.conv import ShortConv
from scalezoo.models.linear.layers import BHTK, LinearMixer, l2_normalize

# Gated DeltaNet gate init (spec 3.6): A ~ U(0, 16); dt = exp(U(ln 1e-3, ln 0.1)) clamped at 1e-4.
A_INIT_RANGE = (0.0, 16.0)
DT_INIT_RANGE = (1e-3, 0.1)
DT_INIT_FLOOR = 1e-4


def a_log_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """log A with A ~ U(0, 16), kept off 0 so the log stays finite."""
  a = jax.random.uniform(key, shape, jnp.float32, *A_INIT_RANGE)
  return jnp.log(jnp.maximum(a, 1e-6)).astype(dtype)


def dt_bias_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """softplus^-1(dt), dt log-uniform in [1e-3, 0.1] and >= 1e-4, so softplus(a + dt_bias) starts near dt."""
  lo, hi = (math.log(x) for x in DT_INIT_RANGE)
  dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi)), DT_INIT_FLOOR)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class DeltaRuleMixer(LinearMixer):
  """q, k, v = SiLU(ShortConv(W x)), q and k L2-normalised per head, beta = sigmoid(W_b x); subclasses add gates."""

  conv_names = ("conv_q", "conv_k", "conv_v")

  def _delta_setup(self, kw: dict, conv_size: int, param_dtype, rngs: nnx.Rngs):
    h, k, v = self.heads, self.key_dim, self.value_dim
    hk, hv = ((h, k), ("heads", "head_dim")), ((h, v), ("heads", "head_dim"))
    self.q, self.k, self.v = self._in_proj(kw, *hk), self._in_proj(kw, *hk), self._in_proj(kw, *hv)
    self.b = self._in_proj(kw, h, ("heads",))
    conv = dict(channel_axes=("heads", "head_dim"), rngs=rngs, kernel_size=conv_size, param_dtype=param_dtype)
    self.conv_q, self.conv_k = ShortConv((h, k), **conv), ShortConv((h, k), **conv)
    self.conv_v = ShortConv((h, v), **conv)
    self.o = self._out_proj(kw, *hv)
    self.norm = RMSNorm(v, axis_name="head_dim", param_dtype=param_dtype)

  def _qkv_beta(self, x_btd: jax.Array, convs: dict | None) -> tuple[dict, dict]:
    new_convs = {}
    q = self._conv("conv_q", constrain(self.q(x_btd), BHTK), convs, new_convs)
    k = self._conv("conv_k", constrain(self.k(x_btd), BHTK), convs, new_convs)
    v = self._conv("conv_v", constrain(self.v(x_btd), BHTK), convs, new_convs)
    q, k = l2_normalize(q).astype(v.dtype), l2_normalize(k).astype(v.dtype)
    beta = constrain(jax.nn.sigmoid(self.b(x_btd).astype(jnp.float32)), ("batch", "seq", "heads"))
    return dict(q=constrain(q, BHTK), k=constrain(k, BHTK), v=v, beta=beta, log_alpha=None), new_convs

  def _mix(self, inputs, state, recurrent):
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["beta"], inputs["log_alpha"])
    if recurrent:
      return delta.recurrent_delta_rule(*args, initial_state=state)
    return delta.chunk_delta_rule(*args, initial_state=state, chunk_size=self.chunk_size)


class DeltaNetMixer(DeltaRuleMixer):
  """DeltaNet: S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t / sqrt(K);
  y = W_o RMSNorm_head(o) (no output gate, spec 3.5)."""

  def __init__(self, width: int, heads: int, key_dim: int, value_dim: int, *, rngs: nnx.Rngs, chunk_size: int = 64,
               conv_size: int = 4, compute_dtype=jnp.float32, param_dtype=jnp.float32):
    kw = self._setup(width, heads, key_dim, value_dim, chunk_size, compute_dtype, param_dtype, rngs)
    self._delta_setup(kw, conv_size, param_dtype, rngs)

  def _inputs(self, x_btd, positions_bt, convs, context):
    inputs, new_convs = self._qkv_beta(x_btd, convs)
    return inputs, None, new_convs


class GatedDeltaNetMixer(DeltaRuleMixer):
  """Gated DeltaNet: S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t / sqrt(K),
  log alpha_t = -exp(A_log) softplus(W_a x + dt_bias); y = W_o[RMSNorm_head(o) * swish(W_g x)] (spec 3.6)."""

  def __init__(self, width: int, heads: int, key_dim: int, value_dim: int, *, rngs: nnx.Rngs, chunk_size: int = 64,
               conv_size: int = 4, compute_dtype=jnp.float32, param_dtype=jnp.float32):
    kw = self._setup(width, heads, key_dim, value_dim, chunk_size, compute_dtype, param_dtype, rngs)
    self._delta_setup(kw, conv_size, param_dtype, rngs)
    self.a = self._in_proj(kw, heads, ("heads",))
    self.g = self._in_proj(kw, (heads, value_dim), ("heads", "head_dim"))
    self.a_log = param(a_log_init, rngs.params(), (heads,), ("heads",), param_dtype)
    self.dt_bias = param(dt_bias_init, rngs.params(), (heads,), ("heads",), param_dtype)

  def _inputs(self, x_btd, positions_bt, convs, context):
    inputs, new_convs = self._qkv_beta(x_btd, convs)
    a = self.a(x_btd).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
    log_alpha = -jnp.exp(self.a_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
    inputs["log_alpha"] = constrain(log_alpha, ("batch", "seq", "heads"))
    return inputs, constrain(self.g(x_btd), BHTK), new_convs
