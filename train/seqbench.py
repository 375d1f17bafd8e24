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
import math
import sys
import time

import jax
import numpy as np
from flax import nnx

from scalezoo.configs import ConfigError
from scalezoo.models.generate import decode_fns
from scalezoo.train.bench import WARMUP_STEPS, _xla_status, memory_analysis
from scalezoo.train.metrics import write_table
from scalezoo.train.sharding import MESH_AXES, make_mesh
from scalezoo.train.step import make_program
from scalezoo.train.validate import validate

COLUMNS = ("config", "seq_len", "status", "train_tokens_per_s", "train_vs_ref", "prefill_s", "decode_ms_per_token",
           "decode_vs_ref", "cache_mib", "reason")


def one_device_config(cfg, seq_len: int, batch: int):
  """A copy of `cfg` on a one-device mesh, with `batch` sequences of `seq_len` tokens per step."""
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


def tree_bytes(tree) -> int:
  """Bytes held by the arrays of a pytree (or by arrays described by ShapeDtypeStructs)."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class DecodeTimer:
  """One model's decoding on one device, ready to time token by token.

  The constructor makes zero caches of `max_len` positions, prefills `prompt_bt` [B, L] (once to compile, once
  timed: `prefill_s`) and compiles the one-token step ahead of time, so the bytes it needs beyond the model
  state and the cache, `step_bytes` (None where the backend has no memory analysis), are known before it runs.
  `step()` decodes `next_b1` [B, 1] once and returns its seconds; `restart()` prefills a fresh cache, so
  warm-up steps need not use up the positions of the timed ones.
  """

  def __init__(self, model, prompt_bt, next_b1, max_len: int):
    self.state, self.fns = nnx.state(model), decode_fns(model)
    self.prompt_bt, self.next_b1, self.max_len = prompt_bt, next_b1, max_len
    self.state_bytes = tree_bytes(self.state)
    cache = self.fns.init_cache(self.state, prompt_bt.shape[0], max_len)
    self.cache_bytes = tree_bytes(cache)
    jax.block_until_ready(self.fns.prefill(self.state, prompt_bt, cache))  # compiles; the cache is not donated here
    t0 = time.perf_counter()
    logits, self.cache = self.fns.prefill(self.state, prompt_bt, cache)
    jax.block_until_ready(logits)
    self.prefill_s = time.perf_counter() - t0
    self.compiled_step = self.fns.step.lower(self.state, next_b1, self.cache).compile()
    m = memory_analysis(self.compiled_step)
    # Arguments aside (jit drops those the step never reads, so they are not the state plus the cache): the
    # temporaries and the outputs that do not reuse the donated cache's buffers, i.e. the logits.
    self.step_bytes = None if m is None else int(m.temp_size_in_bytes + m.output_size_in_bytes
                                                 - m.alias_size_in_bytes)

  def step(self) -> float:
    """One timed token: seconds from dispatch until its logits are ready."""
    t0 = time.perf_counter()
    logits, self.cache = self.compiled_step(self.state, self.next_b1, self.cache)
    jax.block_until_ready(logits)
    return time.perf_counter() - t0

  def restart(self) -> None:
    """A fresh cache holding only the prefilled prompt (a linear layer's state must restart from zero too)."""
    cache = self.fns.init_cache(self.state, self.prompt_bt.shape[0], self.max_len)
    logits, self.cache = self.fns.prefill(self.state, self.prompt_bt, cache)
    jax.block_until_ready(logits)


def bench_one(cfg, seq_len: int, *, batch: int, steps: int, decode_tokens: int) -> dict:
  """One (config, length) row: training tokens/s, prefill seconds, decode ms/token and cache MiB."""
  c = one_device_config(cfg, seq_len, batch)
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
      timer = DecodeTimer(model, batch_bt[:, :seq_len], batch_bt[:, seq_len:seq_len + 1],
                          seq_len + decode_tokens + 1)
      row["cache_mib"], row["prefill_s"] = timer.cache_bytes / 2 ** 20, timer.prefill_s
      timer.step()  # the compiled step's first run, untimed
      # Each step timed on its own, blocked on, and the median kept: one token costs about a millisecond at small
      # sizes, where a mean is at the mercy of one descheduled step.
      row["decode_ms_per_token"] = 1e3 * float(np.median([timer.step() for _ in range(decode_tokens)]))
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
  write_table(workdir, "seqbench", COLUMNS, rows, dict(meta, rows=rows))


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
    validate(one_device_config(cfg, max(seq_lens), batch), 1)
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
