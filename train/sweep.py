"""`scalezoo sweep`: expand a sweep config into runs, run them in turn, and collect `results.csv`.

A sweep config (`configs/sweeps/*.py`, `get_config(arg)`) holds:
  base              the run config every run starts from, as for `--config` (e.g. "dense:quickstart")
  fixed             values applied to every run, nested like the run config (fixed.train.lr = 1e-3)
  grid              lists of values, nested like the run config (grid.model.width = [64, 128]): every combination
  ladder            lists zipped together (all the same length), crossed with the grid
  tokens_per_param  if > 0, each run's train.steps gives about this many tokens per parameter
  name_keys         optional: the axis keys that make up run names (default: all axes)
The token budget can also be an axis: `budget.tokens` (absolute), `budget.tokens_per_param` or `budget.compute`
(C = 6 N D FLOPs, with N the total parameters) in `grid` or `ladder` set train.steps per run; runs sharing a
compute budget form the IsoFLOP groups of the report.
Run names are deterministic (`width128-depth4`), so re-running the same command finds each run's directory:
a finished run is skipped, an interrupted one resumes from its checkpoints, and a run that fails is recorded
with its error while the sweep goes on.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import sys
import time
import traceback

import jax
import ml_collections

from scalezoo import models
from scalezoo.configs import ConfigError, apply_overrides, load
from scalezoo.train.metrics import read_summary
from scalezoo.train.validate import validate

RESULT_FIELDS = ("name", "status", "params", "active_params", "non_embedding_params", "flops_per_token",
                 "tokens", "compute", "steps", "loss", "eval_loss", "eval_bpb", "tokens_per_s", "mfu", "wall_s",
                 "error")


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
      shown = [k for k in values if k in name_keys] if name_keys else list(values)
      name = "-".join(f"{_short(k)}{_fmt_value(values[k])}" for k in shown) or "run"
      runs.append((name, values))
  names = [n for n, _ in runs]
  if len(set(names)) != len(names):
    raise ConfigError("sweep axes give two runs the same name; make the last key parts distinct")
  return runs


def run_configs(sweep) -> list[tuple[str, ml_collections.ConfigDict]]:
  """Every run's full config, validated before any run starts."""
  out = []
  for name, values in expand(sweep):
    cfg = load(sweep.base)
    for key, value in flatten(sweep.get("fixed")).items():
      _set(cfg, key, value)
    budget = {"tokens_per_param": float(sweep.get("tokens_per_param", 0.0))}
    for key, value in values.items():
      if key.startswith("budget."):
        budget = {key[len("budget."):]: float(value)}
      else:
        _set(cfg, key, value)
    _apply_budget(cfg, budget)
    validate(cfg, jax.device_count())
    out.append((name, cfg))
  return out


BUDGETS = ("tokens", "tokens_per_param", "compute")


def _apply_budget(cfg, budget: dict) -> None:
  """Sets train.steps (whole steps, rounded up) from one token budget; warmup is capped at the steps."""
  (kind, value), = budget.items()
  if kind not in BUDGETS:
    raise ConfigError(f"sweep key budget.{kind}: choose one of {', '.join('budget.' + b for b in BUDGETS)}")
  if value <= 0:
    return
  params = models.param_counts(cfg.model)["total"]
  tokens = {"tokens": value, "tokens_per_param": value * params, "compute": value / (6.0 * params)}[kind]
  cfg.train.steps = max(1, math.ceil(tokens / (cfg.train.batch_size * cfg.train.seq_len)))
  cfg.train.warmup = min(cfg.train.warmup, cfg.train.steps)


def _row(name: str, summary: dict | None, error: str = "") -> dict:
  row = {k: "" for k in RESULT_FIELDS}
  row.update(name=name, status="failed" if error else summary.get("status", ""), error=error)
  if summary:
    row.update(params=summary["params"], active_params=summary["params_active"],
               non_embedding_params=summary["params_non_embedding"], flops_per_token=summary["flops_per_token"],
               tokens=summary["tokens"], compute=summary["flops_per_token"] * summary["tokens"],
               steps=summary["steps"], loss=summary["loss"], eval_loss=summary["eval_loss"],
               eval_bpb=summary["eval_bpb"], tokens_per_s=summary["tokens_per_s"], mfu=summary["mfu"],
               wall_s=summary["wall_s"])
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
  return apply_overrides(load(spec), overrides)


def finished_summary(cfg, run_dir: str) -> dict | None:
  """The summary of a completed run of exactly `cfg` in `run_dir`, or None (then the run is (re)started)."""
  from scalezoo.train.trainer import config_json
  try:
    with open(os.path.join(run_dir, "config.json")) as f:
      same = json.load(f) == config_json(cfg)
    summary = read_summary(os.path.join(run_dir, "summary.json"))
  except (OSError, ValueError):
    return None
  return summary if same and summary.get("status") == "completed" else None


def sweep(sweep_cfg, workdir: str, *, quiet: bool = False, train_fn=None) -> list[dict]:
  """Runs every run of `sweep_cfg` under `workdir/runs/` and writes `workdir/results.csv`."""
  from scalezoo.train.trainer import train
  train_fn = train_fn or train
  runs = run_configs(sweep_cfg)
  axis_keys = list(flatten(sweep_cfg.get("grid"))) + list(flatten(sweep_cfg.get("ladder")))
  values = dict(expand(sweep_cfg))
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    f.write(sweep_cfg.to_json(indent=2))
  rows, t0, done_times = [], time.time(), []
  for i, (name, cfg) in enumerate(runs):
    run_dir = os.path.join(workdir, "runs", name)
    t_run = time.time()
    try:
      summary = finished_summary(cfg, run_dir)
      if summary is None:
        summary = train_fn(cfg, run_dir, quiet=True)
      row = _row(name, summary)
    except ConfigError as e:
      row = _row(name, None, error=str(e))
    except Exception as e:  # a broken run must not stop the sweep; its error goes into results.csv
      row = _row(name, None, error=f"{type(e).__name__}: {e}".splitlines()[0])
      if not quiet:
        traceback.print_exc(file=sys.stderr)
    row.update({k: values[name].get(k, "") for k in axis_keys})
    rows.append(row)
    write_results(os.path.join(workdir, "results.csv"), rows, axis_keys)
    done_times.append(time.time() - t_run)
    if not quiet:
      left = len(runs) - (i + 1)
      eta = left * (sum(done_times) / len(done_times))
      print(f"[{i + 1}/{len(runs)}] {name}: {row['status']}"
            f"{' (' + row['error'] + ')' if row['error'] else ''}, eval loss {row['eval_loss'] or '-'}; "
            f"eta {int(eta // 60)}:{int(eta % 60):02d}", file=sys.stderr, flush=True)
  if not quiet:
    print(f"sweep done in {time.time() - t0:.0f}s: {workdir}/results.csv", file=sys.stderr)
  return rows
