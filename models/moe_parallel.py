"""Expert parallelism: each device computes only its own experts, and tokens travel to them.

Used by `moe.MoE` when the rules table shards the `experts` axis of the expert weights over mesh axes (the
`expert` mesh axis by default) and the tokens (`batch`) are sharded over those axes too. Models never name
mesh axes: the axes come from the installed rules (`layers.logical_spec`).

Inside a `shard_map` over the whole mesh, a device holds T_l tokens and E_l = E / ep experts (ep = the
product of the expert mesh axes; weights are gathered whole along embed and mlp on entry):
  dropless   all-gather the tokens of the ep devices of its expert group (ep x T_l rows), compute the
             assignments that land on its own experts (sorted, `ragged_dot`), then reduce-scatter the outputs
             back to the tokens' owners. No token is dropped; the traffic is ep x T_l x D each way, which
             beats an all-to-all of k x T_l x D rows when k is close to ep, and needs no ragged collectives
             (so it also runs on CPU).
  capacity   GShard: each device fills [E, C_l, D] buffers from its own T_l tokens (C_l from T_l, so the
             capacity is per device-local group of tokens), an all-to-all sends expert e's buffer to e's
             device, the experts run on [E_l, ep x C_l, D], and a second all-to-all brings the results back.
Routing, losses and metrics stay outside, on the global arrays, so they are identical to one device's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from scalezoo.models import moe as moe_lib

AxisNames = tuple[str, ...]


def _axes(entry) -> AxisNames:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def expert_axes(weight_spec: P, token_spec: P) -> AxisNames:
  """The mesh axes the experts are split over, if the tokens are split over them too (else ())."""
  axes = _axes(weight_spec[0]) if len(weight_spec) else ()
  token_axes = _axes(token_spec[0]) if len(token_spec) else ()
  return axes if axes and set(axes) <= set(token_axes) else ()


def _local_swiglu(x_md, local_e_m, valid_m, w_gate, w_up, w_down):
  """SwiGLU of rows through local expert `local_e_m` (rows with valid_m False give 0), input order kept."""
  n_local = w_gate.shape[0]
  key_m = jnp.where(valid_m, local_e_m, n_local)  # invalid rows sort last, past every group
  order_m = jnp.argsort(key_m, stable=True)
  sizes_e = jnp.bincount(key_m, length=n_local + 1)[:n_local].astype(jnp.int32)
  y_md = moe_lib.expert_swiglu(x_md[order_m], sizes_e, w_gate, w_up, w_down)
  # Rows past the last group are not defined to be 0 by ragged_dot on every backend: mask them.
  y_md = jnp.where(valid_m[order_m][:, None], y_md, 0)
  return jnp.zeros_like(y_md).at[order_m].set(y_md)


def dropless_ep(x_td, idx_tk, gates_tk, w_gate, w_up, w_down, *, axes: AxisNames, token_spec: P,
                weight_spec: P):
  """`moe.dropless` with the experts split over mesh `axes` (see the module docstring)."""
  ep = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
  n_local = w_gate.shape[0] // ep

  def local(x_td, idx_tk, gates_tk, w_gate, w_up, w_down):
    t, k = idx_tk.shape
    x_g = jax.lax.all_gather(x_td, axes, tiled=True)  # [ep*T_l, D], device order
    idx_g = jax.lax.all_gather(idx_tk, axes, tiled=True).reshape(-1)
    gates_g = jax.lax.all_gather(gates_tk, axes, tiled=True).reshape(-1).astype(jnp.float32)
    first = jax.lax.axis_index(axes) * n_local
    valid_m = (idx_g >= first) & (idx_g < first + n_local)
    token_m = jnp.arange(idx_g.shape[0], dtype=jnp.int32) // k
    y_md = _local_swiglu(x_g[token_m], idx_g - first, valid_m, w_gate, w_up, w_down)
    y_gd = jnp.zeros((x_g.shape[0], x_g.shape[1]), jnp.float32).at[token_m].add(
        y_md.astype(jnp.float32) * jnp.where(valid_m, gates_g, 0.0)[:, None])
    # Every device holds partial sums for every gathered token: add them up, each device keeping its own rows.
    return jax.lax.psum_scatter(y_gd, axes, scatter_dimension=0, tiled=True).astype(x_td.dtype)

  w_spec = P(weight_spec[0])
  return jax.shard_map(local, in_specs=(token_spec, token_spec, token_spec, w_spec, w_spec, w_spec),
                       out_specs=token_spec, check_vma=False)(x_td, idx_tk, gates_tk, w_gate, w_up, w_down)


def capacity_ep(x_td, idx_tk, gates_tk, w_gate, w_up, w_down, capacity_factor: float, *, axes: AxisNames,
                token_spec: P, weight_spec: P):
  """`moe.capacity_dispatch` with the experts split over mesh `axes`; returns (y, drop fraction)."""
  ep = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
  n = w_gate.shape[0]
  token_axes = _axes(token_spec[0])

  def local(x_td, idx_tk, gates_tk, w_gate, w_up, w_down):
    t, k = idx_tk.shape
    d = x_td.shape[-1]
    c = moe_lib.capacity(capacity_factor, k, t, n)
    buf_ecd, slot_m, keep_m = moe_lib.fill_buffers(x_td, idx_tk, n, c)
    # Expert e's buffer goes to the device holding e: split the expert dim over the group, stack by source.
    recv = jax.lax.all_to_all(buf_ecd.reshape(ep, n // ep, c, d), axes, 0, 0, tiled=False)
    out = moe_lib.buffer_swiglu(recv.swapaxes(0, 1).reshape(n // ep, ep * c, d), w_gate, w_up, w_down)
    back = jax.lax.all_to_all(out.reshape(n // ep, ep, c, d).swapaxes(0, 1), axes, 0, 0, tiled=False)
    y_td = moe_lib.combine_buffers(back.reshape(n, c, d), idx_tk, gates_tk, slot_m, keep_m)
    kept = jax.lax.psum(jnp.sum(keep_m.astype(jnp.float32)), token_axes)
    return y_td.astype(x_td.dtype), 1.0 - kept / jax.lax.psum(jnp.float32(keep_m.size), token_axes)

  w_spec = P(weight_spec[0])
  return jax.shard_map(local, in_specs=(token_spec, token_spec, token_spec, w_spec, w_spec, w_spec),
                       out_specs=(token_spec, P()), check_vma=False)(x_td, idx_tk, gates_tk, w_gate, w_up, w_down)
