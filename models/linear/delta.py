"""The (gated) delta rule (DeltaNet, Gated DeltaNet), chunked by the UT/WY transform and token-by-token.

Per head the state S_t in R^{K x V} follows

  S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale * q_t)

i.e. S' = alpha_t S_{t-1}, u_t = beta_t (v_t - S'^T k_t), S_t = S' + k_t u_t^T. DeltaNet is alpha = 1
(log_alpha=None). Shapes, letters as in the tensor names:

  chunk_delta_rule(q, k, v, beta, log_alpha=None, *, scale=None, initial_state=None, chunk_size=64) -> (o, S)
  recurrent_delta_rule(q, k, v, beta, log_alpha=None, *, scale=None, initial_state=None) -> (o, S)
      q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; log_alpha [B, T, H] or None;
      initial_state, S [B, H, K, V]; o [B, T, H, V].

Keys are expected L2-normalised by the caller (and beta in (0, 2)); otherwise I - beta k k^T is not a contraction.
`scale=None` is K**-0.5 on q; `initial_state=None` is zeros. Computed in float32 (float64 for float64 inputs); o
comes back in v's dtype, S in the compute dtype.

Chunked form (spec 4C), per chunk of C rows with chunk-local cumsum g of log_alpha and S_0 the entering state:
A[r, j] = beta_r (k_r.k_j) exp(g_r - g_j) for r > j; W = (I + A)^-1 Diag(beta e^g) K and U = (I + A)^-1 Diag(beta) V
for every chunk at once (one unit-lower-triangular solve); the scan over chunks carries only S, with
V_new = U - W S_0 the true per-token updates u_r and S_C = e^{g_C} S_0 + (K e^{g_C - g})^T V_new. The readout
O = (Q e^g) S_0 + ((Q K^T) * M) V_new (M[r, j] = exp(g_r - g_j), r >= j) is rearranged to
(Q e^g - (QK^T * M) W) S_0 + (QK^T * M) U, so it too is batched over chunks outside the scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scalezoo.models.linear.ops import (chunk_cumsum, chunk_len, chunk_states, compute_dtype, from_chunks, initial,
                                       masked_exp, segsum, suffix_sum, to_chunks, tri)


def chunk_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, log_alpha: jax.Array | None = None,
                     *, scale: float | None = None, initial_state: jax.Array | None = None,
                     chunk_size: int = 64) -> tuple[jax.Array, jax.Array]:
  """Chunked (gated) delta rule; equals `recurrent_delta_rule`.

  q, k [B, T, H, K] (k L2-normalised); v [B, T, H, V]; beta [B, T, H]; log_alpha [B, T, H] or None (no decay);
  initial_state [B, H, K, V] or None. Returns o [B, T, H, V] in v's dtype and the final state [B, H, K, V].
  """
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  gates = (beta,) if log_alpha is None else (beta, log_alpha)
  dtype = compute_dtype(q, k, v, *gates)
  scale = kd ** -0.5 if scale is None else scale
  c = chunk_len(t, chunk_size)
  # Padding has beta = 0 and log_alpha = 0 (and k = 0): the padded steps leave S unchanged.
  q_bnchk = to_chunks(q, c, dtype) * scale
  k_bnchk, v_bnchv = to_chunks(k, c, dtype), to_chunks(v, c, dtype)
  beta_bnch = to_chunks(beta, c, dtype)
  la_bnch = jnp.zeros(beta_bnch.shape, dtype) if log_alpha is None else to_chunks(log_alpha, c, dtype)
  g_bnch = chunk_cumsum(la_bnch, axis=2)  # chunk-local
  seg_bnhrj = segsum(jnp.moveaxis(la_bnch, 2, 3))  # g_r - g_j
  causal_cc, strict_cc = tri(c), tri(c, -1)

  # W and U for all chunks: solve (I + A) [W U] = [Diag(beta e^g) K, Diag(beta) V], A strictly lower.
  beta_bnhc = jnp.moveaxis(beta_bnch, 2, 3)
  kk_bnhrj = jnp.einsum("bnrhk,bnjhk->bnhrj", k_bnchk, k_bnchk)
  a_bnhrj = beta_bnhc[..., None] * kk_bnhrj * masked_exp(seg_bnhrj, strict_cc)
  rhs_bnchx = jnp.concatenate([(beta_bnch * jnp.exp(g_bnch))[..., None] * k_bnchk,
                               beta_bnch[..., None] * v_bnchv], axis=-1)
  sol_bnhcx = jax.scipy.linalg.solve_triangular(a_bnhrj, jnp.moveaxis(rhs_bnchx, 3, 2), lower=True,
                                                unit_diagonal=True)
  sol_bnchx = jnp.moveaxis(sol_bnhcx, 2, 3)
  w_bnchk, u_bnchv = sol_bnchx[..., :kd], sol_bnchx[..., kd:]

  g_last_bnh = g_bnch[:, :, -1]
  k_dec_bnchk = k_bnchk * jnp.exp(suffix_sum(la_bnch, axis=2))[..., None]

  def update(s_bhkv, x):
    decay_bh, w_bchk, u_bchv, k_bchk = x
    v_new_bchv = u_bchv - jnp.einsum("bchk,bhkv->bchv", w_bchk, s_bhkv)
    return decay_bh[..., None, None] * s_bhkv + jnp.einsum("bchk,bchv->bhkv", k_bchk, v_new_bchv)

  s0_bhkv = initial(initial_state, (b, h, kd, vd), dtype)
  s_in_bnhkv, s_final = chunk_states(update, s0_bhkv, (jnp.exp(g_last_bnh), w_bnchk, u_bnchv, k_dec_bnchk))

  qk_bnhrj = jnp.einsum("bnrhk,bnjhk->bnhrj", q_bnchk, k_bnchk) * masked_exp(seg_bnhrj, causal_cc)
  q_eff_bnchk = q_bnchk * jnp.exp(g_bnch)[..., None] - jnp.einsum("bnhrj,bnjhk->bnrhk", qk_bnhrj, w_bnchk)
  o_bnchv = (jnp.einsum("bnchk,bnhkv->bnchv", q_eff_bnchk, s_in_bnhkv)
             + jnp.einsum("bnhrj,bnjhv->bnrhv", qk_bnhrj, u_bnchv))
  return from_chunks(o_bnchv, t, v.dtype), s_final


def recurrent_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
                         log_alpha: jax.Array | None = None, *, scale: float | None = None,
                         initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Token-by-token (gated) delta rule (`lax.scan` over T): the reference for `chunk_delta_rule`, and decoding.

  Same arguments, shapes and results as `chunk_delta_rule`.
  """
  b, _, h, kd = q.shape
  vd = v.shape[-1]
  gates = (beta,) if log_alpha is None else (beta, log_alpha)
  dtype = compute_dtype(q, k, v, *gates)
  scale = kd ** -0.5 if scale is None else scale
  alpha_bth = jnp.ones(beta.shape, dtype) if log_alpha is None else jnp.exp(log_alpha.astype(dtype))

  def step(s_bhkv, x):
    q_bhk, k_bhk, v_bhv, beta_bh, alpha_bh = x
    s_bhkv = alpha_bh[..., None, None] * s_bhkv
    u_bhv = beta_bh[..., None] * (v_bhv - jnp.einsum("bhk,bhkv->bhv", k_bhk, s_bhkv))
    s_bhkv = s_bhkv + k_bhk[..., None] * u_bhv[..., None, :]
    return s_bhkv, jnp.einsum("bhk,bhkv->bhv", q_bhk, s_bhkv)

  xs = (q.astype(dtype) * scale, k.astype(dtype), v.astype(dtype), beta.astype(dtype), alpha_bth)
  xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)
  s_final, o_tbhv = jax.lax.scan(step, initial(initial_state, (b, h, kd, vd), dtype), xs)
  return jnp.moveaxis(o_tbhv, 0, 1).astype(v.dtype), s_final


__all__ = ["chunk_delta_rule", "recurrent_delta_rule"]
