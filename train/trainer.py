"""The architecture-agnostic training loop: run directory, resume, logging, eval, checkpoints, pre-emption.

Order of work in `train`: validate the config and open the data (bad input fails here, before anything is
written or compiled), claim the run directory, build the mesh and the jitted program, restore the newest good
checkpoint (model, optimizer, step and data iterator) or initialise, then loop. The host dispatches step s and
only then fetches the metrics of step s-1, so it never waits on the device for logging.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import signal
import sys
import threading
import time

import jax
import numpy as np

from scalezoo import models
from scalezoo.configs import ConfigError
from scalezoo.train import data as data_lib
from scalezoo.train import init_from
from scalezoo.train.checkpoint import Checkpointer
from scalezoo.train.metrics import MetricsLog, Progress, mfu, peak_flops_per_device, read_summary, write_json
from scalezoo.train.sharding import make_mesh
from scalezoo.train.optim import apply_step_law, data_parallel_size
from scalezoo.train.step import make_program
from scalezoo.train.validate import validate, validate_platform

STATUS_EXIT = {"completed": 0, "nonfinite": 1, "preempted": 143}
RUN_FILES = ("metrics.jsonl", "summary.json", "loss.png", "checkpoints")


def config_json(cfg) -> dict:
  """The config as stored in config.json; `overwrite` is an instruction, not part of the run's identity."""
  d = json.loads(cfg.to_json())
  d.pop("overwrite", None)
  return d


def run_identity(config: dict) -> dict:
  """What must match to resume a run: everything but the mesh, since checkpoints restore onto any mesh (and an
  empty init_from, so run directories written before that key existed still resume)."""
  return {k: v for k, v in config.items() if k != "mesh" and not (k == "init_from" and not v)}


def _first_difference(old, new, prefix=""):
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      diff = _first_difference(a, b, f"{prefix}{key}.")
      if diff:
        return diff
    elif a != b:
      return f"{prefix}{key}: {a!r} -> {b!r}"
  return None


def claim_workdir(cfg, workdir: str) -> None:
  """Writes config.json; refuses a directory holding a run of another config unless `overwrite` is set."""
  path = os.path.join(workdir, "config.json")
  new = config_json(cfg)
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f"{path} is unreadable ({e}); use a new --workdir") from None
    diff = _first_difference(run_identity(old), run_identity(new))
    if diff and not cfg.overwrite:
      raise ConfigError(f"--workdir {workdir} holds a run with a different config ({diff}); use a new --workdir "
                        f"or --config.overwrite=true to replace it")
    if diff:
      for name in RUN_FILES:
        target = os.path.join(workdir, name)
        if os.path.isdir(target):
          shutil.rmtree(target)
        elif os.path.exists(target):
          os.remove(target)
  os.makedirs(workdir, exist_ok=True)
  write_json(path, new)


_PREEMPTED = threading.Event()


class preemption_guard:
  """Turns SIGTERM into a flag every training loop of this process checks after each step.

  Installed by `train` on the main thread, and by a packed sweep around its run threads (signal handlers
  can only be set on the main thread), so one SIGTERM checkpoints every run in flight. Nested use is a no-op.
  """

  def __init__(self):
    self._old = None

  def __enter__(self):
    if _is_main_thread() and not getattr(signal.getsignal(signal.SIGTERM), "_scalezoo", False):
      _PREEMPTED.clear()
      self._old = signal.signal(signal.SIGTERM, _on_sigterm)
    return self

  @property
  def requested(self) -> bool:
    return _PREEMPTED.is_set()

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      _PREEMPTED.clear()


def _on_sigterm(signum, frame):
  _PREEMPTED.set()


_on_sigterm._scalezoo = True


def _is_main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def _say(msg: str, quiet: bool) -> None:
  if not quiet:
    print(msg, file=sys.stderr, flush=True)


def run_processes(devices) -> tuple[int, list[int]]:
  """(this process's rank among the processes owning `devices`, those processes in order).

  A run on the whole job spans every process; a packed sweep run on one host's devices spans just that one,
  which then feeds the whole batch and writes the run's files itself.
  """
  procs = sorted({d.process_index for d in devices})
  if jax.process_index() not in procs:
    raise ValueError(f"process {jax.process_index()} owns none of the run's devices (processes {procs})")
  return procs.index(jax.process_index()), procs


def train(cfg, workdir: str, *, devices=None, quiet: bool = False) -> dict:
  """Trains `cfg` in `workdir` (resuming if it holds checkpoints) and returns the summary dict.

  `devices` (default: all) may be a subset, e.g. one group of a packed sweep; every process owning one of
  them must call `train` alike.
  """
  devices = list(devices if devices is not None else jax.devices())
  if cfg.train.get("step_law"):
    cfg = apply_step_law(cfg, data_parallel_size(cfg, len(devices)))
  validate(cfg, len(devices))
  validate_platform(cfg, devices[0].platform)
  t = cfg.train
  rank, procs = run_processes(devices)
  n_proc = len(procs)
  if t.batch_size % n_proc:
    raise ConfigError(f"config key train.batch_size={t.batch_size}: must be a multiple of the {n_proc} processes")
  train_iter = data_lib.make_train_iterator(cfg.data, batch_size=t.batch_size // n_proc, seq_len=t.seq_len,
                                            seed=t.seed, num_steps=t.steps, process_index=rank,
                                            process_count=n_proc)
  eval_data = data_lib.eval_batches(cfg.data, batch_size=t.batch_size, seq_len=t.seq_len,
                                    num_batches=t.eval_batches)
  bytes_per_token = data_lib.bytes_per_token(cfg.data)
  has_recall = data_lib.recall_mask(cfg.data, t.seq_len) is not None
  is_main = rank == 0
  mesh = make_mesh(cfg.mesh, devices)
  with jax.set_mesh(mesh):
    # Builds the abstract model and every sharding: a mesh axis that does not divide a parameter fails here,
    # before the run directory is touched.
    program = make_program(cfg, mesh)
  source = init_from.check(cfg) if cfg.get("init_from") else None  # also before anything is written
  if is_main:
    claim_workdir(cfg, workdir)

  counts = models.param_counts(cfg.model)
  flops_per_token = models.flops_per_token(cfg.model, t.seq_len)
  tokens_per_step = t.batch_size * t.seq_len
  peak = peak_flops_per_device(t.peak_flops, devices[0])
  if peak is None:
    _say(f"warning: unknown device kind {devices[0].device_kind!r}; set train.peak_flops for MFU", quiet)

  wall0 = time.time()
  with jax.set_mesh(mesh), preemption_guard() as preemption:
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep, processes=procs)
    restored = ckpt.restore_latest(program.abstract_state())
    if restored is None:
      start, state = 0, program.init()
      if source is not None:
        state = init_from.initial_state(cfg, source, program, mesh, state)
        _say(f"initialised from {cfg.init_from}", quiet)
    else:
      start, state, data_state = restored
      summary_path = os.path.join(workdir, "summary.json")
      if start >= t.steps and os.path.exists(summary_path):
        ckpt.close()
        _say(f"{workdir} already holds the finished run ({start} steps); nothing to do", quiet)
        return read_summary(summary_path)
      train_iter.set_state(data_state)
      _say(f"resuming {workdir} from step {start}", False)
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), keep_up_to_step=start) if is_main else None
    progress = Progress(t.steps, start) if (is_main and not quiet) else None

    def evaluate(st) -> dict:
      outs = [jax.device_get(program.eval_step(st, jax.make_array_from_process_local_data(
          program.batch_sharding, b[rank::n_proc] if n_proc > 1 else b))) for b in eval_data]
      # With a recall task (mqar) the eval step returns a dict of the loss and the answer counts.
      loss = float(np.mean([float(o["ce"] if has_recall else o) for o in outs]))
      row = dict(eval_loss=loss, eval_bpb=loss / math.log(2) / bytes_per_token)
      if has_recall:  # pooled over every eval batch: correct answers over all answers
        row["eval_recall"] = sum(int(o["recall_correct"]) for o in outs) / sum(int(o["recall_answers"]) for o in outs)
      return row

    evals: dict[int, dict] = {}
    recent = collections.deque(maxlen=1)
    status, streak = "completed", 0
    timing = dict(t_first=None, t_last=None, steps_timed=0, t_log=None, step_log=start, paused=0.0)

    def paused(fn, *a, **kw):
      t0 = time.time()
      out = fn(*a, **kw)
      timing["paused"] += time.time() - t0
      return out

    def handle(step: int, metrics, now: float | None = None) -> None:
      nonlocal streak
      # Scalars as floats; per-layer entries (`layer/...`, e.g. each MoE layer's expert load) as lists.
      m = {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in jax.device_get(metrics).items()}
      # Time spent in eval and checkpoint saves is not training time: tokens/s leaves it out.
      now = now if now is not None else time.time() - timing["paused"]
      if timing["t_first"] is None:
        timing["t_first"], timing["t_log"], timing["step_log"] = now, now, step
      else:
        timing["t_last"], timing["steps_timed"] = now, step - (start + 1)
      streak = streak + 1 if m["nonfinite"] else 0
      recent.append(m["loss"])
      if step % t.log_every == 0 or step == t.steps or step in evals:
        dt = now - timing["t_log"]
        tps = tokens_per_step * (step - timing["step_log"]) / dt if dt > 0 else float("nan")
        timing["t_log"], timing["step_log"] = now, step
        row = dict(step=step, loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"], tokens=step * tokens_per_step,
                   tokens_per_s=tps, mfu=mfu(tps, flops_per_token, len(devices), peak), nonfinite=m["nonfinite"])
        row.update({k: v for k, v in m.items() if k not in row})
        row.update(evals.pop(step, {}))
        if log:
          log.write(row)
        if progress:
          progress.update(step, m["loss"], tps)

    pending = None
    step = start
    for step in range(start + 1, t.steps + 1):
      batch = jax.make_array_from_process_local_data(program.batch_sharding, next(train_iter))
      state, metrics = program.train_step(state, batch)
      if pending is not None:
        handle(*pending)
      pending = (step, metrics)
      if streak >= t.max_nonfinite:
        status = "nonfinite"
        break
      if t.eval_every and step % t.eval_every == 0 and step != t.steps:
        evals[step] = paused(evaluate, state)
      if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != t.steps:
        paused(ckpt.save, step, state, train_iter.get_state())
      if preemption.requested:
        status = "preempted"
        break
    if pending is not None:
      jax.block_until_ready(pending[1])
      t_done = time.time() - timing["paused"]
      final_eval = paused(evaluate, state) if status == "completed" else {}
      evals[pending[0]] = final_eval
      handle(*pending, now=t_done)
      if streak >= t.max_nonfinite:
        status = "nonfinite"
    else:
      final_eval = evaluate(state)
    # Skipped updates leave the state as it was, so the state now is the last good one in every case.
    ckpt.save(step, state, train_iter.get_state(), force=True)
    ckpt.close()
    if progress:
      progress.close()
    if log:
      log.close()

  timed = timing["steps_timed"]
  tokens_per_s = (tokens_per_step * timed / (timing["t_last"] - timing["t_first"])) if timed > 0 else float("nan")
  summary = dict(
      family=cfg.model.family, params=counts["total"], params_active=counts["active"],
      params_non_embedding=counts["non_embedding"], params_embedding=counts["embedding"],
      flops_per_token=flops_per_token, seq_len=t.seq_len, batch_size=t.batch_size, steps=step,
      tokens=step * tokens_per_step, loss=recent[-1] if recent else float("nan"),
      eval_loss=final_eval.get("eval_loss", float("nan")), eval_bpb=final_eval.get("eval_bpb", float("nan")),
      tokens_per_s=tokens_per_s, mfu=mfu(tokens_per_s, flops_per_token, len(devices), peak),
      peak_flops_per_device=peak, devices=len(devices), device_kind=devices[0].device_kind,
      mesh=dict(mesh.shape), wall_s=time.time() - wall0, status=status)
  # Family facts (a hybrid's attention layers and effective ratio); {} for most families.
  summary.update(models.describe(cfg.model))
  if has_recall:
    # Only sources with a recall task get the key (NaN when there was no final eval), so other summaries are
    # unchanged.
    summary["eval_recall"] = final_eval.get("eval_recall", float("nan"))
  if is_main:
    write_json(os.path.join(workdir, "summary.json"), summary)
  if status == "nonfinite":
    _say(f"stopped at step {step}: {streak} non-finite steps in a row (train.max_nonfinite={t.max_nonfinite}); "
         f"the last good state is checkpointed at step {step}; lower train.lr or raise train.warmup", False)
  elif status == "preempted":
    _say(f"pre-empted at step {step}: checkpoint written; rerun the same command to resume", False)
  return summary
