"""Scaling-law fits: Chinchilla approach 3 and 2, Gadre et al. over-training and downstream laws, ParScale, and
the LR-annealing law of Tissue et al. Math and acceptance numbers: shared/specs/scaling_laws.md.

Every fitter takes plain arrays and returns a dict of floats (plus `ci` where bootstrapped); `fit_csv` is the
entry point for `scalezoo fit --csv` (`fit_table` for rows already read) and turns bad input into one-line
`ConfigError`s. Numerics live in
`laws_fit.py`.
"""

from __future__ import annotations

import csv
import inspect
import math
import os
import warnings
from typing import Iterable, Mapping

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.signal import lfilter

from scalezoo.configs import ConfigError
from scalezoo.train.laws_fit import (ChinchillaObjective, app_d2_grid, bootstrap_ci, huber, huber_grad, lbfgsb,
                                     multistart_lbfgsb, newton_batch, parscale_solve, percentile_ci,
                                     single_threaded_blas)

__all__ = [
    "LAWS", "bootstrap_ci", "compute_optimal", "fit_annealing", "fit_chinchilla", "fit_csv", "fit_downstream",
    "fit_overtrain", "fit_parscale", "fit_table", "isoflop_minima", "lr_areas", "parscale_multiplier",
    "predict_annealing", "predict_chinchilla", "predict_downstream", "predict_overtrain", "predict_parscale",
]

LAWS = ("chinchilla", "overtrain", "parscale", "downstream")


def _positive(name: str, values) -> np.ndarray:
  arr = np.asarray(values, dtype=float).ravel()
  if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
    raise ValueError(f"{name} must be finite and positive")
  return arr


# ----------------------------------------------------------------------------------------------------------------
# Chinchilla approach 3

_N_LBFGSB = 5  # Newton end points that L-BFGS-B finishes


@single_threaded_blas()
def fit_chinchilla(N, D, L, *, delta: float = 1e-3, grid=None, bootstrap: int = 0, seed: int = 0,
                   level: float = 0.95, first_pass_iters: int = 20, n_polish: int = 50) -> dict:
  """Fit L = E + A/N^alpha + B/D^beta (Hoffmann et al. approach 3).

  The model is log L_hat = LSE(a - alpha log N, b - beta log D, e) with A, B, E = exp(a, b, e); the objective is
  the SUM over points of Huber_delta(log L_hat - log L). Starts: `grid` rows (a, alpha, b, beta, e), by default the
  4500-point App. D.2 grid. Running scipy L-BFGS-B from all 4500 costs minutes (about 140 evaluations per start
  at tight tolerances, ~0.2 ms each, mostly scipy overhead), so every start first takes `first_pass_iters`
  damped-Newton steps with the exact Hessian, batched over the whole grid; the best `n_polish` are run on to
  convergence, and the best few of those are finished by L-BFGS-B with the exact gradient, objective scaled by
  1/delta and tiny ftol/gtol (scipy's ftol is absolute for objectives below 1). The best end point is returned.

  `bootstrap` > 0 adds `ci`: {param: (lo, hi)} percentile intervals at `level` from that many resamples of the
  points (seeded by `seed`), each refitted from the best solution rather than the grid.
  Returns dict(E, A, B, alpha, beta, objective, n_points, n_starts, delta[, ci]).
  """
  N, D, L = _positive("N", N), _positive("D", D), _positive("L", L)
  if not len(N) == len(D) == len(L):
    raise ValueError("N, D and L must have the same length")
  if len(N) < 5:
    raise ValueError(f"the Chinchilla law has 5 parameters; fit it on at least 5 points, got {len(N)}")
  obj = ChinchillaObjective(N, D, L, delta)
  starts = app_d2_grid() if grid is None else np.atleast_2d(np.asarray(grid, dtype=float))
  theta, f = newton_batch(obj, starts, max_iter=first_pass_iters)
  f = np.where(np.isfinite(f), f, np.inf)
  keep = np.argsort(f)[:n_polish]
  theta, f = newton_batch(obj, theta[keep], max_iter=500)
  f = np.where(np.isfinite(f), f, np.inf)
  scale = 1.0 / delta
  best_theta, best_f = None, np.inf
  with np.errstate(all="ignore"):
    # Newton has already converged these to round-off; L-BFGS-B from the few best confirms a stationary point.
    for t0 in theta[np.argsort(f)[:_N_LBFGSB]]:
      res = lbfgsb(lambda t: obj.scalar(t, scale), t0)
      if np.isfinite(res.fun) and res.fun / scale < best_f:
        best_theta, best_f = res.x, res.fun / scale
  if best_theta is None:
    raise RuntimeError("every Chinchilla start diverged; check N, D and L")
  out = _chinchilla_params(best_theta)
  out.update(objective=float(best_f), n_points=len(N), n_starts=len(starts), delta=float(delta))
  if bootstrap > 0:
    out["ci"] = _chinchilla_bootstrap(obj, best_theta, bootstrap, seed, level)
  return out


def _chinchilla_params(theta) -> dict:
  a, alpha, b, beta, e = (float(v) for v in theta)
  return dict(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def _chinchilla_bootstrap(obj: ChinchillaObjective, theta, n: int, seed: int, level: float) -> dict:
  # Resampling rows with replacement is the same as weighting each point by its multinomial count, which lets all
  # resamples share one batched Newton solve.
  n_points = len(obj.x)
  counts = np.random.default_rng(seed).multinomial(n_points, np.full(n_points, 1.0 / n_points), size=n)
  thetas, f = newton_batch(obj, np.tile(theta, (n, 1)), max_iter=500, weights_sp=counts.astype(float))
  samples: dict[str, list[float]] = {}
  for t in thetas[np.isfinite(f)]:
    for k, v in _chinchilla_params(t).items():
      samples.setdefault(k, []).append(v)
  return percentile_ci(samples, level)


def predict_chinchilla(fit: Mapping, N, D):
  """E + A/N^alpha + B/D^beta for a `fit_chinchilla` result."""
  N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
  return fit["E"] + fit["A"] / N ** fit["alpha"] + fit["B"] / D ** fit["beta"]


def compute_optimal(fit: Mapping, C):
  """(N_opt, D_opt) minimising the Chinchilla law at compute C = 6 N D.

  N_opt = G (C/6)^(beta/(alpha+beta)) and D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
  with G = (alpha A/(beta B))^(1/(alpha+beta)).
  """
  alpha, beta, A, B = fit["alpha"], fit["beta"], fit["A"], fit["B"]
  G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
  c6 = np.asarray(C, dtype=float) / 6.0
  return G * c6 ** (beta / (alpha + beta)), c6 ** (alpha / (alpha + beta)) / G


# ----------------------------------------------------------------------------------------------------------------
# Chinchilla approach 2

@single_threaded_blas()
def isoflop_minima(rows: Iterable[Mapping], *, min_points: int = 3, tol_dex: float = 0.01) -> list[dict]:
  """Approach 2: the loss-minimising model size on each IsoFLOP profile.

  `rows` are mappings with `params`, `tokens`, `loss` and optionally `group`. Rows are grouped by `group` when
  given; otherwise by compute C = 6 N D, runs whose log10 C lie within `tol_dex` (0.01, i.e. the 2-decimal
  rounding) of their neighbour in sorted order forming one group. Per group with at least `min_points` distinct
  sizes, a parabola of loss in log N is fitted; groups whose parabola opens downward have no minimum and are
  skipped. Returns dicts {C, N_opt, D_opt = C/(6 N_opt), L_min, n_points} sorted by C, with C the group's
  geometric-mean compute.
  """
  groups: dict = {}
  ungrouped = []
  for row in rows:
    n, d, loss = float(row["params"]), float(row["tokens"]), float(row["loss"])
    point = (n, 6.0 * n * d, loss)
    if row.get("group") not in (None, ""):
      groups.setdefault(("group", row["group"]), []).append(point)
    else:
      ungrouped.append(point)
  # Gaps rather than plain rounding, so a budget whose runs straddle a rounding boundary (log10 C = 18.995 and
  # 19.004 after token counts are rounded to whole batches) stays one group.
  ungrouped.sort(key=lambda p: p[1])
  key, prev = 0, None
  for point in ungrouped:
    logc = math.log10(point[1])
    if prev is not None and logc - prev > tol_dex:
      key += 1
    groups.setdefault(("compute", key), []).append(point)
    prev = logc
  out = []
  for members in groups.values():
    n, c, loss = (np.array(v) for v in zip(*members))
    if len(np.unique(n)) < min_points:
      continue
    logn = np.log(n)
    # Centre log N so the quadratic fit is well conditioned.
    mid = logn.mean()
    curv, slope, const = np.polyfit(logn - mid, loss, 2)
    if curv <= 0:
      continue
    u = -slope / (2.0 * curv)
    C = float(np.exp(np.log(c).mean()))
    n_opt = float(np.exp(mid + u))
    out.append(dict(C=C, N_opt=n_opt, D_opt=C / (6.0 * n_opt), L_min=float(const - slope * slope / (4.0 * curv)),
                    n_points=len(n)))
  return sorted(out, key=lambda g: g["C"])


# ----------------------------------------------------------------------------------------------------------------
# Gadre et al. 2024: over-training and downstream error

# The repo's start grid, in its parameterisation alpha_c N^p + beta_c 6^(p/2) D^p + E (p = -2 eta).
_OVERTRAIN_STARTS = [(ac, bc, p, e) for ac in (1e2, 3e2, 1e3, 3e3) for bc in (1e2, 3e2, 1e3, 3e3)
                     for p in (-0.1, -0.3) for e in (0.0, 1.0, 2.0, 10.0)]


def _overtrain_nd(nd, alpha_c, beta_c, p, e):
  n, d = nd
  return alpha_c * n ** p + beta_c * 6.0 ** (p / 2.0) * d ** p + e


@single_threaded_blas()
def fit_overtrain(N, D, L, *, starts=None) -> dict:
  """Fit Gadre et al.'s L(C, M) = E + (a M^eta + b M^-eta) C^-eta, C = 6 N D, M = D/N.

  As in the paper's code: scipy `curve_fit` (Levenberg-Marquardt, least squares on the raw loss) in the
  equivalent form alpha_c N^p + beta_c 6^(p/2) D^p + E, from every start in alpha_c, beta_c in {1e2, 3e2, 1e3, 3e3},
  p in {-0.1, -0.3}, E in {0, 1, 2, 10} (or `starts`), keeping the fit with the lowest RMS residual.
  Then eta = -p/2, a = alpha_c 6^eta, b = beta_c. Returns dict(a, b, eta, E, rms, n_points).
  """
  N, D, L = _positive("N", N), _positive("D", D), _positive("L", L)
  if not len(N) == len(D) == len(L):
    raise ValueError("N, D and L must have the same length")
  if len(N) < 4:
    raise ValueError(f"the over-training law has 4 parameters; fit it on at least 4 points, got {len(N)}")
  best, best_rms = None, np.inf
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore", OptimizeWarning)
    for p0 in _OVERTRAIN_STARTS if starts is None else starts:
      try:
        popt, _ = curve_fit(_overtrain_nd, (N, D), L, p0=p0)
      except RuntimeError:  # LM hit maxfev from this start
        continue
      rms = float(np.sqrt(np.mean((_overtrain_nd((N, D), *popt) - L) ** 2)))
      if np.isfinite(rms) and rms < best_rms:
        best, best_rms = popt, rms
  if best is None:
    raise RuntimeError("no start of the over-training fit converged")
  alpha_c, beta_c, p, e = (float(v) for v in best)
  eta = -p / 2.0
  return dict(a=alpha_c * 6.0 ** eta, b=beta_c, eta=eta, E=e, rms=best_rms, n_points=len(N))


def predict_overtrain(fit: Mapping, N, D):
  """E + (a M^eta + b M^-eta) C^-eta with C = 6 N D, M = D/N, for a `fit_overtrain` result."""
  N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
  C, M, eta = 6.0 * N * D, D / N, fit["eta"]
  return fit["E"] + (fit["a"] * M ** eta + fit["b"] * M ** -eta) * C ** -eta


def _downstream(loss, epsilon, k, gamma):
  return epsilon - k * np.exp(-gamma * loss)


@single_threaded_blas()
def fit_downstream(L, err) -> dict:
  """Fit Gadre et al.'s Err(L) = epsilon - k exp(-gamma L) with `curve_fit` defaults (p0 = 1, 1, 1; LM).

  Returns dict(epsilon, k, gamma, rms, n_points).
  """
  L = _positive("L", L)
  err = np.asarray(err, dtype=float).ravel()
  if len(err) != len(L) or not np.all(np.isfinite(err)):
    raise ValueError("err must be finite and as long as L")
  if len(L) < 3:
    raise ValueError(f"the downstream law has 3 parameters; fit it on at least 3 points, got {len(L)}")
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore", OptimizeWarning)  # no covariance with as many points as parameters
    popt, _ = curve_fit(_downstream, L, err)
  epsilon, k, gamma = (float(v) for v in popt)
  rms = float(np.sqrt(np.mean((_downstream(L, *popt) - err) ** 2)))
  return dict(epsilon=epsilon, k=k, gamma=gamma, rms=rms, n_points=len(L))


def predict_downstream(fit: Mapping, L):
  """epsilon - k exp(-gamma L) for a `fit_downstream` result."""
  return _downstream(np.asarray(L, dtype=float), fit["epsilon"], fit["k"], fit["gamma"])


# ----------------------------------------------------------------------------------------------------------------
# ParScale

_PARSCALE_UNIT = 1e9  # A and N inside the fit are in billions of parameters, which keeps log A near zero.


def _parscale_grid() -> np.ndarray:
  return np.array([(a, k, alpha, e) for a in (-5.0, -1.0, 3.0) for k in (0.2, 1.0) for alpha in (0.2, 0.5)
                   for e in (0.2, 0.8)])


@single_threaded_blas()
def fit_parscale(N, P, L, *, delta: float = 1e-3, grid=None, bootstrap: int = 0, seed: int = 0,
                 level: float = 0.95) -> dict:
  """Fit the ParScale law L = (A / (N (k ln P + 1)))^alpha + E (Chen et al. 2025), P = parallel streams.

  log L_hat = LSE(alpha (log A - log N - log(1 + k ln P)), log E); objective = sum of Huber_delta on log L;
  L-BFGS-B with the exact gradient from a small grid over (log A, k, alpha, log E) (or `grid` rows in that
  order), k >= 0. A is reported in units of 1e9 parameters (N is passed in parameters, non-embedding ones in
  the paper, the ParScale prefixes and aggregator included). The points must span at least two values of P:
  with one P, k only rescales A and is not identified.

  `bootstrap` > 0 adds `ci`: {A, k, alpha, E: (lo, hi)} percentile intervals at `level` from that many resamples
  of the points (seeded by `seed`), each refitted from the best solution rather than the grid; resamples that
  hold a single P cannot be fitted and are left out.
  Returns dict(A, k, alpha, E, objective, n_points[, ci]).
  """
  N, P, L = _positive("N", N), _positive("P", P), _positive("L", L)
  if not len(N) == len(P) == len(L):
    raise ValueError("N, P and L must have the same length")
  if np.any(P < 1):
    raise ValueError("P (streams) must be >= 1")
  if len(L) < 4:
    raise ValueError(f"the ParScale law has 4 parameters; fit it on at least 4 points, got {len(L)}")
  if len(np.unique(P)) < 2:
    raise ValueError(f"every point has P = {P[0]:g} streams, so k (the gain per ln P) is not identified; "
                     f"fit points at two or more P (sweep model.parscale.streams)")
  starts = _parscale_grid() if grid is None else np.atleast_2d(np.asarray(grid, dtype=float))
  theta, objective = parscale_solve(N, P, L, delta, starts, _PARSCALE_UNIT)
  out = _parscale_params(theta)
  out.update(objective=objective, n_points=len(L))
  if bootstrap > 0:
    def refit(n, p, l):
      if len(np.unique(p)) < 2:
        raise ValueError("a resample with a single P does not identify k")
      # One start at the full-data optimum: a resample's optimum lies close by, and the grid costs 20x more.
      return _parscale_params(parscale_solve(n, p, l, delta, theta[None], _PARSCALE_UNIT)[0])
    out["ci"] = bootstrap_ci(refit, N, P, L, n=bootstrap, seed=seed, level=level, keys=("A", "k", "alpha", "E"))
  return out


def _parscale_params(theta) -> dict:
  a, k, alpha, e = (float(v) for v in theta)
  return dict(A=math.exp(a), k=k, alpha=alpha, E=math.exp(e))


def parscale_multiplier(fit: Mapping, P):
  """k ln P + 1: how many times the parameters a single-stream model needs to match P streams, by the fit."""
  return fit["k"] * np.log(np.asarray(P, dtype=float)) + 1.0


def predict_parscale(fit: Mapping, N, P):
  """(A / (N (k ln P + 1)))^alpha + E for a `fit_parscale` result (N in parameters, A in 1e9 parameters)."""
  n = np.asarray(N, dtype=float) / _PARSCALE_UNIT
  return (fit["A"] / (n * (fit["k"] * np.log(np.asarray(P, dtype=float)) + 1.0))) ** fit["alpha"] + fit["E"]


# ----------------------------------------------------------------------------------------------------------------
# LR annealing (Tissue et al. 2024)

def lr_areas(steps_lr, lam: float = 0.999, *, warmup: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(S1, S2) per step for an LR schedule: S1 = cumulative sum of lr; S2 = cumulative sum of m_i with
  m_i = lam m_{i-1} + (lr_{i-1} - lr_i), m_0 = 0. The first `warmup` steps count at the peak LR, as the
  reference code is reported to do, so warmup adds forward area but no (negative) annealing area.
  """
  lr = np.asarray(steps_lr, dtype=float).ravel().copy()
  if warmup > 0:
    lr[:warmup] = lr.max()
  drops = np.concatenate([[0.0], lr[:-1] - lr[1:]])
  m = lfilter([1.0], [1.0, -lam], drops)  # the recurrence m_i = lam m_{i-1} + drop_i as an IIR filter
  return np.cumsum(lr), np.cumsum(m)


@single_threaded_blas()
def fit_annealing(steps_lr, loss, lam: float = 0.999, *, delta: float = 1e-3, warmup: int = 0,
                  grid=None) -> dict:
  """Fit the LR-annealing law L(s) = L0 + A S1^-alpha - C S2 to one loss curve (Tissue et al. 2024).

  `steps_lr` is the LR at every step and `loss` the loss at every step (NaN where not logged; steps with S1 = 0
  are skipped too). Objective: sum of Huber_delta(log L_hat - log L); L-BFGS-B with the exact gradient and bounds
  L0 > 0, A >= 0, alpha > 0, C >= 0, from a small grid scaled to the data (or `grid` rows (L0, A, alpha, C)).
  Returns dict(L0, A, alpha, C, objective, n_points, lam).
  """
  s1, s2 = lr_areas(steps_lr, lam, warmup=warmup)
  loss = np.asarray(loss, dtype=float).ravel()
  if len(loss) != len(s1):
    raise ValueError(f"loss has {len(loss)} steps but the LR schedule has {len(s1)}")
  mask = np.isfinite(loss) & (loss > 0) & (s1 > 0)
  if mask.sum() < 4:
    raise ValueError(f"the annealing law has 4 parameters; fit it on at least 4 logged steps, got {mask.sum()}")
  s1, s2, log_l = s1[mask], s2[mask], np.log(loss[mask])
  log_s1 = np.log(s1)
  scale = 1.0 / delta
  tiny = 1e-12

  def fun_grad(theta):
    l0, a, alpha, c = theta
    power = s1 ** -alpha
    pred = l0 + a * power - c * s2
    # A prediction at or below zero has no log; clamp it so the line search sees a huge loss and backs off.
    bad = pred <= tiny
    pred = np.where(bad, tiny, pred)
    r = np.log(pred) - log_l
    g = np.where(bad, 0.0, huber_grad(r, delta) / pred)
    grad = np.array([g.sum(), (g * power).sum(), -(g * a * power * log_s1).sum(), -(g * s2).sum()])
    return huber(r, delta).sum() * scale, grad * scale

  if grid is None:
    lo, spread = float(np.exp(log_l).min()), float(np.ptp(np.exp(log_l))) or 1.0
    s2_top = max(float(np.abs(s2).max()), tiny)
    grid = [(l0, a * spread, alpha, c * spread / s2_top) for l0 in (0.5 * lo, 0.9 * lo) for a in (0.3, 3.0)
            for alpha in (0.3, 0.8) for c in (0.1, 1.0)]
  bounds = [(tiny, None), (0.0, None), (1e-4, 5.0), (0.0, None)]
  theta, f = multistart_lbfgsb(fun_grad, np.asarray(grid, dtype=float), bounds=bounds)
  l0, a, alpha, c = (float(v) for v in theta)
  return dict(L0=l0, A=a, alpha=alpha, C=c, objective=f / scale, n_points=int(mask.sum()), lam=float(lam))


def predict_annealing(fit: Mapping, steps_lr, *, warmup: int = 0) -> np.ndarray:
  """L0 + A S1^-alpha - C S2 at every step of an LR schedule, for a `fit_annealing` result."""
  s1, s2 = lr_areas(steps_lr, fit["lam"], warmup=warmup)
  with np.errstate(divide="ignore"):
    return fit["L0"] + fit["A"] * s1 ** -fit["alpha"] - fit["C"] * s2


# ----------------------------------------------------------------------------------------------------------------
# CSV entry point

# law -> (fitter, CSV columns in the fitter's positional order, minimum rows = free parameters)
_CSV_LAWS = {
    "chinchilla": (fit_chinchilla, ("params", "tokens", "loss"), 5),
    "overtrain": (fit_overtrain, ("params", "tokens", "loss"), 4),
    "parscale": (fit_parscale, ("params", "streams", "loss"), 4),
    "downstream": (fit_downstream, ("loss", "error"), 3),
}


def fit_csv(path: str, law: str, **kw) -> dict:
  """Fit `law` (chinchilla | overtrain | parscale | downstream) to a CSV and return a JSON-serialisable dict.

  Columns: params, tokens, loss (chinchilla, overtrain); params, streams, loss (parscale); loss, error
  (downstream); other columns are ignored. `kw` goes to the fitter as keyword options (e.g. bootstrap=200 for
  chinchilla and parscale). The result holds the law, the fitted parameters, the objective (or rms) and n_points.
  A missing file, missing column, bad value, unknown law or option, or too few rows raises `ConfigError` with one
  line.
  """
  _law_fitter(law, kw)
  if not os.path.isfile(path):
    raise ConfigError(f"--csv {path}: no such file; pass a CSV with columns {','.join(_CSV_LAWS[law][1])}")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    header = [h.strip() for h in (reader.fieldnames or [])]
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
  return fit_table(header, rows, law, source=f"--csv {path}", **kw)


def fit_table(header: list[str], rows: list[Mapping], law: str, *, source: str, labels: list[str] | None = None,
              **kw) -> dict:
  """`fit_csv` on rows already read: `header` names the columns, `rows` map column -> text or number.

  `source` starts every error line (e.g. "--workdir runs/s"); `labels` name the rows in errors (default: their
  CSV line numbers).
  """
  fitter, columns, min_rows = _law_fitter(law, kw)
  missing = [c for c in columns if c not in header]
  if missing:
    raise ConfigError(f"{source}: missing column(s) {', '.join(missing)} for --law {law}; "
                      f"need {','.join(columns)} (found {','.join(header) or 'no header'})")
  if len(rows) < min_rows:
    raise ConfigError(f"{source}: {len(rows)} data rows; --law {law} needs at least {min_rows}")
  labels = labels or [f"line {i + 2}" for i in range(len(rows))]
  cols = {}
  for name in columns:
    try:
      cols[name] = np.array([float(r[name]) for r in rows])
    except (TypeError, ValueError):
      raise ConfigError(f"{source}: column {name} has a non-numeric or empty value") from None
    # Error rates may be zero; every other column feeds a logarithm or a power.
    bad = ~np.isfinite(cols[name]) | ((cols[name] <= 0) if name != "error" else False)
    if np.any(bad):
      raise ConfigError(f"{source}: column {name}, {labels[int(np.argmax(bad))]}: "
                        f"{'not a finite number' if name == 'error' else 'not a finite positive number'}")
  try:
    result = fitter(*(cols[c] for c in columns), **kw)
  except (ValueError, RuntimeError) as e:
    raise ConfigError(f"{source}: --law {law} fit failed: {e}") from None
  return jsonable(dict(law=law, **result))


def _law_fitter(law: str, kw: Mapping) -> tuple:
  """(fitter, columns, minimum rows) of `law`, after checking the law and the fitter options in `kw`."""
  if law not in _CSV_LAWS:
    raise ConfigError(f"--law {law!r}: unknown law; choose one of {', '.join(LAWS)}")
  fitter, columns, min_rows = _CSV_LAWS[law]
  options = [p.name for p in inspect.signature(fitter).parameters.values() if p.kind == p.KEYWORD_ONLY]
  unknown = sorted(set(kw) - set(options))
  if unknown:
    raise ConfigError(f"--law {law}: unknown option(s) {', '.join(unknown)}; options: {', '.join(options) or 'none'}")
  return fitter, columns, min_rows


def jsonable(value):
  """numpy scalars/arrays and tuples -> plain JSON types, recursively."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [jsonable(v) for v in value]
  if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
    return int(value)
  if isinstance(value, (np.floating, float)):
    return float(value)
  return value
