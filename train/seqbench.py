"""`scalezoo seqbench`: training throughput and per-token decode latency against sequence length, side by side.

For each sequence length L and each config (the first is the reference the ratios are taken against), on one
device:
- training: the jitted train step on a random batch of `batch` x L tokens, 2 warm-up + `steps` timed steps;
- decoding: a prefill of L tokens into caches sized L + `decode_tokens` + 1, then `decode_tokens` one-token steps,
  each timed (the median: ms per token at context L), and the bytes the caches hold (a KV cache grows with L, a
  linear layer's state does not).
A config that fails at some length (out of memory, say) gets a row with its status and reason; the others go on.
Rows are printed as they finish and, with `workdir`, written to seqbench.csv / seqbench.json.

  scalezoo seqbench --config dense:quickstart --config hybrid:quickstart,ratio=0 --config hybrid:quickstart \\
      --seq_lens 1024,2048,4096,8192,16384 --workdir bench/seq
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from scalezoo.configs import ConfigError
from scalezoo.models.generate import decode_fns
from scalezoo.train.bench import WARMUP_STEPS, _xla_status
from scalezoo.train.sharding import MESH_AXES, make_mesh
from scalezoo.train.step import make_program
from scalezoo.train.validate import validate

COLUMNS = ("config", "seq_len", "status", "train_tokens_per_s", "train_vs_ref", "prefill_s", "decode_ms_per_token",
           "decode_vs_ref", "cache_mib", "reason")


def _one_device(cfg, seq_len: int, batch: int):
  c = copy.deepcopy(cfg)
  c.mesh.update(dict(dict.fromkeys(MESH_AXES, 1), preset="", **{f"dcn_{a}": 1 for a in MESH_AXES}))
  c.train.update(dict(seq_len=seq_len, batch_size=batch, microbatches=1))
  return c


def _timed(fn, n: int) -> float:
  """Seconds per call of `fn` (which returns something to block on), over `n` calls."""
  t0 = time.perf_counter()
  out = None
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n


def bench_one(cfg, seq_len: int, *, batch: int, steps: int, decode_tokens: int) -> dict:
  """One (config, length) row: training tokens/s, prefill seconds, decode ms/token and cache MiB."""
  c = _one_device(cfg, seq_len, batch)
  row = dict(seq_len=seq_len, status="ok", reason="")
  mesh = make_mesh(c.mesh, jax.devices()[:1])
  try:
    with jax.set_mesh(mesh):
      program = make_program(c, mesh)
      state = program.init()
      tokens = np.random.default_rng(0).integers(0, c.model.vocab_size, (batch, seq_len + 1), dtype=np.int32)
      batch_bt = jax.device_put(tokens, program.batch_sharding)
      holder = {"state": state}

      def train_step():
        holder["state"], metrics = program.train_step(holder["state"], batch_bt)
        return metrics["loss"]

      _timed(train_step, WARMUP_STEPS)
      row["train_tokens_per_s"] = batch * seq_len / _timed(train_step, steps)

      model = nnx.merge(program.graphdef, holder["state"]["params"], holder["state"]["rest"])
      model_state, fns = nnx.state(model), decode_fns(model)
      cache = fns.init_cache(model_state, batch, seq_len + decode_tokens + 1)
      row["cache_mib"] = sum(x.nbytes for x in jax.tree.leaves(cache)) / 2 ** 20
      prompt = batch_bt[:, :seq_len]
      jax.block_until_ready(fns.prefill(model_state, prompt, cache))  # compiles; the cache is not donated here
      t0 = time.perf_counter()
      logits, cache = fns.prefill(model_state, prompt, cache)
      jax.block_until_ready(logits)
      row["prefill_s"] = time.perf_counter() - t0
      tok = batch_bt[:, seq_len:seq_len + 1]
      logits, cache = fns.step(model_state, tok, cache)  # compiles the one-token step
      jax.block_until_ready(logits)
      # Each step timed on its own, blocked on, and the median kept: one token costs about a millisecond at small
      # sizes, where a mean is at the mercy of one descheduled step.
      times = []
      for _ in range(decode_tokens):
        t0 = time.perf_counter()
        logits, cache = fns.step(model_state, tok, cache)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
      row["decode_ms_per_token"] = 1e3 * float(np.median(times))
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 - a failing length is a row, not a crash
    row["status"], row["reason"] = _xla_status(e, "error")
  return row


def format_row(row: dict | None = None) -> str:
  widths = dict(config=34, seq_len=8, status=7, train_tokens_per_s=12, train_vs_ref=9, prefill_s=10,
                decode_ms_per_token=12, decode_vs_ref=10, cache_mib=10)
  if row is None:
    titles = dict(config="config", seq_len="seq", status="status", train_tokens_per_s="train tok/s",
                  train_vs_ref="vs ref", prefill_s="prefill s", decode_ms_per_token="decode ms/t",
                  decode_vs_ref="vs ref", cache_mib="cache MiB")
    return " ".join(f"{titles[k]:>{w}}" if k != "config" else f"{titles[k]:<{w}}" for k, w in widths.items())
  cells = []
  for k, w in widths.items():
    v = row.get(k)
    if k == "config":
      cells.append(f"{v:<{w}}")
    elif isinstance(v, float):
      cells.append(f"{v:>{w}.{1 if k == 'train_tokens_per_s' else 3}f}" if math.isfinite(v) else f"{'-':>{w}}")
    else:
      cells.append(f"{('-' if v is None else v)!s:>{w}}")
  return " ".join(cells) + (f"  {row['reason']}" if row.get("reason") else "")


def write_results(workdir: str, rows: list[dict], meta: dict) -> None:
  """seqbench.csv and seqbench.json (meta + rows), each replaced atomically."""
  os.makedirs(workdir, exist_ok=True)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(COLUMNS)
  w.writerows([("" if r.get(k) is None else r[k]) for k in COLUMNS] for r in rows)
  doc = dict(meta, rows=rows)
  for name, text in (("seqbench.csv", buf.getvalue()), ("seqbench.json", json.dumps(doc, indent=2) + "\n")):
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)


def seqbench(configs: list[tuple[str, object]], seq_lens: list[int], *, batch: int = 1, steps: int = 3,
             decode_tokens: int = 16, workdir: str = "", out=None) -> list[dict]:
  """Benchmarks every (label, config) at every length; ratios are against the first config at the same length."""
  out = out or sys.stdout
  if not configs:
    raise ConfigError("seqbench needs at least one --config")
  if not seq_lens or any(length < 1 for length in seq_lens):
    raise ConfigError(f"--seq_lens {seq_lens}: give positive sequence lengths, e.g. 1024,2048,4096")
  for name, value in (("--batch", batch), ("--steps", steps), ("--decode_tokens", decode_tokens)):
    if value < 1:
      raise ConfigError(f"{name} {value}: must be >= 1")
  for label, cfg in configs:  # every config error is one line before anything runs
    validate(_one_device(cfg, max(seq_lens), batch), 1)
  meta = dict(configs=[label for label, _ in configs], device_kind=jax.devices()[0].device_kind, batch=batch,
              steps=steps, decode_tokens=decode_tokens, jax=jax.__version__)
  print(format_row(), file=out, flush=True)
  rows = []
  for length in seq_lens:
    ref = None
    for label, cfg in configs:
      row = dict(config=label, **bench_one(cfg, length, batch=batch, steps=steps, decode_tokens=decode_tokens))
      if ref is None:
        ref = row
      for key, ratio in (("train_tokens_per_s", "train_vs_ref"), ("decode_ms_per_token", "decode_vs_ref")):
        a, b = row.get(key), ref.get(key)
        row[ratio] = a / b if a is not None and b else None
      rows.append(row)
      print(format_row(row), file=out, flush=True)
      if workdir:
        write_results(workdir, rows, meta)
  return rows
