"""Meshes and the one rules table that maps logical axes (models/layers.py) onto mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters, gradients and optimizer state
sharded), `tensor` (Megatron-style: heads, mlp and vocab split), `expert` (experts split; tokens also shard
over it). A logical axis maps to a tuple of mesh axes; `-1` in the mesh config fills the remaining devices.

A mesh axis already used by an earlier dim of the same array is skipped (so activations [batch, seq, embed] put
fsdp on batch and parameters [embed, mlp] put it on embed). Parameters must divide: a 2-way kv_heads on a 4-way
tensor axis is a ConfigError before compile that names the parameter and the fix (a rules override such as
`kv_heads=` keeps it whole). Activation constraints are lenient instead: a dim the mapped axes do not divide
(a batch of 1 in decoding) drops axes until they do.

Presets (`mesh.preset`): `dp` data parallel, `fsdp` fully sharded, `fsdp_tp` fully sharded x `mesh.tensor`,
`ep` fully sharded x `mesh.expert`. Multi-slice jobs add DCN factors `mesh.dcn_<axis>`: the `mesh.*` sizes
then describe one slice and each axis spans `dcn_<axis>` slices.
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


PRESETS: dict[str, tuple[str, ...]] = {
    "dp": ("data",),
    "fsdp": ("fsdp",),
    "fsdp_tp": ("fsdp", "tensor"),
    "ep": ("fsdp", "expert"),
}
"""The mesh axes each preset uses; the first fills the devices, the others keep their `mesh.*` sizes."""

DCN_KEYS = tuple(f"dcn_{a}" for a in MESH_AXES)


def _preset_sizes(mesh_cfg) -> dict[str, int]:
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  preset = mesh_cfg.get("preset", "") or ""
  if not preset:
    return sizes
  if preset not in PRESETS:
    raise ConfigError(f"config key mesh.preset={preset!r}: choose one of {', '.join(PRESETS)} (or '' for the "
                      f"mesh.* sizes as given)")
  axes = PRESETS[preset]
  for a in MESH_AXES:
    if a not in axes and sizes[a] not in (1, -1):
      raise ConfigError(f"config key mesh.{a}={sizes[a]}: mesh.preset={preset} uses only "
                        f"{', '.join('mesh.' + x for x in axes)}; set mesh.{a}=1 or drop the preset")
  out = {a: 1 for a in MESH_AXES}
  out[axes[0]] = -1
  for a in axes[1:]:
    if sizes[a] < 2:
      raise ConfigError(f"config key mesh.{a}={sizes[a]}: mesh.preset={preset} shards over {a}; set mesh.{a} "
                        f"to its size (e.g. 2, 4 or 8)")
    out[a] = sizes[a]
  return out


def dcn_shape(mesh_cfg) -> dict[str, int]:
  """Multi-slice (DCN) factor per mesh axis from `mesh.dcn_{data,fsdp,tensor,expert}` (all 1: one slice)."""
  out = {}
  for a in MESH_AXES:
    v = mesh_cfg.get(f"dcn_{a}", 1)
    if not isinstance(v, int) or v < 1:
      raise ConfigError(f"config key mesh.dcn_{a}={v!r}: must be a positive integer (slices along {a})")
    out[a] = v
  return out


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
  """Axis sizes from `mesh.{preset, data, fsdp, tensor, expert, dcn_*}`; -1 takes the remaining devices.

  With DCN factors (multi-slice) the `mesh.*` sizes describe one slice of n_devices / prod(dcn) devices and
  each returned size is the slice size times its DCN factor.
  """
  sizes = _preset_sizes(mesh_cfg)
  dcn = dcn_shape(mesh_cfg)
  slices = math.prod(dcn.values())
  if n_devices % slices:
    raise ConfigError(f"mesh.dcn_* = {_fmt(dcn)} asks for {slices} slices, which does not divide the {n_devices} "
                      f"devices; make the product of mesh.dcn_* the number of slices")
  per_slice = n_devices // slices
  fill = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ConfigError(f"mesh.{bad[0]}={sizes[bad[0]]}: mesh axis sizes are positive, or -1 to fill")
  if len(fill) > 1:
    raise ConfigError(f"mesh axes {', '.join('mesh.' + a for a in fill)} are all -1; at most one axis can fill")
  fixed = math.prod(s for s in sizes.values() if s > 0)
  where = f"{per_slice} devices per slice" if slices > 1 else f"{n_devices} devices"
  if fill:
    if per_slice % fixed:
      raise ConfigError(f"mesh {_fmt(sizes)} does not fit {where}: the fixed axes ({fixed}) must divide the "
                        f"device count; change mesh.{{data,fsdp,tensor,expert}}")
    sizes[fill[0]] = per_slice // fixed
  elif fixed != per_slice:
    raise ConfigError(f"config keys mesh.{{data,fsdp,tensor,expert}} give mesh {_fmt(sizes)} of {fixed} devices but "
                      f"{where} are available; make the product {per_slice} or set one axis to -1")
  return {a: sizes[a] * dcn[a] for a in MESH_AXES}


def _fmt(sizes: dict) -> str:
  return ",".join(f"{a}={s}" for a, s in sizes.items())


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes MESH_AXES, all of type Auto (compiler-propagated).

  With DCN factors the devices are grouped into slices (TPU `slice_index`, else one slice per process) and
  each axis is laid out slice-major, so only the DCN part of an axis crosses the slow network.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(mesh_cfg, len(devices))
  dcn = dcn_shape(mesh_cfg)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn.values()) == 1:
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  from jax.experimental import mesh_utils
  ici = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  by_process = len(slices) == 1  # no TPU slices (GPU/CPU hosts): each process is one granule
  granules = len({d.process_index for d in devices}) if by_process else len(slices)
  kind = "processes" if by_process else "TPU slices"
  if granules != math.prod(dcn.values()):
    raise ConfigError(f"mesh.dcn_* = {_fmt(dcn)} asks for {math.prod(dcn.values())} slices but the devices form "
                      f"{granules} ({kind}); set the product of mesh.dcn_* to {granules}")
  try:
    grid = mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn[a] for a in MESH_AXES), devices,
                                                process_is_granule=by_process, allow_split_physical_axes=True)
  except (ValueError, AssertionError, NotImplementedError) as e:
    raise ConfigError(f"mesh {_fmt(sizes)} with mesh.dcn_* = {_fmt(dcn)} cannot be laid out on these {kind} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); try other mesh.* sizes") from None
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


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


def state_specs(state, mesh: Mesh, rules, *, strict: bool = False) -> object:
  """PartitionSpecs for an nnx.State from each Variable's `out_sharding` metadata (replicated if absent).

  `strict` (used for parameters): a dim whose rule maps it onto mesh axes that do not divide it is a
  ConfigError naming the parameter, instead of silently replicating that dim.
  """
  def one(path, v):
    shape = np.shape(v.get_value())
    axes = v.get_metadata().get("out_sharding") or (None,) * len(shape)
    if strict:
      _check_divides(path, axes, shape, mesh, rules)
    return v.replace(logical_to_spec(axes, shape, mesh, rules))
  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def _check_divides(path, axes, shape, mesh: Mesh, rules) -> None:
  used: set[str] = set()
  for i, (name, dim) in enumerate(zip(axes, shape)):
    targets = [a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1] if name else []
    for a in targets:
      if dim % mesh.shape[a]:
        where = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        raise ConfigError(
            f"parameter {where} dim {i} ({name}={dim}) does not divide over mesh axis {a}={mesh.shape[a]}; "
            f"pick a mesh.{a} that divides {dim}, or keep {name} whole with --config.mesh.rules='{name}='")
    used.update(targets)


def opt_state_specs(tx: optax.GradientTransformation, abstract_opt_state, param_specs) -> object:
  """Optimizer moments follow their parameters' specs; counters and other scalars are replicated."""
  return optax.tree_map_params(tx, lambda _, spec: spec, abstract_opt_state, param_specs,
                               transform_non_params=lambda _: PartitionSpec())


def named(specs, mesh: Mesh):
  """PartitionSpec tree -> NamedSharding tree."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
