"""Checkpointer: round trip, resharding on restore, retention, corrupt and interrupted saves, mismatches."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from scalezoo.train.checkpoint import CheckpointMismatchError, Checkpointer

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's marker for a save that was never committed


def mesh_2x4():
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)


def make_state(seed: int = 0):
  """Params with float32 and int32 leaves plus a real (nested, NamedTuple) optax state and a step counter.

  The matrices are sharded over 8 devices, as in training: a corrupt file then fails several shard reads at once.
  """
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  sharded = NamedSharding(mesh_2x4(), P("data", "fsdp"))
  params = {
      # Random (incompressible) and > 1 KiB, so stored as data files rather than inline in orbax's index.
      "embed": jax.device_put(jax.random.normal(k1, (128, 64), jnp.float32), sharded),
      "block": {"w": jax.device_put(jax.random.normal(k2, (32, 32), jnp.float32), sharded),
                "ids": jax.random.randint(k3, (16,), 0, 99)},
  }
  opt_state = optax.adamw(1e-3).init(params)
  opt_state = jax.tree.map(lambda x: x + 1, opt_state)  # not all zeros, so a wrong restore shows
  return {"params": params, "opt": opt_state, "step": jnp.asarray(7, jnp.int32)}


def abstract(state, sharding=None):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), state)


def as_numpy(x):
  return np.array(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def host_copy(state):
  return jax.tree.map(as_numpy, state)


def assert_bitwise_equal(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    got = as_numpy(got)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def save_steps(directory, steps, keep=3):
  states = {}
  with Checkpointer(str(directory), keep=keep) as ckpt:
    for step in steps:
      states[step] = make_state(step)
      assert ckpt.save(step, states[step], {"position": step, "epoch": 0})
  return states


def test_round_trip_is_bitwise_and_survives_donation(tmp_path):
  state, data_state = make_state(), {"position": 123, "files": ["a.py", "b.py"], "rng": [1, 2]}
  state["rng"] = jax.random.key(5)  # a typed PRNG key, stored by orbax as its key data
  expected = host_copy(state)
  target = abstract(state)
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.save(5, state, data_state)
  # The trainer donates the state's buffers right after save returns and keeps moving the iterator.
  jax.tree.map(lambda x: x.delete(), state)
  data_state["position"] = 999
  ckpt.wait()
  step, restored, restored_data = ckpt.restore_latest(target)
  assert step == 5 and ckpt.latest_step() == 5
  assert_bitwise_equal(restored, expected)
  assert restored_data == {"position": 123, "files": ["a.py", "b.py"], "rng": [1, 2]}
  # Saving a step that exists, or one older than the latest, is a no-op.
  assert not ckpt.save(5, make_state(), {})
  assert not ckpt.save(4, make_state(), {})
  ckpt.close()
  ckpt.close()


def test_restore_lands_on_requested_sharding_and_dtype(tmp_path):
  mesh = mesh_2x4()
  sharded = NamedSharding(mesh, P("data", "fsdp"))
  replicated = NamedSharding(mesh, P())
  # Saved sharded one way, restored another: resharding happens on read.
  w = jax.device_put(jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32), NamedSharding(mesh, P("fsdp", None)))
  state = {"w": w, "b": jnp.arange(8, dtype=jnp.float32), "step": jnp.asarray(3, jnp.int32)}
  expected = host_copy(state)
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(3, state, {})
  target = {
      "w": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=sharded),
      "b": jax.ShapeDtypeStruct((8,), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp"))),
      "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
  }
  with Checkpointer(str(tmp_path)) as ckpt:
    step, restored, _ = ckpt.restore_latest(target)
  assert step == 3
  for name, want in target.items():
    assert restored[name].sharding == want.sharding, name
    assert restored[name].dtype == want.dtype, name
  np.testing.assert_array_equal(np.asarray(restored["w"]), expected["w"])
  np.testing.assert_array_equal(np.asarray(restored["b"], np.float32), expected["b"])
  assert int(restored["step"]) == 3


def test_keep_leaves_only_the_newest(tmp_path):
  save_steps(tmp_path, [10, 20, 30, 40], keep=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["30", "40"]
  with Checkpointer(str(tmp_path), keep=2) as ckpt:
    assert ckpt.latest_step() == 40


def truncate_data_files(step_dir: pathlib.Path):
  # Orbax's OCDBT store keeps array chunks in files under `d/` folders (the per-process store and, after the
  # merge at commit, the top-level one may both hold them); cut every sizeable one in half.
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  big = [p for p in files if p.stat().st_size > 1024]
  assert big, files
  for path in big:
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 2)


def truncate_largest_file(step_dir: pathlib.Path):
  # With shards over 1 KiB this is a file of array chunks: the metadata reads fine and the array read fails.
  largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 2)


def garble_array_metadata(step_dir: pathlib.Path):
  (step_dir / "state" / "_METADATA").write_text("{not json")


def delete_data_state(step_dir: pathlib.Path):
  for p in (step_dir / "data").iterdir():
    p.unlink()


# A failed shard read makes orbax's other reads echo the error through asyncio's logger and sys.unraisablehook
# (which pytest turns into warnings and log records instead of stderr): those echoes must stay silent.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [truncate_data_files, truncate_largest_file, garble_array_metadata,
                                     delete_data_state])
def test_corrupt_newest_falls_back_and_is_kept_aside(tmp_path, capfd, caplog, corrupt):
  states = save_steps(tmp_path, [1, 2, 3])
  expected = host_copy(states[2])
  corrupt(tmp_path / "3")
  capfd.readouterr()
  with Checkpointer(str(tmp_path)) as ckpt:
    step, restored, data_state = ckpt.restore_latest(abstract(states[2]))
    assert step == 2 and data_state == {"position": 2, "epoch": 0}
    assert_bitwise_equal(restored, expected)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "checkpoint step 3" in line]
    assert len(warnings) == 1 and "corrupt-3" in warnings[0], err
    assert "never retrieved" not in err and "Traceback" not in err, err
    assert not [r for r in caplog.records if r.name == "asyncio"]
    assert not (tmp_path / "3").exists() and any((tmp_path / "corrupt-3").rglob("*"))
    # The step number is free again: the resumed run saves it anew.
    fresh = make_state(33)
    assert ckpt.save(3, fresh, {"position": 3})
    ckpt.wait()
    assert ckpt.restore_latest(abstract(fresh))[0] == 3
  # A second bad step 3 does not clobber the first one set aside.
  corrupt(tmp_path / "3")
  with Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.restore_latest(abstract(states[2]))[0] == 2
    assert "corrupt-3-1" in capfd.readouterr().err
    # Retention counts steps only: what was set aside is never deleted.
    for step in (3, 4, 5):
      assert ckpt.save(step, fresh, {})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4", "5", "corrupt-3", "corrupt-3-1"]


def test_nothing_restorable_returns_none(tmp_path, capfd):
  with Checkpointer(str(tmp_path / "new")) as ckpt:  # created on demand
    assert ckpt.latest_step() is None
    assert ckpt.restore_latest(abstract(make_state())) is None
  assert capfd.readouterr().err == ""
  states = save_steps(tmp_path / "bad", [1])
  garble_array_metadata(tmp_path / "bad" / "1")
  with Checkpointer(str(tmp_path / "bad")) as ckpt:
    assert ckpt.restore_latest(abstract(states[1])) is None
    assert ckpt.latest_step() is None
  assert "checkpoint step 1" in capfd.readouterr().err


def test_leftover_temporary_directory_is_ignored(tmp_path, capfd):
  states = save_steps(tmp_path, [1, 2])
  # What a save killed mid-write leaves: an uncommitted folder under orbax's temporary name, partly written.
  leftover = tmp_path / f"3{TMP_SUFFIX}"
  shutil.copytree(tmp_path / "2", leftover)
  (leftover / "commit_success.txt").unlink()
  truncate_data_files(leftover)
  capfd.readouterr()
  with Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 2
    assert ckpt.restore_latest(abstract(states[2]))[0] == 2
    assert "warning" not in capfd.readouterr().err
    assert ckpt.save(3, make_state(3), {"position": 3})  # orbax replaces the stale temporary folder
    ckpt.wait()
    assert ckpt.restore_latest(abstract(states[2]))[0] == 3
  assert not leftover.exists()


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from scalezoo.train.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.ones((256, 256))}, {"position": 1})
    ckpt.wait()
    ckpt.save(2, {"w": jnp.zeros((4096, 4096))}, {"position": 2})  # 64 MiB: still writing when killed
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_process_killed_mid_save_leaves_only_committed_steps(tmp_path):
  proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  names = sorted(p.name for p in tmp_path.iterdir())
  target = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
      jax.devices()[0]))}
  with Checkpointer(str(tmp_path)) as ckpt:
    if "2" in names:  # the write won the race against the kill; nothing to check about leftovers
      pytest.skip(f"save finished before SIGKILL: {names}")
    # Killed before or after orbax made its temporary folder: either way step 2 must stay invisible.
    assert set(names) - {"1"} <= {f"2{TMP_SUFFIX}"} and "1" in names, names
    step, restored, data_state = ckpt.restore_latest(target)
  assert step == 1 and data_state == {"position": 1}
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones((256, 256), np.float32))


def test_mismatched_state_raises_and_keeps_checkpoint(tmp_path):
  states = save_steps(tmp_path, [1])
  wrong_shape = abstract(states[1])
  wrong_shape["params"]["embed"] = jax.ShapeDtypeStruct((128, 32), jnp.float32)
  extra_leaf = abstract(states[1])
  extra_leaf["params"]["new"] = jax.ShapeDtypeStruct((4,), jnp.float32)
  with Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(CheckpointMismatchError, match=r"params/embed: saved shape \(128, 64\), wanted \(128, 32"):
      ckpt.restore_latest(wrong_shape)
    with pytest.raises(CheckpointMismatchError, match="missing from checkpoint: params/new"):
      ckpt.restore_latest(extra_leaf)
    assert ckpt.latest_step() == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="keep"):
    Checkpointer(str(tmp_path), keep=0)
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    with pytest.raises(TypeError, match="JSON"):
      ckpt.save(1, make_state(), {"rng": np.arange(3)})
    assert ckpt.latest_step() is None
