"""`scalezoo bench`: the parallelism sweep. One config, many meshes: step time, tokens/s, MFU and memory.

Each mesh is compiled ahead of time first, so its per-device peak memory is known before anything is allocated
and a mesh over the memory limit is reported, not run. One that fits runs 2 warm-up steps, then `steps` timed
steps on one random-token batch made once on the devices (so only the jitted step is measured), ended by a block
on the result so asynchronous dispatch hides no device time. A failing mesh is a row with a reason, never a crash.
"""

from __future__ import annotations

import copy
import math
import sys
import time

import jax
import numpy as np

from scalezoo import models
from scalezoo.configs import ConfigError
from scalezoo.train.metrics import mfu, peak_flops_per_device, write_table
from scalezoo.train.sharding import MESH_AXES, PRESETS, dcn_shape, make_mesh, mesh_shape, parse_rules
from scalezoo.train.step import make_program
from scalezoo.train.validate import validate, validate_platform

GIB = 2 ** 30
WARMUP_STEPS = 2
_TABLE = (("mesh", "mesh", 26, "s"), ("status", "status", 14, "s"), ("batch_size", "batch", 7, "d"),
          ("step_ms", "step ms", 10, ".2f"), ("tokens_per_s", "tokens/s", 12, ".0f"),
          ("tflops_per_device", "TFLOP/s/dev", 12, ".3f"), ("mfu", "MFU", 7, ".1%"),
          ("peak_gib", "peak GiB", 10, ".3f"), ("compile_s", "compile s", 10, ".1f"))  # (key, title, width, format)
CSV_COLUMNS = tuple(key for key, *_ in _TABLE) + ("reason",)


class _Failed(Exception):
  """A mesh's outcome other than ok, carried out of the nested compile/run steps: args (status, reason)."""


def mesh_label(sizes: dict[str, int]) -> str:
  """"fsdp=4,tensor=2": the axes larger than 1, in MESH_AXES order ("data=1" for one device)."""
  return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes.get(a, 1) != 1) or "data=1"


def factorisations(n: int, axes: tuple[str, ...]) -> list[dict[str, int]]:
  """Every ordered factorisation of `n` over `axes` (the first axis largest first), other axes 1."""
  if len(axes) == 1:
    return [{**dict.fromkeys(MESH_AXES, 1), axes[0]: n}]
  divisors = [d for d in range(n, 0, -1) if n % d == 0]
  return [{**rest, axes[0]: d} for d in divisors for rest in factorisations(n // d, axes[1:])]


def auto_axes(cfg, preset: str = "") -> tuple[str, ...]:
  """The axes `--meshes auto` factorises over: `preset`, else the config's mesh.preset, else data, fsdp and
  tensor (plus expert for a model with experts, the only kind the expert axis can split)."""
  name, where = (preset, "--preset") if preset else (cfg.mesh.get("preset", "") or "", "config key mesh.preset")
  if name:
    if name not in PRESETS:
      raise ConfigError(f"{where} {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
  m = cfg.model
  has_experts = "moe" in m or int(m.get("num_experts", 0) or 0) > 1
  return ("data", "fsdp", "tensor") + (("expert",) if has_experts else ())


def parse_meshes(spec: str, n_devices: int, axes: tuple[str, ...]) -> list[dict[str, int]]:
  """`auto` (factorisations of n_devices over `axes`) or `"data=2,fsdp=4;fsdp=8"` -> sizes of every axis.

  A mesh whose product is not the device count parses fine: it becomes an `invalid` row, not an error.
  """
  if spec.strip() == "auto":
    return factorisations(n_devices, axes)
  meshes = []
  for item in filter(None, (s.strip() for s in spec.split(";"))):
    mesh = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in item.split(","):
      axis, eq, size = (s.strip() for s in part.partition("="))
      if not eq or axis not in MESH_AXES or axis in seen or not (size.isdigit() and int(size) > 0 or size == "-1"):
        raise ConfigError(f"--meshes item {item!r}: write AXIS=SIZE[,AXIS=SIZE] with each axis once, sizes "
                          f"positive (or -1 to fill), axes in {', '.join(MESH_AXES)}; meshes separated by ';'")
      seen.add(axis)
      mesh[axis] = int(size)
    meshes.append(mesh)
  if not meshes:
    raise ConfigError(f"--meshes {spec!r} names no mesh; use auto or e.g. 'fsdp=8;data=2,fsdp=4'")
  return meshes


def memory_limit_bytes(flag_gib: float = 0.0) -> int | None:
  """Per-device memory limit: `--memory_limit` (GiB) if given, else the device's allocator limit, else None."""
  if flag_gib < 0 or not math.isfinite(flag_gib):
    raise ConfigError(f"--memory_limit {flag_gib}: give the per-device memory in GiB (> 0)")
  if flag_gib > 0:
    return int(flag_gib * GIB)
  try:
    stats = jax.local_devices()[0].memory_stats()  # None on CPU; may raise on backends without it
  except Exception:  # noqa: BLE001
    return None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def memory_analysis(compiled):
  """XLA's memory analysis of a compiled program (sizes in bytes: argument, output, alias, temp), or None where
  the backend gives none."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (NotImplemented on some backends)
    return None
  return (m[0] if m else None) if isinstance(m, (list, tuple)) else m  # a list, one per program, in some versions


def peak_bytes(compiled) -> int | None:
  """Per-device peak of a compiled SPMD program (arguments + outputs + temporaries - donated aliases), or
  None where the backend gives no memory analysis."""
  m = memory_analysis(compiled)
  return None if m is None else int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                                    - m.alias_size_in_bytes)


def _xla_status(e: Exception, default: str) -> tuple[str, str]:
  text = str(e).strip() or type(e).__name__
  oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
  return ("oom" if oom else default), text.splitlines()[0][:300]


def _compile(c, program):
  """AOT-compiles the train step for `c`'s batch shape -> (compiled, peak bytes or None, seconds)."""
  batch = jax.ShapeDtypeStruct((c.train.batch_size, c.train.seq_len + 1), np.int32, sharding=program.batch_sharding)
  t0 = time.perf_counter()
  try:
    compiled = program.train_step.lower(program.abstract_state(), batch).compile()
  except Exception as e:  # noqa: BLE001
    raise _Failed(*_xla_status(e, "compile_error")) from None
  return compiled, peak_bytes(compiled), time.perf_counter() - t0


def _search_batch(c, mesh, dp: int, limit: int, max_batch: int, row: dict):
  """Doubles the per-device batch (from train.microbatches, which it must be a multiple of) while the compiled
  peak fits `limit`, compiling only; returns (cfg, program, compiled, peak, seconds) of the largest that fits."""
  best, b = None, c.train.microbatches
  while b <= max_batch:
    cb = copy.deepcopy(c)
    cb.train.batch_size = b * dp
    validate(cb, jax.device_count())
    program = make_program(cb, mesh)
    try:
      compiled, peak, secs = _compile(cb, program)
    except _Failed as e:
      if e.args[0] != "oom":
        raise
      compiled, peak, secs = None, math.inf, 0.0  # too big to compile (TPU compilers check): over the limit
    if peak is None:
      raise _Failed("invalid", "--batch auto needs the compiled memory analysis, which this backend lacks")
    fits = peak <= limit
    row["batch_search"].append(dict(batch_size=b * dp, peak_gib=peak / GIB if peak < math.inf else None, fits=fits))
    if not fits:
      break
    best, b = (cb, program, compiled, peak, secs), b * 2
  if best is None:
    raise _Failed("oom", f"even batch {c.train.microbatches * dp} exceeds the {limit / GIB:.4g} GiB memory limit")
  return best


def _time_steps(c, program, compiled, steps: int) -> tuple[float, float]:
  """Runs warm-up and `steps` timed steps -> (seconds per step, last loss)."""
  t = c.train
  host = np.random.default_rng(0).integers(0, c.model.vocab_size, (t.batch_size, t.seq_len + 1), dtype=np.int32)
  # From a callback rather than device_put: every process builds the same host array and gives its own shards.
  batch = jax.make_array_from_callback(host.shape, program.batch_sharding, lambda idx: host[idx])
  state = program.init()
  for _ in range(WARMUP_STEPS):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - t0) / steps, float(metrics["loss"])


def bench_mesh(cfg, sizes: dict[str, int], *, steps: int, limit: int | None, batch_auto: bool = False,
               max_batch: int = 1024) -> dict:
  """Compiles and (if it fits `limit` bytes per device) times `cfg` on the mesh `sizes`; returns one row."""
  n = jax.device_count()
  nan = float("nan")
  row = dict(mesh=mesh_label(sizes), status="ok", reason="", batch_size=cfg.train.batch_size, batch_search=[],
             loss=nan, **{key: nan for key, *_ in _TABLE[3:]})
  c = copy.deepcopy(cfg)
  c.mesh.update(dict(sizes, preset=""))
  try:
    resolved = mesh_shape(c.mesh, n)
    row["mesh"] = mesh_label(resolved)
    mesh = make_mesh(c.mesh)
    with jax.set_mesh(mesh):
      if batch_auto:
        dp = math.prod(resolved[a] for a in parse_rules(c.mesh.rules)["batch"])
        c, program, compiled, peak, secs = _search_batch(c, mesh, dp, limit, max_batch, row)
      else:
        validate(c, n)
        program = make_program(c, mesh)
        compiled, peak, secs = _compile(c, program)
      row.update(batch_size=c.train.batch_size, compile_s=secs, peak_gib=nan if peak is None else peak / GIB)
      if limit is not None and peak is not None and peak > limit:
        raise _Failed("oom", f"compiled peak {peak / GIB:.4g} GiB per device exceeds the {limit / GIB:.4g} GiB limit")
      try:
        step_s, row["loss"] = _time_steps(c, program, compiled, steps)
      except Exception as e:  # noqa: BLE001
        raise _Failed(*_xla_status(e, "run_error")) from None
  except ConfigError as e:
    row.update(status="invalid", reason=str(e).splitlines()[0])
    return row
  except _Failed as e:
    row.update(status=e.args[0], reason=e.args[1])
    return row
  tokens_per_s = c.train.batch_size * c.train.seq_len / step_s
  flops_per_token = models.flops_per_token(c.model, c.train.seq_len)
  peak_flops = peak_flops_per_device(c.train.peak_flops, jax.devices()[0])
  row.update(step_ms=step_s * 1e3, tokens_per_s=tokens_per_s,
             tflops_per_device=flops_per_token * tokens_per_s / n / 1e12,
             mfu=mfu(tokens_per_s, flops_per_token, n, peak_flops))
  return row


def format_row(row: dict | None = None) -> str:
  """One fixed-width table line for `row` (the header when None); NaN prints as '-', the reason last."""
  cells = []
  for key, title, width, fmt in _TABLE:
    v = title if row is None else row[key]
    text = "-" if isinstance(v, float) and math.isnan(v) else format(v, "s" if row is None else fmt)
    cells.append(text.ljust(width) if fmt == "s" else text.rjust(width))
  return "".join(cells) + "  " + ("reason" if row is None else row["reason"])


def fastest(rows: list[dict]) -> dict | None:
  """The ok row with the highest tokens/s, or None when no mesh ran."""
  ok = [r for r in rows if r["status"] == "ok"]
  return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def write_results(workdir: str, rows: list[dict], meta: dict) -> None:
  """bench.csv (CSV_COLUMNS, NaN as empty) and bench.json (meta + full rows, NaN as null), each atomically."""
  clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
  best = fastest(rows)
  doc = dict(meta, fastest=best["mesh"] if best else None, rows=[{k: clean(v) for k, v in r.items()} for r in rows])
  write_table(workdir, "bench", CSV_COLUMNS, rows, doc)


def bench(cfg, meshes: str = "auto", *, steps: int = 10, preset: str = "", batch_auto: bool = False,
          max_batch: int = 1024, memory_limit: float = 0.0, workdir: str = "", out=None) -> list[dict]:
  """Benchmarks `cfg` on every mesh of `meshes`; prints a table as rows finish (to `out`, default stdout) and
  the fastest mesh that fits; with `workdir` writes bench.csv and bench.json there after every row.

  Raises ConfigError, before compiling or writing anything, for bad arguments or a config that is wrong on
  any mesh; a mesh that does not work is a row with its status and reason instead.
  """
  out = out or sys.stdout
  if steps <= 0:
    raise ConfigError(f"--steps {steps}: must be a positive number of timed steps")
  if max_batch < 1:
    raise ConfigError(f"--max-batch {max_batch}: must be a positive per-device batch")
  if preset and meshes.strip() != "auto":
    raise ConfigError(f"--preset {preset} picks the axes of --meshes auto; drop it or use --meshes auto")
  n = jax.device_count()
  per_slice = n // math.prod(dcn_shape(cfg.mesh).values())  # mesh.* sizes describe one slice (multi-slice)
  mesh_list = parse_meshes(meshes, per_slice, auto_axes(cfg, preset))
  limit = memory_limit_bytes(memory_limit)
  if batch_auto and limit is None:
    raise ConfigError("--batch auto needs a per-device memory limit and these devices report none; "
                      "pass --memory_limit GIB")
  # Mesh-independent config errors are one error line up front, not the same invalid row on every mesh.
  one = copy.deepcopy(cfg)
  one.mesh.update(dict(dict.fromkeys(MESH_AXES, 1), preset="", **{f"dcn_{a}": 1 for a in MESH_AXES}))
  validate(one, 1)
  validate_platform(cfg, jax.devices()[0].platform)
  lead = jax.process_index() == 0  # multi-process jobs: one table and one set of files
  meta = dict(config=cfg.to_dict(), devices=n, device_kind=jax.devices()[0].device_kind, steps=steps,
              warmup_steps=WARMUP_STEPS, batch_auto=batch_auto, memory_limit_gib=limit and limit / GIB)
  if lead:
    print(format_row(), file=out, flush=True)
  rows = []
  for sizes in mesh_list:
    rows.append(bench_mesh(cfg, sizes, steps=steps, limit=limit, batch_auto=batch_auto, max_batch=max_batch))
    if lead:
      print(format_row(rows[-1]), file=out, flush=True)
      if workdir:
        write_results(workdir, rows, meta)
  best = fastest(rows)
  if lead:
    print(f"fastest: {best['mesh']} ({best['tokens_per_s']:.0f} tokens/s, batch {best['batch_size']})" if best else
          f"fastest: none of the {len(rows)} meshes fits and runs (see status and reason)", file=out, flush=True)
  return rows
