"""Numerical machinery behind `scalezoo.train.laws`: the Huber loss, the Chinchilla log-sum-exp objective with
exact gradient and Hessian batched over many starts, a damped-Newton pass over a whole start grid, an L-BFGS-B
multi-start wrapper, the ParScale objective and a generic bootstrap. Pure numpy/scipy; no JAX.

Chinchilla parameters are packed as theta = (a, alpha, b, beta, e) with A = e^a, B = e^b, E = e^e, and the model
is log L = LSE(a - alpha log N, b - beta log D, e).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import importlib
import os
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import minimize


@functools.cache
def _openblas_thread_setters() -> tuple:
  """`openblas_set_num_threads_local` of the OpenBLAS copies vendored in the numpy and scipy wheels, if any."""
  setters = []
  for pkg in ("numpy", "scipy"):
    libdir = os.path.dirname(importlib.import_module(pkg).__file__) + ".libs"  # where manylinux wheels vendor it
    for path in glob.glob(os.path.join(libdir, "*openblas*")):
      try:
        fn = ctypes.CDLL(path).openblas_set_num_threads_local
      except (OSError, AttributeError):
        continue
      fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
      setters.append(fn)
  return tuple(setters)


@contextlib.contextmanager
def single_threaded_blas():
  """Run a block (or, as `@single_threaded_blas()`, a function) with OpenBLAS single-threaded in this thread.

  The linear algebra in these fits is tiny (L-BFGS-B's 5x5 updates, [S, 240] @ [240, 3] matmuls), and waking
  OpenBLAS's thread pool for it costs far more than it saves: 3-10x slower fits on 2 cores, worse on a busy
  machine. The per-thread setting leaves other threads alone and is restored on exit; without a vendored
  OpenBLAS (e.g. macOS Accelerate) this does nothing.
  """
  setters = _openblas_thread_setters()
  old = [fn(1) for fn in setters]
  try:
    yield
  finally:
    for fn, n in zip(setters, old):
      fn(n)


def huber(r: np.ndarray, delta: float) -> np.ndarray:
  """Elementwise Huber loss: r^2/2 inside [-delta, delta], delta (|r| - delta/2) outside."""
  r = np.asarray(r, dtype=float)
  abs_r = np.abs(r)
  return np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))


def huber_grad(r: np.ndarray, delta: float) -> np.ndarray:
  """Derivative of `huber` with respect to r."""
  return np.clip(r, -delta, delta)


def app_d2_grid() -> np.ndarray:
  """Hoffmann et al. App. D.2 start grid as theta rows (a, alpha, b, beta, e): 4500 x 5."""
  exps = np.arange(0.0, 2.01, 0.5)
  es = np.arange(-1.0, 1.01, 0.5)
  logs = np.arange(0.0, 25.1, 5.0)
  a, alpha, b, beta, e = np.meshgrid(logs, exps, logs, exps, es, indexing="ij")
  return np.stack([a.ravel(), alpha.ravel(), b.ravel(), beta.ravel(), e.ravel()], axis=1)


class ChinchillaObjective:
  """Sum_i w_i Huber_delta(log L_hat_i - log L_i) for many thetas at once.

  Data are fixed at construction; `weights` (one row of point weights per theta, e.g. bootstrap counts) may be
  given per call. Everything is vectorised over [S starts, P points] so a 4500-start grid costs a few matmuls.
  """

  def __init__(self, N: np.ndarray, D: np.ndarray, L: np.ndarray, delta: float):
    self.x = np.log(np.asarray(N, dtype=float))  # [P]
    self.y = np.log(np.asarray(D, dtype=float))  # [P]
    self.l = np.log(np.asarray(L, dtype=float))  # [P]
    self.delta = float(delta)
    one = np.ones_like(self.x)
    x, y = self.x, self.y
    # Feature matrices for the Hessian sums; see `grad_hess`.
    self._fx = np.stack([one, x, x * x], axis=1)
    self._fy = np.stack([one, y, y * y], axis=1)
    self._fxy = np.stack([one, x, y, x * y], axis=1)

  def value(self, theta_s5: np.ndarray, weights_sp: np.ndarray | None = None):
    """Objective per theta [S] and the cache (softmax weights, residuals) that `grad_hess` needs."""
    a, alpha, b, beta, e = (theta_s5[:, i:i + 1] for i in range(5))
    z1 = a - alpha * self.x                        # [S, P]
    z2 = b - beta * self.y
    z3 = np.broadcast_to(e, z1.shape)
    zmax = np.maximum(np.maximum(z1, z2), z3)
    w1, w2, w3 = np.exp(z1 - zmax), np.exp(z2 - zmax), np.exp(z3 - zmax)
    total = w1 + w2 + w3
    r = zmax + np.log(total) - self.l              # log L_hat - log L
    h = huber(r, self.delta)
    if weights_sp is not None:
      h = h * weights_sp
    # Normalising the softmax weights is left to `grad_hess`, which only sees the accepted trial points.
    return h.sum(axis=1), (w1, w2, w3, total, r, weights_sp)

  def grad_hess(self, cache) -> tuple[np.ndarray, np.ndarray]:
    """Exact gradient [S, 5] and Hessian [S, 5, 5] from a `value` cache.

    With z = (a - alpha x, b - beta y, e) and w = softmax(z), d r/d z = w and d2 r/d z2 = diag(w) - w w^T, so the
    Hessian in z-space per point is huber'' w w^T + huber' (diag(w) - w w^T); z is linear in theta, so the theta
    Hessian is a sum of those 3x3 blocks times features (1, x, x^2, y, ...), i.e. six [S, P] @ [P, k] matmuls.
    """
    w1, w2, w3, total, r, weights = cache
    w1, w2, w3 = w1 / total, w2 / total, w3 / total
    g = huber_grad(r, self.delta)
    curv = (np.abs(r) <= self.delta).astype(float)
    if weights is not None:
      g, curv = g * weights, curv * weights
    c = curv - g
    g1, g2, g3 = g * w1, g * w2, g * w3
    grad = np.stack([g1.sum(1), -(g1 @ self.x), g2.sum(1), -(g2 @ self.y), g3.sum(1)], axis=1)
    f11 = (c * w1 * w1 + g1) @ self._fx
    f22 = (c * w2 * w2 + g2) @ self._fy
    f12 = (c * w1 * w2) @ self._fxy
    f13 = (c * w1 * w3) @ self._fx[:, :2]
    f23 = (c * w2 * w3) @ self._fy[:, :2]
    h33 = (c * w3 * w3 + g3).sum(1)
    hess = np.empty((len(r), 5, 5))
    rows = {
        (0, 0): f11[:, 0], (0, 1): -f11[:, 1], (1, 1): f11[:, 2],
        (2, 2): f22[:, 0], (2, 3): -f22[:, 1], (3, 3): f22[:, 2], (4, 4): h33,
        (0, 2): f12[:, 0], (0, 3): -f12[:, 2], (1, 2): -f12[:, 1], (1, 3): f12[:, 3],
        (0, 4): f13[:, 0], (1, 4): -f13[:, 1], (2, 4): f23[:, 0], (3, 4): -f23[:, 1],
    }
    for (i, j), v in rows.items():
      hess[:, i, j] = v
      hess[:, j, i] = v
    return grad, hess

  def scalar(self, theta: np.ndarray, scale: float = 1.0, weights: np.ndarray | None = None):
    """(value, gradient) for one theta, times `scale`: the callable handed to scipy (jac=True)."""
    w = None if weights is None else weights[None, :]
    f, cache = self.value(np.asarray(theta, dtype=float)[None, :], w)
    grad, _ = self.grad_hess(cache)
    return float(f[0]) * scale, grad[0] * scale


def _solve_batch(m_s55: np.ndarray, v_s5: np.ndarray) -> np.ndarray:
  try:
    return np.linalg.solve(m_s55, v_s5[..., None])[..., 0]
  except np.linalg.LinAlgError:
    # One singular system should not sink the batch; pinv gives a usable (minimum-norm) step for it.
    return (np.linalg.pinv(m_s55) @ v_s5[..., None])[..., 0]


def newton_batch(obj: ChinchillaObjective, theta_s5: np.ndarray, *, max_iter: int, weights_sp=None,
                 step_tol: float = 1e-11, max_step: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
  """Damped (Levenberg-Marquardt style) Newton on every row of theta at once, exact Hessian.

  Each start keeps its own damping mu: an accepted step (lower objective) divides it by 3, a rejected one
  multiplies it by 4, so starts far from a minimum take short gradient-like steps and starts near one take full
  Newton steps. The Huber loss makes the Hessian indefinite or near zero away from the fit (most points on the
  linear branch); the damping and the step cap keep that safe. A start stops when its proposed step is below
  `step_tol` or its damping has grown past any use. Returns (theta [S, 5], objective [S]).
  """
  theta = np.array(theta_s5, dtype=float)
  with np.errstate(all="ignore"):
    f, cache = obj.value(theta, weights_sp)
    grad, hess = obj.grad_hess(cache)
    mu = np.ones(len(theta))
    active = np.isfinite(f)
    eye = np.eye(5)
    for _ in range(max_iter):
      idx = np.flatnonzero(active)
      if idx.size == 0:
        break
      step = -_solve_batch(hess[idx] + mu[idx, None, None] * eye, grad[idx])
      step = np.where(np.isfinite(step), step, 0.0)
      # Cap the step so a near-zero Hessian cannot fling a start to overflow.
      biggest = np.abs(step).max(axis=1)
      step *= np.minimum(1.0, max_step / np.maximum(biggest, 1e-300))[:, None]
      w = None if weights_sp is None else weights_sp[idx]
      f_new, cache_new = obj.value(theta[idx] + step, w)
      ok = np.isfinite(f_new) & (f_new < f[idx])
      acc = idx[ok]
      theta[acc] += step[ok]
      f[acc] = f_new[ok]
      if acc.size:
        sub = tuple(None if c is None else c[ok] for c in cache_new)
        grad[acc], hess[acc] = obj.grad_hess(sub)
      mu[idx] = np.where(ok, np.maximum(mu[idx] / 3.0, 1e-15), mu[idx] * 4.0)
      active[idx] = (biggest > step_tol) & (mu[idx] < 1e12)
  return theta, f


def lbfgsb(fun_grad: Callable, x0: Sequence[float], *, bounds=None, ftol: float = 1e-15, gtol: float = 1e-12,
           maxiter: int = 20000):
  """scipy L-BFGS-B with an exact gradient (jac=True) and tight tolerances.

  scipy stops when (f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= ftol: for objectives far below 1 that is an
  absolute test, so callers scale their objective to order one as well as passing tiny tolerances.
  """
  return minimize(fun_grad, np.asarray(x0, dtype=float), jac=True, method="L-BFGS-B", bounds=bounds,
                  options=dict(ftol=ftol, gtol=gtol, maxiter=maxiter, maxfun=2 * maxiter, maxls=50))


def multistart_lbfgsb(fun_grad: Callable, starts: np.ndarray, *, bounds=None, n_polish: int = 3,
                      first_pass: dict | None = None) -> tuple[np.ndarray, float]:
  """Best (x, f) over L-BFGS-B runs from every start; non-finite results are skipped.

  scipy's L-BFGS-B has a fixed overhead per iteration that dwarfs these small objectives, so every start first
  runs with loose tolerances (`first_pass`, default ftol=1e-9, gtol=1e-7, maxiter=20) and only the `n_polish`
  best end points are run on to the tight defaults of `lbfgsb`. `fun_grad` should return an objective of order
  one (see `lbfgsb`).
  """
  loose = dict(ftol=1e-9, gtol=1e-7, maxiter=20) if first_pass is None else first_pass
  ends = []
  with np.errstate(all="ignore"):
    for x0 in np.atleast_2d(starts):
      res = lbfgsb(fun_grad, x0, bounds=bounds, **loose)
      if np.isfinite(res.fun):
        ends.append((float(res.fun), res.x))
    ends.sort(key=lambda e: e[0])
    best_x, best_f = None, np.inf
    for _, x0 in ends[:n_polish]:
      res = lbfgsb(fun_grad, x0, bounds=bounds)
      if np.isfinite(res.fun) and res.fun < best_f:
        best_x, best_f = res.x, float(res.fun)
  if best_x is None:
    raise RuntimeError("every start of the fit gave a non-finite objective; check the data for zeros or NaNs")
  return best_x, best_f


def parscale_solve(N, P, L, delta: float, starts: np.ndarray, unit: float = 1e9) -> tuple[np.ndarray, float]:
  """The ParScale objective's best L-BFGS-B end point from `starts`: (theta, objective).

  theta = (log A, k, alpha, log E) with A in units of `unit` parameters; the objective is the sum over points of
  Huber_delta(log L_hat - log L), log L_hat = LSE(alpha (log A - log(N/unit) - log(1 + k ln P)), log E).
  """
  log_n, log_p, log_l = np.log(N / unit), np.log(P), np.log(L)
  scale = 1.0 / delta

  def fun_grad(theta):
    a, k, alpha, e = theta
    u = 1.0 + k * log_p
    base = a - log_n - np.log(u)
    z1, z2 = alpha * base, np.full_like(base, e)
    zmax = np.maximum(z1, z2)
    w1, w2 = np.exp(z1 - zmax), np.exp(z2 - zmax)
    r = zmax + np.log(w1 + w2) - log_l
    w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)
    g = huber_grad(r, delta)
    grad = np.array([(g * w1 * alpha).sum(), -(g * w1 * alpha * log_p / u).sum(), (g * w1 * base).sum(),
                     (g * w2).sum()])
    return huber(r, delta).sum() * scale, grad * scale

  theta, f = multistart_lbfgsb(fun_grad, starts, bounds=[(None, None), (0.0, None), (1e-4, None), (None, None)])
  return theta, f / scale


def bootstrap_ci(fit: Callable[..., dict], *arrays, n: int = 100, seed: int = 0, level: float = 0.95,
                 keys: Sequence[str] | None = None) -> dict[str, tuple[float, float]]:
  """Percentile bootstrap intervals for any fitter: refit `fit(*resampled_arrays)` on `n` resamples of the rows.

  `keys` selects the returned parameters (default: every float entry of the first refit). Refits that raise
  are dropped; an interval needs at least two successful refits.
  """
  arrays = [np.asarray(a) for a in arrays]
  rng = np.random.default_rng(seed)
  samples: dict[str, list[float]] = {}
  for _ in range(n):
    rows = rng.integers(0, len(arrays[0]), size=len(arrays[0]))
    try:
      res = fit(*(a[rows] for a in arrays))
    except (RuntimeError, ValueError, np.linalg.LinAlgError):
      continue
    names = keys or [k for k, v in res.items() if isinstance(v, float)]
    for k in names:
      samples.setdefault(k, []).append(float(res[k]))
  return percentile_ci(samples, level)


def percentile_ci(samples: dict[str, Sequence[float]], level: float) -> dict[str, tuple[float, float]]:
  """{name: (lo, hi)}: the central `level` percentile interval of each sample list (finite values only)."""
  tail = 50.0 * (1.0 - level)
  out = {}
  for k, v in samples.items():
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    if v.size >= 2:
      lo, hi = np.percentile(v, [tail, 100.0 - tail])
      out[k] = (float(lo), float(hi))
  return out
