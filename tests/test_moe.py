"""MoE routing, dispatch, losses and the MoE channel mixer against the invariants of variants.md sections 3-4.

Inputs come from numpy (an eager jax.random call compiles once per shape on CPU) and sizes are tiny.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalezoo.models import moe

# Routing under jit: one compile per configuration is cheaper on CPU than many eager ops.
route = jax.jit(moe.route, static_argnames=("top_k", "routing", "score", "renormalize", "groups", "topk_groups",
                                            "route_scale"))
dropless = jax.jit(moe.dropless)
capacity_dispatch = jax.jit(moe.capacity_dispatch, static_argnames="capacity_factor")

pytestmark = pytest.mark.usefixtures("fast_compile")

T, N, K, D, F = 12, 4, 2, 8, 16


def rand(seed, *shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def distinct_idx(seed, t=T, n=N, k=K):
  """k distinct experts per token, uniformly at random."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.stack([rng.permutation(n)[:k] for _ in range(t)]), jnp.int32)


def weights(seed=0, n=N):
  return rand(seed, n, D, F, scale=0.3), rand(seed + 1, n, D, F, scale=0.3), rand(seed + 2, n, F, D, scale=0.3)


def loop_reference(x, idx, gates, wg, wu, wd):
  """y = sum_e g_e(x) FFN_e(x), g_e = 0 where e is not selected: an explicit loop over experts."""
  y = jnp.zeros_like(x)
  for e in range(wg.shape[0]):
    g_t = jnp.sum(jnp.where(idx == e, gates, 0.0), axis=-1)
    h = jax.nn.silu(x @ wg[e]) * (x @ wu[e])
    y = y + g_t[:, None] * (h @ wd[e])
  return y


def assert_rel(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b), np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------------------------------------- dispatch


def test_dropless_matches_loop_over_experts_with_gradients():
  x, idx, gates = rand(10, T, D), distinct_idx(0), jax.nn.softmax(rand(11, T, K))
  args = (x, gates) + weights()
  assert_rel(dropless(x, idx, gates, *weights()), jax.jit(loop_reference)(x, idx, gates, *weights()))
  c = rand(12, T, D)

  def loss(fn):
    return lambda x, g, wg, wu, wd: jnp.sum(c * fn(x, idx, g, wg, wu, wd))

  argnums = tuple(range(5))
  got = jax.jit(jax.grad(loss(moe.dropless), argnums))(*args)
  want = jax.jit(jax.grad(loss(loop_reference), argnums))(*args)
  for name, a, b in zip(("x", "gates", "w_gate", "w_up", "w_down"), got, want):
    assert_rel(a, b), name


def test_capacity_dispatch_equals_dropless_when_nothing_can_drop():
  x, idx, gates = rand(20, T, D), distinct_idx(1), jax.nn.softmax(rand(21, T, K))
  assert moe.capacity(float(N), K, T, N) >= K * T
  y, drop = capacity_dispatch(x, idx, gates, *weights(), capacity_factor=float(N))
  assert float(drop) == 0.0
  assert_rel(y, dropless(x, idx, gates, *weights()))


def test_drop_fraction_non_increasing_in_capacity_factor():
  # Skewed routing (expert 0 popular) so small buffers really drop.
  rng = np.random.default_rng(3)
  idx = jnp.asarray([[0, rng.integers(1, N)] if rng.random() < 0.7 else rng.permutation(N)[:K] for _ in range(T)],
                    jnp.int32)
  x, gates = rand(30, T, D), jax.nn.softmax(rand(31, T, K))
  drops = [float(capacity_dispatch(x, idx, gates, *weights(), capacity_factor=cf)[1])
           for cf in (0.25, 0.5, 1.0, 2.0, 4.0)]
  assert drops[0] > 0 and drops[-1] == 0, drops
  assert all(a >= b for a, b in zip(drops, drops[1:])), drops


def test_dropped_assignments_contribute_zero_and_first_choices_win():
  # C = ceil(0.5 * 2 * 4 / 4) = 1. Token 0 routes (0, 1), token 1 (1, 0): both first choices fit and both second
  # choices find the buffer full (token-major order would keep all of token 0 and none of token 1). Tokens 2 and
  # 3 both route (2, 3): token 2 takes both buffers, so token 3 loses every slot and must get exactly 0.
  idx = jnp.asarray([[0, 1], [1, 0], [2, 3], [2, 3]], jnp.int32)
  x, gates = rand(40, 4, D), jax.nn.softmax(rand(41, 4, K))
  assert moe.capacity(0.5, K, 4, N) == 1
  y, drop = capacity_dispatch(x, idx, gates, *weights(), capacity_factor=0.5)
  first_only = gates * jnp.asarray([[1, 0], [1, 0], [1, 1], [0, 0]], jnp.float32)
  assert_rel(y, loop_reference(x, idx, first_only, *weights()))
  assert np.all(np.asarray(y[3]) == 0.0)
  assert float(drop) == pytest.approx(4 / 8)


# ----------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("groups,top_k", [(4, 4), (2, 4), (4, 8)])
def test_moge_places_k_over_g_experts_in_every_group(groups, top_k):
  n = 8
  logits = rand(50 + groups + top_k, 32, n, scale=3.0)
  idx, gates, probs = route(logits, top_k=top_k, routing="moge", groups=groups, renormalize=True)
  per_group = jax.vmap(lambda r: jnp.bincount(r // (n // groups), length=groups))(idx)
  assert np.all(np.asarray(per_group) == top_k // groups)
  assert float(moe.imbalance_score(idx, n, groups)) == 0.0
  # No renormalisation even when asked: the gates are the global-softmax entries.
  np.testing.assert_array_equal(gates, jnp.take_along_axis(jax.nn.softmax(logits), idx, axis=-1))


def test_moge_with_one_group_is_plain_topk_without_renormalisation():
  logits = rand(60, T, 8, scale=2.0)
  idx, gates, _ = route(logits, top_k=3, routing="moge", groups=1)
  probs = jax.nn.softmax(logits)
  top_vals, top_idx = jax.lax.top_k(probs, 3)
  np.testing.assert_array_equal(idx, top_idx)
  np.testing.assert_allclose(gates, top_vals, rtol=1e-6)
  assert np.all(np.asarray(jnp.sum(gates, -1)) < 1 - 1e-3)


def test_group_limited_selects_within_best_groups_and_bias_only_moves_indices():
  n, g, tg, k = 16, 4, 2, 4
  logits, bias = rand(70, 32, n, scale=2.0), rand(71, n, scale=0.5)
  idx, gates, _ = route(logits, top_k=k, routing="group_limited", score="sigmoid", groups=g,
                            topk_groups=tg, bias_n=bias, route_scale=2.5)
  s = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  sel = (s + np.asarray(bias)).reshape(32, g, n // g)
  group_score = np.sort(sel, axis=-1)[..., -2:].sum(-1)
  best = np.argsort(-group_score, axis=-1)[:, :tg]
  chosen = np.asarray(idx)
  for t in range(32):
    assert set(chosen[t] // (n // g)) <= set(best[t]), t
    allowed = np.where(np.isin(np.arange(n) // (n // g), best[t]), sel.reshape(32, n)[t], -np.inf)
    assert set(chosen[t]) == set(np.argsort(-allowed)[:k]), t
  s_at = np.take_along_axis(s, chosen, -1)
  np.testing.assert_allclose(gates, 2.5 * s_at / s_at.sum(-1, keepdims=True), rtol=1e-5)
  # Without the bias the indices differ, yet the gates are still the unbiased scores at whatever was chosen.
  idx0, _, _ = route(logits, top_k=k, routing="group_limited", score="sigmoid", groups=g, topk_groups=tg,
                         renormalize=False)
  assert np.any(np.asarray(idx0) != chosen)
  _, gates_raw, _ = route(logits, top_k=k, routing="topk", score="sigmoid", bias_n=bias, renormalize=False)
  idx_raw = route(logits, top_k=k, routing="topk", score="sigmoid", bias_n=bias)[0]
  np.testing.assert_allclose(gates_raw, np.take_along_axis(s, np.asarray(idx_raw), -1), rtol=1e-6)


def test_renormalised_gates_sum_to_one():
  for routing, kw in (("topk", {}), ("group_limited", dict(groups=2, topk_groups=1))):
    _, gates, _ = route(rand(80, T, N), top_k=K, routing=routing, renormalize=True, **kw)
    np.testing.assert_allclose(jnp.sum(gates, -1), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ losses


def test_balance_loss_is_one_when_uniform_and_larger_under_collapse():
  probs = jax.nn.softmax(jnp.zeros((8, N)))
  round_robin = jnp.asarray([[(K * t + j) % N for j in range(K)] for t in range(8)], jnp.int32)
  assert float(moe.balance_loss(probs, round_robin, N)) == pytest.approx(1.0, rel=1e-6)
  collapsed = jnp.tile(jnp.asarray([[0, 1]], jnp.int32), (8, 1))
  peaked = jax.nn.softmax(jnp.tile(jnp.asarray([[5.0, 5.0, 0.0, 0.0]]), (8, 1)))
  assert float(moe.balance_loss(peaked, collapsed, N)) > 1.5


def test_z_loss_sees_logit_shift_that_routing_ignores():
  logits = rand(90, T, N)
  z0, z1 = moe.z_loss(logits), moe.z_loss(logits + 3.0)
  assert float(z0) >= 0 and float(z1) > float(z0) + 1.0
  np.testing.assert_array_equal(route(logits, top_k=K)[0], route(logits + 3.0, top_k=K)[0])


def test_update_bias_moves_against_load():
  b = moe.update_bias(jnp.zeros(4), jnp.asarray([8.0, 2.0, 5.0, 5.0]), 0.1)
  np.testing.assert_allclose(b, [-0.1, 0.1, 0.0, 0.0])


# ------------------------------------------------------------------------------------------------ module


def make(**kw):
  kw.setdefault("rngs", nnx.Rngs(0))
  return moe.MoE(D, F, kw.pop("num_experts", N), kw.pop("top_k", K), **kw)


def test_shared_experts_are_added_ungated():
  m = make(shared_experts=2, balance_coef=1e-2, z_coef=1e-3)
  x = rand(100, 2, 6, D)
  call = nnx.jit(lambda m, x: m(x))
  y, aux = call(m, x)
  shared = m.shared
  m.shared = None
  y_routed, _ = call(m, x)
  assert_rel(y, y_routed + nnx.jit(lambda s, x: s(x))(shared, x))
  assert set(aux) == {"moe_balance", "moe_z", "metric/moe_drop_fraction", "metric/moe_imbalance",
                      "metric/moe_load_max", "layer/moe_load"}
  np.testing.assert_allclose(float(jnp.sum(aux["layer/moe_load"])), 1.0, rtol=1e-6)


def test_bias_is_not_a_param_and_gets_no_gradient():
  m = make(num_experts=8, routing="group_limited", score="sigmoid", groups=4, topk_groups=2, bias_balancing=True,
           router_scale=True)
  assert isinstance(m.router_bias, moe.RouterBias) and not isinstance(m.router_bias, nnx.Param)
  assert not any(v is m.router_bias for _, v in nnx.iter_graph(m) if isinstance(v, nnx.Param))
  m.router_bias[...] = rand(110, 8, scale=0.5)
  graphdef, bias_state, rest = nnx.split(m, moe.RouterBias, ...)
  x = rand(111, 2, 6, D)

  def f(bias_state, rest):
    return jnp.sum(nnx.merge(graphdef, bias_state, rest)(x)[0] ** 2)

  g_bias, g_rest = jax.jit(jax.grad(f, argnums=(0, 1)))(bias_state, rest)
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(g_bias))
  assert float(jnp.sum(jnp.abs(g_rest["router"][...]))) > 0  # the router still learns through the gates


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_experts=6, groups=4), "groups"),
    (dict(top_k=5), "top_k"),
    (dict(top_k=3, routing="moge", groups=2), "top_k"),
    (dict(groups=2, topk_groups=3, routing="group_limited"), "topk_groups"),
    (dict(routing="expert_choice"), "routing"),
])
def test_bad_arguments_raise_value_error(kwargs, name):
  with pytest.raises(ValueError, match=name):
    make(**kwargs)


@pytest.mark.parametrize("kw", [dict(), dict(routing="moge", groups=2, capacity_factor=1.25)])
def test_module_runs_under_jit_with_expert_axes(kw):
  m = make(**kw)
  y, aux = nnx.jit(lambda m, x: m(x))(m, rand(120, 2, 6, D))
  assert y.shape == (2, 6, D) and np.all(np.isfinite(np.asarray(y)))
  for w in (m.w_gate, m.w_up, m.w_down):
    assert w.get_metadata()["out_sharding"][0] == "experts"
  assert m.router.get_metadata()["out_sharding"] == ("embed", None)
  if kw.get("routing") == "moge":
    assert float(aux["metric/moe_imbalance"]) == 0.0
