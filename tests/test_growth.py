"""Growth through `init_from`: a grown TokenFormer resumes exactly, bad sources are one line, the progressive sweep.

One module fixture runs the tiny progressive sweep (three stages and a from-scratch baseline); the tests read its
runs, so the tiny programs compile once.
"""

from __future__ import annotations

import csv
import json
import os

import jax
import numpy as np
import pytest

from scalezoo.train import sweep as sweep_lib
from scalezoo.train.checkpoint import Checkpointer
from scalezoo.train.cli import main
from scalezoo.train.data import make_train_iterator
from scalezoo.train.generate import load_run
from scalezoo.train.metrics import read_jsonl
from scalezoo.train.report import write_report
from scalezoo.train.report_growth import compute_to_reach
from scalezoo.train.sharding import make_mesh
from scalezoo.train.step import make_program

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def grown_sweep(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("grow") / "sweep"
  sweep_cfg = sweep_lib.load_sweep("tokenformer_grow:tiny", {})
  rows = sweep_lib.sweep(sweep_cfg, str(workdir), quiet=True)
  assert [r["status"] for r in rows] == ["completed"] * 4, rows
  write_report(str(workdir))  # as `scalezoo sweep` does at the end
  return workdir


def test_grown_run_starts_from_the_smaller_model_exactly(grown_sweep):
  """Stage 2's first training loss equals stage 1's final model's loss on that same batch: growth (zero new key
  tokens, tau kept) changed nothing, and the weights came from stage 1's checkpoint."""
  small_dir, grown_dir = grown_sweep / "runs" / "stage1", grown_sweep / "runs" / "stage2"
  grown_cfg = json.loads((grown_dir / "config.json").read_text())
  assert grown_cfg["init_from"] == str(small_dir)
  t = grown_cfg["train"]
  first_batch = next(make_train_iterator(load_run(str(grown_dir))[0].data, batch_size=t["batch_size"],
                                         seq_len=t["seq_len"], seed=t["seed"], num_steps=1))
  small_cfg, _ = load_run(str(small_dir))
  mesh = make_mesh(small_cfg.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh):
    program = make_program(small_cfg, mesh)
    with Checkpointer(str(small_dir / "checkpoints")) as ckpt:
      _, state, _ = ckpt.restore_latest(program.abstract_state())
    small_loss = float(program.eval_step(state, jax.device_put(first_batch, program.batch_sharding)))
  grown_first = read_jsonl(str(grown_dir / "metrics.jsonl"))[0]
  assert grown_first["step"] == 1
  np.testing.assert_allclose(grown_first["loss"], small_loss, rtol=2e-6)
  summaries = [json.loads((grown_sweep / "runs" / n / "summary.json").read_text()) for n in ("stage1", "stage2")]
  assert summaries[1]["params"] > summaries[0]["params"]


def test_progressive_report_accounts_cumulative_compute(grown_sweep):
  growth = json.loads((grown_sweep / "growth.json").read_text())
  assert growth["chain"] == ["stage1", "stage2", "stage3"]
  rows = compute_by_run(grown_sweep)
  assert growth["offsets"]["stage1"] == 0.0 and growth["offsets"]["scratch"] == 0.0
  assert growth["offsets"]["stage2"] == pytest.approx(rows["stage1"])
  assert growth["offsets"]["stage3"] == pytest.approx(rows["stage1"] + rows["stage2"])
  assert growth["compute_grow"] == pytest.approx(rows["stage1"] + rows["stage2"] + rows["stage3"])
  report = (grown_sweep / "report.md").read_text()
  # The verdict states the saving (reached or not, the baseline sets C_scratch or its total compute).
  c_scratch = growth["compute_scratch"] if growth["reached"] else growth["compute_scratch_total"]
  assert growth["saved"] == pytest.approx(1 - growth["compute_grow"] / c_scratch)
  assert f"{growth['saved']:.0%}" in report and os.path.getsize(grown_sweep / "growth.png") > 0


def compute_by_run(sweep_dir) -> dict[str, float]:
  """results.csv's compute (flops_per_token x tokens) of each run."""
  with open(sweep_dir / "results.csv") as f:
    return {r["name"]: float(r["compute"]) for r in csv.DictReader(f)}


def test_compute_to_reach_interpolates():
  c, loss = np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])
  assert compute_to_reach(c, loss, 1.5) == pytest.approx(2.5)
  assert compute_to_reach(c, loss, 3.5) == 1.0
  assert compute_to_reach(c, loss, 0.5) is None


def _bad(tmp_path, capsys, config, extra):
  workdir = tmp_path / "run"
  capsys.readouterr()
  code = main(["train", "--workdir", str(workdir), "--quiet", "--config", config, "--config.train.steps=1",
               "--config.train.warmup=0"] + extra)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("scalezoo: error: "), err
  assert not workdir.exists()
  return err[0]


def test_bad_init_from_is_one_line_and_writes_nothing(grown_sweep, tmp_path, capsys):
  stage2 = str(grown_sweep / "runs" / "stage2")
  tau = ["--config.model.tokenformer.tau.qkv=8.0", "--config.model.tokenformer.tau.proj=8.0",
         "--config.model.tokenformer.tau.ffn=16.0"]
  fewer = _bad(tmp_path, capsys, "tokenformer:tiny", [f"--config.init_from={stage2}"] + tau +
               ["--config.model.tokenformer.ffn_tokens=64"])
  assert "model.tokenformer.ffn_tokens=64" in fewer and "growth only adds" in fewer
  wider = _bad(tmp_path, capsys, "tokenformer:tiny", [f"--config.init_from={stage2}", "--config.model.width=128"])
  assert "model.width=128" in wider
  family = _bad(tmp_path, capsys, "dense:tiny", [f"--config.init_from={stage2}"])
  assert "family 'tokenformer'" in family
  missing = _bad(tmp_path, capsys, "tokenformer:tiny", [f"--config.init_from={tmp_path / 'nowhere'}"])
  assert "no config.json" in missing


def test_rerunning_the_sweep_skips_finished_runs(grown_sweep):
  """A second `scalezoo sweep` over a finished sweep trains nothing: every run's files stay as they were."""
  metrics = {n: (grown_sweep / "runs" / n / "metrics.jsonl") for n in ("stage1", "stage2", "stage3", "scratch")}
  before = {n: (p.stat().st_mtime_ns, p.read_bytes()) for n, p in metrics.items()}
  rows = sweep_lib.sweep(sweep_lib.load_sweep("tokenformer_grow:tiny", {}), str(grown_sweep), quiet=True)
  assert [r["status"] for r in rows] == ["completed"] * 4
  assert {n: (p.stat().st_mtime_ns, p.read_bytes()) for n, p in metrics.items()} == before
