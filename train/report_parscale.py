"""Report of a ParScale scaling study: the law L(N, P) = (A / (N (k ln P + 1)))^alpha + E over model sizes and
parallel streams, eval loss against parameters per P with each P's fitted curve, and what the fitted k says.

A sweep config with `report = "parscale"` gets this report from `scalezoo sweep` and `scalezoo plot`. Each completed
run is one point: N its non-embedding parameters (the ParScale prefixes and aggregator included, as in the paper's
fit), P its streams (1 for runs of other families), L its eval loss in nats/token. k ln P + 1 is the factor by which
a single-stream model's parameters must grow to match P streams.
"""

from __future__ import annotations

import math
import os

import numpy as np

from scalezoo.train import laws
from scalezoo.train.metrics import write_json
from scalezoo.train.report import _save, plot_loss_curves, plt, write_markdown

MIN_RUNS = 4  # the law has four constants
DEFAULT_BOOTSTRAP = 200  # about 2-3 s of refits for a dozen runs
MARKERS = "osD^v<>ph*"
LEVEL = 0.95


def parscale_points(rows: list[dict]) -> list[dict]:
  """One point per completed run with finite, positive N and loss: name, P, N, loss, bpb; sorted by (P, N)."""
  out = []
  for r in rows:
    n, loss = r["non_embedding_params"], r["eval_loss"]
    if math.isfinite(n) and math.isfinite(loss) and n > 0 and loss > 0:
      bpb = float(r["eval_bpb"]) if r.get("eval_bpb") not in (None, "") else float("nan")
      out.append(dict(name=r["name"], P=int(r["streams"]), N=n, loss=loss, bpb=bpb))
  return sorted(out, key=lambda p: (p["P"], p["N"]))


def fit_points(points: list[dict], bootstrap: int = DEFAULT_BOOTSTRAP) -> tuple[dict | None, str]:
  """(the ParScale fit with `bootstrap` intervals, "") or (None, why it was not fitted)."""
  if len(points) < MIN_RUNS:
    return None, (f"{len(points)} completed run{'s' if len(points) != 1 else ''} with an eval loss; the law has "
                  f"{MIN_RUNS} constants and needs at least {MIN_RUNS} runs")
  arrays = (np.array([p[k] for p in points], dtype=float) for k in ("N", "P", "loss"))
  try:
    return laws.fit_parscale(*arrays, bootstrap=bootstrap, level=LEVEL), ""
  except (ValueError, RuntimeError) as e:
    return None, f"the fit failed: {e}"


def plot_loss_vs_params(sweep_dir: str, points: list[dict], fit: dict | None) -> str:
  """Eval loss against N on a log axis, one colour and marker per P, with each P's fitted curve."""
  streams = sorted({p["P"] for p in points})
  cmap = plt.get_cmap("tab10")
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  n_all = np.array([p["N"] for p in points])
  n_line = np.logspace(np.log10(n_all.min()) - 0.1, np.log10(n_all.max()) + 0.1, 100)
  for i, s in enumerate(streams):
    mine = [p for p in points if p["P"] == s]
    col = cmap(i % 10)
    ax.scatter([p["N"] for p in mine], [p["loss"] for p in mine], color=col, marker=MARKERS[i % len(MARKERS)],
               s=36, zorder=3, label=f"P = {s}")
    if fit is not None:
      ax.plot(n_line, laws.predict_parscale(fit, n_line, s), color=col, lw=1.2)
  if fit is not None:
    ax.set_title(f"fit: L = (A / (N (k ln P + 1)))^alpha + E,  k = {fit['k']:.3g}, alpha = {fit['alpha']:.3g}, "
                 f"E = {fit['E']:.3g}", fontsize=9)
  return _save(fig, ax, "non-embedding parameters N", "eval loss (nats/token)",
               os.path.join(sweep_dir, "loss_vs_params.png"), legend=8)


def write_parscale_report(sweep_dir: str, rows: list[dict], *, bootstrap: int = DEFAULT_BOOTSTRAP) -> dict:
  """fit.json (when fitted), loss_vs_params.png, loss_curves.png and report.md; returns {name: path}."""
  points = parscale_points(rows)
  fit, why = fit_points(points, bootstrap)
  written = {}
  fit_path = os.path.join(sweep_dir, "fit.json")
  if fit is not None:
    multiplier = {str(s): float(laws.parscale_multiplier(fit, s)) for s in _gain_streams(points)}
    write_json(fit_path, {"law": "parscale", **laws.jsonable(fit), "bootstrap": bootstrap, "level": LEVEL,
                          "multiplier": multiplier, "N": "non-embedding parameters"})
    written["fit"] = fit_path
  elif os.path.exists(fit_path):
    os.remove(fit_path)  # an earlier report's fit no longer describes these runs
  if points:
    written["loss_vs_params"] = plot_loss_vs_params(sweep_dir, points, fit)
  written["loss_curves"] = plot_loss_curves(sweep_dir, rows)
  written["report"] = _write_markdown(sweep_dir, points, fit, why, bootstrap, written)
  return written


def _gain_streams(points: list[dict]) -> list[int]:
  """The P > 1 of the sweep, else the paper's 2, 4, 8."""
  return sorted({p["P"] for p in points if p["P"] > 1}) or [2, 4, 8]


def _interval(fit: dict, key: str, fmt: str = ".4g") -> str:
  lo_hi = (fit.get("ci") or {}).get(key)
  return f"{lo_hi[0]:{fmt}} to {lo_hi[1]:{fmt}}" if lo_hi else "-"


def verdict(fit: dict, points: list[dict]) -> str:
  """One sentence: the parameter multiplier k ln P + 1 at the sweep's P, and whether k's interval excludes 0."""
  gains = ", ".join(f"{float(laws.parscale_multiplier(fit, s)):.2f}x at P = {s}" for s in _gain_streams(points))
  text = (f"By this fit, P parallel streams match a single-stream model with k ln P + 1 times the parameters: "
          f"{gains} (k = {fit['k']:.3g}, {LEVEL:.0%} interval {_interval(fit, 'k', '.3g')}; refits of the ParScale "
          f"paper's runs at 0.5-4.4B parameters give k = 0.33 on the Pile and 0.39 on Stack-V2-Python).")
  lo_hi = (fit.get("ci") or {}).get("k")
  if lo_hi and lo_hi[0] <= 1e-3:
    text += " The interval of k reaches 0, so these runs do not show that more streams help."
  return text


def _write_markdown(sweep_dir: str, points: list[dict], fit: dict | None, why: str, bootstrap: int,
                    written: dict) -> str:
  lines = [f"# ParScale report: {os.path.basename(os.path.abspath(sweep_dir))}", "",
           f"{len(points)} completed runs. L is the eval cross-entropy in nats/token on the held-out split, N the "
           "non-embedding parameters (ParScale prefixes and aggregator included), P the parallel streams.", "",
           "| run | P | N | eval loss | bits/byte |", "|---|---|---|---|---|"]
  lines += [f"| {p['name']} | {p['P']} | {round(p['N']):,} | {p['loss']:.4f} | {p['bpb']:.3f} |" for p in points]
  lines += ["", "## ParScale law: L(N, P) = (A / (N (k ln P + 1)))^alpha + E", ""]
  if fit is None:
    lines.append(f"Not fitted: {why}.")
  else:
    lines += [f"| constant | value | {LEVEL:.0%} bootstrap interval |", "|---|---|---|"]
    for key, label in (("A", "A (units of 1e9 parameters)"), ("k", "k"), ("alpha", "alpha"), ("E", "E")):
      lines.append(f"| {label} | {fit[key]:.4g} | {_interval(fit, key)} |")
    resampled = f"intervals from {bootstrap} resamples of the runs" if fit.get("ci") else "no bootstrap intervals"
    lines += ["", f"Objective (sum of Huber losses of log residuals): {fit['objective']:.4g} over {fit['n_points']} "
              f"runs; {resampled}.", "", verdict(fit, points)]
  return write_markdown(sweep_dir, lines, written)
