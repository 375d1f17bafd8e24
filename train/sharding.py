"""Meshes and the one rules table that maps logical axes (models/layers.py) onto mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters, gradients and optimizer state
sharded), `tensor` (Megatron-style: heads, mlp and vocab split), `expert` (experts split; tokens also shard
over it). A logical axis maps to a tuple of mesh axes; `-1` in the mesh config fills the remaining devices.

Two rules keep any table valid for any mesh: a mesh axis already used by an earlier dim of the same array is
skipped (so activations [batch, seq, embed] put fsdp on batch and parameters [embed, mlp] put it on embed), and
a dim that the mapped axes do not divide evenly drops axes until they do (a 2-way kv_heads on a 4-way tensor axis
stays replicated rather than failing).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from scalezoo.configs import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "layers": (),
    "param_tokens": ("tensor",),
    "streams": (),
}


def parse_rules(overrides: str) -> dict[str, tuple[str, ...]]:
  """The rules table with `mesh.rules` overrides applied: "embed=;mlp=tensor,fsdp"."""
  rules = dict(RULES)
  for item in filter(None, (s.strip() for s in overrides.split(";"))):
    name, eq, axes = item.partition("=")
    name = name.strip()
    targets = tuple(a.strip() for a in axes.split(",") if a.strip())
    if not eq or name not in RULES or any(a not in MESH_AXES for a in targets):
      raise ConfigError(f"mesh.rules item {item!r}: write LOGICAL=MESH_AXIS[,MESH_AXIS] with LOGICAL in "
                        f"{', '.join(RULES)} and mesh axes in {', '.join(MESH_AXES)}")
    rules[name] = targets
  return rules


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
  """Axis sizes from `mesh.{data,fsdp,tensor,expert}`, one of them -1 to take the remaining devices."""
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ConfigError(f"mesh.{bad[0]}={sizes[bad[0]]}: mesh axis sizes are positive, or -1 to fill")
  if len(fill) > 1:
    raise ConfigError(f"mesh axes {', '.join('mesh.' + a for a in fill)} are all -1; at most one axis can fill")
  fixed = math.prod(s for s in sizes.values() if s > 0)
  if fill:
    if n_devices % fixed:
      raise ConfigError(f"mesh {_fmt(sizes)} does not fit {n_devices} devices: the fixed axes ({fixed}) must "
                        f"divide the device count")
    sizes[fill[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise ConfigError(f"config keys mesh.{{data,fsdp,tensor,expert}} give mesh {_fmt(sizes)} of {fixed} devices but "
                      f"{n_devices} are available; make the product {n_devices} or set one axis to -1")
  return sizes


def _fmt(sizes: dict) -> str:
  return ",".join(f"{a}={s}" for a, s in sizes.items())


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes MESH_AXES, all of type Auto (compiler-propagated)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, tuple[str, ...]]) -> PartitionSpec:
  """PartitionSpec for an array of `shape` with logical `axes` under `rules` on `mesh`."""
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape):
    targets = [a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1] if name else []
    while targets and dim % math.prod(mesh.shape[a] for a in targets):
      targets.pop()
    used.update(targets)
    out.append(None if not targets else targets[0] if len(targets) == 1 else tuple(targets))
  return PartitionSpec(*out)


def spec_fn(mesh: Mesh, rules: dict[str, tuple[str, ...]]):
  """The callable that models.layers.axis_rules installs for activation constraints."""
  return lambda axes, shape: logical_to_spec(axes, shape, mesh, rules)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_specs(state, mesh: Mesh, rules) -> object:
  """PartitionSpecs for an nnx.State from each Variable's `out_sharding` metadata (replicated if absent)."""
  def one(v):
    axes = v.get_metadata().get("out_sharding") or (None,) * np.ndim(v.get_value())
    return v.replace(logical_to_spec(axes, np.shape(v.get_value()), mesh, rules))
  return jax.tree.map(one, state, is_leaf=_is_var)


def opt_state_specs(tx: optax.GradientTransformation, abstract_opt_state, param_specs) -> object:
  """Optimizer moments follow their parameters' specs; counters and other scalars are replicated."""
  return optax.tree_map_params(tx, lambda _, spec: spec, abstract_opt_state, param_specs,
                               transform_non_params=lambda _: PartitionSpec())


def named(specs, mesh: Mesh):
  """PartitionSpec tree -> NamedSharding tree."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
