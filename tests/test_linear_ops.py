"""Linear-attention ops: chunked == token recurrence (fp64 and fp32), state carry across a split, gradients, limits.

Compile time dominates on CPU, so all variants and cases of a dtype run through one jit call (`run_cases`, keyed by
"dtype/variant/chunk_size/T" strings), and later tests reuse that compiled program by passing the same case layout
with other values. Besides each other, chunked ops and JAX recurrences are both held to an independent float64
NumPy transcription of the recurrences (`np_recurrence`, no compile). K != V so a transposed state cannot pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from scalezoo.models.linear.delta import chunk_delta_rule, recurrent_delta_rule
from scalezoo.models.linear.ops import chunk_gla, hgrn_scan, recurrent_gla, recurrent_hgrn

B, H, K, V, D = 2, 2, 8, 6, 8
VARIANTS = ("gla_scalar", "gla_vector", "hgrn", "delta", "gated_delta")
# (chunk_size, T): every chunk size and every length once per dtype. T=37 with chunk 64 runs as one chunk of 48
# (a sequence shorter than a chunk shrinks it to T rounded up to 16); T=1 is a single padded chunk.
PAIRS = {"float64": ((16, 37), (32, 1), (64, 100)), "float32": ((16, 1), (32, 100), (64, 37)),
         "bfloat16": ((32, 100),)}


def _logsigmoid(x):
  return -np.logaddexp(0.0, -x)


def make_inputs(variant: str, t: int, seed: int = 0, gate: str = "normal") -> dict[str, np.ndarray]:
  """Inputs as in fla's tests, float64 numpy. gate: "normal" (fla's distributions), "strong" (log alpha ~ -20 per
  step) or "one" (log alpha ~ -1e-6)."""
  rng = np.random.default_rng(seed)
  if variant == "hgrn":
    log_alpha = _logsigmoid(rng.uniform(0, 1, (B, t, D))) / 16
    inp = dict(x=rng.standard_normal((B, t, D)), log_alpha=log_alpha, s0=rng.standard_normal((B, D)))
  else:
    inp = dict(q=rng.standard_normal((B, t, H, K)), k=rng.standard_normal((B, t, H, K)),
               v=rng.standard_normal((B, t, H, V)), s0=rng.standard_normal((B, H, K, V)))
  if variant.startswith("gla"):
    shape = (B, t, H, K) if variant == "gla_vector" else (B, t, H)
    inp["log_alpha"] = _logsigmoid(rng.uniform(0, 1, shape)) / 16
  if variant in ("delta", "gated_delta"):
    inp["k"] /= np.linalg.norm(inp["k"], axis=-1, keepdims=True)
    inp["beta"] = 1 / (1 + np.exp(-rng.standard_normal((B, t, H))))
  if variant == "gated_delta":
    # Gated DeltaNet: log alpha = -exp(A_log) softplus(a + dt_bias), with its A_log and dt_bias initialisation.
    a_log = np.log(rng.uniform(0, 16, H))
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), H))
    dt_bias = dt + np.log(-np.expm1(-dt))
    inp["log_alpha"] = -np.exp(a_log) * np.logaddexp(0.0, rng.standard_normal((B, t, H)) + dt_bias)
  if gate != "normal" and "log_alpha" in inp:
    u = rng.uniform(0.5, 1.5, inp["log_alpha"].shape)
    inp["log_alpha"] = -20.0 * u if gate == "strong" else -1e-6 * u
  return inp


def np_recurrence(variant: str, inp: dict) -> tuple[np.ndarray, np.ndarray]:
  """The spec's token recurrences in float64 NumPy: (outputs, final state)."""
  la = inp.get("log_alpha")
  s, outs = np.array(inp["s0"], np.float64), []
  if variant == "hgrn":
    for t in range(inp["x"].shape[1]):
      s = np.exp(la[:, t]) * s + inp["x"][:, t]
      outs.append(s)
    return np.stack(outs, 1), s
  q, k, v = inp["q"] * K ** -0.5, inp["k"], inp["v"]
  for t in range(q.shape[1]):
    if la is not None:
      alpha = np.exp(la[:, t])
      s = (alpha[..., None] if variant == "gla_vector" else alpha[..., None, None]) * s
    if variant.startswith("gla"):
      s = s + k[:, t, :, :, None] * v[:, t, :, None, :]
    else:
      u = inp["beta"][:, t, :, None] * (v[:, t] - np.einsum("bhk,bhkv->bhv", k[:, t], s))
      s = s + k[:, t, :, :, None] * u[:, :, None, :]
    outs.append(np.einsum("bhk,bhkv->bhv", q[:, t], s))
  return np.stack(outs, 1), s


def _call(inp, variant: str, chunked: bool, chunk_size: int):
  kw = dict(chunk_size=chunk_size) if chunked else {}
  if variant.startswith("gla"):
    op = chunk_gla if chunked else recurrent_gla
    return op(inp["q"], inp["k"], inp["v"], inp["log_alpha"], initial_state=inp["s0"], **kw)
  if variant == "hgrn":
    return (hgrn_scan if chunked else recurrent_hgrn)(inp["x"], inp["log_alpha"], initial_state=inp["s0"])
  op = chunk_delta_rule if chunked else recurrent_delta_rule
  return op(inp["q"], inp["k"], inp["v"], inp["beta"], inp.get("log_alpha"), initial_state=inp["s0"], **kw)


@jax.jit
def run_cases(cases: dict[str, dict]) -> dict[str, tuple]:
  """{"dtype/variant/chunk_size/T": inputs} -> (output, final state) of each chunked op; chunk_size "rec" runs
  the token recurrence instead. The keys are part of the pytree structure, so they are static."""
  out = {}
  for key, inp in cases.items():
    _, variant, chunk, _ = key.split("/")
    out[key] = _call(inp, variant, chunk != "rec", 0 if chunk == "rec" else int(chunk))
  return out


def default_cases(*dtypes: str) -> dict[str, dict]:
  """Inputs of every variant and (chunk, T) pair of the dtypes, each with its token recurrence ("rec") on the same
  inputs; float64 adds T=63 at chunk 16 for the split test."""
  cases = {}
  for dtype in dtypes:
    for v in VARIANTS:
      extra = ((16, 63),) if dtype == "float64" else ()
      for c, t in PAIRS[dtype] + extra:
        cases[f"{dtype}/{v}/{c}/{t}"] = make_inputs(v, t, seed=c + t)
        if (c, t) not in extra:
          cases[f"{dtype}/{v}/rec/{t}"] = cases[f"{dtype}/{v}/{c}/{t}"]
  return cases


def run(cases: dict[str, dict]) -> dict[str, tuple[jax.Array, jax.Array]]:
  """run_cases on numpy inputs, each case cast to the dtype its key names (float64 under enable_x64)."""
  x64 = any(key.startswith("float64") for key in cases)
  with jax.enable_x64(x64):
    return run_cases({key: jax.tree.map(lambda a, d=key.split("/")[0]: jnp.asarray(a, d), inp)
                      for key, inp in cases.items()})


def rel_err(x, ref) -> float:
  """fla's get_err_ratio: rmse(x - ref) / rms(ref)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.sqrt(np.mean((x - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


def max_abs(x, ref) -> float:
  return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(ref, np.float64))))


def test_float64_chunked_equals_recurrent():
  """float64, every variant, chunk sizes 16/32/64 and T 1/37/100 (paired), random initial state, H=2: chunked op ==
  JAX token recurrence, and both == the NumPy recurrence, output and final state, max abs error <= 1e-10."""
  cases = default_cases("float64")
  out = run(cases)
  for key, (o, s) in out.items():
    o_ref, s_ref = np_recurrence(key.split("/")[1], cases[key])
    assert o.dtype == s.dtype == jnp.float64 and o.shape == o_ref.shape, key
    assert max_abs(o, o_ref) <= 1e-10 and max_abs(s, s_ref) <= 1e-10, (key, max_abs(o, o_ref), max_abs(s, s_ref))
    dtype, v, chunk, t = key.split("/")
    if chunk != "rec" and f"{dtype}/{v}/rec/{t}" in out:
      o_rec, s_rec = out[f"{dtype}/{v}/rec/{t}"]
      assert max_abs(o, o_rec) <= 1e-10 and max_abs(s, s_rec) <= 1e-10, key


def test_float32_and_bfloat16_chunked_equal_recurrent():
  """float32, same coverage with other pairings: chunked == JAX recurrence and == the NumPy recurrence, relative
  error (rmse/rms, fla's get_err_ratio) <= 1e-5 for output and final state. bfloat16 inputs (T=100, chunk 32):
  bf16 output, float32 state, within fla's 0.005 of the recurrence on the same (rounded) inputs."""
  cases = default_cases("float32", "bfloat16")
  out = run(cases)
  for key, (o, s) in out.items():
    dtype, v, chunk, t = key.split("/")
    rounded = jax.tree.map(lambda a, d=dtype: np.asarray(jnp.asarray(a, d), np.float64), cases[key])
    o_ref, s_ref = np_recurrence(v, rounded)
    assert o.dtype == dtype and s.dtype == jnp.float32, key
    tol = 1e-5 if dtype == "float32" else 5e-3
    assert rel_err(o, o_ref) <= tol and rel_err(s, s_ref) <= tol, (key, rel_err(o, o_ref), rel_err(s, s_ref))
    if chunk != "rec" and dtype == "float32":
      o_rec, s_rec = out[f"{dtype}/{v}/rec/{t}"]
      assert rel_err(o, o_rec) <= 1e-5 and rel_err(s, s_rec) <= 1e-5, key


def test_state_carry_across_split():
  """Every variant (float64, chunk 16): tokens 0:37 (not chunk aligned), then 37:100 started from the first part's
  final state: the concatenated outputs and final state equal the unsplit chunked run and the reference."""
  first, second, full = default_cases("float64"), default_cases("float64"), default_cases("float64")
  for v in VARIANTS:
    whole = full[f"float64/{v}/64/100"]
    first[f"float64/{v}/16/37"] = {n: a if n == "s0" else a[:, :37] for n, a in whole.items()}
  out_first, out_full = run(first), run(full)
  for v in VARIANTS:
    s_mid = out_first[f"float64/{v}/16/37"][1]
    whole = full[f"float64/{v}/64/100"]
    second[f"float64/{v}/16/63"] = {n: s_mid if n == "s0" else a[:, 37:] for n, a in whole.items()}
  out_second = run(second)
  for v in VARIANTS:
    o = np.concatenate([out_first[f"float64/{v}/16/37"][0], out_second[f"float64/{v}/16/63"][0]], axis=1)
    s = out_second[f"float64/{v}/16/63"][1]
    o_ref, s_ref = np_recurrence(v, full[f"float64/{v}/64/100"])
    o_full, s_full = out_full[f"float64/{v}/64/100"]
    assert max_abs(o, o_full) <= 1e-10 and max_abs(s, s_full) <= 1e-10, v
    assert max_abs(o, o_ref) <= 1e-10 and max_abs(s, s_ref) <= 1e-10, v


@jax.jit
def _grads(inputs, cots):
  """Per variant: gradients of <o, cot_o> + <S, cot_s> w.r.t. every input, through the chunked op (chunk 32, so
  T=37 spans two chunks, two vector-decay sub-chunks each) and through the recurrence."""
  out = {}
  for variant, inp in inputs.items():
    def loss(x, chunked, variant=variant):
      o, s = _call(x, variant, chunked, 32)
      return jnp.sum(o * cots[variant]["o"]) + jnp.sum(s * cots[variant]["s"])
    out[variant] = (jax.grad(loss)(inp, True), jax.grad(loss)(inp, False))
  return out


def test_gradients_match_recurrence():
  """float32 gradients w.r.t. q, k, v (x), gates, beta and the initial state: chunked == recurrence (rel <= 1e-4)
  and finite, for fla's gates, strong gates (log alpha ~ -20 per step, so a 32-chunk decays by e^-640) and
  alpha ~ 1 (log alpha ~ -1e-6)."""
  t, rng = 37, np.random.default_rng(3)
  cots = {v: dict(o=rng.standard_normal((B, t, D) if v == "hgrn" else (B, t, H, V)),
                  s=rng.standard_normal((B, D) if v == "hgrn" else (B, H, K, V))) for v in VARIANTS}
  as_f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)  # noqa: E731
  for gate in ("normal", "strong", "one"):
    inputs = {v: make_inputs(v, t, seed=11, gate=gate) for v in VARIANTS}
    out = _grads(as_f32(inputs), as_f32(cots))
    for v, (g_chunk, g_ref) in out.items():
      assert set(g_chunk) == set(inputs[v])
      for name in g_ref:
        assert np.all(np.isfinite(np.asarray(g_chunk[name]))), (v, gate, name)
        assert rel_err(g_chunk[name], g_ref[name]) <= 1e-4, (v, gate, name, rel_err(g_chunk[name], g_ref[name]))


def test_limit_gated_delta_without_decay_is_delta_rule():
  """Gated delta rule with log alpha = 0 == delta rule (log_alpha=None); with beta = 0 it only decays S:
  S_t = exp(sum log alpha) S_0."""
  cases = default_cases("float64")
  gated = cases["float64/gated_delta/16/37"]
  gated["log_alpha"] = np.zeros_like(gated["log_alpha"])
  cases["float64/delta/16/37"] = {n: a for n, a in gated.items() if n != "log_alpha"}
  decaying = cases["float64/gated_delta/64/100"] = dict(cases["float64/gated_delta/64/100"])
  decaying["beta"] = np.zeros_like(decaying["beta"])
  out = run(cases)
  (o_g, s_g), (o_d, s_d) = out["float64/gated_delta/16/37"], out["float64/delta/16/37"]
  assert max_abs(o_g, o_d) <= 1e-12 and max_abs(s_g, s_d) <= 1e-12
  s_t_bthkv = np.exp(np.cumsum(decaying["log_alpha"], axis=1))[..., None, None] * decaying["s0"][:, None]
  o_ref = np.einsum("bthk,bthkv->bthv", decaying["q"] * K ** -0.5, s_t_bthkv)
  o0, s0 = out["float64/gated_delta/64/100"]
  assert max_abs(o0, o_ref) <= 1e-10 and max_abs(s0, s_t_bthkv[:, -1]) <= 1e-10


def test_limit_vector_decay_with_constant_gate_is_scalar_decay():
  """Vector-decay GLA whose gate is the same for every key channel == the scalar-decay form."""
  cases = default_cases("float64")
  scalar = cases["float64/gla_scalar/16/37"]
  cases["float64/gla_vector/16/37"] = dict(scalar, log_alpha=np.repeat(scalar["log_alpha"][..., None], K, axis=-1))
  out = run(cases)
  (o_v, s_v), (o_s, s_s) = out["float64/gla_vector/16/37"], out["float64/gla_scalar/16/37"]
  assert max_abs(o_v, o_s) <= 1e-12 and max_abs(s_v, s_s) <= 1e-12


def test_limit_retnet_parallel_form():
  """RetNet decay gamma_h = 1 - 2^(-5-h), zero initial state: O = s((Q K^T) * D) V with D_rs = gamma^(r-s) for
  r >= s, and the final state is sum_s gamma^(T-1-s) k_s v_s^T."""
  cases, t = default_cases("float64"), 100
  inp = cases["float64/gla_scalar/64/100"] = dict(cases["float64/gla_scalar/64/100"])
  gamma_h = 1 - 2.0 ** (-5 - np.arange(H))
  inp["log_alpha"] = np.broadcast_to(np.log(gamma_h), (B, t, H)).copy()
  inp["s0"] = np.zeros_like(inp["s0"])
  o, s = run(cases)["float64/gla_scalar/64/100"]
  r = np.arange(t)
  d_hts = np.where(r[:, None] >= r[None, :], gamma_h[:, None, None] ** (r[:, None] - r[None, :]), 0.0)
  scores_bhts = np.einsum("bthk,bshk->bhts", inp["q"], inp["k"]) * K ** -0.5 * d_hts
  o_ref = np.einsum("bhts,bshv->bthv", scores_bhts, inp["v"])
  s_ref = np.einsum("hs,bshk,bshv->bhkv", gamma_h[:, None] ** (t - 1 - r), inp["k"], inp["v"])
  assert max_abs(o, o_ref) <= 1e-10 and max_abs(s, s_ref) <= 1e-10


def test_limit_delta_rule_overwrites_with_orthonormal_keys():
  """Delta rule with beta = 1 and orthonormal keys: S_T^T k_i = v_i for each of them. Here the last K of 37 keys
  are orthonormal (beta = 1 there), after random tokens and a random initial state, which they must overwrite."""
  cases, t = default_cases("float64"), 37
  inp = cases["float64/delta/16/37"] = dict(cases["float64/delta/16/37"])
  basis = np.linalg.qr(np.random.default_rng(10).standard_normal((B, H, K, K)))[0]  # orthonormal columns
  inp["k"], inp["beta"] = inp["k"].copy(), inp["beta"].copy()
  inp["k"][:, t - K:] = np.moveaxis(basis, 3, 1)  # token i of the last K gets column i
  inp["beta"][:, t - K:] = 1.0
  _, s = run(cases)["float64/delta/16/37"]
  read_bihv = np.einsum("bhkv,bihk->bihv", np.asarray(s), inp["k"][:, t - K:])
  assert max_abs(read_bihv, inp["v"][:, t - K:]) <= 1e-10
