"""`scalezoo` command line: bad input is one `scalezoo: error:` line naming the key, exit code 2, nothing written;
a good `train` exits 0 and writes the run directory."""

from __future__ import annotations

import json

import jax
import pytest

from scalezoo.models import param_counts
from scalezoo.configs import load
from scalezoo.train.cli import main
from scalezoo.train.metrics import read_jsonl

# The settings of test_trainer.tiny_cfg, so this run's programs (8 devices, fsdp=8) are the ones test_bench.py
# compiles: with the shared persistent cache each compiles once per session.
TINY = ["--config", "dense:tiny", "--config.train.steps=3", "--config.train.batch_size=8",
        "--config.train.seq_len=32", "--config.train.compute_dtype=float32", "--config.train.schedule=constant",
        "--config.train.warmup=0", "--config.train.eval_batches=1", "--config.train.log_every=1",
        "--config.checkpoint.every=0"]


pytestmark = pytest.mark.usefixtures("fast_compile")


# (id, extra argv, text the error line must contain: the offending key)
BAD_INPUTS = [
    ("heads_not_dividing_width", ["--config.model.heads=3"], "model.heads"),
    ("kv_heads_not_dividing_heads", ["--config.model.kv_heads=3"], "model.kv_heads"),
    ("mesh_product_not_device_count", ["--config.mesh.fsdp=3"], "fsdp=3"),
    ("unknown_family", ["--config.model.family=nosuch"], "model.family"),
    ("unknown_key", ["--config.train.stpes=5"], "did you mean train.steps"),
    ("text_glob_matches_nothing", ["--config.data.source=text", "--config.data.path=/nonexistent/*.txt"],
     "data.path"),
    ("missing_token_file", ["--config.data.source=tokens", "--config.data.path=/nonexistent/tokens.npy"],
     "data.path"),
    ("zero_steps", ["--config.train.steps=0"], "train.steps"),
    ("zero_lr", ["--config.train.lr=0"], "train.lr"),
    ("negative_lr", ["--config.train.lr=-0.001"], "train.lr"),
    ("wrong_type", ["--config.train.steps=abc"], "train.steps"),
    ("bool_wrong_type", ["--config.train.scan_layers=maybe"], "train.scan_layers"),
    ("group_as_value", ["--config.model=3"], "model"),
    ("cudnn_without_gpu", ["--config.model.attention_impl=cudnn"], "model.attention_impl"),
]


def _run(argv, capsys):
  capsys.readouterr()
  code = main(argv)
  out, err = capsys.readouterr()
  return code, out, err


def _assert_usage_error(code, out, err, needle):
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("scalezoo: error: "), lines[0]
  assert needle in lines[0], lines[0]
  assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("extra,needle", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_config_is_one_line_exit_2_nothing_written(extra, needle, tmp_path, capsys):
  workdir = tmp_path / "run"
  code, out, err = _run(["train", "--workdir", str(workdir), "--quiet"] + TINY + extra, capsys)
  _assert_usage_error(code, out, err, needle)
  assert not workdir.exists()


def test_unknown_config_name(tmp_path, capsys):
  workdir = tmp_path / "run"
  code, out, err = _run(["train", "--config", "nosuch:tiny", "--workdir", str(workdir)], capsys)
  _assert_usage_error(code, out, err, "nosuch")
  assert "dense" in err  # lists the known names
  assert not workdir.exists()


def test_unknown_size(tmp_path, capsys):
  workdir = tmp_path / "run"
  code, out, err = _run(["train", "--config", "dense:huge", "--workdir", str(workdir)], capsys)
  _assert_usage_error(code, out, err, "huge")
  assert not workdir.exists()


def test_bad_config_leaves_existing_workdir_alone(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text("{}\n")
  code, out, err = _run(["train", "--workdir", str(workdir)] + TINY + ["--config.train.lr=0"], capsys)
  _assert_usage_error(code, out, err, "train.lr")
  assert [p.name for p in workdir.iterdir()] == ["config.json"]
  assert (workdir / "config.json").read_text() == "{}\n"


def test_train_succeeds(tmp_path, capsys):
  workdir = tmp_path / "run"
  code, out, err = _run(["train", "--workdir", str(workdir), "--quiet"] + TINY, capsys)
  assert code == 0, err
  assert "error" not in err
  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json", "loss.png", "metrics.jsonl",
                                                      "summary.json"]
  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["steps"] == 3 and config["train"]["compute_dtype"] == "float32"
  assert config["mesh"]["fsdp"] == -1  # stored as given; the run filled it with all 8 devices
  rows = read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["steps"] == 3 and summary["devices"] == 8
  assert summary["mesh"]["fsdp"] == 8
  assert summary["params"] == param_counts(load("dense:tiny").model)["total"]
  assert summary["loss"] == pytest.approx(rows[-1]["loss"])
  assert "completed: 3 steps" in out and str(workdir / "summary.json") in out


def test_stray_argument(tmp_path, capsys):
  """Not a --config.KEY override: exit status 2 and one line (main raises SystemExit(2) here, not returns)."""
  workdir = tmp_path / "run"
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    main(["train", "--workdir", str(workdir)] + TINY + ["--bogus"])
  out, err = capsys.readouterr()
  _assert_usage_error(exit_info.value.code, out, err, "--bogus")
  assert not workdir.exists()


def test_infinite_int_value(tmp_path, capsys):
  workdir = tmp_path / "run"
  code, out, err = _run(["train", "--workdir", str(workdir)] + TINY + ["--config.train.steps=inf"], capsys)
  _assert_usage_error(code, out, err, "train.steps")


def test_infinite_lr_rejected():
  from scalezoo.configs import ConfigError
  from scalezoo.train.validate import validate
  cfg = load("dense:tiny")
  cfg.train.lr = float("inf")
  with pytest.raises(ConfigError, match="train.lr"):
    validate(cfg, jax.device_count())


def test_rerun_of_finished_run_with_nan_field(tmp_path, capsys):
  workdir = tmp_path / "run"
  argv = ["train", "--workdir", str(workdir), "--quiet"] + TINY + ["--config.train.steps=1"]
  code, _, err = _run(argv, capsys)  # one step: no timed interval, so tokens_per_s and mfu are NaN
  assert code == 0, err
  assert json.loads((workdir / "summary.json").read_text())["tokens_per_s"] is None
  code, out, err = _run(argv, capsys)
  assert code == 0 and "completed: 1 steps" in out, err
