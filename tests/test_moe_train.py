"""MoE in the trainer: aux-loss-free bias balancing once per step, per-layer load metrics, expert parallelism.

The balancing bias is non-parameter state that the forward pass feeds (expert counts, summed over every
microbatch) and `after_step` moves once per optimizer step; these tests pin that bookkeeping to the loads the
step reports.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest

from scalezoo import configs
from scalezoo.train.sharding import make_mesh
from scalezoo.train.step import make_program
from tests.test_trainer import ONE_DEVICE, host, train_batches

pytestmark = pytest.mark.usefixtures("fast_compile")


def moe_cfg(family="moe", **moe):
  cfg = configs.load(f"{family}:tiny")
  cfg.train.update(dict(steps=4, batch_size=8, seq_len=32, compute_dtype="float32", schedule="constant",
                        warmup=0, eval_batches=1, log_every=1))
  cfg.model.moe.update(moe)
  return cfg


def _leaves(tree, name):
  return [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree) if name in jax.tree_util.keystr(p)]


def test_bias_moves_once_per_step_against_the_whole_batch_load():
  # Two microbatches: the counts of both add up before the one update (one microbatch is the simpler case).
  cfg = moe_cfg(bias_balancing=True, bias_rate=0.01)
  cfg.train.microbatches = 2
  mesh = make_mesh(cfg.mesh, ONE_DEVICE)
  with jax.set_mesh(mesh):
    program = make_program(cfg, mesh)
    state = program.init()
    (bias0,) = _leaves(state["rest"], "router_bias")
    assert bias0.shape == (cfg.model.depth, cfg.model.moe.num_experts) and not bias0.any()
    batch = jax.device_put(train_batches(cfg, 1)[0], program.batch_sharding)
    state, metrics = program.train_step(state, batch)
  load = np.asarray(metrics["layer/moe_load"])  # [layers, experts], fraction of the step's assignments
  np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
  (bias1,) = _leaves(state["rest"], "router_bias")
  (pending,) = _leaves(state["rest"], "expert_load")
  want = -0.01 * np.sign(load - load.mean(-1, keepdims=True))
  np.testing.assert_allclose(bias1, want, atol=1e-7)  # one update per step, from the whole batch's load
  assert not pending.any()  # the counts start again at the next step
  # The bias is state, not a parameter: nothing of it reaches the optimizer.
  assert not _leaves(state["params"], "router_bias") and not _leaves(state["opt"], "router_bias")


@pytest.mark.parametrize("capacity_factor,mesh", [(0.0, dict(data=1, fsdp=2, expert=4)),
                                                   (8.0, dict(data=1, fsdp=4, expert=2))], ids=["dropless", "capacity"])
def test_expert_parallel_equals_one_device(capacity_factor, mesh):
  """Experts split over the `expert` axis (tokens too): the same losses as one device. Dropless on `expert=2` x
  `fsdp=4` is test_parallel's `ep` preset run; here dropless on `expert=4` and capacity on `expert=2,fsdp=4`.

  Capacity 8 = num_experts keeps every assignment (C >= k T on every device), where per-device capacity and
  the single device's global capacity agree."""
  from tests.test_trainer import _run_steps
  cfg = moe_cfg(capacity_factor=capacity_factor)
  batches = train_batches(cfg, 2)
  _, ref, _ = _run_steps(cfg, ONE_DEVICE, batches)
  for mesh in (mesh,):
    c = copy.deepcopy(cfg)
    c.mesh.update(mesh)
    _, losses, state = _run_steps(c, jax.devices(), batches)
    np.testing.assert_allclose(losses, ref, rtol=2e-5, err_msg=str(mesh))
    w = [v for p, v in jax.tree_util.tree_leaves_with_path(state["params"]) if "w_gate" in jax.tree_util.keystr(p)]
    assert w and all("expert" in str(leaf.sharding.spec) for leaf in w)  # the experts really are split
