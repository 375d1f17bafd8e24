"""Peak FLOPs by device kind, MFU, the metrics.jsonl writer and the terminal progress bar."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time

import jax

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity). Matched as substrings of
# `device.device_kind`, most specific first; `train.peak_flops` overrides for chips not listed.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("TPU v6", 918e12),   # Trillium (v6e)
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("TPU v2", 45e12),
]


def cpu_peak_flops() -> float:
  """A nominal fp32 peak for one host-CPU device: cores x 3 GHz x 32 FLOP/cycle (two AVX2 FMA units).

  A rough figure: CPU MFU is only for comparing runs on the same machine.
  """
  cores = os.cpu_count() or 1
  return cores * 3e9 * 32 / max(1, jax.local_device_count())


def peak_flops_per_device(override: float = 0.0, device: jax.Device | None = None) -> float | None:
  """Peak FLOP/s of one device: the override if set, else the table; None for an unknown accelerator."""
  if override > 0:
    return float(override)
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return cpu_peak_flops()
  kind = device.device_kind
  for key, flops in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return flops
  return None


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the mesh's peak (NaN if the peak is unknown)."""
  if not peak or not tokens_per_s:
    return float("nan")
  return tokens_per_s * flops_per_token / (peak * n_devices)


def _clean(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
  return v


def write_json(path: str, obj: dict) -> None:
  """Atomic write (temp file + rename) so a killed process never leaves a half-written file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump({k: _clean(v) for k, v in obj.items()}, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def write_table(workdir: str, stem: str, columns, rows: list[dict], doc: dict) -> None:
  """STEM.csv (`columns` of `rows`; None and non-finite numbers as empty cells) and STEM.json (`doc`, JSON-ready)
  in `workdir`, each replaced atomically: the benchmarks' output files."""
  os.makedirs(workdir, exist_ok=True)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(columns)
  w.writerows([("" if _clean(r.get(k)) is None else r[k]) for k in columns] for r in rows)
  for name, text in ((f"{stem}.csv", buf.getvalue()), (f"{stem}.json", json.dumps(doc, indent=2) + "\n")):
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)


class MetricsLog:
  """Appends one JSON object per logged step to metrics.jsonl."""

  def __init__(self, path: str, keep_up_to_step: int | None):
    """Opens `path`; on resume, entries after `keep_up_to_step` (the restored step) are dropped first,
    since the resumed run recomputes them."""
    self.path = path
    if keep_up_to_step is not None and os.path.exists(path):
      with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= keep_up_to_step]
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(rows)
      os.replace(tmp, path)
    self._f = open(path, "a")

  def write(self, row: dict) -> None:
    self._f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def read_summary(path: str) -> dict:
  """summary.json with NaN back where write_json stored null."""
  with open(path) as f:
    return {k: float("nan") if v is None else v for k, v in json.load(f).items()}


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A one-line progress bar on a terminal; on a pipe, a plain line every ~5% of the run."""

  def __init__(self, total: int, start: int = 0, stream=None):
    self.total, self.start = total, start
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.t0 = time.time()
    self.every = max(1, total // 20)
    self._last_line = -1

  def update(self, step: int, loss: float, tokens_per_s: float) -> None:
    done = step - self.start
    rate = done / max(1e-9, time.time() - self.t0)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    eta_s = f"{int(eta // 60)}:{int(eta % 60):02d}" if math.isfinite(eta) else "?"
    rate_s = f"{tokens_per_s / 1e3:.1f}k" if math.isfinite(tokens_per_s) else "?"
    text = f"step {step}/{self.total} loss {loss:.4f} {rate_s} tok/s eta {eta_s}"
    if self.tty:
      width = 24
      filled = int(width * step / max(1, self.total))
      self.stream.write(f"\r[{'=' * filled}{' ' * (width - filled)}] {text}   ")
      self.stream.flush()
    elif step // self.every != self._last_line or step == self.total:
      self._last_line = step // self.every
      self.stream.write(text + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()
