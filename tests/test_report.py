"""Sweep report: from a sweep directory whose losses follow a known Chinchilla law, `scalezoo plot` writes the
plots, a fit.json that recovers the law, IsoFLOP minima near the law's optimum, and report.md linking them."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from scalezoo.train import laws
from scalezoo.train.cli import main
from scalezoo.train.report import write_report

LAW = dict(E=1.5, A=400.0, B=900.0, alpha=0.35, beta=0.3)


def _fake_sweep(root, budgets=(1e15, 1e16, 1e17), sizes=(2e6, 5e6, 1e7, 2e7, 5e7)):
  os.makedirs(root / "runs")
  rows = []
  for c in budgets:
    for n in sizes:
      d = c / (6 * n)
      loss = laws.predict_chinchilla(LAW, n, d)
      name = f"c{c:g}-n{n:g}"
      os.makedirs(root / "runs" / name)
      with open(root / "runs" / name / "metrics.jsonl", "w") as f:
        for frac in (0.25, 0.5, 1.0):
          f.write(json.dumps(dict(step=int(frac * 100), tokens=frac * d,
                                  loss=float(laws.predict_chinchilla(LAW, n, frac * d)))) + "\n")
      rows.append(dict(name=name, status="completed", params=n, tokens=d, compute=6 * n * d, eval_loss=loss,
                       loss=loss, eval_bpb=loss / np.log(2), flops_per_token=6 * n))
  rows.append(dict(name="broken", status="failed", params="", tokens="", compute="", eval_loss="", loss="",
                   eval_bpb="", flops_per_token=""))
  with open(root / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def test_report_recovers_the_law_and_links_plots(tmp_path):
  _fake_sweep(tmp_path)
  written = write_report(str(tmp_path), bootstrap=20)
  for key in ("loss_curves", "loss_vs_compute", "isoflop", "fit", "report"):
    assert os.path.getsize(written[key]) > 0, key
  fit = json.loads(open(written["fit"]).read())
  assert fit["n_points"] == 15  # the failed run is left out
  for k, v in LAW.items():
    assert fit[k] == pytest.approx(v, rel=1e-3), k
  report = open(written["report"]).read()
  assert "![isoflop](isoflop.png)" in report and "![loss_vs_compute](loss_vs_compute.png)" in report
  assert f"{fit['E']:.4g}" in report
  # IsoFLOP minima sit near the law's compute-optimal N (the parabola in log N is an approximation).
  for m in laws.isoflop_minima([dict(params=r, tokens=1e16 / (6 * r), loss=laws.predict_chinchilla(LAW, r, 1e16 / (
      6 * r))) for r in (2e6, 5e6, 1e7, 2e7, 5e7)]):
    n_opt, _ = laws.compute_optimal(LAW, m["C"])
    assert abs(np.log(m["N_opt"] / n_opt)) < 0.3


def test_plot_and_fit_commands(tmp_path, capsys):
  _fake_sweep(tmp_path)
  assert main(["plot", "--workdir", str(tmp_path)]) == 0
  assert "report: " in capsys.readouterr().out
  assert main(["fit", "--workdir", str(tmp_path), "--law", "chinchilla", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["law"] == "chinchilla" and out["alpha"] == pytest.approx(LAW["alpha"], rel=1e-3)
  assert main(["plot", "--workdir", str(tmp_path / "nosuch")]) == 2
  assert "no results.csv" in capsys.readouterr().err
