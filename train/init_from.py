"""`init_from`: start a run from another run's trained parameters (TokenFormer growth, ParScale recycling).

`--config.init_from=RUN_DIR` takes the newest readable checkpoint of RUN_DIR (restored onto this run's mesh) and
maps its parameters onto this run's model: equal shapes are copied, and a family may let some model keys grow
(`Family.growable`, e.g. TokenFormer's parameter-token counts, whose new key tokens start at zero so the logits do
not change). A ParScale run recycles a run of its base family: the base parameters are copied and ParScale's
prefixes, initial states and aggregator start from their init (`parscale.recycle_params`). Optimizer moments, the
step and the data order start fresh. Every other model key must match the source run's; the first that does not is
one clear error line. Once the run has checkpoints of its own it resumes from those and `init_from` is not read
again.

Inside a sweep, `init_from="run:NAME"` names another run of the same sweep (resolved to its run directory).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from scalezoo import models
from scalezoo.configs import ConfigError
from scalezoo.models import parscale
from scalezoo.models.tokenformer import grow_params
from scalezoo.train.checkpoint import Checkpointer
from scalezoo.train.sweep import flatten

SWEEP_PREFIX = "run:"


def read_run_config(run_dir: str, where: str) -> ml_collections.ConfigDict:
  """The config.json of a run directory, or one ConfigError line starting with `where` (the flag or key)."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{where}: no config.json in {run_dir}, so not a run directory; name a directory that "
                      f"`scalezoo train` wrote")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{where}: {path} is unreadable ({e})") from None


def _comparable(cfg, source) -> tuple[dict, dict]:
  """The flat model keys to compare. ParScale recycles a run of its base family: that run is compared with the
  base model; from another ParScale run every key but freeze_base must match."""
  src, dst = flatten(source.model.to_dict()), flatten(cfg.model.to_dict())
  if dst.get("family") == "parscale" and src.get("family") == dst.get("parscale.base"):
    dst = flatten(parscale.base_config(cfg.model).to_dict())
  elif dst.get("family") == "parscale":
    src.pop("parscale.freeze_base", None)
    dst.pop("parscale.freeze_base", None)
  return src, dst


def check_compatible(cfg, source) -> None:
  """Every model key of `cfg` equals the source run's, except the keys the family lets grow (a ParScale run
  compares its base model with a run of the base family)."""
  src, dst = _comparable(cfg, source)
  if src.get("family") != dst.get("family"):
    need = "the same family" if dst.get("family") != "parscale" else f"family {dst.get('parscale.base')!r} or parscale"
    raise ConfigError(f"config key init_from={cfg.init_from!r}: that run is family {src.get('family')!r} and this "
                      f"config is {dst.get('family')!r}; init_from needs a run of {need}")
  growable = models.FAMILIES[dst["family"]].growable
  for key in sorted(set(src) | set(dst)):
    a, b = src.get(key, "<absent>"), dst.get(key, "<absent>")
    if key in growable:
      if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b < a:
        raise ConfigError(f"config key model.{key}={b!r}: the init_from run has {a!r}; growth only adds "
                          f"parameter tokens, so set model.{key} >= {a}")
    elif a != b:
      raise ConfigError(f"config key model.{key}={b!r}: the init_from run has {a!r}; init_from keeps every model "
                        f"key but {', '.join(sorted(growable)) or 'none'} (set model.{key}={a!r} or train from "
                        f"scratch)")


def check(cfg):
  """Before anything is written: the source run exists, has checkpoints and matches `cfg`; returns its config."""
  run_dir = cfg.init_from
  if run_dir.startswith(SWEEP_PREFIX):
    raise ConfigError(f"config key init_from={run_dir!r}: '{SWEEP_PREFIX}NAME' names a run of the same sweep and "
                      f"works only inside `scalezoo sweep`; give a run directory")
  source = read_run_config(run_dir, f"config key init_from={run_dir!r}")
  check_compatible(cfg, source)
  if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
    raise ConfigError(f"config key init_from={run_dir!r}: it has no checkpoints/; train that run first")
  return source


def initial_state(cfg, source, program, mesh, fresh: dict) -> dict:
  """The state a run with `init_from` starts from: the source's parameters mapped onto `fresh` (this run's
  initialised state), with `fresh`'s optimizer state (zero moments), non-parameter state and step."""
  from scalezoo.train.step import make_program
  run_dir = cfg.init_from
  source = ml_collections.ConfigDict(source.to_dict())
  source.mesh = cfg.mesh  # restored straight onto this run's mesh
  source_program = make_program(source, mesh)
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  with Checkpointer(ckpt_dir, processes=sorted({d.process_index for d in mesh.devices.flat})) as ckpt:
    restored = ckpt.restore_latest(source_program.abstract_state())
  if restored is None:
    raise ConfigError(f"config key init_from={run_dir!r}: no readable checkpoint in {ckpt_dir}")
  _, old, _ = restored
  grow = parscale.recycle_params if cfg.model.family == "parscale" else grow_params
  try:
    params = grow(old["params"], fresh["params"])
  except ValueError as e:
    raise ConfigError(f"config key init_from={run_dir!r}: {e}") from None
  params = jax.device_put(params, program.state_shardings["params"])
  return dict(fresh, params=params)
