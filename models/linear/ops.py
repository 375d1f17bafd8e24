"""Gated linear attention (scalar or vector decay) and the HGRN vector recurrence, chunked and token-by-token.

Per head the state S_t in R^{K x V} follows

  S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T (scale * q_t)      (readout after the write)

with alpha_t = exp(log_alpha_t) either one scalar per head (RetNet, Mamba2-like: spec 4A) or one value per key
channel (GLA, HGRN-2: spec 4B). Shapes, letters as in the tensor names:

  chunk_gla(q, k, v, log_alpha, *, scale=None, initial_state=None, chunk_size=64) -> (o, S)
  recurrent_gla(q, k, v, log_alpha, *, scale=None, initial_state=None) -> (o, S)
      q, k [B, T, H, K]; v [B, T, H, V]; log_alpha [B, T, H] (scalar decay) or [B, T, H, K] (vector decay);
      initial_state, S [B, H, K, V]; o [B, T, H, V].
  hgrn_scan(x, log_alpha, *, initial_state=None) -> (h, h_T)
  recurrent_hgrn(x, log_alpha, *, initial_state=None) -> (h, h_T)
      h_t = alpha_t * h_{t-1} + x_t elementwise; x, log_alpha, h [B, T, D]; initial_state, h_T [B, D].

`scale=None` is K**-0.5, applied to q; `initial_state=None` is zeros. Everything (cumsums, gates, states) is
computed in float32, or float64 for float64 inputs; outputs come back in v's (x's) dtype, states in the compute
dtype. The chunked form pads T to a multiple of the chunk with identity steps (q=k=v=0, log_alpha=0), works on
chunk-local cumsums of log_alpha only (global products under/overflow), does all intra-chunk work as einsums over
every chunk at once and leaves only the inter-chunk state recurrence to `lax.scan`. Every exponent that a causal
mask discards is zeroed before `exp` (double where), so gradients stay finite for any gate strength; log_alpha
must be finite and <= 0 (a decay).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Sub-chunk of the vector-decay intra-chunk matrix: exponents are taken relative to a row at most this far away.
# A chunk length that 16 does not divide uses its largest divisor up to 16.
SUB_CHUNK = 16


def compute_dtype(*xs) -> jnp.dtype:
  """float32, or float64 when an input is float64 (bf16 inputs compute in float32)."""
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def chunk_len(t: int, chunk_size: int) -> int:
  """The chunk length used for T tokens: chunk_size, shrunk for a sequence shorter than one chunk to T rounded
  up to 16 so that short prefills do not pay for a mostly padded chunk."""
  return max(1, min(chunk_size, -(-t // SUB_CHUNK) * SUB_CHUNK))


def to_chunks(x: jax.Array, c: int, dtype) -> jax.Array:
  """[B, T, ...] -> [B, N, C, ...] in dtype, zero-padded at the end of T."""
  t = x.shape[1]
  n = -(-t // c)
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, n * c - t)
  x = jnp.pad(x.astype(dtype), pad)
  return x.reshape(x.shape[0], n, c, *x.shape[2:])


def from_chunks(o_bnc: jax.Array, t: int, dtype) -> jax.Array:
  """[B, N, C, ...] -> [B, T, ...] in dtype, dropping the padding."""
  return o_bnc.reshape(o_bnc.shape[0], -1, *o_bnc.shape[3:])[:, :t].astype(dtype)


def masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
  """exp(x) where mask, else 0. The exponent is zeroed first: a discarded entry may be huge, and exp(inf) * 0
  would be NaN in the value or, through `where`'s gradient, in the backward pass."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def chunk_states(update: Callable, s0_bhkv: jax.Array, xs) -> tuple[jax.Array, jax.Array]:
  """Runs s <- update(s, xs[:, n]) over the chunk axis (axis 1 of every leaf of xs).

  Returns the state entering every chunk [B, N, H, K, V] and the final state [B, H, K, V].
  """
  def body(s, x):
    return update(s, x), s

  xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)
  s_final, s_in_nbhkv = jax.lax.scan(body, s0_bhkv, xs)
  return jnp.moveaxis(s_in_nbhkv, 0, 1), s_final


def initial(state, shape, dtype) -> jax.Array:
  """The given initial state in dtype, or zeros of shape."""
  return jnp.zeros(shape, dtype) if state is None else state.astype(dtype)


def masked_sum(x: jax.Array, axis: int, mask_rm: jax.Array) -> jax.Array:
  """y_r = sum_m mask[r, m] x_m along axis, e.g. a cumsum for mask m <= r.

  One matmul against the 0/1 mask, where a cumsum lowers (outside TPU) to an associative scan of log2(C) passes
  of small ops. precision=HIGHEST keeps these gate sums true fp32 on hardware whose default f32 dot is TF32/bf16.
  """
  y = jnp.einsum("...m,rm->...r", jnp.moveaxis(x, axis, -1), mask_rm.astype(x.dtype),
                 precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(y, -1, axis)


def tri(c: int, k: int = 0) -> jax.Array:
  """[c, c] bool mask m <= r + k, rows r, columns m (lower triangle; k=-1 strict)."""
  r = jnp.arange(c)
  return r[None, :] <= r[:, None] + k


def chunk_cumsum(la: jax.Array, axis: int) -> jax.Array:
  """g_r = sum_{m <= r} la_m along the chunk axis."""
  return masked_sum(la, axis, tri(la.shape[axis]))


def suffix_sum(la: jax.Array, axis: int) -> jax.Array:
  """sum_{m > r} la_m along the chunk axis: the decay from row r to the chunk's end, summed directly for the
  reason in `segsum` (the last row's exponent is a constant 0)."""
  return masked_sum(la, axis, ~tri(la.shape[axis]))


def segsum(la_xc: jax.Array) -> jax.Array:
  """seg[..., r, j] = sum_{j < m <= r} la_m over the last axis (0 for r <= j): [..., C] -> [..., C, C].

  Summed directly rather than as g_r - g_j of a cumsum g: the diagonal is then a constant 0, and a decay factor
  only reaches the gates between j and r. As a difference, the exp(0) terms of the diagonal send equal and
  opposite O(1) cotangents into the cumsum, whose cancellation leaves fp32 noise far above the true gate gradient
  once gates are strong.
  """
  c = la_xc.shape[-1]
  return masked_sum(jnp.where(tri(c, -1), la_xc[..., :, None], 0.0), -2, tri(c))


def _intra_scalar(q_bnchk, k_bnchk, la_bnch) -> jax.Array:
  """Intra-chunk scores A[r, j] = q_r.k_j exp(g_r - g_j) for r >= j, else 0: [B, N, H, C, C]."""
  c = q_bnchk.shape[2]
  mask_cc = tri(c)
  decay_bnhrj = masked_exp(segsum(jnp.moveaxis(la_bnch, 2, 3)), mask_cc)
  return jnp.einsum("bnrhk,bnjhk->bnhrj", q_bnchk, k_bnchk) * decay_bnhrj


def _intra_vector(q_bnchk, k_bnchk, la_bnchk, g_bnchk) -> jax.Array:
  """Intra-chunk scores A[r, j] = sum_d q_rd k_jd exp(g_rd - g_jd) for r >= j, else 0: [B, N, H, C, C].

  The factorised (q e^g)(k e^-g)^T overflows once a chunk's cumulative decay passes ~88 (fp32), so the chunk is
  cut into sub-chunks of c rows. Off-diagonal blocks (query sub-chunk i > key sub-chunk j) use the first row p of
  block i as reference: (q_r e^{g_r - g_p}) . (k_j e^{g_p - g_j}), both exponents <= 0. Diagonal blocks build the
  masked [c, c, K] tensor exp(g_r - g_j) explicitly.
  """
  b, n, cl, h, kd = q_bnchk.shape
  c = max(d for d in range(1, SUB_CHUNK + 1) if cl % d == 0)
  s = cl // c
  q_bnsrhk, k_bnsrhk, la_bnsrhk, g_bnsrhk = (x.reshape(b, n, s, c, h, kd)
                                             for x in (q_bnchk, k_bnchk, la_bnchk, g_bnchk))
  g_ref_bnshk = g_bnsrhk[:, :, :, 0]
  # g_r - g_p within block i, summed from the gates after p (see `segsum`).
  q_off_bnsrhk = q_bnsrhk * jnp.exp(masked_sum(la_bnsrhk, 3, tri(c) & (jnp.arange(c) > 0)))
  # [B, N, i, j, c, H, K]: block j's keys decayed to block i's reference row, kept for i > j only.
  below_ss = tri(s, -1)[:, :, None, None, None]
  k_off_bnijchk = k_bnsrhk[:, :, None] * masked_exp(g_ref_bnshk[:, :, :, None, None] - g_bnsrhk[:, :, None],
                                                    below_ss)
  a_off_bnhirjt = jnp.einsum("bnirhk,bnijthk->bnhirjt", q_off_bnsrhk, k_off_bnijchk)
  mask_cc = tri(c)
  decay_bnshkrt = masked_exp(segsum(jnp.moveaxis(la_bnsrhk, 3, 5)), mask_cc)
  q_bnshkr, k_bnshkr = jnp.moveaxis(q_bnsrhk, 3, 5), jnp.moveaxis(k_bnsrhk, 3, 5)
  a_diag_bnshrt = jnp.sum(q_bnshkr[..., :, None] * k_bnshkr[..., None, :] * decay_bnshkrt, axis=4)
  a_diag_bnhsrt = jnp.moveaxis(a_diag_bnshrt, 3, 2)
  eye_ij = jnp.eye(s, dtype=a_off_bnhirjt.dtype)[:, None, :, None]
  a_bnhirjt = a_off_bnhirjt + eye_ij * a_diag_bnhsrt[:, :, :, :, :, None, :]
  return a_bnhirjt.reshape(b, n, h, cl, cl)


def chunk_gla(q: jax.Array, k: jax.Array, v: jax.Array, log_alpha: jax.Array, *, scale: float | None = None,
              initial_state: jax.Array | None = None, chunk_size: int = 64) -> tuple[jax.Array, jax.Array]:
  """Chunked gated linear attention (spec 4A for log_alpha [B, T, H], 4B for [B, T, H, K]).

  q, k [B, T, H, K]; v [B, T, H, V]; initial_state [B, H, K, V] or None. Returns o [B, T, H, V] in v's dtype and
  the final state [B, H, K, V] in the compute dtype. Equals `recurrent_gla`.
  """
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  vector = log_alpha.ndim == 4
  dtype = compute_dtype(q, k, v, log_alpha)
  scale = kd ** -0.5 if scale is None else scale
  c = chunk_len(t, chunk_size)
  q_bnchk = to_chunks(q, c, dtype) * scale
  k_bnchk, v_bnchv = to_chunks(k, c, dtype), to_chunks(v, c, dtype)
  # Chunk-local only: g is the cumsum of log_alpha from the chunk's start (trailing K for vector decay).
  la_bnch_ = to_chunks(log_alpha, c, dtype)
  g_bnch_ = chunk_cumsum(la_bnch_, axis=2)
  rest_bnch_ = suffix_sum(la_bnch_, axis=2)  # g_C - g_r
  if vector:
    a_bnhrj = _intra_vector(q_bnchk, k_bnchk, la_bnch_, g_bnch_)
    g_bnchk, rest_bnchk = g_bnch_, rest_bnch_
  else:
    a_bnhrj = _intra_scalar(q_bnchk, k_bnchk, la_bnch_)
    g_bnchk, rest_bnchk = g_bnch_[..., None], rest_bnch_[..., None]
  g_last_bnhk = g_bnchk[:, :, -1]
  q_dec_bnchk = q_bnchk * jnp.exp(g_bnchk)
  k_dec_bnchk = k_bnchk * jnp.exp(rest_bnchk)

  def update(s_bhkv, x):
    decay_bhk, k_bchk, v_bchv = x
    return decay_bhk[..., None] * s_bhkv + jnp.einsum("bchk,bchv->bhkv", k_bchk, v_bchv)

  s0_bhkv = initial(initial_state, (b, h, kd, vd), dtype)
  s_in_bnhkv, s_final = chunk_states(update, s0_bhkv, (jnp.exp(g_last_bnhk), k_dec_bnchk, v_bnchv))
  o_bnchv = (jnp.einsum("bnchk,bnhkv->bnchv", q_dec_bnchk, s_in_bnhkv)
             + jnp.einsum("bnhrj,bnjhv->bnrhv", a_bnhrj, v_bnchv))
  return from_chunks(o_bnchv, t, v.dtype), s_final


def recurrent_gla(q: jax.Array, k: jax.Array, v: jax.Array, log_alpha: jax.Array, *, scale: float | None = None,
                  initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Token-by-token gated linear attention (`lax.scan` over T): the reference for `chunk_gla`, and decoding.

  Same arguments, shapes and results as `chunk_gla`.
  """
  b, _, h, kd = q.shape
  vd = v.shape[-1]
  dtype = compute_dtype(q, k, v, log_alpha)
  scale = kd ** -0.5 if scale is None else scale
  alpha_bthk = jnp.exp(log_alpha.astype(dtype))
  if log_alpha.ndim == 3:
    alpha_bthk = alpha_bthk[..., None]

  def step(s_bhkv, x):
    q_bhk, k_bhk, v_bhv, alpha_bhk = x
    s_bhkv = alpha_bhk[..., None] * s_bhkv + k_bhk[..., None] * v_bhv[..., None, :]
    return s_bhkv, jnp.einsum("bhk,bhkv->bhv", q_bhk, s_bhkv)

  xs = (q.astype(dtype) * scale, k.astype(dtype), v.astype(dtype), alpha_bthk)
  xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)
  s_final, o_tbhv = jax.lax.scan(step, initial(initial_state, (b, h, kd, vd), dtype), xs)
  return jnp.moveaxis(o_tbhv, 0, 1).astype(v.dtype), s_final


def _hgrn_inputs(x, log_alpha, initial_state):
  dtype = compute_dtype(x, log_alpha)
  h0_bd = initial(initial_state, (x.shape[0], x.shape[2]), dtype)
  return x.astype(dtype), jnp.exp(log_alpha.astype(dtype)), h0_bd


def hgrn_scan(x: jax.Array, log_alpha: jax.Array, *,
              initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """h_t = alpha_t * h_{t-1} + x_t by a parallel `lax.associative_scan` over T (spec 3.4).

  x, log_alpha [B, T, D]; initial_state [B, D] or None. Returns h [B, T, D] in x's dtype and h_T [B, D] in the
  compute dtype. Equals `recurrent_hgrn`.
  """
  x_btd, alpha_btd, h0_bd = _hgrn_inputs(x, log_alpha, initial_state)
  # The initial state enters as part of the first step's input: h_1 = alpha_1 h_0 + x_1.
  x_btd = x_btd.at[:, 0].add(alpha_btd[:, 0] * h0_bd)

  def combine(earlier, later):
    # Products of alpha only shrink (alpha <= 1), so multiplying gates directly cannot overflow.
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2

  _, h_btd = jax.lax.associative_scan(combine, (alpha_btd, x_btd), axis=1)
  return h_btd.astype(x.dtype), h_btd[:, -1]


def recurrent_hgrn(x: jax.Array, log_alpha: jax.Array, *,
                   initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """h_t = alpha_t * h_{t-1} + x_t token by token (`lax.scan` over T); same arguments and results as `hgrn_scan`."""
  x_btd, alpha_btd, h0_bd = _hgrn_inputs(x, log_alpha, initial_state)

  def step(h_bd, xs):
    x_bd, alpha_bd = xs
    h_bd = alpha_bd * h_bd + x_bd
    return h_bd, h_bd

  h_final, h_tbd = jax.lax.scan(step, h0_bd, (jnp.moveaxis(x_btd, 1, 0), jnp.moveaxis(alpha_btd, 1, 0)))
  return jnp.moveaxis(h_tbd, 0, 1).astype(x.dtype), h_final


__all__ = ["chunk_gla", "recurrent_gla", "hgrn_scan", "recurrent_hgrn"]
