"""Report of a progressive-growth sweep: loss against cumulative training compute, growth path vs from scratch.

A run started with `init_from` continues its source run, so its compute starts where the source's ended: each
run's cumulative compute is its own (flops_per_token x tokens) plus that of the chain of runs before it. The growth
path is the chain that ends in the last run grown; the baseline is the sweep's `baseline` run, trained from scratch.

Compute saved at equal loss: the growth path's final training loss L (mean of its last few logged losses, the
noise of one batch averaged out) and its cumulative compute C_grow; C_scratch is the compute at which the
baseline's training loss, averaged the same way, first reaches L (interpolated between logged steps). Saved is
1 - C_grow / C_scratch; when the baseline never reaches L, it is at least 1 - C_grow / (its total compute).
"""

from __future__ import annotations

import json
import os

import numpy as np

from scalezoo.train.metrics import read_jsonl
from scalezoo.train.report import plot_loss_curves, plt

SMOOTH = 5  # logged losses averaged for "the loss at a point"


def _source_name(sweep_dir: str, name: str) -> str | None:
  """The run of this sweep that `name` was initialised from, or None."""
  with open(os.path.join(sweep_dir, "runs", name, "config.json")) as f:
    source = json.load(f).get("init_from", "") or ""
  return os.path.basename(os.path.normpath(source)) if source else None


def _curve(sweep_dir: str, name: str, flops_per_token: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
  """(cumulative compute, running mean of the training loss) at each logged step of run `name`."""
  rows = [r for r in read_jsonl(os.path.join(sweep_dir, "runs", name, "metrics.jsonl")) if r.get("loss") is not None]
  compute = offset + flops_per_token * np.array([r["tokens"] for r in rows], float)
  loss = np.array([r["loss"] for r in rows], float)
  smooth = np.array([loss[max(0, i - SMOOTH + 1):i + 1].mean() for i in range(len(loss))])
  return compute, smooth


def compute_to_reach(compute: np.ndarray, loss: np.ndarray, target: float) -> float | None:
  """The first compute at which `loss` (along `compute`) reaches `target`, linearly interpolated; None if never."""
  below = np.nonzero(loss <= target)[0]
  if not len(below):
    return None
  i = below[0]
  if i == 0:
    return float(compute[0])
  c0, c1, l0, l1 = compute[i - 1], compute[i], loss[i - 1], loss[i]
  return float(c0 + (c1 - c0) * (l0 - target) / (l0 - l1))


def growth_summary(sweep_dir: str, rows: list[dict], baseline: str) -> dict:
  """Cumulative compute per run, the growth chain, and the compute saved at equal loss."""
  by_name = {r["name"]: r for r in rows}
  source = {n: _source_name(sweep_dir, n) for n in by_name}
  offset: dict[str, float] = {}

  def start(name: str) -> float:
    if name not in offset:
      parent = source[name]
      offset[name] = 0.0 if parent is None or parent not in by_name else start(parent) + by_name[parent]["compute"]
    return offset[name]

  for n in by_name:
    start(n)
  parents = {p for p in source.values() if p}
  ends = [n for n in by_name if source[n] and n not in parents]
  if not ends or baseline not in by_name:
    raise ValueError(f"{sweep_dir}: a growth report needs a grown run (init_from) and the baseline run "
                     f"{baseline!r} among the completed runs")
  end = max(ends, key=lambda n: offset[n])
  chain = [end]
  while source[chain[0]]:
    chain.insert(0, source[chain[0]])
  curves = {n: _curve(sweep_dir, n, by_name[n]["flops_per_token"], offset[n]) for n in by_name}
  target = float(curves[end][1][-1])
  c_grow = offset[end] + by_name[end]["compute"]
  c_scratch = compute_to_reach(*curves[baseline], target)
  total_scratch = by_name[baseline]["compute"]
  saved = 1.0 - c_grow / (c_scratch if c_scratch is not None else total_scratch)
  return dict(chain=chain, end=end, offset=offset, curves=curves, target_loss=target, compute_grow=c_grow,
              compute_scratch=c_scratch, compute_scratch_total=total_scratch, saved=saved,
              reached=c_scratch is not None)


def write_growth_report(sweep_dir: str, rows: list[dict], baseline: str) -> dict:
  """growth.png, growth.json and report.md of a progressive-growth sweep; returns {name: path}."""
  g = growth_summary(sweep_dir, rows, baseline)
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  for i, name in enumerate(g["chain"]):
    c, loss = g["curves"][name]
    ax.plot(c, loss, color="tab:blue", lw=1.4, label="progressive growth" if i == 0 else None)
    if i:  # where a stage grew
      ax.axvline(g["offset"][name], color="tab:blue", lw=0.6, ls=":")
  c, loss = g["curves"][baseline]
  ax.plot(c, loss, color="tab:orange", lw=1.4, label=f"from scratch ({baseline})")
  ax.axhline(g["target_loss"], color="grey", lw=0.8, ls="--", label=f"growth's final loss {g['target_loss']:.3f}")
  ax.set_xscale("log")
  ax.set_xlabel("cumulative training compute (FLOPs)")
  ax.set_ylabel(f"train loss (running mean of {SMOOTH} logs)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  png = os.path.join(sweep_dir, "growth.png")
  fig.savefig(png)
  plt.close(fig)
  facts = {k: g[k] for k in ("chain", "end", "target_loss", "compute_grow", "compute_scratch",
                             "compute_scratch_total", "saved", "reached")}
  facts["offsets"] = g["offset"]
  with open(os.path.join(sweep_dir, "growth.json"), "w") as f:
    json.dump(facts, f, indent=2)
  by_name = {r["name"]: r for r in rows}
  lines = [f"# Progressive growth report: {os.path.basename(os.path.abspath(sweep_dir))}", "",
           "| run | from | params | own compute | cumulative compute at end | eval loss |", "|---|---|---|---|---|---|"]
  for name in g["chain"] + [baseline]:
    r = by_name[name]
    source = g["chain"][g["chain"].index(name) - 1] if name in g["chain"][1:] else "-"
    lines.append(f"| {name} | {source} | {r['params']:.3g} | {r['compute']:.3g} | "
                 f"{g['offset'][name] + r['compute']:.3g} | {r['eval_loss']:.4f} |")
  if g["reached"]:
    verdict = (f"The baseline reaches the growth path's final training loss {g['target_loss']:.4f} after "
               f"{g['compute_scratch']:.3g} FLOPs; growth used {g['compute_grow']:.3g}: **{g['saved']:.0%} of the "
               f"compute saved** at equal loss" + (" (negative: growth cost more)." if g["saved"] < 0 else "."))
  else:
    verdict = (f"The baseline never reaches the growth path's final training loss {g['target_loss']:.4f} within its "
               f"{g['compute_scratch_total']:.3g} FLOPs; growth used {g['compute_grow']:.3g}, so it saved at least "
               f"{g['saved']:.0%} of the compute at equal loss.")
  lines += ["", verdict, "", "## Plots", "", "![growth](growth.png)", "![loss_curves](loss_curves.png)"]
  out = os.path.join(sweep_dir, "report.md")
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  return {"growth": png, "growth_json": os.path.join(sweep_dir, "growth.json"),
          "loss_curves": plot_loss_curves(sweep_dir, rows), "report": out}
