"""Sweep plots and report: loss curves by size, loss vs compute with the fitted law, IsoFLOP curves, report.md.

`scalezoo plot --workdir SWEEPDIR` and the end of every sweep call `write_report`. The Chinchilla law is fitted
to the completed runs' eval losses (nats/token) against total parameters N and training tokens D, with C = 6ND.
"""

from __future__ import annotations

import csv
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scalezoo.train import laws  # noqa: E402
from scalezoo.train.metrics import read_jsonl, write_json  # noqa: E402

MIN_POINTS_FOR_FIT = 5  # the Chinchilla law has 5 parameters


def read_results(sweep_dir: str) -> list[dict]:
  """Completed rows of results.csv with numeric fields as floats and `streams` (ParScale's P) as an int.

  `streams` is 1 where the column is missing or empty: results written before it existed, or non-ParScale runs.
  """
  path = os.path.join(sweep_dir, "results.csv")
  with open(path) as f:
    rows = list(csv.DictReader(f))
  out = []
  for r in rows:
    if r.get("status") != "completed":
      continue
    row = dict(r)
    for k in ("params", "non_embedding_params", "tokens", "compute", "eval_loss", "loss", "flops_per_token"):
      row[k] = float(r[k]) if r.get(k) not in (None, "") else float("nan")
    row["streams"] = int(float(r["streams"])) if r.get("streams") not in (None, "") else 1
    out.append(row)
  return out


def _size_colors(params: list[float]):
  lo, hi = math.log(min(params)), math.log(max(params))
  cmap = plt.get_cmap("viridis")
  return lambda p: cmap(0.0 if hi == lo else (math.log(p) - lo) / (hi - lo))


def _save(fig, ax, xlabel: str, ylabel: str, path: str, legend: int) -> str:
  """Shared finish of every sweep plot: log x axis, labels, grid, legend of font size `legend` (0: none)."""
  ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, which="both")
  if legend:
    ax.legend(fontsize=legend)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_loss_curves(sweep_dir: str, rows: list[dict]) -> str:
  """Training loss against tokens for every run, coloured by parameter count."""
  color = _size_colors([r["params"] for r in rows])
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  for r in sorted(rows, key=lambda r: r["params"]):
    metrics = read_jsonl(os.path.join(sweep_dir, "runs", r["name"], "metrics.jsonl"))
    pts = [(m["tokens"], m["loss"]) for m in metrics if m.get("loss") is not None]
    ax.plot([t for t, _ in pts], [v for _, v in pts], color=color(r["params"]), lw=1.2,
            label=f"{r['name']} ({r['params'] / 1e6:.2f}M)")
  return _save(fig, ax, "tokens", "train loss (nats/token)", os.path.join(sweep_dir, "loss_curves.png"), legend=7)


def plot_loss_vs_compute(sweep_dir: str, rows: list[dict], fit: dict | None) -> str:
  """Eval loss against C = 6ND, with the fitted law's compute-optimal frontier extended 100x past the data."""
  color = _size_colors([r["params"] for r in rows])
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  for r in rows:
    ax.scatter(6 * r["params"] * r["tokens"], r["eval_loss"], color=color(r["params"]), s=30, zorder=3)
  if fit is not None:
    c_data = np.array([6 * r["params"] * r["tokens"] for r in rows])
    c = np.logspace(np.log10(c_data.min()) - 0.5, np.log10(c_data.max()) + 2, 200)
    n_opt, d_opt = laws.compute_optimal(fit, c)
    frontier = fit["E"] + fit["A"] / n_opt ** fit["alpha"] + fit["B"] / d_opt ** fit["beta"]
    ax.plot(c, frontier, "k--", lw=1.2, label="fitted law, compute-optimal")
    ax.axvline(c_data.max(), color="grey", lw=0.8, ls=":")
    if fit["E"] >= 0.05 * min(r["eval_loss"] for r in rows):  # an unidentified E (near 0) only squashes the plot
      ax.axhline(fit["E"], color="tab:red", lw=0.8, ls=":", label=f"E = {fit['E']:.3f}")
  return _save(fig, ax, "compute C = 6ND (FLOPs)", "eval loss (nats/token)",
               os.path.join(sweep_dir, "loss_vs_compute.png"), legend=8 if fit is not None else 0)


def plot_isoflop(sweep_dir: str, rows: list[dict], minima: list[dict]) -> str:
  """Eval loss against N for each iso-compute group, with each group's parabola minimum marked."""
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  cmap = plt.get_cmap("plasma")
  for i, m in enumerate(minima):
    members = [r for r in rows if abs(math.log10(6 * r["params"] * r["tokens"]) - math.log10(m["C"])) < 0.05]
    members.sort(key=lambda r: r["params"])
    col = cmap(i / max(1, len(minima) - 1))
    ax.plot([r["params"] for r in members], [r["eval_loss"] for r in members], "o-", color=col,
            label=f"C = {m['C']:.2e}")
    ax.plot([m["N_opt"]], [m["L_min"]], "*", color=col, ms=12)
  return _save(fig, ax, "parameters N", "eval loss (nats/token)", os.path.join(sweep_dir, "isoflop.png"), legend=8)


def fit_sweep(rows: list[dict], bootstrap: int = 0) -> dict | None:
  """The Chinchilla fit of the completed runs, or None with fewer than MIN_POINTS_FOR_FIT runs."""
  if len(rows) < MIN_POINTS_FOR_FIT:
    return None
  n = np.array([r["params"] for r in rows])
  d = np.array([r["tokens"] for r in rows])
  loss = np.array([r["eval_loss"] for r in rows])
  return laws.fit_chinchilla(n, d, loss, bootstrap=bootstrap)


def _sweep_json(sweep_dir: str) -> dict:
  """The sweep config as saved in sweep.json ({} if absent)."""
  try:
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _sweep_report_kind(sweep_dir: str) -> str:
  """The sweep config's `report` key: "recall", "progressive", "parscale" (see `write_report`), else ""."""
  return str(_sweep_json(sweep_dir).get("report", "") or "")


def recall_points(sweep_dir: str, rows: list[dict]) -> list[dict]:
  """Per completed run: name, mixer, attention fraction, effective ratio and eval recall (from summary.json)."""
  out = []
  for r in rows:
    with open(os.path.join(sweep_dir, "runs", r["name"], "summary.json")) as f:
      s = json.load(f)
    if "eval_recall" not in s or "attention_fraction" not in s:
      continue
    out.append(dict(name=r["name"], mixer=s.get("mixer", ""), attention_fraction=s["attention_fraction"],
                    ratio=s.get("hybrid_ratio_effective"), recall=s["eval_recall"], eval_loss=r["eval_loss"]))
  return sorted(out, key=lambda p: p["attention_fraction"])


def plot_recall(sweep_dir: str, points: list[dict]) -> str:
  """MQAR recall against the fraction of softmax-attention layers, one point per run, labelled by its ratio."""
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  ax.plot([p["attention_fraction"] for p in points], [p["recall"] for p in points], "o-", ms=6)
  for p in points:
    label = "pure" if p["ratio"] is None else ("all attn" if p["ratio"] == 0 else f"{p['ratio']:.3g}:1")
    ax.annotate(label, (p["attention_fraction"], p["recall"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
  ax.set_xlabel("fraction of softmax-attention layers")
  ax.set_ylabel("MQAR recall (eval)")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(sweep_dir, "recall_vs_ratio.png")
  fig.savefig(path)
  plt.close(fig)
  return path


def _write_recall_report(sweep_dir: str, rows: list[dict]) -> dict:
  points = recall_points(sweep_dir, rows)
  if not points:
    raise ValueError(f"{sweep_dir}: no completed run reports eval_recall (train on data.source=mqar)")
  written = {"loss_curves": plot_loss_curves(sweep_dir, rows), "recall": plot_recall(sweep_dir, points)}
  lines = [f"# Recall report: {os.path.basename(os.path.abspath(sweep_dir))}", "",
           "MQAR recall (fraction of queried values predicted) on the eval split, by hybrid ratio.", "",
           "| run | mixer | linear:attention | attention fraction | recall | eval loss |", "|---|---|---|---|---|---|"]
  for p in points:
    ratio = "pure linear" if p["ratio"] is None else f"{p['ratio']:.3g}:1"
    lines.append(f"| {p['name']} | {p['mixer']} | {ratio} | {p['attention_fraction']:.3f} | {p['recall']:.3f} | "
                 f"{p['eval_loss']:.4f} |")
  lines += ["", "## Plots", ""] + [f"![{k}]({os.path.basename(v)})" for k, v in written.items()]
  out = os.path.join(sweep_dir, "report.md")
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  written["report"] = out
  return written


def write_report(sweep_dir: str, *, bootstrap: int | None = None) -> dict:
  """Fits, plots and writes report.md and fit.json in `sweep_dir`; returns {name: path} of what it wrote.

  A sweep whose config sets `report = "recall"` gets the recall-vs-ratio plot and table instead of a law fit;
  `report = "progressive"` the growth-vs-scratch report (report_growth.py); `report = "parscale"` the ParScale
  law's fit over streams and sizes (report_parscale.py). `bootstrap` resamples for the fit's intervals (default:
  50 for the Chinchilla fit, 200 for ParScale's).
  """
  rows = read_results(sweep_dir)
  if not rows:
    raise ValueError(f"{sweep_dir}/results.csv has no completed runs to report on")
  kind = _sweep_report_kind(sweep_dir)
  if kind == "recall":
    return _write_recall_report(sweep_dir, rows)
  if kind == "progressive":
    from scalezoo.train.report_growth import write_growth_report
    return write_growth_report(sweep_dir, rows, baseline=str(_sweep_json(sweep_dir).get("baseline", "")))
  if kind == "parscale":
    from scalezoo.train.report_parscale import write_parscale_report
    return write_parscale_report(sweep_dir, rows, **({} if bootstrap is None else {"bootstrap": bootstrap}))
  fit = fit_sweep(rows, bootstrap=50 if bootstrap is None else bootstrap)
  written = {"loss_curves": plot_loss_curves(sweep_dir, rows), "loss_vs_compute": plot_loss_vs_compute(
      sweep_dir, rows, fit)}
  iso_rows = [dict(params=r["params"], tokens=r["tokens"], loss=r["eval_loss"]) for r in rows]
  minima = laws.isoflop_minima(iso_rows)
  if minima:
    written["isoflop"] = plot_isoflop(sweep_dir, rows, minima)
  if fit is not None:
    write_json(os.path.join(sweep_dir, "fit.json"), {"law": "chinchilla", **laws.jsonable(fit)})
    written["fit"] = os.path.join(sweep_dir, "fit.json")
  written["report"] = _write_markdown(sweep_dir, rows, fit, minima, written)
  return written


def _write_markdown(sweep_dir, rows, fit, minima, written) -> str:
  lines = [f"# Sweep report: {os.path.basename(os.path.abspath(sweep_dir))}", "",
           f"{len(rows)} completed runs; losses are eval cross-entropy in nats/token on the held-out split.", "",
           "| run | params | tokens | C = 6ND | eval loss | bits/byte |", "|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["params"], r["tokens"])):
    lines.append(f"| {r['name']} | {r['params']:.3g} | {r['tokens']:.3g} | {6 * r['params'] * r['tokens']:.3g} | "
                 f"{r['eval_loss']:.4f} | {float(r['eval_bpb']):.3f} |")
  lines += ["", "## Chinchilla fit: L(N, D) = E + A / N^alpha + B / D^beta", ""]
  if fit is None:
    lines.append(f"Not fitted: {len(rows)} completed runs, the law needs at least {MIN_POINTS_FOR_FIT}.")
  else:
    ci = fit.get("ci") or {}
    lines += ["| parameter | value | 95% bootstrap interval |", "|---|---|---|"]
    for k in ("E", "A", "B", "alpha", "beta"):
      lo_hi = ci.get(k)
      lines.append(f"| {k} | {fit[k]:.4g} | {f'{lo_hi[0]:.4g} to {lo_hi[1]:.4g}' if lo_hi else '-'} |")
    lines += ["", f"Objective (sum of Huber losses of log residuals): {fit['objective']:.4g} over "
              f"{fit['n_points']} points.", "", "Predictions (compute-optimal allocation):", "",
              "| C (FLOPs) | N_opt | D_opt | D/N | predicted loss |", "|---|---|---|---|---|"]
    c_max = max(6 * r["params"] * r["tokens"] for r in rows)
    for mult in (1, 10, 100):
      c = c_max * mult
      n_opt, d_opt = laws.compute_optimal(fit, c)
      n_opt, d_opt = float(n_opt), float(d_opt)
      pred = fit["E"] + fit["A"] / n_opt ** fit["alpha"] + fit["B"] / d_opt ** fit["beta"]
      lines.append(f"| {c:.3g} | {n_opt:.3g} | {d_opt:.3g} | {d_opt / n_opt:.3g} | {pred:.4f} |")
    lines += ["", "With few, small runs the fit is loosely constrained (see the intervals): treat the predictions as "
              "the law's extrapolation, not a measurement."]
    if fit["E"] < 0.05 * min(r["eval_loss"] for r in rows):
      lines += ["", f"**E is not identified by these runs** (fitted {fit['E']:.3g}, at its lower bound): the losses "
                "are far from the irreducible loss, so E trades off against A and B. Longer runs (more tokens per "
                "parameter) pin it down."]
  if minima:
    lines += ["", "## IsoFLOP minima (approach 2)", "", "| C | N_opt | D_opt | min loss |", "|---|---|---|---|"]
    lines += [f"| {m['C']:.3g} | {m['N_opt']:.3g} | {m['D_opt']:.3g} | {m['L_min']:.4f} |" for m in minima]
  return write_markdown(sweep_dir, lines, written)


def write_markdown(sweep_dir: str, lines: list[str], written: dict) -> str:
  """report.md of `sweep_dir`: `lines`, then a Plots section linking every PNG in `written`; returns its path."""
  lines = lines + ["", "## Plots", ""]
  lines += [f"![{k}]({os.path.basename(v)})" for k, v in written.items() if v.endswith(".png")]
  out = os.path.join(sweep_dir, "report.md")
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  return out
