"""`scalezoo parbench`: the inference cost of ParScale against parameter scaling at equal loss.

Three models on one device, all built from the one ParScale config:
- base: the ParScale model's base-family model (P = 1 is exactly this model), N_base non-embedding parameters;
- parscale: the config itself, P streams, N_ps non-embedding parameters (prefixes and aggregator included, as in
  the law's N);
- dense: the base scaled (by width, or by depth) to the non-embedding count closest in ratio to N_ps (k ln P + 1),
  the size at which the fitted law L = (A / (N (k ln P + 1)))^alpha + E gives a P = 1 model ParScale's loss.

For each batch size and model: memory = parameter bytes + cache bytes (prompt_len + tokens positions) + the decode
step's transient bytes (temporaries and the logits, from the compiled step's memory analysis); ms per token = the
median of `tokens` one-token steps, each timed on its own, after a prefill, warm-up steps and a fresh prefill. The
three models' steps are interleaved, so a slow spell of the machine hits all three alike. Increases are over the
base; each ratio is the dense model's increase over ParScale's (the paper reports up to 22x for memory and 6x for
latency). Rows are printed and, with `workdir`, written to parbench.csv / parbench.json.

  scalezoo parbench --config parscale:dense:quickstart,streams=4 --fit sweeps/parscale --batches 1,8,32
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys

import jax
import numpy as np
from flax import nnx

from scalezoo import models
from scalezoo.configs import ConfigError
from scalezoo.models.registry import head_dim
from scalezoo.train.bench import WARMUP_STEPS, _xla_status
from scalezoo.train.metrics import write_table
from scalezoo.train.seqbench import DecodeTimer, one_device_config
from scalezoo.train.validate import validate

MODELS = ("base", "parscale", "dense")
SCALES = ("width", "depth")
COLUMNS = ("batch", "model", "status", "config", "non_embedding_params", "param_bytes", "cache_bytes", "step_bytes",
           "memory_bytes", "ms_per_token", "memory_increase_bytes", "latency_increase_ms", "memory_ratio",
           "latency_ratio", "reason")
MIB = 2 ** 20
_MAX_SCALE = 100_000  # a bound on the size search: far beyond any model, reached only by a runaway target


def read_k(fit: str = "", k: str = "") -> float:
  """The law's k from `--fit` (a fit.json, or the sweep directory holding one) or `--k`; ConfigError if bad."""
  if bool(fit) == bool(k):
    raise ConfigError("give the ParScale law's k once: --fit SWEEPDIR/fit.json (a ParScale sweep's fit) or "
                      "--k FLOAT (e.g. --k 0.39, the paper's Stack-V2-Python fit)")
  where, value = "--k", k
  if fit:
    path = os.path.join(fit, "fit.json") if os.path.isdir(fit) else fit
    if not os.path.isfile(path):
      raise ConfigError(f"--fit {fit}: no {'fit.json in that directory' if os.path.isdir(fit) else 'such file'}; "
                        f"a ParScale sweep's report writes it once 4 or more runs have completed (scalezoo plot "
                        f"--workdir SWEEPDIR), or give --k FLOAT")
    try:
      with open(path) as f:
        doc = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(f"--fit {path}: not a readable JSON file ({e}); pass a fit.json or give --k FLOAT") from None
    doc = doc if isinstance(doc, dict) else {}
    value = doc.get("k", (doc.get("parscale") if isinstance(doc.get("parscale"), dict) else {}).get("k"))
    if value is None:
      raise ConfigError(f"--fit {path}: holds no k (law {doc.get('law', 'unknown')!r}); pass the fit.json of a "
                        f"ParScale sweep (law parscale) or give --k FLOAT")
    where = f"--fit {path}: k"
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{where} {value!r}: not a number; give a positive float like 0.39") from None
  if not math.isfinite(value) or value <= 0:
    raise ConfigError(f"{where}={value}: must be > 0; P streams count as (k ln P + 1) x the parameters, so k <= 0 "
                      f"leaves no equal-loss dense model (the paper's fits give k = 0.33-0.39)")
  return value


def scaled(model_cfg, scale: str, n: int):
  """`model_cfg` with `n` layers (scale "depth") or with `n` KV heads (scale "width": heads keep their group size
  and head_dim, so width = heads x head_dim, and ffn_width keeps its ratio to width)."""
  c = copy.deepcopy(model_cfg)
  if scale == "depth":
    c.depth = n
    return c
  group, hd = model_cfg.heads // model_cfg.kv_heads, head_dim(model_cfg)
  c.kv_heads, c.heads = n, n * group
  c.width = c.heads * hd
  c.ffn_width = max(1, round(model_cfg.ffn_width * c.width / model_cfg.width))
  return c


def dense_equivalent(model_cfg, target: float, scale: str = "width"):
  """(config, non-embedding params) of `model_cfg` scaled by `scale` to the count closest in ratio to `target`.

  The grid is one KV-head group (width) or one layer (depth), so the result is within half a step of the target
  in log terms; counts are analytic (`scalezoo.models.param_counts`), nothing is built.
  """
  if scale not in SCALES:
    raise ConfigError(f"--scale {scale!r}: choose one of {', '.join(SCALES)}")
  missing = [k for k in (("depth",) if scale == "depth" else ("width", "heads", "kv_heads", "ffn_width"))
             if k not in model_cfg]
  if missing or (scale == "width" and model_cfg.heads % model_cfg.kv_heads):
    raise ConfigError(f"family {model_cfg.family} cannot be scaled by {scale} (needs keys width, heads, kv_heads, "
                      f"ffn_width with heads a multiple of kv_heads, or depth); try --scale "
                      f"{'depth' if scale == 'width' else 'width'}")
  count = lambda n: models.param_counts(scaled(model_cfg, scale, n))["non_embedding"]
  n = model_cfg.depth if scale == "depth" else model_cfg.kv_heads
  while n > 1 and count(n) > target:
    n -= 1
  while count(n) < target and n < _MAX_SCALE:
    n += 1
  if n > 1 and abs(math.log(count(n - 1) / target)) < abs(math.log(count(n) / target)):
    n -= 1
  return scaled(model_cfg, scale, n), count(n)


def model_label(model_cfg) -> str:
  """Short description of a model config: its family and sizes (and, for ParScale, its streams and prefix)."""
  keys = [k for k in ("width", "depth", "heads", "kv_heads", "ffn_width") if k in model_cfg]
  text = " ".join([model_cfg.family] + [f"{k}={model_cfg[k]}" for k in keys])
  if "parscale" in model_cfg:
    p = model_cfg.parscale
    text += f" streams={p.streams} prefix_len={p.prefix_len} base={p.base}"
  return text


def equal_loss_configs(cfg, k: float, scale: str = "width") -> tuple[dict, dict]:
  """({base, parscale, dense} full configs, sizes) for the ParScale config `cfg` and the law's `k`."""
  if cfg.model.family != "parscale":
    raise ConfigError(f"--config: model.family={cfg.model.family!r} is not parscale; pass a ParScale config, e.g. "
                      f"parscale:dense:quickstart,streams=4")
  p = int(cfg.model.parscale.streams)
  if p < 2:
    raise ConfigError(f"config key model.parscale.streams={p}: parbench compares P streams with their P = 1 base; "
                      f"give streams >= 2, e.g. parscale:dense:quickstart,streams=4")
  from scalezoo.models.parscale import base_config
  base = copy.deepcopy(cfg)
  base.model = base_config(cfg.model)
  n_base = models.param_counts(base.model)["non_embedding"]
  n_ps = models.param_counts(cfg.model)["non_embedding"]
  target = n_ps * (k * math.log(p) + 1.0)
  dense = copy.deepcopy(base)
  dense.model, n_dense = dense_equivalent(base.model, target, scale)
  sizes = dict(streams=p, k=k, multiplier=k * math.log(p) + 1.0, scale=scale, n_base=n_base, n_parscale=n_ps,
               target=target, n_dense=n_dense, dense_vs_target=n_dense / target)
  return dict(base=base, parscale=copy.deepcopy(cfg), dense=dense), sizes


def build_model(cfg):
  """The model of a full config on the default device, in the config's dtypes and layer layout. Initialised by one
  jitted program: eagerly, every random draw is dispatched (and compiled) on its own, which takes longer."""
  t, box = cfg.train, {}

  def init():
    model = models.build(cfg.model, rngs=nnx.Rngs(t.seed), compute_dtype=t.compute_dtype, param_dtype=t.param_dtype,
                         scan_layers=t.scan_layers)
    box["graphdef"], state = nnx.split(model)
    return state

  state = jax.jit(init)()
  return nnx.merge(box["graphdef"], state)


def measure_batch(built: dict, batch: int, prompt_len: int, tokens: int, vocab_size: int) -> dict[str, dict]:
  """{name: param_bytes, cache_bytes, step_bytes, ms_per_token} of every built model at `batch`; the timed
  steps of the models alternate (in a rotating order) so that all see the same machine."""
  ids = np.random.default_rng(0).integers(0, vocab_size, (batch, prompt_len + 1), dtype=np.int32)
  prompt_bt, next_b1 = jax.device_put(ids[:, :prompt_len]), jax.device_put(ids[:, prompt_len:])
  timers = {name: DecodeTimer(model, prompt_bt, next_b1, prompt_len + tokens) for name, model in built.items()}
  for timer in timers.values():
    for _ in range(min(WARMUP_STEPS, tokens)):
      timer.step()
    timer.restart()  # the timed steps get the cache's prompt_len + tokens positions to themselves
  names, times = list(timers), {name: [] for name in timers}
  for i in range(tokens):
    for name in names[i % len(names):] + names[:i % len(names)]:
      times[name].append(timers[name].step())
  out = {}
  for name, t in timers.items():
    out[name] = dict(param_bytes=t.state_bytes, cache_bytes=t.cache_bytes, step_bytes=t.step_bytes,
                     ms_per_token=1e3 * float(np.median(times[name])))
  return out


def _ratio(num, den):
  return num / den if num is not None and den is not None and den > 0 else None


def compare(batch: int, measured: dict[str, dict], info: dict[str, dict]) -> list[dict]:
  """One batch's rows (base, parscale, dense): memory (step_bytes None, where the backend has no memory analysis,
  counts 0), increases over the base and the two ratios (dense increase / ParScale increase, None where ParScale's
  increase is not positive). `info` adds per-model columns."""
  rows = {}
  for name in MODELS:
    m = dict(measured[name])
    m["memory_bytes"] = m["param_bytes"] + m["cache_bytes"] + (m["step_bytes"] or 0)
    rows[name] = dict(batch=batch, model=name, status="ok", reason="", **info.get(name, {}), **m)
  base = rows["base"]
  for row in rows.values():
    row["memory_increase_bytes"] = row["memory_bytes"] - base["memory_bytes"]
    row["latency_increase_ms"] = row["ms_per_token"] - base["ms_per_token"]
  ps, dense = rows["parscale"], rows["dense"]
  ratios = dict(memory_ratio=_ratio(dense["memory_increase_bytes"], ps["memory_increase_bytes"]),
                latency_ratio=_ratio(dense["latency_increase_ms"], ps["latency_increase_ms"]))
  return [dict(row, **ratios) for row in rows.values()]


def failed_rows(batch: int, error: Exception, info: dict[str, dict]) -> list[dict]:
  """A batch that could not run (out of memory, say): one row per model with its status and reason."""
  status, reason = _xla_status(error, "error")
  return [dict(batch=batch, model=name, status=status, reason=reason, **info.get(name, {})) for name in MODELS]


_TABLE = (("batch", "batch", 6, "d", 1), ("model", "model", 9, "s", 1),
          ("non_embedding_params", "params M", 9, ".3f", 1e6), ("param_bytes", "param MiB", 10, ".3f", MIB),
          ("cache_bytes", "cache MiB", 10, ".3f", MIB), ("step_bytes", "step MiB", 9, ".3f", MIB),
          ("memory_bytes", "memory MiB", 11, ".3f", MIB), ("memory_increase_bytes", "+memory", 9, ".3f", MIB),
          ("ms_per_token", "ms/token", 9, ".3f", 1), ("latency_increase_ms", "+ms/token", 10, ".3f", 1))
# (key, title, width, format, unit the value is divided by)


def format_row(row: dict | None = None) -> str:
  """One fixed-width line of the printed table (the header when `row` is None); missing values print as '-'."""
  cells = []
  for key, title, width, fmt, unit in _TABLE:
    v = title if row is None else row.get(key)
    text = "-" if v is None else format(v if row is None or fmt in ("s", "d") else v / unit,
                                        "s" if row is None else fmt)
    cells.append(text.ljust(width) if fmt == "s" else text.rjust(width))
  reason = "" if row is None else row.get("reason", "")
  return " ".join(cells) + (f"  {row['status']}: {reason}" if reason else "")


def _times(v) -> str:
  return "n/a" if v is None else f"{v:.2f}x"


def ratio_line(rows: list[dict]) -> str:
  """The batch's two ratios, printed under its rows."""
  r = rows[-1]
  return (f"{'':6} dense increase / ParScale increase: memory {_times(r.get('memory_ratio'))}, "
          f"latency {_times(r.get('latency_ratio'))}")


def summary_sentence(rows: list[dict], streams: int) -> str:
  """The last line: both ratios at every batch, in one sentence."""
  by_batch = {r["batch"]: r for r in rows if r["model"] == "dense" and r["status"] == "ok"}
  if not by_batch:
    return "No batch size ran, so there are no ratios (see each row's status and reason)."
  parts = [f"{_times(r.get('memory_ratio'))} and {_times(r.get('latency_ratio'))} at batch {b}"
           for b, r in by_batch.items()]
  return (f"At equal loss, the dense model's increase over the base divided by ParScale P={streams}'s, for memory "
          f"and per-token latency: {'; '.join(parts)} (the paper reports up to 22x and 6x).")


def write_results(workdir: str, rows: list[dict], meta: dict) -> None:
  """parbench.csv (COLUMNS, one row per batch and model) and parbench.json (meta, rows, ratios), each replaced
  atomically."""
  ratios = [dict(batch=r["batch"], memory_ratio=r.get("memory_ratio"), latency_ratio=r.get("latency_ratio"))
            for r in rows if r["model"] == "dense"]
  write_table(workdir, "parbench", COLUMNS, rows, dict(meta, rows=rows, ratios=ratios))


def check_arguments(batches: list[int], prompt_len: int, tokens: int) -> None:
  """One ConfigError line for a bad batch list, prompt length or token count."""
  if not batches or any(b < 1 for b in batches):
    raise ConfigError(f"--batches {batches}: give positive batch sizes, e.g. 1,8,32")
  for name, value in (("--prompt_len", prompt_len), ("--tokens", tokens)):
    if value < 1:
      raise ConfigError(f"{name} {value}: must be >= 1")


def run_models(cfgs: dict, sizes: dict, *, batches: list[int], prompt_len: int = 64, tokens: int = 32,
               workdir: str = "", out=None) -> list[dict]:
  """Measures the {base, parscale, dense} full configs `cfgs` at every batch size; prints the table, writes the
  files after every batch and returns the rows. `sizes` (from equal_loss_configs) goes into the JSON."""
  out = out or sys.stdout
  check_arguments(batches, prompt_len, tokens)
  for c in cfgs.values():  # every config error is one line before anything is built or written
    validate(one_device_config(c, prompt_len + tokens, max(batches)), 1)
  info = {name: dict(config=model_label(c.model), non_embedding_params=models.param_counts(c.model)["non_embedding"])
          for name, c in cfgs.items()}
  meta = dict(sizes, models={name: i["config"] for name, i in info.items()}, batches=batches, prompt_len=prompt_len,
              tokens=tokens, warmup_steps=WARMUP_STEPS, device_kind=jax.devices()[0].device_kind,
              jax=jax.__version__, config=cfgs["parscale"].to_dict())
  for name in MODELS:
    print(f"{name:<9} {info[name]['config']}: {info[name]['non_embedding_params'] / 1e6:.3f}M non-embedding params",
          file=out)
  if "target" in sizes:
    print(f"{'':9} target N_ps (k ln P + 1) = {sizes['target'] / 1e6:.3f}M (k={sizes['k']:g}, P={sizes['streams']});"
          f" the dense model has {sizes['dense_vs_target']:.3f} x the target", file=out)
  print(format_row(), file=out, flush=True)
  built = {name: build_model(c) for name, c in cfgs.items()}
  rows = []
  for batch in batches:
    try:
      batch_rows = compare(batch, measure_batch(built, batch, prompt_len, tokens, cfgs["base"].model.vocab_size),
                           info)
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001 - a batch that does not fit is a row, not a crash
      batch_rows = failed_rows(batch, e, info)
    rows += batch_rows
    for row in batch_rows:
      print(format_row(row), file=out)
    if batch_rows[0]["status"] == "ok":
      print(ratio_line(batch_rows), file=out, flush=True)
    if workdir:
      write_results(workdir, rows, meta)
  print(summary_sentence(rows, sizes.get("streams", 0)), file=out, flush=True)
  return rows


def parbench(cfg, *, k: float, batches: list[int], prompt_len: int = 64, tokens: int = 32, scale: str = "width",
             workdir: str = "", out=None) -> list[dict]:
  """The ParScale config `cfg` against its base and the dense model of equal loss under the law with `k`."""
  check_arguments(batches, prompt_len, tokens)
  cfgs, sizes = equal_loss_configs(cfg, k, scale)
  return run_models(cfgs, sizes, batches=batches, prompt_len=prompt_len, tokens=tokens, workdir=workdir, out=out)
