"""Scaling-law fits against the published refits in shared/specs/scaling_laws.md, plus synthetic recovery tests.

tests/data/chinchilla_points.csv and tests/data/gadre2024_models.csv are byte copies of shared/data/ (the Epoch
extraction of Chinchilla Fig. 4, and the flat table of Gadre et al.'s 104 models).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time

import numpy as np
import pytest

from scalezoo.configs import ConfigError
from scalezoo.train import laws

DATA = os.path.join(os.path.dirname(__file__), "data")


def _read(name: str) -> list[dict]:
  with open(os.path.join(DATA, name), newline="") as f:
    return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------------
# Chinchilla approach 3 on the Epoch data


@pytest.fixture(scope="module")
def epoch_fit():
  rows = _read("chinchilla_points.csv")
  N = np.array([float(r["Model Size"]) for r in rows])
  flops = np.array([float(r["Training FLOP"]) for r in rows])
  L = np.array([float(r["loss"]) for r in rows])
  keep = L < np.sort(L)[-5]  # Epoch's rule: drop the 5 highest losses
  N, L, D = N[keep], L[keep], flops[keep] / (6.0 * N[keep])
  wall, cpu = time.perf_counter(), time.process_time()
  fit = laws.fit_chinchilla(N, D, L, bootstrap=200, seed=42)
  return fit, time.perf_counter() - wall, time.process_time() - cpu


def test_chinchilla_reproduces_epoch_grid_refit(epoch_fit):
  fit, wall_s, cpu_s = epoch_fit
  print(f"chinchilla grid fit + 200 bootstraps: {wall_s:.1f} s wall, {cpu_s:.1f} s CPU: {fit}")
  assert fit["n_points"] == 240 and fit["n_starts"] == 4500
  assert fit["objective"] <= 1.01828e-3
  assert abs(fit["E"] - 1.8172) <= 1e-3
  assert abs(fit["alpha"] - 0.3473) <= 1e-3
  assert abs(fit["beta"] - 0.3672) <= 1e-3
  assert abs(fit["A"] / 478 - 1) <= 0.02
  assert abs(fit["B"] / 2143 - 1) <= 0.02
  assert wall_s < 60


def test_compute_optimal_matches_epoch_ratio(epoch_fit):
  fit = epoch_fit[0]
  C = 5.88e23
  n_opt, d_opt = laws.compute_optimal(fit, C)
  assert math.isclose(6 * n_opt * d_opt, C, rel_tol=1e-9)
  assert abs(d_opt / n_opt - 17.9) <= 0.1  # spec: D/N ~ 17.9 at 5.88e23 for the Epoch refit
  # It is the minimum of the fitted law along the IsoFLOP curve.
  for f in (0.98, 1.02):
    assert laws.predict_chinchilla(fit, n_opt * f, C / (6 * n_opt * f)) > laws.predict_chinchilla(fit, n_opt, d_opt)


def test_chinchilla_bootstrap_matches_epoch_intervals(epoch_fit):
  fit = epoch_fit[0]
  ci = fit["ci"]
  for k in ("E", "A", "B", "alpha", "beta"):
    assert ci[k][0] < fit[k] < ci[k][1], k
  # Epoch's 95% intervals (likelihood fit, 4000 resamples): E 1.769-1.871, alpha 0.317-0.373, beta 0.331-0.415,
  # A 285-744, B 1042-5810. A different estimator and 200 resamples, so bounds agree only loosely.
  for k, lo, hi, tol in (("E", 1.769, 1.871, 0.015), ("alpha", 0.317, 0.373, 0.01), ("beta", 0.331, 0.415, 0.01)):
    assert abs(ci[k][0] - lo) <= tol and abs(ci[k][1] - hi) <= tol, (k, ci[k])
  assert 0.8 < ci["A"][0] / 285 < 1.25 and 0.8 < ci["A"][1] / 744 < 1.25, ci["A"]
  assert 0.7 < ci["B"][0] / 1042 < 1.4 and 0.7 < ci["B"][1] / 5810 < 1.4, ci["B"]


# ----------------------------------------------------------------------------------------------------------------
# Synthetic Chinchilla data: bootstrap, approach 2

LAW = dict(E=1.82, A=482.0, B=2085.0, alpha=0.348, beta=0.366)
SMALL_GRID = np.array([(a, al, b, be, e) for a in (0.0, 5.0, 10.0) for al in (0.5, 1.0) for b in (5.0, 10.0)
                       for be in (0.5, 1.0) for e in (0.0, 0.5)])


def _synthetic_chinchilla(n: int, rng, noise: float = 0.01):
  N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n))
  D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), n))
  return N, D, laws.predict_chinchilla(LAW, N, D) * np.exp(rng.normal(0.0, noise, n))


def test_chinchilla_recovers_noise_free_law():
  N, D, L = _synthetic_chinchilla(60, np.random.default_rng(3), noise=0.0)
  fit = laws.fit_chinchilla(N, D, L, grid=SMALL_GRID)
  for k, v in LAW.items():
    assert math.isclose(fit[k], v, rel_tol=1e-4), (k, fit[k])


def test_bootstrap_interval_holds_estimate_and_narrows_with_data():
  rng = np.random.default_rng(0)
  widths = {}
  for n in (40, 320):
    fit = laws.fit_chinchilla(*_synthetic_chinchilla(n, rng), grid=SMALL_GRID, bootstrap=40, seed=1)
    for k in ("E", "alpha", "beta"):
      lo, hi = fit["ci"][k]
      assert lo < fit[k] < hi, (n, k, fit[k], lo, hi)
      widths[n, k] = hi - lo
  # 8x the points should shrink intervals by about sqrt(8) ~ 2.8; an unweighted resample would give width 0.
  for k in ("E", "alpha", "beta"):
    assert 0 < widths[320, k] < 0.7 * widths[40, k], (k, widths[40, k], widths[320, k])


def test_generic_bootstrap_ci_around_downstream_fit():
  rng = np.random.default_rng(0)
  L = rng.uniform(2.5, 4.5, 30)
  err = laws.predict_downstream(dict(epsilon=0.85, k=2.2, gamma=0.7), L) + rng.normal(0, 0.005, 30)
  fit = laws.fit_downstream(L, err)
  ci = laws.bootstrap_ci(laws.fit_downstream, L, err, n=30, seed=0, keys=["epsilon", "k", "gamma"])
  for k in ("epsilon", "k", "gamma"):
    assert ci[k][0] < fit[k] < ci[k][1], k


def test_isoflop_minima_find_the_compute_optimal_size():
  rows = []
  for C in (1e18, 1e19, 1e20, 1e21):
    n0, _ = laws.compute_optimal(LAW, C)
    for f in np.geomspace(0.25, 4.0, 9):
      n = n0 * f
      rows.append(dict(params=n, tokens=C / (6 * n), loss=float(laws.predict_chinchilla(LAW, n, C / (6 * n)))))
  rows += [dict(params=1e8, tokens=1e9, loss=4.0), dict(params=2e8, tokens=5e8, loss=3.9)]  # 2 points: skipped
  minima = laws.isoflop_minima(rows)
  assert [round(math.log10(g["C"]), 6) for g in minima] == [18, 19, 20, 21]
  for g in minima:
    n_opt, _ = laws.compute_optimal(LAW, g["C"])
    # A parabola in log N is only an approximation of the law, hence 1% rather than exact.
    assert abs(g["N_opt"] / n_opt - 1) < 0.01
    assert math.isclose(g["D_opt"], g["C"] / (6 * g["N_opt"]))
    assert abs(g["L_min"] - laws.predict_chinchilla(LAW, n_opt, g["C"] / (6 * n_opt))) < 2e-3
  # Runs of one budget whose log10 C straddles a 2-decimal rounding boundary (19.002 to 19.008) stay together.
  C = 10 ** 19.005
  n0, _ = laws.compute_optimal(LAW, C)
  jittered = []
  for i, f in enumerate(np.geomspace(0.25, 4.0, 9)):
    n, d = n0 * f, C / (6 * n0 * f) * 10 ** (0.003 * (i % 3 - 1))
    jittered.append(dict(params=n, tokens=d, loss=float(laws.predict_chinchilla(LAW, n, d))))
  (g,) = laws.isoflop_minima(jittered)
  assert g["n_points"] == 9 and abs(g["N_opt"] / n0 - 1) < 0.02
  # An explicit group column overrides grouping by compute.
  grouped = laws.isoflop_minima([dict(r, group="all") for r in rows[:9]])
  assert len(grouped) == 1 and grouped[0]["n_points"] == 9


# ----------------------------------------------------------------------------------------------------------------
# Gadre et al. 2024

SMALL_MODELS = ("d=96_l=8_h=4", "d=512_l=8_h=4", "d=576_l=24_h=8", "d=1024_l=24_h=8")


def _gadre(dataset: str):
  rows = [r for r in _read("gadre2024_models.csv") if r["dataset"] == dataset]

  def pick(model: str, M: float) -> dict:
    (row,) = [r for r in rows if r["model"] == model and float(r["token_multiplier_M"]) == M]
    return row

  fit_rows = [pick(m, 20) for m in SMALL_MODELS] + [pick(SMALL_MODELS[0], 320)]
  return fit_rows, pick


def _nd_loss(rows):
  return ([float(r["N_params"]) for r in rows], [float(r["D_tokens"]) for r in rows],
          [float(r["loss_c4_val"]) for r in rows])


@pytest.mark.parametrize("dataset,a,b,eta,E", [
    ("rpj", 212.2, 366.7, 0.1364, 1.8366),
    ("c4_original", 141.3, 189.5, 0.1212, 1.5083),
    ("rw_original", 157.1, 246.2, 0.1272, 1.7345),
])
def test_overtrain_fit_reproduces_spec_table(dataset, a, b, eta, E):
  fit = laws.fit_overtrain(*_nd_loss(_gadre(dataset)[0]))
  # Agreement to the printed digits: within half a unit of the last one.
  assert abs(fit["a"] - a) <= 0.05 and abs(fit["b"] - b) <= 0.05, fit
  assert abs(fit["eta"] - eta) <= 5e-5 and abs(fit["E"] - E) <= 5e-5, fit


def test_overtrain_and_downstream_predict_redpajama_holdouts():
  fit_rows, pick = _gadre("rpj")
  fit = laws.fit_overtrain(*_nd_loss(fit_rows))
  down_rows = fit_rows + [pick("open_lm_1b", 20)]
  down = laws.fit_downstream([float(r["loss_c4_val"]) for r in down_rows],
                             [float(r["err_avg_17"]) for r in down_rows])
  assert abs(down["epsilon"] - 0.8570) <= 5e-5 and abs(down["k"] - 2.2065) <= 5e-5, down
  assert abs(down["gamma"] - 0.7146) <= 5e-5, down
  held_out = [pick("open_lm_1b", 640), pick("open_lm_7b", 20)]
  for row, loss_pct, err_pct in zip(held_out, (0.71, 0.73), (3.64, 0.05)):
    pred = laws.predict_overtrain(fit, float(row["N_params"]), float(row["D_tokens"]))
    actual = float(row["loss_c4_val"])
    assert abs(100 * abs(pred - actual) / actual - loss_pct) <= 0.05, (row["name"], pred, actual)
    err_pred, err_actual = laws.predict_downstream(down, pred), float(row["err_avg_17"])
    assert abs(100 * abs(err_pred - err_actual) / err_actual - err_pct) <= 0.05, (row["name"], err_pred, err_actual)


# ----------------------------------------------------------------------------------------------------------------
# ParScale and LR annealing (no published points shipped: synthetic recovery)


def test_parscale_recovers_synthetic_law():
  N, P = (v.ravel() for v in np.meshgrid(np.array([0.5, 0.9, 1.6, 2.8, 4.4]) * 1e9, [1, 2, 4, 8]))
  truth = dict(A=0.08, k=0.39, alpha=0.3, E=1.7)  # A in units of 1e9 parameters
  L = laws.predict_parscale(truth, N, P)
  fit = laws.fit_parscale(N, P, L)
  for k, v in truth.items():
    assert math.isclose(fit[k], v, rel_tol=1e-4), (k, fit[k])
  noisy = laws.fit_parscale(N, P, L * np.exp(np.random.default_rng(0).normal(0, 0.002, L.shape)))
  assert abs(noisy["E"] - 1.7) < 0.05 and abs(noisy["alpha"] - 0.3) < 0.03 and abs(noisy["k"] - 0.39) < 0.05


def test_lr_areas_by_hand():
  s1, s2 = laws.lr_areas([1.0, 1.0, 0.5, 0.0], lam=0.5)
  # m = (0, 0, 0.5, 0.5*0.5 + 0.5) -> S2 = cumulative sum
  np.testing.assert_allclose(s1, [1.0, 2.0, 2.5, 2.5])
  np.testing.assert_allclose(s2, [0.0, 0.0, 0.5, 1.25])
  s1, s2 = laws.lr_areas([0.1, 0.2, 0.3, 0.3, 0.3], warmup=2)
  np.testing.assert_allclose(s1, [0.3, 0.6, 0.9, 1.2, 1.5])
  np.testing.assert_allclose(s2, 0.0)  # warmup at the peak, then constant: no annealing area


def _wsd(steps=10000, peak=3e-4, warmup=200, decay=2000):
  lr = np.full(steps, peak)
  lr[:warmup] = np.linspace(peak / warmup, peak, warmup)
  lr[steps - decay:] = np.linspace(peak, 0.0, decay)
  return lr


def test_annealing_recovers_wsd_curve():
  lr = _wsd()
  truth = dict(L0=2.0, A=0.5, alpha=0.5, C=1.0, lam=0.999)
  loss = laws.predict_annealing(truth, lr, warmup=200)
  logged = np.full_like(loss, np.nan)
  logged[100::10] = loss[100::10]  # a loss every 10 steps after the start
  fit = laws.fit_annealing(lr, logged, warmup=200)
  assert fit["n_points"] == len(loss[100::10])
  for k in ("L0", "A", "alpha", "C"):
    assert math.isclose(fit[k], truth[k], rel_tol=1e-3), (k, fit[k])
  noisy = logged * np.exp(np.random.default_rng(0).normal(0, 0.003, loss.shape))
  fit = laws.fit_annealing(lr, noisy, warmup=200)
  for k in ("L0", "A", "alpha", "C"):
    assert math.isclose(fit[k], truth[k], rel_tol=0.03), (k, fit[k])


def test_fits_restore_blas_threads():
  from scalezoo.train import laws_fit
  setters = laws_fit._openblas_thread_setters()
  before = [fn(3) for fn in setters]  # set a recognisable count; fn returns the previous one
  laws.fit_downstream([2.5, 3.0, 3.5, 4.0], [0.5, 0.6, 0.66, 0.7])
  assert [fn(old) for fn, old in zip(setters, before)] == [3] * len(setters)


# ----------------------------------------------------------------------------------------------------------------
# fit_csv


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


def test_fit_csv_chinchilla_is_json_serialisable(tmp_path):
  N, D, L = _synthetic_chinchilla(30, np.random.default_rng(2), noise=0.0)
  path = _write_csv(tmp_path / "runs.csv", ["name", "params", "tokens", "loss"],
                    [(f"r{i}", n, d, l) for i, (n, d, l) in enumerate(zip(N, D, L))])
  out = json.loads(json.dumps(laws.fit_csv(path, "chinchilla", bootstrap=5)))
  assert out["law"] == "chinchilla" and out["n_points"] == 30 and out["objective"] < 1e-12
  assert math.isclose(out["alpha"], LAW["alpha"], rel_tol=1e-3)
  assert set(out["ci"]) == {"E", "A", "B", "alpha", "beta"}


def test_fit_csv_overtrain_and_downstream_match_direct_fits(tmp_path):
  fit_rows, pick = _gadre("rpj")
  rows = fit_rows + [pick("open_lm_1b", 20)]
  path = _write_csv(tmp_path / "g.csv", ["params", "tokens", "loss", "error"],
                    [(r["N_params"], r["D_tokens"], r["loss_c4_val"], r["err_avg_17"]) for r in rows])
  down = laws.fit_csv(path, "downstream")
  assert abs(down["gamma"] - 0.7146) <= 5e-5 and down["n_points"] == 6
  path5 = _write_csv(tmp_path / "g5.csv", ["params", "tokens", "loss"], [(r["N_params"], r["D_tokens"],
                                                                          r["loss_c4_val"]) for r in fit_rows])
  assert abs(laws.fit_csv(path5, "overtrain")["eta"] - 0.1364) <= 5e-5


@pytest.mark.parametrize("case,match", [
    ("missing_file", "no such file"),
    ("missing_column", "missing column"),
    ("unknown_law", "unknown law"),
    ("too_few", "needs at least 4"),
    ("not_numeric", "non-numeric"),
    ("not_positive", "finite positive"),
    ("unknown_option", "unknown option"),
])
def test_fit_csv_errors_are_one_line(tmp_path, case, match):
  good = [(1e8 * (i + 1), 2e9 * (i + 1), 3.0 - 0.1 * i, 2) for i in range(6)]
  header = ["params", "tokens", "loss", "streams"]
  law, kw = "parscale", {}
  path = str(tmp_path / "x.csv")
  if case == "missing_file":
    path = str(tmp_path / "nope.csv")
  elif case == "missing_column":
    _write_csv(path, ["params", "tokens", "loss"], [g[:3] for g in good])
  else:
    rows = {"too_few": good[:3], "not_numeric": good[:5] + [("x", 1, 1, 1)],
            "not_positive": good[:5] + [(1e9, 1e9, -1.0, 1)]}.get(case, good)
    _write_csv(path, header, rows)
    law = "kaplan" if case == "unknown_law" else law
    kw = {"gird": 3} if case == "unknown_option" else kw
  with pytest.raises(ConfigError, match=match) as info:
    laws.fit_csv(path, law, **kw)
  assert "\n" not in str(info.value)
