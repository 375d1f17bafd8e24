"""Pattention (TokenFormer's token-parameter attention) and the LayerNorm TokenFormer uses.

Pattention replaces a linear map: n key tokens K [n, in] and value tokens V [n, *out] are its parameters, and
O = Theta(X K^T) V. The scores A = X K^T carry no 1/sqrt(d). Theta (`norm`):

  l2_norm_gelu  GeLU(tau * A / sqrt(sum_n A^2 + eps))      (TokenFormer's released models)
  gelu_l2_norm  tau * G / sqrt(sum_n G^2 + eps), G = GeLU(A)
  softmax       n * softmax_n(A)

GeLU is the exact (erf) one. `tau` is a constructor constant and never follows n: appending tokens whose keys are
zero adds A = 0 and GeLU(0) = 0, so under both l2 variants the new tokens get weight exactly 0 and the output is
unchanged, but only while tau stays; sqrt(n_new) would rescale every old weight. Softmax gives a zero score
exp(0) mass, so growth changes it whatever the keys.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from scalezoo.models.layers import Axes, constrain, param

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


def _as_tuple(x) -> tuple:
  return (x,) if isinstance(x, (int, str)) else tuple(x)


def token_weights(a_xn: jax.Array, *, tau: float, norm: str, eps: float = 1e-6) -> jax.Array:
  """Theta(A) over the last (parameter-token) axis, in float32."""
  a_xn = a_xn.astype(jnp.float32)
  if norm == "l2_norm_gelu":
    inv = jax.lax.rsqrt(jnp.sum(a_xn * a_xn, axis=-1, keepdims=True) + eps)
    return jax.nn.gelu(tau * a_xn * inv, approximate=False)
  if norm == "gelu_l2_norm":
    g_xn = jax.nn.gelu(a_xn, approximate=False)
    return tau * g_xn * jax.lax.rsqrt(jnp.sum(g_xn * g_xn, axis=-1, keepdims=True) + eps)
  if norm == "softmax":
    return a_xn.shape[-1] * jax.nn.softmax(a_xn, axis=-1)
  raise ValueError(f"Pattention norm {norm!r} is not one of {NORMS}")


def pattention(x: jax.Array, key_tokens: jax.Array, value_tokens: jax.Array, *, n_in: int, tau: float, norm: str,
               eps: float = 1e-6, compute_dtype=jnp.float32) -> jax.Array:
  """Theta(X K^T) V, contracting the trailing `n_in` dims of x with key_tokens [n, *in] and the token axis of the
  weights with value_tokens [n, *out]: [..., *in] -> [..., *out]."""
  contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(1, 1 + n_in)))
  # Scores accumulate and are normalised in float32 whatever the compute dtype: the l2 norm runs over n terms.
  a_xn = jax.lax.dot_general(x.astype(compute_dtype), key_tokens.astype(compute_dtype), (contract, ((), ())),
                             preferred_element_type=jnp.float32)
  if a_xn.ndim == 3:
    a_xn = constrain(a_xn, ("batch", "seq", "param_tokens"))
  w_xn = token_weights(a_xn, tau=tau, norm=norm, eps=eps).astype(compute_dtype)
  return jax.lax.dot_general(w_xn, value_tokens.astype(compute_dtype), (((w_xn.ndim - 1,), (0,)), ((), ())))


class Pattention(nnx.Module):
  """O = Theta(X K^T) V with `n_tokens` key tokens [n, *in] and value tokens [n, *out] (module docstring).

  Shapes as a Linear(in, out): `in_features` may be a tuple (the output projection reads (heads, head_dim) with
  `in_axis=("heads", "head_dim")`), `out_shape` likewise with `out_axes`.
  """

  def __init__(self, in_features: int | Sequence[int], out_shape: int | Sequence[int], n_tokens: int, *, tau: float,
               norm: str = "l2_norm_gelu", rngs: nnx.Rngs, key_std: float = 0.02, value_std: float,
               in_axis: str | Axes = "embed", out_axes: Axes = ("embed",), compute_dtype=jnp.float32,
               param_dtype=jnp.float32, eps: float = 1e-6):
    if norm not in NORMS:
      raise ValueError(f"Pattention norm {norm!r} is not one of {NORMS}")
    if not (math.isfinite(tau) and tau > 0):
      raise ValueError(f"Pattention tau={tau!r} must be a positive finite number (sqrt of the initial token count)")
    self.in_shape, self.out_shape = _as_tuple(in_features), _as_tuple(out_shape)
    in_axes, out_axes = _as_tuple(in_axis), _as_tuple(out_axes)
    self.tau, self.norm, self.eps = float(tau), norm, eps
    self.key_std, self.value_std = key_std, value_std
    self.compute_dtype = compute_dtype
    self.key_tokens = param(jax.nn.initializers.normal(key_std), rngs.params(), (n_tokens,) + self.in_shape,
                            ("param_tokens",) + in_axes, param_dtype)
    self.value_tokens = param(jax.nn.initializers.normal(value_std), rngs.params(), (n_tokens,) + self.out_shape,
                              ("param_tokens",) + out_axes, param_dtype)

  @property
  def n_tokens(self) -> int:
    return self.key_tokens.shape[0]

  def __call__(self, x: jax.Array) -> jax.Array:
    return pattention(x, self.key_tokens[...], self.value_tokens[...], n_in=len(self.in_shape), tau=self.tau,
                      norm=self.norm, eps=self.eps, compute_dtype=self.compute_dtype)

  def grow(self, m: int, rngs: nnx.Rngs) -> None:
    """Appends `m` parameter tokens in place: zero key rows (with l2_norm_gelu or gelu_l2_norm the output does not
    change, since tau stays) and value rows drawn from the value init. Models grow with tokenformer.grow_params."""
    k, v = self.key_tokens[...], self.value_tokens[...]
    new_v = jax.nn.initializers.normal(self.value_std)(rngs.params(), (m,) + v.shape[1:], v.dtype)
    self.key_tokens.set_value(jnp.concatenate([k, jnp.zeros((m,) + k.shape[1:], k.dtype)]))
    self.value_tokens.set_value(jnp.concatenate([v, new_v]))


class LayerNorm(nnx.Module):
  """LayerNorm over the last dim, in float32; `parametric` adds a gain (init 1) and a bias (init 0).

  TokenFormer's blocks use it without parameters (eps 1e-5), its final norm with them.
  """

  def __init__(self, width: int, *, eps: float = 1e-5, parametric: bool = True, axis_name: str = "embed",
               param_dtype=jnp.float32):
    if parametric:
      self.scale = nnx.Param(jnp.ones((width,), param_dtype), out_sharding=(axis_name,), eager_sharding=False)
      self.bias = nnx.Param(jnp.zeros((width,), param_dtype), out_sharding=(axis_name,), eager_sharding=False)
    else:
      self.scale = self.bias = None
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)
