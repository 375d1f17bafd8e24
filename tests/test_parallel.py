"""Parallelism: presets, DCN meshes, divisibility errors, resharding restore, sweep packing, and two processes.

Every comparison is between runs of the same tiny config (test_trainer.tiny_cfg), so most programs come from
the session's compilation cache. The two-process test starts two CPU processes of 4 devices each that talk
through gloo, and checks they train exactly what one process of 8 devices trains.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from scalezoo import configs, models
from scalezoo.configs import ConfigError
from scalezoo.train import sharding
from scalezoo.train import sweep as sweep_lib
from scalezoo.train.checkpoint import Checkpointer
from scalezoo.train.cli import main
from scalezoo.train.metrics import read_jsonl
from scalezoo.train.sharding import make_mesh
from scalezoo.train.step import make_program
from scalezoo.train.trainer import train
from tests.test_trainer import ONE_DEVICE, _run_steps, host, tiny_cfg, train_batches

pytestmark = pytest.mark.usefixtures("fast_compile")


def _mesh_cfg(**kw):
  cfg = tiny_cfg()
  cfg.mesh.update(kw)
  return cfg.mesh


# --------------------------------------------------------------------------------------------------------------
# 1. presets and DCN axes


def test_presets_resolve_to_mesh_shapes():
  assert sharding.mesh_shape(_mesh_cfg(preset="dp"), 8) == dict(data=8, fsdp=1, tensor=1, expert=1)
  assert sharding.mesh_shape(_mesh_cfg(preset="fsdp"), 8) == dict(data=1, fsdp=8, tensor=1, expert=1)
  assert sharding.mesh_shape(_mesh_cfg(preset="fsdp_tp", tensor=2), 8) == dict(data=1, fsdp=4, tensor=2, expert=1)
  assert sharding.mesh_shape(_mesh_cfg(preset="ep", expert=4), 8) == dict(data=1, fsdp=2, tensor=1, expert=4)
  with pytest.raises(ConfigError, match="mesh.tensor=1: mesh.preset=fsdp_tp shards over tensor"):
    sharding.mesh_shape(_mesh_cfg(preset="fsdp_tp"), 8)
  with pytest.raises(ConfigError, match="mesh.data=2: mesh.preset=fsdp uses only mesh.fsdp"):
    sharding.mesh_shape(_mesh_cfg(preset="fsdp", data=2), 8)
  with pytest.raises(ConfigError, match="mesh.preset='zero3'"):
    sharding.mesh_shape(_mesh_cfg(preset="zero3"), 8)


def test_dcn_axes_multiply_slice_sizes():
  # Two slices of 4 devices: mesh.* describe a slice, dcn_data spans the slices.
  assert sharding.mesh_shape(_mesh_cfg(dcn_data=2), 8) == dict(data=2, fsdp=4, tensor=1, expert=1)
  assert sharding.mesh_shape(_mesh_cfg(dcn_fsdp=2, tensor=2), 8) == dict(data=1, fsdp=4, tensor=2, expert=1)
  with pytest.raises(ConfigError, match="3 slices, which does not divide the 8 devices"):
    sharding.mesh_shape(_mesh_cfg(dcn_data=3), 8)
  # One process, no TPU slices: the devices form one granule, so two slices cannot be laid out.
  with pytest.raises(ConfigError, match=r"asks for 2 slices but the devices form 1 \(processes\)"):
    make_mesh(_mesh_cfg(dcn_data=2))


@pytest.mark.parametrize("family", sorted(models.FAMILIES))
def test_every_family_same_loss_under_every_preset(family):
  """Two steps under each preset that applies equal one device (ep only for families with experts)."""
  if family == "tokenformer":
    pytest.skip("tests/test_tokenformer.py runs fsdp=4,tensor=2 with param_tokens over tensor and over fsdp")
  # ParScale wraps another family: two streams over dense:tiny, with short prefixes.
  cfg = configs.load("parscale:dense:tiny,streams=2,prefix_len=4" if family == "parscale" else f"{family}:tiny")
  cfg.train.update(tiny_cfg().train.to_dict())
  batches = train_batches(cfg, 2)
  _, ref, _ = _run_steps(cfg, ONE_DEVICE, batches)
  presets = dict(dp={}, fsdp={}, fsdp_tp=dict(tensor=2))
  if "moe" in cfg.model:
    # fsdp splits the batch as dp does and the weights too, so for the (slow to compile) MoE families it
    # stands for dp; ep splits the experts.
    presets = dict(fsdp={}, fsdp_tp=dict(tensor=2), ep=dict(expert=2))
  if family == "moge":
    # The same parameter tree and layouts as moe (routing differs only in global math before dispatch), so
    # moe's dp/fsdp/fsdp_tp runs cover it; ep is where moge's routing meets the expert-parallel dispatch.
    presets = dict(ep=dict(expert=2))
  if family == "hybrid":
    # Gated DeltaNet 3:1: fsdp_tp shards the batch and weights over fsdp and the linear heads over tensor, the
    # layouts dp and fsdp alone only subset.
    presets = dict(fsdp_tp=dict(tensor=2))
  if family == "parscale":
    # fsdp_tp splits the stream-major batch over fsdp and the prefixes by kv head over tensor.
    presets = dict(fsdp_tp=dict(tensor=2))
  for preset, extra in presets.items():
    c = copy.deepcopy(cfg)
    c.mesh.update(dict(preset=preset, **extra))
    _, losses, state = _run_steps(c, jax.devices(), batches)
    np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=preset)
    if family == "parscale":  # [layers, streams, prefix_len, kv_heads, head_dim]
      assert state["params"]["layers"]["blocks"][0]["parscale"]["k"].sharding.spec[3] == "tensor"


def test_axis_that_does_not_divide_a_parameter_is_one_line(tmp_path, capsys):
  workdir = tmp_path / "run"
  code = main(["train", "--config", "dense:tiny", "--config.mesh.fsdp=1", "--config.mesh.tensor=8",
               "--workdir", str(workdir)])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert "does not divide over mesh axis tensor=8" in err and "mesh.rules=" in err, err
  assert not workdir.exists()  # failed before anything was written


# --------------------------------------------------------------------------------------------------------------
# 2. resharding restore


def test_checkpoint_restores_onto_other_meshes_and_training_continues(tmp_path):
  cfg = tiny_cfg(steps=4)
  cfg.mesh.update(dict(data=1, fsdp=8))
  cfg.checkpoint.every = 2
  workdir = tmp_path / "run"
  train(cfg, str(workdir), quiet=True)
  ref_losses = [r["loss"] for r in read_jsonl(str(workdir / "metrics.jsonl"))]
  # Back to the state of a run stopped at step 2 on 8 devices.
  shutil.rmtree(workdir / "checkpoints" / "4")
  os.remove(workdir / "summary.json")

  saved = {}
  for name, mesh_kw, devices in [("fsdp8", dict(data=1, fsdp=8), jax.devices()),
                                 ("data2_fsdp4", dict(data=2, fsdp=4), jax.devices()),
                                 ("fsdp4_on_4", dict(data=1, fsdp=-1), jax.devices()[:4]),
                                 ("one_device", dict(data=1, fsdp=-1), ONE_DEVICE)]:
    c = copy.deepcopy(cfg)
    c.mesh.update(mesh_kw)
    mesh = make_mesh(c.mesh, devices)
    with jax.set_mesh(mesh):
      program = make_program(c, mesh)
      with Checkpointer(str(workdir / "checkpoints")) as ckpt:
        step, state, _ = ckpt.restore_latest(program.abstract_state())
    assert step == 2
    leaves = jax.tree.leaves(state["params"])
    assert all(leaf.sharding.mesh.shape == mesh.shape for leaf in leaves)  # laid out on the new mesh
    saved[name] = host(state)
  for name, leaves in saved.items():
    for a, b in zip(leaves, saved["fsdp8"], strict=True):
      np.testing.assert_array_equal(a, b, err_msg=name)

  # Resume on 4 devices (the packing test's mesh, so one compile serves both): steps 3 and 4 come out as the
  # 8-device run had them.
  moved = copy.deepcopy(cfg)
  moved.mesh.update(dict(data=1, fsdp=-1))
  summary = train(moved, str(workdir), devices=jax.devices()[:4], quiet=True)
  assert summary["status"] == "completed" and summary["steps"] == 4 and summary["mesh"]["fsdp"] == 4
  losses = [r["loss"] for r in read_jsonl(str(workdir / "metrics.jsonl"))]
  assert len(losses) == 4
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# 3. sub-mesh packing


def _packing_sweep(devices_per_run: int) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.base = "dense:tiny"
  s.fixed = dict(train=dict(batch_size=8, seq_len=32, compute_dtype="float32", schedule="constant", warmup=0,
                            eval_batches=1, log_every=1, steps=3), checkpoint=dict(every=0))
  s.grid = dict(train=dict(seed=[0, 1, 2]))
  s.devices_per_run = devices_per_run
  return s


def test_device_groups_and_plan():
  groups = sweep_lib.device_groups(2)
  assert [[d.id for d in g] for g in groups] == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert sweep_lib.device_groups(0) == [sorted(jax.devices(), key=lambda d: d.id)]
  with pytest.raises(ConfigError, match="devices_per_run=3"):
    sweep_lib.device_groups(3)
  runs = sweep_lib.run_configs(_packing_sweep(4), 4)
  runs[0][1].train.steps = 30  # the biggest run gets a group to itself
  assert sweep_lib.plan(runs, 2) == [0, 1, 1]


def test_packed_sweep_equals_runs_one_by_one(tmp_path):
  """Two runs at once on devices 0-3 and 4-7; the one on 4-7 equals the same run alone on devices 0-3."""
  s = _packing_sweep(4)
  s.grid.train.seed = [0, 1]
  rows = sweep_lib.sweep(s, str(tmp_path / "packed"), quiet=True)
  assert [r["status"] for r in rows] == ["completed"] * 2
  (_, cfg0), (name, cfg) = sweep_lib.run_configs(s, 4)
  assert sweep_lib.plan([(None, cfg0), (name, cfg)], 2) == [0, 1]  # seed1 ran on the second group
  alone = train(cfg, str(tmp_path / "alone"), devices=jax.devices()[:4], quiet=True)
  packed_dir = tmp_path / "packed" / "runs" / name
  summary = json.loads((packed_dir / "summary.json").read_text())
  assert summary["devices"] == 4 and summary["mesh"]["fsdp"] == 4
  assert summary["eval_loss"] == alone["eval_loss"] and summary["loss"] == alone["loss"]
  packed_losses = [r["loss"] for r in read_jsonl(str(packed_dir / "metrics.jsonl"))]
  assert packed_losses == [r["loss"] for r in read_jsonl(str(tmp_path / "alone" / "metrics.jsonl"))]
  assert rows[0]["eval_loss"] != rows[1]["eval_loss"]  # the two seeds really are two runs
  with open(tmp_path / "packed" / "results.csv") as f:
    assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["seed0", "seed1"]


# --------------------------------------------------------------------------------------------------------------
# 4. two processes x 4 devices == one process x 8 devices


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  flags = ["--config", "dense:tiny", "--config.train.steps=3", "--config.train.batch_size=8",
           "--config.train.seq_len=32", "--config.train.compute_dtype=float32", "--config.train.schedule=constant",
           "--config.train.warmup=0", "--config.train.eval_batches=2", "--config.train.log_every=1",
           "--config.checkpoint.every=0", "--quiet"]
  # Each process is one DCN granule: dcn_data=2 lays data across the processes, fsdp=4 within each (the
  # hybrid mesh of multi-slice jobs), the same data=2,fsdp=4 shape the one-process run uses.
  two_flags = ["--config.mesh.dcn_data=2", "--config.mesh.fsdp=-1"]
  # The same XLA flags as this process (compiler emitters included), but 4 devices per process.
  xla_flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8",
                                              "--xla_force_host_platform_device_count=4")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  multi = tmp_path / "two"
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "scalezoo.train.cli", "train", *flags, *two_flags,
                             "--workdir", str(multi),
                             "--coordinator", f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]

  # The reference runs on fsdp=8 (programs the resharding test compiled already); another mesh adds float
  # reduction-order differences only, hence rtol 1e-5 rather than bitwise.
  single = tmp_path / "one"
  cfg = tiny_cfg(steps=3, eval_batches=2)
  cfg.mesh.update(dict(data=1, fsdp=8))
  train(cfg, str(single), quiet=True)
  two_rows, one_rows = read_jsonl(str(multi / "metrics.jsonl")), read_jsonl(str(single / "metrics.jsonl"))
  assert [r["step"] for r in two_rows] == [1, 2, 3]  # process 0 alone wrote the metrics
  np.testing.assert_allclose([r["loss"] for r in two_rows], [r["loss"] for r in one_rows], rtol=1e-5)
  s2 = json.loads((multi / "summary.json").read_text())
  s1 = json.loads((single / "summary.json").read_text())
  assert s2["devices"] == 8 and s2["mesh"]["data"] == 2 and s2["mesh"]["fsdp"] == 4
  assert math.isclose(s2["eval_loss"], s1["eval_loss"], rel_tol=1e-5)

  # The checkpoint both processes wrote restores in one process and equals the one-process run's state.
  states = []
  for workdir in (multi, single):
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
      program = make_program(cfg, mesh)
      with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        step, state, data_state = ckpt.restore_latest(program.abstract_state())
    assert step == 3
    states.append(host(state["params"]))
  # Adam divides by sqrt(v): a float-order difference in a near-zero gradient moves its update by up to ~1e-7
  # (seen: one of 24576 entries at 1.2e-7), against lr-sized (3e-3) updates.
  for a, b in zip(*states, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bucket_url_workdir_is_one_line(capsys):
  code = main(["train", "--config", "dense:tiny", "--workdir", "gs://bucket/run"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and "mount the bucket" in err, err
