"""`scalezoo bench`: steady-state step time, tokens/s and MFU of one config on each of several meshes.

Batches are random tokens made once on the device, so the numbers measure the jitted step alone (no input
pipeline). Each mesh runs 2 warm-up steps (compile + first run), then `steps` timed steps, ended by a
block on the result, so asynchronous dispatch does not hide device time.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time

import jax
import numpy as np

from scalezoo import models
from scalezoo.configs import ConfigError
from scalezoo.train.metrics import mfu, peak_flops_per_device
from scalezoo.train.sharding import MESH_AXES, make_mesh
from scalezoo.train.step import make_program
from scalezoo.train.validate import validate, validate_platform


def parse_meshes(spec: str, n_devices: int) -> list[dict[str, int]]:
  """`auto` or `"data=2,fsdp=4;fsdp=8"` -> mesh dicts; `auto` tries fsdp, data, and fsdp x tensor splits."""
  if spec.strip() == "auto":
    out = [dict(fsdp=n_devices)]
    if n_devices > 1:
      out.append(dict(data=n_devices))
    tp = 2
    while tp <= min(8, n_devices):
      if n_devices % tp == 0 and tp < n_devices:
        out.append(dict(fsdp=n_devices // tp, tensor=tp))
      tp *= 2
    return out
  meshes = []
  for item in filter(None, (s.strip() for s in spec.split(";"))):
    mesh = {}
    for part in item.split(","):
      axis, eq, size = part.partition("=")
      if not eq or axis.strip() not in MESH_AXES or not size.strip().lstrip("-").isdigit():
        raise ConfigError(f"--meshes item {item!r}: write AXIS=SIZE[,AXIS=SIZE] with axes in {', '.join(MESH_AXES)}")
      mesh[axis.strip()] = int(size)
    meshes.append(mesh)
  if not meshes:
    raise ConfigError(f"--meshes {spec!r} names no mesh; use auto or e.g. 'fsdp=8;data=2,fsdp=4'")
  return meshes


def bench_one(cfg, steps: int) -> dict:
  """Times `steps` train steps of `cfg` on the mesh that `cfg.mesh` describes."""
  devices = jax.devices()
  mesh = make_mesh(cfg.mesh, devices)
  t = cfg.train
  with jax.set_mesh(mesh):
    program = make_program(cfg, mesh)
    state = program.init()
    rng = np.random.default_rng(0)
    batch = jax.device_put(rng.integers(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), dtype=np.int32),
                           program.batch_sharding)
    t0 = time.perf_counter()
    for _ in range(2):
      state, metrics = program.train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = program.train_step(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
  flops_per_token = models.flops_per_token(cfg.model, t.seq_len)
  tokens_per_s = t.batch_size * t.seq_len / step_s
  peak = peak_flops_per_device(t.peak_flops, devices[0])
  return dict(mesh={a: s for a, s in mesh.shape.items() if s > 1} or {"data": 1}, step_s=step_s,
              tokens_per_s=tokens_per_s, mfu=mfu(tokens_per_s, flops_per_token, len(devices), peak),
              warmup_s=compile_s, loss=float(metrics["loss"]), devices=len(devices),
              device_kind=devices[0].device_kind, params=models.param_counts(cfg.model)["total"],
              flops_per_token=flops_per_token, batch_size=t.batch_size, seq_len=t.seq_len)


def bench(cfg, meshes: str, *, steps: int, workdir: str = "", out=None) -> list[dict]:
  """Benchmarks every mesh of `meshes`, prints a table (to `out`, default stdout), writes bench.json if asked."""
  out = out or sys.stdout
  if steps <= 0:
    raise ConfigError(f"--steps {steps}: must be positive")
  n = jax.device_count()
  results = []
  for mesh in parse_meshes(meshes, n):
    c = copy.deepcopy(cfg)
    c.mesh.update({a: mesh.get(a, 1) for a in MESH_AXES})
    validate(c, n)
    validate_platform(c, jax.devices()[0].platform)
    results.append(bench_one(c, steps))
    r = results[-1]
    mesh_s = ",".join(f"{a}={s}" for a, s in r["mesh"].items())
    mfu_s = f"{r['mfu']:.1%}" if not math.isnan(r["mfu"]) else "n/a"
    print(f"{mesh_s:<28} step {r['step_s'] * 1e3:9.2f} ms  {r['tokens_per_s']:12.0f} tok/s  MFU {mfu_s:>6}  "
          f"({r['device_kind']} x{r['devices']}, {r['params'] / 1e6:.1f}M params)", file=out, flush=True)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "bench.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results
