"""Sweeps: expansion and names, per-run configs, failure recording, and kill + re-run finishing without redoing
finished runs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from scalezoo.configs import ConfigError
from scalezoo.models import param_counts
from scalezoo.train import sweep as sweep_lib


def _sweep(**kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = "dense:tiny"
  c.fixed = dict(train=dict(batch_size=8, seq_len=32))
  c.grid = kw.get("grid", dict(model=dict(width=[32, 64])))
  c.ladder = kw.get("ladder", {})
  c.tokens_per_param = kw.get("tokens_per_param", 0.0)
  return c


def test_expand_grid_times_ladder_in_fixed_order():
  c = _sweep(grid=dict(model=dict(width=[32, 64])), ladder=dict(model=dict(depth=[1, 2]), train=dict(lr=[1e-3, 3e-3])))
  runs = sweep_lib.expand(c)
  assert [n for n, _ in runs] == ["width32-depth1-lr0.001", "width32-depth2-lr0.003",
                                  "width64-depth1-lr0.001", "width64-depth2-lr0.003"]
  assert runs[1][1] == {"model.width": 32, "model.depth": 2, "train.lr": 3e-3}
  assert sweep_lib.expand(c) == runs  # deterministic


def test_ladder_lengths_must_match_and_names_must_differ():
  with pytest.raises(ConfigError, match="equal lengths"):
    sweep_lib.expand(_sweep(ladder=dict(model=dict(depth=[1, 2]), train=dict(lr=[1e-3]))))
  with pytest.raises(ConfigError, match="same name"):
    sweep_lib.expand(_sweep(grid=dict(model=dict(width=[32])), ladder=dict(train=dict(seed=[0, 0]))))


def test_run_configs_apply_values_and_token_budget():
  c = _sweep(grid=dict(model=dict(width=[32, 64])), tokens_per_param=2.0)
  configs = dict(sweep_lib.run_configs(c))
  for name, width in (("width32", 32), ("width64", 64)):
    cfg = configs[name]
    assert cfg.model.width == width and cfg.train.batch_size == 8
    tokens = cfg.train.steps * 8 * 32
    params = param_counts(cfg.model)["total"]
    # ceil to whole steps: at least the budget, less than one step over it.
    assert 2.0 * params <= tokens < 2.0 * params + 8 * 32


def test_bad_sweep_key_fails_before_any_run():
  c = _sweep(grid=dict(model=dict(widht=[32, 64])))
  with pytest.raises(ConfigError, match="did you mean model.width"):
    sweep_lib.run_configs(c)
  c = _sweep(grid=dict(model=dict(heads=[3])))
  with pytest.raises(ConfigError, match="model.heads"):
    sweep_lib.run_configs(c)


def test_failing_run_is_recorded_and_sweep_goes_on(tmp_path):
  c = _sweep(grid=dict(model=dict(width=[32, 64, 96])))
  calls = []

  def fake_train(cfg, run_dir, quiet):
    calls.append(cfg.model.width)
    if cfg.model.width == 64:
      raise RuntimeError("out of memory\nsecond line")
    return dict(status="completed", params=cfg.model.width, params_active=1, params_non_embedding=1,
                flops_per_token=10.0, tokens=100, steps=5, loss=2.0, eval_loss=2.5, eval_bpb=3.6,
                tokens_per_s=1.0, mfu=0.1, wall_s=1.0)

  rows = sweep_lib.sweep(c, str(tmp_path), quiet=True, train_fn=fake_train)
  assert calls == [32, 64, 96]
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["name"] for r in table] == ["width32", "width64", "width96"]
  assert [r["status"] for r in table] == ["completed", "failed", "completed"]
  assert table[1]["error"] == "RuntimeError: out of memory"
  assert table[2]["compute"] == str(10.0 * 100) and table[2]["model.width"] == "96"
  assert rows[0]["eval_loss"] == 2.5


def _results(path) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


# ~23 s (two subprocess runs); resuming a killed run is covered fast in test_resume.py and skipping finished runs
# in test_growth.py (re-running its sweep): `pytest -m slow` runs it.
@pytest.mark.slow
def test_killed_sweep_finishes_without_redoing_finished_runs(tmp_path):
  """Kill the sweep while its second run trains; re-running finishes it: the first run is not touched again and
  the second resumes from its checkpoint."""
  sweep_file = tmp_path / "s.py"
  sweep_file.write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.base = 'dense:tiny'\n"
      "  c.fixed = dict(train=dict(batch_size=8, seq_len=32, log_every=1, eval_batches=1, steps=12),\n"
      "                 checkpoint=dict(every=2))\n"
      "  c.grid = dict(model=dict(depth=[1, 2]))\n"
      "  c.ladder = dict()\n"
      "  c.tokens_per_param = 0.0\n"
      "  return c\n")
  workdir = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "scalezoo.train.cli", "sweep", "--config", str(sweep_file), "--workdir", str(workdir)]
  # A compilation cache shared by both invocations: the re-run reuses the first process's programs.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1"),
             JAX_DISABLE_MOST_OPTIMIZATIONS="true", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  second = workdir / "runs" / "depth2"
  deadline = time.monotonic() + 240
  while True:
    assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.communicate()}"
    assert time.monotonic() < deadline, "the second run never checkpointed"
    ckpts = second / "checkpoints"
    if ckpts.is_dir() and any(n.isdigit() and int(n) >= 4 for n in os.listdir(ckpts)):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  first = workdir / "runs" / "depth1"
  first_summary = (first / "summary.json").read_bytes()
  first_mtime = os.stat(first / "summary.json").st_mtime_ns
  assert _results(workdir / "results.csv")[0]["status"] == "completed"

  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"resuming {second} from step" in out.stderr  # the interrupted run continued from its checkpoint
  assert (first / "summary.json").read_bytes() == first_summary
  assert os.stat(first / "summary.json").st_mtime_ns == first_mtime
  table = _results(workdir / "results.csv")
  assert [(r["name"], r["status"], r["steps"]) for r in table] == [("depth1", "completed", "12"),
                                                                   ("depth2", "completed", "12")]
  steps = [json.loads(line)["step"] for line in open(second / "metrics.jsonl")]
  assert steps == list(range(1, 13))


def test_fixed_overrides_reach_every_run_even_keys_the_sweep_does_not_fix():
  s = sweep_lib.load_sweep("dense_quick:tiny", {"fixed.mesh.preset": "dp", "fixed.train.batch_size": "16"})
  runs = sweep_lib.run_configs(s)
  assert {cfg.mesh.preset for _, cfg in runs} == {"dp"} and {cfg.train.batch_size for _, cfg in runs} == {16}
  with pytest.raises(ConfigError, match="did you mean mesh.preset"):
    sweep_lib.run_configs(sweep_lib.load_sweep("dense_quick:tiny", {"fixed.mesh.prest": "dp"}))
