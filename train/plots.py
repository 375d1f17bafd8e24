"""PNG plots of run outputs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scalezoo.train.metrics import read_jsonl  # noqa: E402


def plot_loss_curve(run_dir: str, out: str | None = None) -> str:
  """Training loss (and eval loss where logged) against tokens, from metrics.jsonl; returns the PNG path."""
  rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  if not rows:
    raise ValueError(f"{run_dir}/metrics.jsonl has no logged steps to plot")
  out = out or os.path.join(run_dir, "loss.png")
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  train = [(r["tokens"], r["loss"]) for r in rows if r.get("loss") is not None]
  ax.plot([t for t, _ in train], [v for _, v in train], label="train loss", lw=1.2)
  evals = [(r["tokens"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
  if evals:
    ax.plot([t for t, _ in evals], [v for _, v in evals], "o-", label="eval loss", ms=4)
  ax.set_xlabel("tokens")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(os.path.basename(os.path.abspath(run_dir)))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)
  return out
