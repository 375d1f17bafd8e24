"""`scalezoo bench`, the parallelism sweep, end to end through `cli.main` on 8 fake CPU devices.

Every run uses the settings of test_cli.TINY (dense:tiny, batch 8 x seq 32, float32, constant lr), so the
8-device programs on fsdp=8 and fsdp=4,tensor=2 are the ones test_trainer and test_cli compile: the shared
persistent cache compiles each once per session. dense:tiny has kv_heads=2, so any tensor axis above 2 is a
parameter that does not divide: those meshes are `invalid` rows, found before anything compiles.
"""

from __future__ import annotations

import csv
import json
import math

import jax
import pytest

from scalezoo import configs, models
from scalezoo.train import bench as bench_lib
from scalezoo.train.cli import main
from scalezoo.train.sharding import make_mesh
from scalezoo.train.step import make_program

TINY = ["--config", "dense:tiny", "--config.train.batch_size=8", "--config.train.seq_len=32",
        "--config.train.compute_dtype=float32", "--config.train.schedule=constant", "--config.train.warmup=0"]
BATCH, SEQ = 8, 32

pytestmark = pytest.mark.usefixtures("fast_compile")


def _run(argv, capsys):
  capsys.readouterr()
  code = main(["bench"] + TINY + ["--steps", "2"] + argv)
  out, err = capsys.readouterr()
  return code, out, err


def _csv(path):
  with open(path) as f:
    rows = list(csv.DictReader(f))
  with open(path) as f:
    assert f.readline().strip() == ",".join(bench_lib.CSV_COLUMNS)
  return rows


def _check_table(out, rows):
  """Header, one line per row in order (mesh, status), then the fastest line; returns that last line."""
  lines = out.strip().splitlines()
  assert lines[0].split()[:3] == ["mesh", "status", "batch"]
  assert len(lines) == len(rows) + 2, out
  for line, r in zip(lines[1:-1], rows):
    assert line.split()[:2] == [r["mesh"], r["status"]], line
  return lines[-1]


def _check_ok_row(r, batch=BATCH):
  assert r["reason"] == "" and int(r["batch_size"]) == batch
  step_ms, tps = float(r["step_ms"]), float(r["tokens_per_s"])
  assert step_ms > 0 and tps > 0 and float(r["peak_gib"]) > 0 and float(r["compile_s"]) > 0
  assert tps == pytest.approx(batch * SEQ / (step_ms / 1e3), rel=1e-6)
  cfg = configs.load("dense:tiny")
  flops = models.flops_per_token(cfg.model, SEQ)
  assert float(r["tflops_per_device"]) == pytest.approx(flops * tps / 8 / 1e12, rel=1e-6)
  assert 0 < float(r["mfu"]) < 1


def test_factorisations_and_auto_axes():
  meshes = bench_lib.factorisations(8, ("data", "fsdp", "tensor"))
  labels = [bench_lib.mesh_label(m) for m in meshes]
  assert len(labels) == len(set(labels)) == 10  # 3 factors of 2 over 3 axes: C(5, 2) ways
  assert all(math.prod(m.values()) == 8 and m["expert"] == 1 for m in meshes)
  assert labels[0] == "data=8" and labels[-1] == "tensor=8"
  assert bench_lib.factorisations(8, ("data", "fsdp", "tensor")) == meshes  # deterministic
  assert [bench_lib.mesh_label(m) for m in bench_lib.factorisations(12, ("fsdp", "expert"))] == [
      "fsdp=12", "fsdp=6,expert=2", "fsdp=4,expert=3", "fsdp=3,expert=4", "fsdp=2,expert=6", "expert=12"]
  cfg = configs.load("dense:tiny")
  assert bench_lib.auto_axes(cfg) == ("data", "fsdp", "tensor")
  assert bench_lib.auto_axes(cfg, "ep") == ("fsdp", "expert")
  cfg.mesh.preset = "fsdp_tp"
  assert bench_lib.auto_axes(cfg) == ("fsdp", "tensor")
  assert bench_lib.auto_axes(cfg, "dp") == ("data",)  # the flag wins over the config
  moe = configs.load("dense:tiny")
  moe.model.num_experts = 4
  assert bench_lib.auto_axes(moe) == ("data", "fsdp", "tensor", "expert")


def test_auto_fsdp_tp_table_csv_json(tmp_path, capsys):
  workdir = tmp_path / "bench"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine\n")
  code, out, err = _run(["--meshes", "auto", "--preset", "fsdp_tp", "--workdir", str(workdir)], capsys)
  assert code == 0, err
  rows = _csv(workdir / "bench.csv")
  assert [r["mesh"] for r in rows] == ["fsdp=8", "fsdp=4,tensor=2", "fsdp=2,tensor=4", "tensor=8"]
  assert [r["status"] for r in rows] == ["ok", "ok", "invalid", "invalid"]
  for r in rows[:2]:
    _check_ok_row(r)
  for r, size in zip(rows[2:], (4, 8)):
    assert f"does not divide over mesh axis tensor={size}" in r["reason"] and "kv_heads" in r["reason"]
    assert r["step_ms"] == r["tokens_per_s"] == r["peak_gib"] == ""
  best = max(rows[:2], key=lambda r: float(r["tokens_per_s"]))
  last = _check_table(out, rows)
  assert last == f"fastest: {best['mesh']} ({float(best['tokens_per_s']):.0f} tokens/s, batch 8)"
  doc = json.loads((workdir / "bench.json").read_text())
  assert doc["fastest"] == best["mesh"] and doc["devices"] == 8 and doc["memory_limit_gib"] is None
  assert [(r["mesh"], r["status"]) for r in doc["rows"]] == [(r["mesh"], r["status"]) for r in rows]
  assert all(math.isfinite(r["loss"]) for r in doc["rows"][:2]) and doc["rows"][2]["tokens_per_s"] is None
  assert sorted(p.name for p in workdir.iterdir()) == ["bench.csv", "bench.json", "notes.txt"]  # no .tmp left


def test_explicit_list_wrong_device_count_is_a_row(tmp_path, capsys):
  code, out, err = _run(["--meshes", "fsdp=8; fsdp=3 ;fsdp=4,tensor=2", "--workdir", str(tmp_path)], capsys)
  assert code == 0, err
  rows = _csv(tmp_path / "bench.csv")
  assert [(r["mesh"], r["status"]) for r in rows] == [("fsdp=8", "ok"), ("fsdp=3", "invalid"),
                                                      ("fsdp=4,tensor=2", "ok")]
  assert "fsdp=3" in rows[1]["reason"] and "8 devices" in rows[1]["reason"]
  _check_ok_row(rows[0])
  _check_ok_row(rows[2])
  _check_table(out, rows)


def test_only_mesh_invalid_or_over_memory_exits_1(tmp_path, capsys):
  code, out, err = _run(["--meshes", "data=2,fsdp=2"], capsys)
  assert code == 1 and err == ""
  assert out.splitlines()[1].split()[:2] == ["data=2,fsdp=2", "invalid"]
  assert out.strip().splitlines()[-1].startswith("fastest: none")
  # Compiles (fsdp=8 at batch 8, cached) but its peak is over a 1 KiB limit: oom, never run.
  code, out, err = _run(["--meshes", "fsdp=8", "--memory_limit", str(2 ** -20), "--workdir", str(tmp_path)], capsys)
  assert code == 1 and err == ""
  [r] = _csv(tmp_path / "bench.csv")
  assert r["status"] == "oom" and f"exceeds the {2 ** -20:.4g} GiB limit" in r["reason"]
  assert float(r["peak_gib"]) > 2 ** -20 and r["step_ms"] == ""


def _peak_gib(batch_size):
  """Compiled per-device peak of the tiny step on fsdp=8 at `batch_size`, computed here, not by bench."""
  cfg = configs.load("dense:tiny")
  cfg.train.update(dict(batch_size=batch_size, seq_len=SEQ, compute_dtype="float32", schedule="constant", warmup=0))
  cfg.mesh.update(dict(data=1, fsdp=8, tensor=1, expert=1))
  mesh = make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    program = make_program(cfg, mesh)
    batch = jax.ShapeDtypeStruct((batch_size, SEQ + 1), jax.numpy.int32, sharding=program.batch_sharding)
    compiled = program.train_step.lower(program.abstract_state(), batch).compile()
  return bench_lib.peak_bytes(compiled) / bench_lib.GIB


def test_batch_auto_finds_largest_fitting_power_of_two(tmp_path, capsys):
  p16, p32 = _peak_gib(16), _peak_gib(32)  # per-device batch 2 and 4 on fsdp=8
  assert p16 < p32
  limit = (p16 + p32) / 2  # so per-device 2 fits and 4 does not
  code, out, err = _run(["--meshes", "fsdp=8", "--batch", "auto", "--memory_limit", repr(limit),
                         "--workdir", str(tmp_path)], capsys)
  assert code == 0, err
  [r] = json.loads((tmp_path / "bench.json").read_text())["rows"]
  assert r["status"] == "ok" and r["batch_size"] == 16
  search = r["batch_search"]
  assert [s["batch_size"] for s in search] == [8, 16, 32]  # per device 1, 2, 4: stops at the first too big
  assert [s["fits"] for s in search] == [True, True, False]
  assert all((s["peak_gib"] <= limit) == s["fits"] for s in search)
  assert search[1]["peak_gib"] == pytest.approx(p16, rel=1e-9) == r["peak_gib"]
  assert search[2]["peak_gib"] == pytest.approx(p32, rel=1e-9)
  assert r["peak_gib"] <= limit < 2 * r["peak_gib"]
  [row] = _csv(tmp_path / "bench.csv")
  _check_ok_row(row, batch=16)
  assert out.strip().splitlines()[-1].startswith("fastest: fsdp=8 (") and "batch 16)" in out


@pytest.mark.parametrize("argv,needle", [
    (["--meshes", "fsdp8"], "--meshes"),
    (["--meshes", "model=2"], "--meshes"),
    (["--meshes", "fsdp=x"], "--meshes"),
    (["--meshes", "fsdp=0"], "--meshes"),
    (["--meshes", "fsdp=2,fsdp=4"], "--meshes"),
    (["--meshes", " ; "], "--meshes"),
    (["--steps", "0"], "--steps"),
    (["--preset", "nosuch"], "--preset"),
    (["--meshes", "fsdp=8", "--preset", "fsdp"], "--preset"),
    (["--batch", "auto"], "--memory_limit"),  # CPU devices report no memory limit
    (["--memory_limit", "-1"], "--memory_limit"),
    (["--config.train.lr=0"], "train.lr"),  # a mesh-independent config error: one line, not a row per mesh
], ids=["no_equals", "unknown_axis", "size_not_int", "size_zero", "axis_twice", "empty", "steps_0",
        "unknown_preset", "preset_without_auto", "batch_auto_no_limit", "negative_limit", "bad_config"])
def test_bad_arguments_one_line_exit_2(argv, needle, tmp_path, capsys):
  code, out, err = _run(argv + ["--workdir", str(tmp_path / "bench")], capsys)
  assert code == 2 and out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("scalezoo: error: ") and needle in lines[0], err
  assert not (tmp_path / "bench").exists()


def test_xla_errors_classified():
  assert bench_lib._xla_status(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4GiB\nmore"), "run_error") \
      == ("oom", "RESOURCE_EXHAUSTED: Out of memory allocating 4GiB")
  assert bench_lib._xla_status(RuntimeError("INTERNAL: bad thing\ndetails"), "compile_error") == (
      "compile_error", "INTERNAL: bad thing")
