"""ParScale scaling-law study: bootstrap intervals of the law, the `streams` column of results.csv, the report over
streams and sizes, `scalezoo fit --workdir --law parscale`, and the tiny parscale_quick sweep end to end."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

from scalezoo import models
from scalezoo.train import laws
from scalezoo.train import sweep as sweep_lib
from scalezoo.train.cli import main
from scalezoo.train.report import write_report

# Constants of the order a small CPU sweep gives: N of 1e4 to 1e6 parameters, losses near 2-3 nats.
TRUTH = dict(A=1e-5, k=0.39, alpha=0.3, E=1.7)  # A in units of 1e9 parameters
SIZES = (3e4, 1e5, 3e5)
STREAMS = (1, 2, 4, 8)


def _points(noise: float, seed: int = 0, sizes=SIZES, streams=STREAMS):
  N, P = (v.ravel() for v in np.meshgrid(np.array(sizes, float), np.array(streams, float)))
  L = laws.predict_parscale(TRUTH, N, P) * np.exp(np.random.default_rng(seed).normal(0, noise, N.shape))
  return N, P, L


def test_bootstrap_intervals_contain_the_truth():
  N, P, L = _points(noise=0.002, sizes=(3e4, 6e4, 1e5, 2e5, 3e5))
  fit = laws.fit_parscale(N, P, L, bootstrap=40, seed=1)
  assert set(fit["ci"]) == {"A", "k", "alpha", "E"}
  for key, true in TRUTH.items():
    lo, hi = fit["ci"][key]
    assert lo <= fit[key] <= hi and lo <= true <= hi, (key, lo, fit[key], hi)
  assert abs(fit["k"] - TRUTH["k"]) < 0.05
  grid = [[math.log(fit["A"]), fit["k"], fit["alpha"], math.log(fit["E"])]]  # skip the grid search: same optimum
  assert laws.fit_parscale(N, P, L, grid=grid, bootstrap=5, seed=3)["ci"] == laws.fit_parscale(
      N, P, L, grid=grid, bootstrap=5, seed=3)["ci"]  # seeded resamples
  np.testing.assert_allclose(laws.parscale_multiplier(fit, [1, 2]), [1.0, fit["k"] * math.log(2) + 1.0])


def test_single_stream_count_does_not_identify_k():
  N, _, L = _points(noise=0.0)
  with pytest.raises(ValueError, match="k .* is not identified"):
    laws.fit_parscale(N, np.ones_like(N), L)


# ----------------------------------------------------------------------------------------------------------------
# A synthetic sweep directory, in the formats train/sweep.py writes


def _fake_sweep(root, points, with_streams: bool = True) -> str:
  """runs/<name>/metrics.jsonl, sweep.json of parscale_quick:tiny and results.csv (one failed run added)."""
  os.makedirs(root / "runs")
  rows = []
  for n, p, loss in points:
    name = f"streams{int(p)}-n{int(n)}"
    summary = dict(status="completed", params=n + 256 * 64, params_active=n + 256 * 64, params_non_embedding=n,
                   flops_per_token=6 * n * p, tokens=2e5, steps=100, loss=loss, eval_loss=loss,
                   eval_bpb=loss / math.log(2), tokens_per_s=1e4, mfu=0.01, wall_s=10.0)
    if with_streams and p > 1:  # ParScale runs record their streams; P = 1 stands for a plain base run
      summary.update(streams=int(p), base_family="dense")
    row = sweep_lib._row(name, summary)
    row["model.parscale.streams"] = int(p)
    rows.append(row)
    os.makedirs(root / "runs" / name)
    with open(root / "runs" / name / "metrics.jsonl", "w") as f:
      for step in (50, 100):
        f.write(json.dumps(dict(step=step, tokens=2e3 * step, loss=loss + 1.0 / step)) + "\n")
  rows.append(dict(sweep_lib._row("broken", None, error="RuntimeError: boom"), **{"model.parscale.streams": 8}))
  sweep_lib.write_results(str(root / "results.csv"), rows, ["model.parscale.streams"])
  if not with_streams:  # a results.csv written before the streams column existed
    with open(root / "results.csv") as f:
      table = list(csv.DictReader(f))
    with open(root / "results.csv", "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=[k for k in table[0] if k != "streams"], extrasaction="ignore")
      w.writeheader()
      w.writerows(table)
  with open(root / "sweep.json", "w") as f:
    f.write(sweep_lib.load_sweep("parscale_quick:tiny", {}).to_json(indent=2))
  return str(root)


def test_results_row_has_streams_one_for_other_families():
  base = dict(params=1, params_active=1, params_non_embedding=1, flops_per_token=6, tokens=1, steps=1, loss=1.0,
              eval_loss=1.0, eval_bpb=1.0, tokens_per_s=1.0, mfu=0.0, wall_s=1.0, status="completed")
  assert "streams" in sweep_lib.RESULT_FIELDS
  assert sweep_lib._row("dense", base)["streams"] == 1
  assert sweep_lib._row("par", dict(base, streams=4))["streams"] == 4


def test_report_fits_the_law_and_plots_loss_vs_params(tmp_path):
  sweep_dir = _fake_sweep(tmp_path, zip(*_points(noise=0.001)))
  written = write_report(sweep_dir, bootstrap=30)
  for key in ("fit", "loss_vs_params", "loss_curves", "report"):
    assert os.path.getsize(written[key]) > 0, key
  fit = json.loads(open(written["fit"]).read())
  assert fit["law"] == "parscale" and fit["n_points"] == 12  # the failed run is left out
  assert set(fit["ci"]) == {"A", "k", "alpha", "E"} and fit["bootstrap"] == 30
  assert fit["k"] == pytest.approx(TRUTH["k"], abs=0.05)
  assert set(fit["multiplier"]) == {"2", "4", "8"}
  report = open(written["report"]).read()
  assert "![loss_vs_params](loss_vs_params.png)" in report and "![loss_curves](loss_curves.png)" in report
  assert f"{fit['k']:.4g}" in report and "k ln P + 1" in report
  assert f"{fit['multiplier']['8']:.2f}x at P = 8" in report
  assert report.count("| streams") == 12  # one table row per completed run


def test_report_with_too_few_runs_says_so(tmp_path):
  sweep_dir = _fake_sweep(tmp_path, list(zip(*_points(noise=0.0)))[:3])
  (tmp_path / "fit.json").write_text("{}")  # from an earlier report: no longer true
  written = write_report(sweep_dir, bootstrap=10)
  assert "fit" not in written and not (tmp_path / "fit.json").exists()
  report = open(written["report"]).read()
  assert "Not fitted: 3 completed runs with an eval loss; the law has 4 constants and needs at least 4" in report
  assert os.path.getsize(written["loss_vs_params"]) > 0


def test_fit_command_on_a_sweep_prints_k_with_its_interval(tmp_path, capsys):
  sweep_dir = _fake_sweep(tmp_path, zip(*_points(noise=0.001)))
  assert main(["fit", "--workdir", sweep_dir, "--law", "parscale", "--bootstrap", "20"]) == 0
  out = capsys.readouterr().out
  k_line = next(line for line in out.splitlines() if line.strip().startswith("k:"))
  assert "95% interval" in k_line and abs(float(k_line.split()[1]) - TRUTH["k"]) < 0.05
  assert "P=8:" in out and "n_points: 12" in out
  assert main(["fit", "--workdir", sweep_dir, "--law", "parscale", "--json"]) == 0
  fit = json.loads(capsys.readouterr().out)
  assert fit["law"] == "parscale" and "ci" not in fit


def test_fit_command_without_streams_is_one_line_exit_2(tmp_path, capsys):
  sweep_dir = _fake_sweep(tmp_path, zip(*_points(noise=0.001)), with_streams=False)
  assert main(["fit", "--workdir", sweep_dir, "--law", "parscale"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith(f"scalezoo: error: --workdir {sweep_dir}: --law parscale fit failed")
  assert "P = 1 streams" in err and "model.parscale.streams" in err
  assert main(["fit", "--workdir", sweep_dir, "--law", "downstream"]) == 2
  assert "no downstream error rates" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# End to end: the tiny sweep


@pytest.mark.skipif("parscale" not in models.FAMILIES, reason="the parscale family is not in the registry")
@pytest.mark.usefixtures("fast_compile")
def test_tiny_parscale_sweep_writes_streams_and_report(tmp_path, capsys):
  workdir = tmp_path / "sweep"
  # One device per run: the two runs compile side by side, and unpartitioned programs compile faster.
  code = main(["sweep", "--config", "parscale_quick:tiny", "--workdir", str(workdir), "--quiet",
               "--config.devices_per_run=1"])
  out = capsys.readouterr().out
  assert code == 0, out
  with open(workdir / "results.csv") as f:
    rows = {int(r["streams"]): r for r in csv.DictReader(f)}
  assert sorted(rows) == [1, 2] and all(r["status"] == "completed" for r in rows.values())
  # N includes the prefixes and the aggregator
  assert float(rows[2]["non_embedding_params"]) > float(rows[1]["non_embedding_params"])
  for name in ("loss_vs_params.png", "loss_curves.png", "report.md"):
    assert os.path.getsize(workdir / name) > 0, name
  report = (workdir / "report.md").read_text()
  assert "Not fitted: 2 completed runs" in report and "| streams2 | 2 |" in report
