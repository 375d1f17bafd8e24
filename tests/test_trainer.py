"""Trainer: gradient accumulation, sharded == single device, schedules, decay mask, the non-finite guard,
run outputs, run-directory claims and MFU helpers (bench: test_bench.py).

Compiles dominate the cost on CPU, so every test uses one tiny config (`tiny_cfg`) whose jitted programs are
identical wherever the mesh is: `constant` schedule with no warmup makes the step independent of
`train.steps`, and host-only keys (steps, logging, eval batches, checkpoints) never reach the HLO. A
persistent compilation cache (a fresh directory per pytest session, shared with test_cli.py) then lets each
distinct program compile once per session even though every `train()` call builds new jitted functions.
Distinct programs: 1-device init/step/eval, its microbatches=4 step, its NaN-injecting step/eval, and
init/step on the 8-device meshes fsdp=4,tensor=2 (sharded test, test_bench) and fsdp=8 (test_bench, test_cli).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalezoo import configs, models
from scalezoo.configs import ConfigError
from scalezoo.train import metrics as metrics_lib
from scalezoo.train import step as step_lib
from scalezoo.train.checkpoint import Checkpointer
from scalezoo.train.data import make_train_iterator
from scalezoo.train.metrics import mfu, peak_flops_per_device, read_jsonl
from scalezoo.train.optim import decay_mask, make_optimizer, make_schedule
from scalezoo.train.sharding import make_mesh
from scalezoo.train.step import abstract_split, make_program
from scalezoo.train.trainer import train

ONE_DEVICE = jax.devices()[:1]
BATCH, SEQ = 8, 32


pytestmark = pytest.mark.usefixtures("fast_compile")


def tiny_cfg(**train):
  """dense:tiny at batch 8 x seq 32, float32 compute, constant lr, one eval batch, checkpoint only at the end."""
  cfg = configs.load("dense:tiny")
  cfg.train.update(dict(steps=4, batch_size=BATCH, seq_len=SEQ, compute_dtype="float32", schedule="constant",
                        warmup=0, eval_batches=1, log_every=1))
  cfg.checkpoint.every = 0
  cfg.train.update(train)
  return cfg


def train_batches(cfg, num_steps=None):
  """The batches train() feeds, recomputed on the host with the trainer's arguments."""
  t = cfg.train
  return list(make_train_iterator(cfg.data, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed,
                                  num_steps=num_steps or t.steps))


def host(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def trees_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(host(a), host(b), strict=True))


def restore_with_init(cfg, workdir, devices=ONE_DEVICE):
  """(step, restored state, freshly initialised state) for the run in `workdir`, both on the host."""
  mesh = make_mesh(cfg.mesh, devices)
  with jax.set_mesh(mesh):
    program = make_program(cfg, mesh)
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      step, state, _ = ckpt.restore_latest(program.abstract_state())
    return step, jax.device_get(state), jax.device_get(program.init())


def rel(a, b) -> float:
  return abs(a - b) / max(abs(b), 1e-30)


# --------------------------------------------------------------------------------------------------------------
# 1. gradient accumulation


def test_grad_accumulation_equals_full_batch():
  cfg1, cfg4 = tiny_cfg(), tiny_cfg(microbatches=4)
  batch = train_batches(cfg1, 1)[0]
  mesh = make_mesh(cfg1.mesh, ONE_DEVICE)
  with jax.set_mesh(mesh):
    full, accum = make_program(cfg1, mesh), make_program(cfg4, mesh)
    state = full.init()
    state_copy = jax.tree.map(jnp.copy, state)  # train_step donates its state
    b = jax.device_put(batch, full.batch_sharding)
    # The accumulating step really scans: its program has a loop the full-batch one lacks.
    loops = lambda p, s: p.train_step.lower(s, b).as_text().count("stablehlo.while")
    assert loops(accum, state_copy) > loops(full, state)
    s1, m1 = full.train_step(state, b)
    s4, m4 = accum.train_step(state_copy, b)
  m1, m4 = jax.device_get(m1), jax.device_get(m4)
  for key in ("loss", "ce", "grad_norm"):
    assert rel(float(m4[key]), float(m1[key])) < 1e-5, (key, m4[key], m1[key])
  assert int(m1["nonfinite"]) == int(m4["nonfinite"]) == 0
  # Adam's first update is g / (|g| + eps) ~ lr * sign(g): params hide the gradient's scale and magnify float
  # noise where |g| is tiny, so they match to 1% of lr (a wrong gradient flips signs: 2 * lr). Adam's moments
  # hold the (clipped) gradient itself: they match to 1e-5 in norm, leaf by leaf.
  lr = cfg1.train.lr
  for p4, p1 in zip(host(s4["params"]), host(s1["params"]), strict=True):
    np.testing.assert_allclose(p4, p1, rtol=1e-5, atol=1e-2 * lr)
  for o4, o1 in zip(host(s4["opt"]), host(s1["opt"]), strict=True):
    assert np.linalg.norm(o4 - o1) <= 1e-5 * np.linalg.norm(o1), (np.linalg.norm(o4 - o1), np.linalg.norm(o1))


# --------------------------------------------------------------------------------------------------------------
# 2. sharded == single device


def _run_steps(cfg, devices, batches):
  mesh = make_mesh(cfg.mesh, devices)
  with jax.set_mesh(mesh):
    program = make_program(cfg, mesh)
    state = program.init()
    init_params = host(state["params"])
    losses = []
    for batch in batches:
      state, m = program.train_step(state, jax.device_put(batch, program.batch_sharding))
      losses.append(float(m["loss"]))
  return init_params, losses, state


def test_sharded_equals_single_device():
  cfg = tiny_cfg()
  sharded_cfg = copy.deepcopy(cfg)
  sharded_cfg.mesh.update(dict(data=1, fsdp=4, tensor=2))
  batches = train_batches(cfg, 3)
  init1, losses1, _ = _run_steps(cfg, ONE_DEVICE, batches)
  init8, losses8, state8 = _run_steps(sharded_cfg, jax.devices(), batches)
  for a, b in zip(init8, init1, strict=True):  # the same initial values whatever the layout
    np.testing.assert_array_equal(a, b)
  assert all(math.isfinite(x) for x in losses1)
  assert losses1[-1] != losses1[0]  # the steps do something
  for s8, s1 in zip(losses8, losses1, strict=True):
    assert rel(s8, s1) < 1e-5, (losses8, losses1)
  # The params really are split: some kernel over both fsdp and tensor, its local shard 1/8 of the array.
  specs = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state8["params"]):
    flat = [a for entry in leaf.sharding.spec if entry
            for a in ((entry,) if isinstance(entry, str) else entry)]
    if "fsdp" in flat and "tensor" in flat:
      specs.append(jax.tree_util.keystr(path))
      assert leaf.addressable_shards[0].data.size * 8 == leaf.size
  assert any("kernel" in p for p in specs), specs


# --------------------------------------------------------------------------------------------------------------
# 3. schedules


def _lrs(steps, **train):
  cfg = tiny_cfg(steps=steps, **train)
  schedule = make_schedule(cfg.train)
  return [float(schedule(c)) for c in range(steps)]


def test_schedule_constant_with_warmup():
  lrs = _lrs(10, schedule="constant", lr=1e-3, warmup=4)
  np.testing.assert_allclose(lrs, [2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 7, rtol=1e-6)


def test_schedule_cosine():
  lr, end, warmup, steps = 1e-3, 1e-4, 2, 10
  lrs = _lrs(steps, schedule="cosine", lr=lr, warmup=warmup, min_lr_ratio=0.1)
  np.testing.assert_allclose(lrs[:2], [5e-4, 1e-3], rtol=1e-6)  # linear warmup, first update already moves
  expected = [end + (lr - end) * 0.5 * (1 + math.cos(math.pi * (c + 1 - warmup) / (steps - warmup)))
              for c in range(warmup, steps)]
  np.testing.assert_allclose(lrs[warmup:], expected, rtol=1e-5)
  assert lrs[5] == pytest.approx(5.5e-4, rel=1e-5)  # halfway through the decay
  assert lrs[-1] == pytest.approx(end, rel=1e-6)  # the last update (count = steps - 1) uses lr * min_lr_ratio
  assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))


def test_schedule_wsd():
  lrs = _lrs(10, schedule="wsd", lr=1e-3, warmup=2, min_lr_ratio=0.1, decay_fraction=0.2)
  # warmup 2 updates, stable through update 7, then linear to lr * 0.1 over the last 2 updates (20%).
  np.testing.assert_allclose(lrs, [5e-4, 1e-3] + [1e-3] * 6 + [5.5e-4, 1e-4], rtol=1e-5)
  lrs = _lrs(20, schedule="wsd", lr=2e-3, warmup=0, min_lr_ratio=0.0, decay_fraction=0.25)
  np.testing.assert_allclose(lrs[:15], [2e-3] * 15, rtol=1e-6)
  np.testing.assert_allclose(lrs[15:], [2e-3 * (1 - k / 5) for k in range(1, 6)], rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------------------------------------------
# 4. weight-decay mask


def _canonical(path) -> str:
  """Param path without the layer index, so loop ([layers][i]) and scan ([layers]) layouts compare."""
  keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  keys = [k for k in keys if k != "value"]
  if len(keys) > 1 and keys[0] == "layers" and keys[1].isdigit():
    del keys[1]
  return "/".join(keys)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_decay_mask_matrices_only(scan_layers):
  cfg = tiny_cfg(scan_layers=scan_layers, weight_decay=0.5, lr=1e-2)
  _, abs_params, _ = abstract_split(cfg)
  mask = {}
  for path, flag in jax.tree_util.tree_leaves_with_path(decay_mask(abs_params)):
    name = _canonical(path)
    assert mask.setdefault(name, bool(flag)) == bool(flag), name  # every layer alike
  assert mask == {
      "embed/embedding": True, "final_norm/scale": False,
      "layers/blocks/0/channel/down/kernel": True, "layers/blocks/0/channel/gate/kernel": True,
      "layers/blocks/0/channel/up/kernel": True, "layers/blocks/0/channel_norm/scale": False,
      "layers/blocks/0/mixer/k/kernel": True, "layers/blocks/0/mixer/o/kernel": True,
      "layers/blocks/0/mixer/q/kernel": True, "layers/blocks/0/mixer/v/kernel": True,
      "layers/blocks/0/mixer_norm/scale": False,
  }
  # The optimizer applies it: with zero gradients Adam's part is 0, so the update is -lr * wd * p exactly
  # where decayed and 0 elsewhere.
  tx, _ = make_optimizer(cfg.train, abs_params)
  params = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype), abs_params)
  updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p))(params)
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    want = -1e-2 * 0.5 * 2.0 if mask[_canonical(path)] else 0.0
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=_canonical(path))


# --------------------------------------------------------------------------------------------------------------
# 5. non-finite guard


def _nan_if_first_token_divisible_by_3(original):
  def loss_fn(graphdef, params, rest, batch_bt):
    loss, aux = original(graphdef, params, rest, batch_bt)
    return loss * jnp.where(batch_bt[0, 0] % 3 == 0, jnp.nan, 1.0), aux
  return loss_fn


def test_nonfinite_steps_are_skipped(tmp_path, monkeypatch):
  # make_program's grads_of looks `loss_fn` up as a module global when the step is traced (first call).
  monkeypatch.setattr(step_lib, "loss_fn", _nan_if_first_token_divisible_by_3(step_lib.loss_fn))
  cfg = tiny_cfg(steps=6, max_nonfinite=100)
  summary = train(cfg, str(tmp_path), devices=ONE_DEVICE, quiet=True)
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  batches = train_batches(cfg)
  expected = [int(b[0, 0] % 3 == 0) for b in batches]
  assert 0 < sum(expected) < len(expected) and expected[0] == 0, expected  # a mix, as the data fixes it
  assert [r["step"] for r in rows] == list(range(1, 7))
  assert [int(r["nonfinite"]) for r in rows] == expected
  assert [r["loss"] is None for r in rows] == [bool(e) for e in expected]  # NaN is written as null
  assert summary["status"] == "completed" and summary["steps"] == 6

  # Replay the same program on the same batches: a flagged step leaves params and optimizer state untouched.
  mesh = make_mesh(cfg.mesh, ONE_DEVICE)
  with jax.set_mesh(mesh):
    program = make_program(cfg, mesh)
    state = program.init()
    for batch, bad, row in zip(batches, expected, rows):
      before = jax.device_get({"params": state["params"], "opt": state["opt"]})
      state, m = program.train_step(state, jax.device_put(batch, program.batch_sharding))
      assert int(m["nonfinite"]) == bad
      assert trees_equal(before["params"], state["params"]) == bool(bad), row["step"]
      assert trees_equal(before["opt"], state["opt"]) == bool(bad), row["step"]
      if not bad:
        assert rel(float(m["loss"]), row["loss"]) < 1e-6
    replayed = jax.device_get(state["params"])
  step, restored, _ = restore_with_init(cfg, str(tmp_path))
  assert step == 6 and int(restored["step"]) == 6
  assert trees_equal(restored["params"], replayed)  # the trainer's final state is the replay's


def test_nonfinite_streak_stops_run(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(step_lib, "loss_fn", _nan_if_first_token_divisible_by_3(step_lib.loss_fn))
  tokens = tmp_path / "tokens.npy"
  np.save(tokens, np.full(20_000, 42, np.int32))  # every first token divisible by 3: every step NaN
  cfg = tiny_cfg(steps=20, max_nonfinite=3)
  cfg.data.update(dict(source="tokens", path=str(tokens)))
  workdir = tmp_path / "run"
  summary = train(cfg, str(workdir), devices=ONE_DEVICE, quiet=True)
  assert summary["status"] == "nonfinite"
  # Stops once 3 in a row are seen; metrics arrive one step behind, so at most one more step was dispatched.
  assert 3 <= summary["steps"] <= 4, summary["steps"]
  rows = read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1))
  assert all(r["nonfinite"] == 1 and r["loss"] is None for r in rows)
  assert json.loads((workdir / "summary.json").read_text())["status"] == "nonfinite"
  err = capsys.readouterr().err
  assert "non-finite" in err and "train.max_nonfinite=3" in err
  step, restored, init = restore_with_init(cfg, str(workdir))
  assert step == summary["steps"]
  assert trees_equal(restored["params"], init["params"])  # the last good state is the initial one
  assert trees_equal(restored["opt"], init["opt"])


# --------------------------------------------------------------------------------------------------------------
# 6. run outputs (and 8. the trainer's MFU with a peak override)


def test_run_outputs_and_loss_decreases(tmp_path):
  cfg = tiny_cfg(steps=20, peak_flops=1e12)
  summary = train(cfg, str(tmp_path), devices=ONE_DEVICE, quiet=True)
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json", "metrics.jsonl", "summary.json"]
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  tokens_per_step = BATCH * SEQ
  flops_per_token = models.flops_per_token(cfg.model, SEQ)
  assert [r["step"] for r in rows] == list(range(1, 21))
  for r in rows:
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "ce", "nonfinite"} <= set(r)
    assert r["tokens"] == r["step"] * tokens_per_step
    assert r["lr"] == pytest.approx(cfg.train.lr, rel=1e-6)
    assert r["loss"] == pytest.approx(r["ce"], rel=1e-6)  # dense has no auxiliary losses
    assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 and r["nonfinite"] == 0
  for r in rows[1:]:
    assert r["tokens_per_s"] > 0
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops_per_token / 1e12, rel=1e-6)
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, (rows[0]["loss"], rows[-1]["loss"])

  on_disk = json.loads((tmp_path / "summary.json").read_text())
  for key in ("params", "flops_per_token", "tokens", "steps", "loss", "eval_loss", "eval_bpb", "tokens_per_s",
              "mfu", "wall_s", "status"):
    assert key in on_disk and key in summary, key
  assert on_disk["params"] == models.param_counts(cfg.model)["total"] == 115008
  assert on_disk["flops_per_token"] == flops_per_token
  assert on_disk["steps"] == 20 and on_disk["tokens"] == 20 * tokens_per_step
  assert on_disk["status"] == "completed"
  assert on_disk["loss"] == pytest.approx(rows[-1]["loss"])
  assert on_disk["eval_loss"] == pytest.approx(rows[-1]["eval_loss"])
  assert on_disk["eval_bpb"] == pytest.approx(on_disk["eval_loss"] / math.log(2), rel=1e-9)  # bytes: 1 per token
  assert 0 < on_disk["eval_loss"] < math.log(256)
  assert on_disk["peak_flops_per_device"] == 1e12
  assert on_disk["tokens_per_s"] > 0 and on_disk["wall_s"] > 0
  assert on_disk["mfu"] == pytest.approx(on_disk["tokens_per_s"] * flops_per_token / 1e12, rel=1e-6)
  assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 20


# --------------------------------------------------------------------------------------------------------------
# 7. an existing run directory


def _snapshot(workdir):
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def test_existing_workdir(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  cfg = tiny_cfg(steps=4)
  cfg.checkpoint.every = 2
  first = train(cfg, workdir, devices=ONE_DEVICE, quiet=True)
  losses = [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
  assert first["status"] == "completed" and len(losses) == 4
  before = _snapshot(workdir)

  other = copy.deepcopy(cfg)
  other.train.eval_batches = 2
  with pytest.raises(ConfigError, match=r"train\.eval_batches: 1 -> 2.*overwrite"):
    train(other, workdir, devices=ONE_DEVICE, quiet=True)
  assert _snapshot(workdir) == before  # config.json, metrics.jsonl, summary, checkpoints: byte-identical

  other.overwrite = True
  capsys.readouterr()
  replaced = train(other, workdir, devices=ONE_DEVICE, quiet=False)
  assert "resuming" not in capsys.readouterr().err  # a fresh run: the old checkpoints were removed
  stored = json.loads(open(os.path.join(workdir, "config.json")).read())
  assert stored["train"]["eval_batches"] == 2 and "overwrite" not in stored
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and replaced["steps"] == 4
  np.testing.assert_allclose([r["loss"] for r in rows], losses, rtol=1e-6)  # same seed, same numbers

  # The same config resumes: drop the final checkpoint so it continues from step 2.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  other.overwrite = False
  resumed = train(other, workdir, devices=ONE_DEVICE, quiet=False)
  assert "from step 2" in capsys.readouterr().err
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]  # no duplicated rows
  assert resumed["steps"] == 4 and resumed["status"] == "completed"
  np.testing.assert_allclose([r["loss"] for r in rows], losses, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# 8. MFU helpers


def test_peak_flops_and_mfu():
  gpu = lambda kind: types.SimpleNamespace(platform="gpu", device_kind=kind)
  assert peak_flops_per_device(5e12, gpu("NVIDIA H100 80GB HBM3")) == 5e12  # override wins
  assert peak_flops_per_device(0.0, gpu("NVIDIA H100 80GB HBM3")) == 989e12
  assert peak_flops_per_device(0.0, types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")) == 197e12
  assert peak_flops_per_device(0.0, types.SimpleNamespace(platform="tpu", device_kind="TPU v5p")) == 459e12
  assert peak_flops_per_device(0.0, gpu("Some Future Accelerator")) is None
  assert peak_flops_per_device(7.0, gpu("Some Future Accelerator")) == 7.0
  assert peak_flops_per_device(0.0, jax.devices()[0]) == metrics_lib.cpu_peak_flops() > 0
  assert math.isnan(mfu(1000.0, 1e6, 2, None))
  assert math.isnan(mfu(float("nan"), 1e6, 2, 1e9))
  assert mfu(1000.0, 1e6, 2, 1e9) == pytest.approx(0.5)

