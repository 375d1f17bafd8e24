"""Mixture-of-experts channel mixer: routing (top-k, MoGE, DeepSeek-V3 group-limited), dropless and capacity
dispatch, balance / z losses, aux-loss-free bias balancing.

Math: shared/specs/variants.md sections 3 (MoGE) and 4 (standard top-k MoE). The pure functions below
take plain arrays so they can be tested and jitted alone; `MoE` wires them into an nnx channel mixer that
returns (y, aux) as `decoder.Block` expects.

Shape letters (see layers.py): T tokens (batch x seq flattened), D embed, F mlp, E experts (weights),
N experts (router columns), K top-k slots, C capacity per expert.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec as P

from scalezoo.models.layers import SwiGLU, constrain, logical_spec, param, scaled_normal

ROUTINGS = ("topk", "moge", "group_limited")
SCORES = ("softmax", "sigmoid")


# ----------------------------------------------------------------------------------------------- routing


def route(logits_tn: jax.Array, *, top_k: int, routing: str = "topk", score: str = "softmax",
          renormalize: bool = True, groups: int = 1, topk_groups: int = 1, bias_n: jax.Array | None = None,
          route_scale: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Chooses `top_k` experts per token; returns (idx [T,K] int32, gates [T,K] float32, probs [T,N]).

  routing:
    "topk"          top-k of the (biased) scores.
    "moge"          N experts in `groups` contiguous groups; top-(k/groups) per group of the global scores.
                    Never renormalised (MoGE keeps the global-softmax values), whatever `renormalize` says.
    "group_limited" DeepSeek-V3: a group's score is the sum of its top-2 biased scores; only the
                    `topk_groups` best groups stay eligible, then top-k among their experts.
  `bias_n` only shifts which experts are chosen: the gates are always the unbiased scores at the chosen
  indices, optionally renormalised to sum 1, times `route_scale`. `probs` are the unbiased scores.
  """
  logits_tn = logits_tn.astype(jnp.float32)
  t, n = logits_tn.shape
  probs_tn = jax.nn.softmax(logits_tn, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits_tn)
  sel_tn = probs_tn if bias_n is None else probs_tn + bias_n.astype(jnp.float32)
  # Selection scores only decide indices (top_k has no gradient to them anyway); cutting them off states that
  # the bias, a balancing controller and not a learned parameter, can never receive gradient.
  sel_tn = jax.lax.stop_gradient(sel_tn)

  if routing == "topk":
    _, idx_tk = jax.lax.top_k(sel_tn, top_k)
  elif routing == "moge":
    per_group = n // groups
    _, local_tgk = jax.lax.top_k(sel_tn.reshape(t, groups, per_group), top_k // groups)
    offset_g1 = (jnp.arange(groups) * per_group)[:, None]
    idx_tk = (local_tgk + offset_g1).reshape(t, top_k)
    renormalize = False
  elif routing == "group_limited":
    per_group = n // groups
    sel_tgn = sel_tn.reshape(t, groups, per_group)
    group_score_tg = jnp.sum(jax.lax.top_k(sel_tgn, min(2, per_group))[0], axis=-1)
    _, keep_tg = jax.lax.top_k(group_score_tg, topk_groups)
    allowed_tg = jnp.zeros((t, groups), bool).at[jnp.arange(t)[:, None], keep_tg].set(True)
    masked_tn = jnp.where(allowed_tg[:, :, None], sel_tgn, -jnp.inf).reshape(t, n)
    _, idx_tk = jax.lax.top_k(masked_tn, top_k)
  else:
    raise ValueError(f"routing={routing!r} is not one of {ROUTINGS}")

  idx_tk = idx_tk.astype(jnp.int32)
  gates_tk = jnp.take_along_axis(probs_tn, idx_tk, axis=-1)
  if renormalize:
    gates_tk = gates_tk / jnp.sum(gates_tk, axis=-1, keepdims=True)
  return idx_tk, gates_tk * route_scale, probs_tn


# ---------------------------------------------------------------------------------------------- dispatch


def expert_swiglu(x_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd):
  """SwiGLU of expert-sorted rows: rows [sum(group_sizes[:e]), sum(group_sizes[:e+1])) go through expert e."""
  h_mf = (jax.nn.silu(jax.lax.ragged_dot(x_md, w_gate_edf, group_sizes_e))
          * jax.lax.ragged_dot(x_md, w_up_edf, group_sizes_e))
  return jax.lax.ragged_dot(h_mf, w_down_efd, group_sizes_e)


def dropless(x_td: jax.Array, idx_tk: jax.Array, gates_tk: jax.Array, w_gate_edf: jax.Array,
             w_up_edf: jax.Array, w_down_efd: jax.Array) -> jax.Array:
  """y_t = sum_k gates[t,k] * SwiGLU_{idx[t,k]}(x_t), with no token dropped (MegaBlocks-style).

  The T*K (token, slot) pairs are sorted by expert so each expert's rows are contiguous, which is what
  `ragged_dot` needs; every shape is static (T*K rows), only the group boundaries depend on the data.
  """
  t, k = idx_tk.shape
  n = w_gate_edf.shape[0]
  expert_m = idx_tk.reshape(-1)
  order_m = jnp.argsort(expert_m, stable=True)
  token_m = (jnp.arange(t * k, dtype=jnp.int32) // k)[order_m]
  group_sizes_e = jnp.bincount(expert_m, length=n).astype(jnp.int32)
  y_md = expert_swiglu(x_td[token_m], group_sizes_e, w_gate_edf, w_up_edf, w_down_efd)
  # Weighting and accumulation in float32: a token sums up to K expert outputs.
  y_md = y_md.astype(jnp.float32) * gates_tk.reshape(-1)[order_m].astype(jnp.float32)[:, None]
  y_td = jnp.zeros((t, x_td.shape[-1]), jnp.float32).at[token_m].add(y_md)
  return y_td.astype(x_td.dtype)


def capacity(capacity_factor: float, top_k: int, tokens: int, num_experts: int) -> int:
  """Per-expert buffer size C = ceil(cf * k * T / N) (GShard/Switch), at least 1."""
  return max(1, math.ceil(capacity_factor * top_k * tokens / num_experts))


def fill_buffers(x_td: jax.Array, idx_tk: jax.Array, num_experts: int, c: int):
  """[N, C, D] expert buffers; returns (buffers, slot of each row, whether each row was kept).

  Rows are (slot, token) pairs in priority order: every token's first choice before any second choice, then
  by token. A row past slot C-1 is dropped: it points one past the buffer and mode="drop" discards its write.
  """
  t, k = idx_tk.shape
  expert_m = idx_tk.T.reshape(-1)  # slot-major: row j*T + t is slot j of token t
  token_m = jnp.tile(jnp.arange(t, dtype=jnp.int32), k)
  onehot_mn = jax.nn.one_hot(expert_m, num_experts, dtype=jnp.int32)
  pos_m = jnp.sum((jnp.cumsum(onehot_mn, axis=0) - 1) * onehot_mn, axis=-1)
  keep_m = pos_m < c
  slot_m = jnp.where(keep_m, pos_m, c)
  buf_ecd = jnp.zeros((num_experts, c, x_td.shape[-1]), x_td.dtype).at[expert_m, slot_m].add(
      x_td[token_m], mode="drop")
  return buf_ecd, slot_m, keep_m


def combine_buffers(out_ecd: jax.Array, idx_tk: jax.Array, gates_tk: jax.Array, slot_m: jax.Array,
                    keep_m: jax.Array) -> jax.Array:
  """y [T, D] float32: each kept row's expert output times its gate, summed per token (dropped rows give 0)."""
  t, k = idx_tk.shape
  c = out_ecd.shape[1]
  expert_m, token_m = idx_tk.T.reshape(-1), jnp.tile(jnp.arange(t, dtype=jnp.int32), k)
  y_md = out_ecd[expert_m, jnp.minimum(slot_m, c - 1)].astype(jnp.float32)
  weight_m = jnp.where(keep_m, gates_tk.T.reshape(-1).astype(jnp.float32), 0.0)
  return jnp.zeros((t, out_ecd.shape[-1]), jnp.float32).at[token_m].add(y_md * weight_m[:, None])


def buffer_swiglu(x_ecd, w_gate_edf, w_up_edf, w_down_efd):
  """Each expert's SwiGLU over its buffer rows."""
  h_ecf = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ecd, w_gate_edf))
           * jnp.einsum("ecd,edf->ecf", x_ecd, w_up_edf))
  return jnp.einsum("ecf,efd->ecd", h_ecf, w_down_efd)


def capacity_dispatch(x_td: jax.Array, idx_tk: jax.Array, gates_tk: jax.Array, w_gate_edf: jax.Array,
                      w_up_edf: jax.Array, w_down_efd: jax.Array,
                      capacity_factor: float) -> tuple[jax.Array, jax.Array]:
  """Token-dropping dispatch into fixed [N, C, D] expert buffers; returns (y [T,D], drop fraction).

  An assignment past its expert's slot C-1 is dropped and contributes exactly 0 (the token keeps its residual).
  """
  t, k = idx_tk.shape
  n = w_gate_edf.shape[0]
  buf_ecd, slot_m, keep_m = fill_buffers(x_td, idx_tk, n, capacity(capacity_factor, k, t, n))
  out_ecd = buffer_swiglu(buf_ecd, w_gate_edf, w_up_edf, w_down_efd)
  y_td = combine_buffers(out_ecd, idx_tk, gates_tk, slot_m, keep_m)
  return y_td.astype(x_td.dtype), 1.0 - jnp.mean(keep_m.astype(jnp.float32))


# ---------------------------------------------------------------------------------------- balance & losses


def expert_counts(idx_tk: jax.Array, num_experts: int) -> jax.Array:
  """Number of (token, slot) assignments per expert, float32 [N]."""
  return jnp.bincount(idx_tk.reshape(-1), length=num_experts).astype(jnp.float32)


def balance_loss(probs_tn: jax.Array, idx_tk: jax.Array, num_experts: int) -> jax.Array:
  """DeepSeek/Switch balance loss N/(kT) sum_i count_i * mean_t p_i; 1 under uniform routing and probs.

  Counts are integers (no gradient), so the router learns only through P = mean_t p.
  """
  t, k = idx_tk.shape
  f_n = jax.lax.stop_gradient(expert_counts(idx_tk, num_experts)) * (num_experts / (k * t))
  p_n = jnp.mean(probs_tn.astype(jnp.float32), axis=0)
  return jnp.sum(f_n * p_n)


def z_loss(logits_tn: jax.Array) -> jax.Array:
  """ST-MoE router z-loss mean_t logsumexp(z_t)^2: penalises the logit scale that softmax ignores."""
  return jnp.mean(jax.nn.logsumexp(logits_tn.astype(jnp.float32), axis=-1) ** 2)


def update_bias(bias_n: jax.Array, load_n: jax.Array, gamma: float) -> jax.Array:
  """Aux-loss-free balancing step (DeepSeek-V3): b - gamma * sign(load - mean(load)), over the last axis (so
  a scanned decoder's stacked [layers, N] biases update per layer)."""
  load_n = load_n.astype(jnp.float32)
  return bias_n - gamma * jnp.sign(load_n - jnp.mean(load_n, axis=-1, keepdims=True)).astype(bias_n.dtype)


def imbalance_score(idx_tk: jax.Array, num_experts: int, devices: int) -> jax.Array:
  """MoGE's IS = (max_i T_i - min_i T_i) / T, T_i the assignments on device i of `devices` contiguous groups.

  Expert e lives on device floor(e * devices / N), which is e // (N / devices) when N divides evenly and still
  a contiguous split when it does not.
  """
  device_m = idx_tk.reshape(-1) * devices // num_experts
  load_g = jnp.bincount(device_m, length=devices).astype(jnp.float32)
  return (jnp.max(load_g) - jnp.min(load_g)) / idx_tk.shape[0]


# ------------------------------------------------------------------------------------------------ module


class RouterBias(nnx.Variable):
  """Selection-only bias of aux-loss-free balancing. Not an nnx.Param, so optimizers never update it;
  `MoE.after_step` moves it with `update_bias` from the step's expert loads."""


class ExpertLoad(nnx.Variable):
  """Assignments per expert counted by the forward passes since the last optimizer step (all microbatches)."""


class MoE(nnx.Module):
  """Routed SwiGLU experts (+ optional ungated shared experts) as a channel mixer: x [B,T,D] -> (y, aux).

  aux holds the weighted losses "moe_balance" / "moe_z" (only when their coefficient is > 0), the logged
  metrics "metric/moe_drop_fraction", "metric/moe_imbalance", "metric/moe_load_max", and "layer/moe_load"
  (fraction of assignments per expert, kept per layer). With `bias_balancing` the layer counts its expert
  load as it runs and `after_step` moves the selection bias by `bias_rate` (aux-loss-free balancing).
  """

  def __init__(self, width: int, ffn_width: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               routing: str = "topk", score: str = "softmax", renormalize: bool = True, groups: int = 1,
               topk_groups: int = 1, shared_experts: int = 0, router_scale: bool = False,
               bias_balancing: bool = False, capacity_factor: float = 0.0, balance_coef: float = 0.0,
               z_coef: float = 0.0, route_scale: float = 1.0, bias_rate: float = 1e-3, depth: int = 1,
               compute_dtype=jnp.float32, param_dtype=jnp.float32):
    _validate(num_experts, top_k, routing, score, groups, topk_groups, shared_experts, capacity_factor)
    self.num_experts, self.top_k, self.routing, self.score = num_experts, top_k, routing, score
    self.renormalize, self.groups, self.topk_groups = renormalize, groups, topk_groups
    self.capacity_factor, self.balance_coef, self.z_coef = capacity_factor, balance_coef, z_coef
    self.route_scale, self.compute_dtype, self.bias_rate = route_scale, compute_dtype, bias_rate
    n, d, f = num_experts, width, ffn_width
    self.router = param(scaled_normal(d), rngs.params(), (d, n), ("embed", None), param_dtype)
    self.w_gate = param(scaled_normal(d), rngs.params(), (n, d, f), ("experts", "embed", "mlp"), param_dtype)
    self.w_up = param(scaled_normal(d), rngs.params(), (n, d, f), ("experts", "embed", "mlp"), param_dtype)
    # As in layers.SwiGLU: the output projection shrinks with depth to keep the residual variance O(1).
    self.w_down = param(scaled_normal(f, 1.0 / math.sqrt(2 * depth)), rngs.params(), (n, f, d),
                        ("experts", "mlp", "embed"), param_dtype)
    self.router_scale = (nnx.Param(jnp.ones((n,), param_dtype), out_sharding=(None,), eager_sharding=False)
                         if router_scale else None)
    self.router_bias = (RouterBias(jnp.zeros((n,), jnp.float32), out_sharding=(None,), eager_sharding=False)
                        if bias_balancing else None)
    self.expert_load = (ExpertLoad(jnp.zeros((n,), jnp.float32), out_sharding=(None,), eager_sharding=False)
                        if bias_balancing else None)
    self.shared = (SwiGLU(d, shared_experts * f, rngs=rngs, depth=depth, compute_dtype=compute_dtype,
                          param_dtype=param_dtype) if shared_experts else None)

  def __call__(self, x_btd: jax.Array) -> tuple[jax.Array, dict]:
    b, t, d = x_btd.shape
    x_td = x_btd.reshape(b * t, d)
    # Router in float32: top-k choices and softmax tails are sensitive to bf16 rounding.
    logits_tn = x_td.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
    bias_n = None if self.router_bias is None else self.router_bias[...]
    idx_tk, gates_tk, probs_tn = route(
        logits_tn, top_k=self.top_k, routing=self.routing, score=self.score, renormalize=self.renormalize,
        groups=self.groups, topk_groups=self.topk_groups, bias_n=bias_n, route_scale=self.route_scale)
    if self.router_scale is not None:
      gates_tk = gates_tk * self.router_scale[...].astype(jnp.float32)[idx_tk]

    cd = self.compute_dtype
    weights = (self.w_gate[...].astype(cd), self.w_up[...].astype(cd), self.w_down[...].astype(cd))
    y_td, drop = self._dispatch(x_td.astype(cd), idx_tk, gates_tk, weights)
    y_btd = constrain(y_td.reshape(b, t, d), ("batch", "seq", "embed"))
    if self.shared is not None:
      y_btd = y_btd + self.shared(x_btd).astype(y_btd.dtype)

    n = self.num_experts
    # Sigmoid scores do not sum to 1 per token; the balance loss wants a distribution (as DeepSeek-V3 does).
    p_tn = probs_tn if self.score == "softmax" else probs_tn / jnp.sum(probs_tn, axis=-1, keepdims=True)
    # Imbalance is measured over the devices experts would be spread on: MoGE's `groups` (one group per
    # device, IS = 0 by construction); otherwise an assumed 8-way expert parallelism (fewer if N < 8).
    devices = self.groups if self.routing == "moge" else min(n, 8)
    counts_n = jax.lax.stop_gradient(expert_counts(idx_tk, n))
    if self.expert_load is not None:
      self.expert_load[...] = self.expert_load[...] + counts_n
    aux = {
        "layer/moe_load": counts_n / idx_tk.size,  # fraction of assignments per expert, logged per layer
        "metric/moe_drop_fraction": drop,
        "metric/moe_imbalance": imbalance_score(idx_tk, n, devices),
        "metric/moe_load_max": jnp.max(expert_counts(idx_tk, n)) / idx_tk.size,
    }
    if self.balance_coef > 0:
      aux["moe_balance"] = self.balance_coef * balance_loss(p_tn, idx_tk, n)
    if self.z_coef > 0:
      aux["moe_z"] = self.z_coef * z_loss(logits_tn)
    return y_btd, aux


  def _dispatch(self, x_td, idx_tk, gates_tk, weights):
    """Dropless or capacity dispatch; expert-parallel (moe_parallel) when the rules split the experts."""
    from scalezoo.models import moe_parallel
    w_spec = logical_spec(("experts", "embed", "mlp"), weights[0].shape)
    t_spec = logical_spec(("batch", None), x_td.shape)
    axes = moe_parallel.expert_axes(w_spec, t_spec) if w_spec is not None else ()
    if axes:
      kw = dict(axes=axes, token_spec=P(t_spec[0], None), weight_spec=w_spec)
      if self.capacity_factor > 0:
        return moe_parallel.capacity_ep(x_td, idx_tk, gates_tk, *weights, self.capacity_factor, **kw)
      return moe_parallel.dropless_ep(x_td, idx_tk, gates_tk, *weights, **kw), jnp.zeros((), jnp.float32)
    if self.capacity_factor > 0:
      return capacity_dispatch(x_td, idx_tk, gates_tk, *weights, self.capacity_factor)
    return dropless(x_td, idx_tk, gates_tk, *weights), jnp.zeros((), jnp.float32)

  def after_step(self) -> None:
    """Once per optimizer step (train.step.after_step): move the balancing bias against the step's load."""
    if self.router_bias is not None:
      self.router_bias[...] = update_bias(self.router_bias[...], self.expert_load[...], self.bias_rate)
      self.expert_load[...] = jnp.zeros_like(self.expert_load[...])


def _validate(num_experts, top_k, routing, score, groups, topk_groups, shared_experts, capacity_factor):
  if routing not in ROUTINGS:
    raise ValueError(f"routing={routing!r} is not one of {ROUTINGS}")
  if score not in SCORES:
    raise ValueError(f"score={score!r} is not one of {SCORES}")
  if num_experts < 1 or not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
  if groups < 1 or num_experts % groups:
    raise ValueError(f"num_experts={num_experts} is not divisible by groups={groups}")
  if routing == "moge" and top_k % groups:
    raise ValueError(f"top_k={top_k} is not divisible by groups={groups} (moge takes top_k/groups per group)")
  if not 1 <= topk_groups <= groups:
    raise ValueError(f"topk_groups={topk_groups} must be in [1, groups={groups}]")
  if routing == "group_limited" and top_k > topk_groups * (num_experts // groups):
    raise ValueError(f"top_k={top_k} exceeds the {topk_groups * (num_experts // groups)} experts in "
                     f"topk_groups={topk_groups} groups")
  if shared_experts < 0:
    raise ValueError(f"shared_experts={shared_experts} must be >= 0")
  if capacity_factor < 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be >= 0 (0 = dropless)")
