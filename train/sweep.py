"""`scalezoo sweep`: expand a sweep config into runs, run them in turn, and collect `results.csv`.

A sweep config (`configs/sweeps/*.py`, `get_config(arg)`) holds:
  base              the run config every run starts from, as for `--config` (e.g. "dense:quickstart")
  fixed             values applied to every run, nested like the run config (fixed.train.lr = 1e-3)
  grid              lists of values, nested like the run config (grid.model.width = [64, 128]): every combination
  ladder            lists zipped together (all the same length), crossed with the grid
  tokens_per_param  if > 0, each run's train.steps gives about this many tokens per parameter
  name_keys         optional: the axis keys that make up run names (default: all axes)
  A `base` list in `grid` or `ladder` makes the run config itself an axis (grid.base = ["dense:quickstart",
  "moe:quickstart"]): runs of different families in one sweep, named by the config (`dense-width32`).
  devices_per_run   optional: 0 (default) runs one run at a time on every device; k > 0 splits the devices into
                    groups of k (within a host where k fits in one) and runs one run per group at once
The token budget can also be an axis: `budget.tokens` (absolute), `budget.tokens_per_param` or `budget.compute`
(C = 6 N D FLOPs, with N the total parameters) in `grid` or `ladder` set train.steps per run; runs sharing a
compute budget form the IsoFLOP groups of the report.
Run names are deterministic (`width128-depth4`), so re-running the same command finds each run's directory:
a finished run is skipped, an interrupted one resumes from its checkpoints, and a run that fails is recorded
with its error while the sweep goes on.

Packing (`devices_per_run`): runs are dealt to the device groups before any starts, largest compute first onto
the least-loaded group, so every process of a multi-host job derives the same plan and runs its own groups'
runs (a thread per group). A run's numbers depend only on its config and its group size, not on which group
or what ran beside it. With several processes, each run's files are written by the process that owns its
group, and process 0 collects every run's summary.json (so the workdir must be shared: gs:// or NFS).
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import os
import sys
import threading
import time
import traceback

import jax
import ml_collections

from scalezoo import models
from scalezoo.configs import ConfigError, apply_overrides, load
from scalezoo.train.metrics import read_summary
from scalezoo.train.validate import validate

RESULT_FIELDS = ("name", "status", "params", "active_params", "non_embedding_params", "streams", "flops_per_token",
                 "tokens", "compute", "steps", "loss", "eval_loss", "eval_bpb", "eval_recall", "tokens_per_s", "mfu",
                 "wall_s", "error")


def _set(cfg, key: str, value) -> None:
  """Sets a dotted key through the command-line parser, so types and unknown keys are checked the same way."""
  apply_overrides(cfg, {key: value if isinstance(value, str) else repr(value)})


def flatten(tree, prefix: str = "") -> dict:
  """Nested ConfigDict/dict -> {dotted key: leaf}, in insertion order."""
  out = {}
  for k, v in (tree or {}).items():
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _short(key: str) -> str:
  return key.split(".")[-1]


def _fmt_value(v) -> str:
  if isinstance(v, float):
    return f"{v:g}"
  return str(v).replace("/", "_").replace(" ", "")


def _name_part(key: str, value) -> str:
  if key == "base":  # "moe:quickstart" -> "moe": the config's name says the family
    return _fmt_value(str(value).split(":")[0].split(os.sep)[-1].removesuffix(".py"))
  return f"{_short(key)}{_fmt_value(value)}"


def expand(sweep) -> list[tuple[str, dict]]:
  """[(run name, {dotted key: value})] in a fixed order: grid (row-major) crossed with the ladder."""
  grid = {k: list(v) for k, v in flatten(sweep.get("grid")).items()}
  ladder = {k: list(v) for k, v in flatten(sweep.get("ladder")).items()}
  lengths = {len(v) for v in ladder.values()}
  if len(lengths) > 1:
    raise ConfigError(f"sweep ladder lists have different lengths {sorted(lengths)}; zipped axes need equal lengths")
  name_keys = list(sweep.get("name_keys", []) or [])
  rungs = [dict(zip(ladder, vals)) for vals in zip(*ladder.values())] if ladder else [{}]
  points = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else [{}]
  runs = []
  for point in points:
    for rung in rungs:
      values = {**point, **rung}
      shown = [k for k in values if k in name_keys] if name_keys else [k for k in values if k != "name"]
      # A `name` axis names its runs outright (a progressive-growth sweep's stages).
      name = str(values["name"]) if "name" in values else "-".join(_name_part(k, values[k]) for k in shown) or "run"
      runs.append((name, values))
  names = [n for n, _ in runs]
  if len(set(names)) != len(names):
    raise ConfigError("sweep axes give two runs the same name; make the last key parts distinct")
  return runs


def run_configs(sweep, n_devices: int | None = None) -> list[tuple[str, ml_collections.ConfigDict]]:
  """Every run's full config, validated (for runs on `n_devices`, default all) before any run starts."""
  out = []
  for name, values in expand(sweep):
    cfg = load(values.get("base", sweep.get("base")))
    for key, value in flatten(sweep.get("fixed")).items():
      _set(cfg, key, value)
    budget = {"tokens_per_param": float(sweep.get("tokens_per_param", 0.0))}
    for key, value in values.items():
      if key in ("base", "name"):
        continue
      if key.startswith("budget."):
        budget = {key[len("budget."):]: float(value)}
      else:
        _set(cfg, key, value)
    _apply_budget(cfg, budget)
    validate(cfg, n_devices or jax.device_count())
    source = cfg.get("init_from", "")
    if source.startswith(RUN_PREFIX) and source[len(RUN_PREFIX):] not in [n for n, _ in out]:
      raise ConfigError(f"sweep run {name}: init_from={source!r} must name a run listed before it in the sweep")
    out.append((name, cfg))
  return out


RUN_PREFIX = "run:"  # init_from="run:NAME": another run of the same sweep (train/init_from.py)


def depends_on_runs(runs) -> bool:
  """Whether a run starts from another run of the sweep (so runs must go one after another, in order)."""
  return any(cfg.get("init_from", "").startswith(RUN_PREFIX) for _, cfg in runs)


BUDGETS = ("tokens", "tokens_per_param", "compute")


def _apply_budget(cfg, budget: dict) -> None:
  """Sets train.steps (whole steps, rounded up) from one token budget; warmup is capped at the steps."""
  (kind, value), = budget.items()
  if kind not in BUDGETS:
    raise ConfigError(f"sweep key budget.{kind}: choose one of {', '.join('budget.' + b for b in BUDGETS)}")
  if value <= 0:
    return
  # Active parameters: a token's compute and a sparse model's tokens-per-parameter follow what it passes
  # through, not the experts it skips (dense: active = total).
  params = models.param_counts(cfg.model)["active"]
  tokens = {"tokens": value, "tokens_per_param": value * params, "compute": value / (6.0 * params)}[kind]
  cfg.train.steps = max(1, math.ceil(tokens / (cfg.train.batch_size * cfg.train.seq_len)))
  cfg.train.warmup = min(cfg.train.warmup, cfg.train.steps)


def _row(name: str, summary: dict | None, error: str = "") -> dict:
  row = {k: "" for k in RESULT_FIELDS}
  row.update(name=name, status="failed" if error else (summary or {}).get("status", ""), error=error)
  if summary:
    row.update(params=summary["params"], active_params=summary["params_active"],
               non_embedding_params=summary["params_non_embedding"],
               streams=summary.get("streams", 1),  # ParScale's parallel streams P; every other model has one
               flops_per_token=summary["flops_per_token"],
               tokens=summary["tokens"], compute=summary["flops_per_token"] * summary["tokens"],
               steps=summary["steps"], loss=summary["loss"], eval_loss=summary["eval_loss"],
               eval_bpb=summary["eval_bpb"], eval_recall=summary.get("eval_recall", ""),  # mqar runs only
               tokens_per_s=summary["tokens_per_s"], mfu=summary["mfu"], wall_s=summary["wall_s"])
  return row


def write_results(path: str, rows: list[dict], axis_keys: list[str]) -> None:
  """results.csv: one row per run, axis values as columns after the name (atomic replace)."""
  fields = ["name"] + axis_keys + [f for f in RESULT_FIELDS if f != "name"]
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


def load_sweep(spec: str, overrides: dict[str, str]) -> ml_collections.ConfigDict:
  """A sweep config by name (`dense_quick` under configs/sweeps) or file, with `--config.KEY` overrides."""
  name, sep, arg = spec.partition(":")
  if not (name.endswith(".py") or os.sep in name) and not name.startswith("sweeps."):
    spec = f"sweeps.{name}{sep}{arg}"
  sweep_cfg = load(spec)
  # `--config.fixed.KEY=VALUE` may name any run-config key, also one the sweep file does not fix: it is kept
  # as text here and typed and checked against the run config when each run's config is built.
  fixed = sweep_cfg.get("fixed") or {}
  new = {k: v for k, v in overrides.items() if k.startswith("fixed.") and k[len("fixed."):] not in flatten(fixed)}
  sweep_cfg = apply_overrides(sweep_cfg, {k: v for k, v in overrides.items() if k not in new})
  if new:
    if "fixed" not in sweep_cfg:
      sweep_cfg.fixed = ml_collections.ConfigDict()
    for key, value in new.items():
      node = sweep_cfg.fixed
      *parents, leaf = key[len("fixed."):].split(".")
      for part in parents:
        if part not in node:
          node[part] = ml_collections.ConfigDict()
        node = node[part]
      node[leaf] = value
  return sweep_cfg


def finished_summary(cfg, run_dir: str) -> dict | None:
  """The summary of a completed run of exactly `cfg` in `run_dir`, or None (then the run is (re)started)."""
  from scalezoo.train.trainer import config_json, run_identity
  try:
    with open(os.path.join(run_dir, "config.json")) as f:
      same = run_identity(json.load(f)) == run_identity(config_json(cfg))
    summary = read_summary(os.path.join(run_dir, "summary.json"))
  except (OSError, ValueError):
    return None
  return summary if same and summary.get("status") == "completed" else None


def device_groups(devices_per_run: int, devices=None) -> list[list]:
  """The devices split into groups of `devices_per_run` (0: one group of all), host-local where they fit."""
  devices = sorted(devices if devices is not None else jax.devices(), key=lambda d: (d.process_index, d.id))
  n = len(devices)
  if devices_per_run == 0 or devices_per_run == n:
    return [devices]
  if not isinstance(devices_per_run, int) or devices_per_run < 0 or n % devices_per_run:
    raise ConfigError(f"sweep key devices_per_run={devices_per_run!r}: must be 0 (all devices) or divide the {n} "
                      f"devices")
  local = n // max(1, len({d.process_index for d in devices}))
  if devices_per_run < local and local % devices_per_run:
    raise ConfigError(f"sweep key devices_per_run={devices_per_run}: must divide the {local} devices of each host "
                      f"so that no group straddles two hosts")
  # Devices are ordered host by host, so consecutive groups stay within a host when they fit in one.
  return [devices[i:i + devices_per_run] for i in range(0, n, devices_per_run)]


def plan(runs: list[tuple[str, ml_collections.ConfigDict]], n_groups: int) -> list[int]:
  """Group index of each run: largest compute first, each onto the group with the least work so far."""
  cost = [models.flops_per_token(cfg.model, cfg.train.seq_len) * cfg.train.steps * cfg.train.batch_size *
          cfg.train.seq_len for _, cfg in runs]
  load, where = [0.0] * n_groups, [0] * len(runs)
  for i in sorted(range(len(runs)), key=lambda i: (-cost[i], i)):
    g = min(range(n_groups), key=lambda g: (load[g], g))
    where[i], load[g] = g, load[g] + cost[i]
  return where


def sweep(sweep_cfg, workdir: str, *, quiet: bool = False, train_fn=None) -> list[dict]:
  """Runs every run of `sweep_cfg` under `workdir/runs/` and writes `workdir/results.csv`.

  `train_fn(cfg, run_dir, quiet=..., [devices=...])` defaults to the trainer; `devices` is passed only
  when the sweep packs runs onto device groups.
  """
  from scalezoo.train.trainer import preemption_guard, train
  train_fn = train_fn or train
  groups = device_groups(sweep_cfg.get("devices_per_run", 0) or 0)
  runs = run_configs(sweep_cfg, len(groups[0]))
  packed = len(groups) > 1
  if packed and depends_on_runs(runs):
    raise ConfigError(f"devices_per_run={sweep_cfg.devices_per_run} runs the sweep's runs side by side, but some "
                      f"start from another run (init_from=run:NAME); set devices_per_run=0")
  axis_keys = [k for k in list(flatten(sweep_cfg.get("grid"))) + list(flatten(sweep_cfg.get("ladder")))
               if k != "name"]
  values = dict(expand(sweep_cfg))
  is_main = jax.process_index() == 0
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
      f.write(sweep_cfg.to_json(indent=2))
  rows: list[dict | None] = [None] * len(runs)
  lock, t0, done_times = threading.Lock(), time.time(), []
  where = plan(runs, len(groups))

  def one(i: int) -> None:
    name, cfg = runs[i]
    run_dir = os.path.join(workdir, "runs", name)
    if cfg.get("init_from", "").startswith(RUN_PREFIX):
      cfg = copy.deepcopy(cfg)
      cfg.init_from = os.path.join(workdir, "runs", cfg.init_from[len(RUN_PREFIX):])
    t_run = time.time()
    try:
      summary = finished_summary(cfg, run_dir)
      if summary is None and guard.requested:
        row = dict(_row(name, None), status="preempted")  # SIGTERM: start nothing new; a re-run resumes here
      else:
        if summary is None:
          kw = dict(devices=groups[where[i]]) if packed else {}
          summary = train_fn(cfg, run_dir, quiet=True, **kw)
        row = _row(name, summary)
    except ConfigError as e:
      row = _row(name, None, error=str(e))
    except Exception as e:  # a broken run must not stop the sweep; its error goes into results.csv
      row = _row(name, None, error=f"{type(e).__name__}: {e}".splitlines()[0])
      if not quiet:
        traceback.print_exc(file=sys.stderr)
    row.update({k: values[name].get(k, "") for k in axis_keys})
    with lock:
      rows[i] = row
      done_times.append(time.time() - t_run)
      if is_main:
        write_results(os.path.join(workdir, "results.csv"), [r for r in rows if r is not None], axis_keys)
      if not quiet:
        done = sum(r is not None for r in rows)
        eta = (len(runs) - done) * (sum(done_times) / len(done_times)) / len(groups)
        print(f"[{done}/{len(runs)}] {name}: {row['status']}"
              f"{' (' + row['error'] + ')' if row['error'] else ''}, eval loss {row['eval_loss'] or '-'}; "
              f"eta {int(eta // 60)}:{int(eta % 60):02d}", file=sys.stderr, flush=True)
      if row["error"] and jax.process_count() > 1:
        # Process 0 may not own this run: leave the error where it will look for it.
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "error.txt"), "w") as f:
          f.write(row["error"])

  mine = [g for g, devs in enumerate(groups) if jax.process_index() in {d.process_index for d in devs}]
  with preemption_guard() as guard:
    threads = [threading.Thread(target=lambda g=g: [one(i) for i in range(len(runs)) if where[i] == g],
                                name=f"sweep-group-{g}") for g in mine]
    for th in threads[1:]:
      th.start()
    if threads:
      threads[0].run()  # the first group runs on the main thread, as an unpacked sweep always did
    for th in threads[1:]:
      th.join()
  if jax.process_count() > 1:
    rows = _collect_across_hosts(runs, rows, workdir, values, axis_keys)
  if not quiet:
    print(f"sweep done in {time.time() - t0:.0f}s: {workdir}/results.csv", file=sys.stderr)
  return rows


def _collect_across_hosts(runs, rows, workdir: str, values: dict, axis_keys: list[str]) -> list[dict]:
  """After every process has finished its groups, process 0 reads the runs the others trained."""
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("scalezoo sweep done")
  out = []
  for (name, _), row in zip(runs, rows):
    if row is None:
      run_dir = os.path.join(workdir, "runs", name)
      try:
        row = _row(name, read_summary(os.path.join(run_dir, "summary.json")))
      except (OSError, ValueError):
        try:
          with open(os.path.join(run_dir, "error.txt")) as f:
            error = f.read().strip()
        except OSError:
          error = "no summary.json from the process that ran it; see that host's log"
        row = _row(name, None, error=error)
      row.update({k: values[name].get(k, "") for k in axis_keys})
    out.append(row)
  if jax.process_index() == 0:
    write_results(os.path.join(workdir, "results.csv"), out, axis_keys)
  return out
