"""`scalezoo parbench`: the equal-loss dense size, the table's arithmetic, bad input, and one tiny run.

Times are never asserted (a benchmark measures speed); memory is, exactly, since it follows from shapes.
"""

from __future__ import annotations

import csv
import json
import math

import pytest

from scalezoo import models
from scalezoo.configs.loader import load
from scalezoo.models.registry import head_dim
from scalezoo.train import parbench as pb
from scalezoo.train.cli import main

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.parametrize("scale", ["width", "depth"])
@pytest.mark.parametrize("factor", [0.8, 1.2, 1.54, 2.0, 3.7])
def test_dense_equivalent_is_the_closest_size_on_its_grid(scale, factor):
  base = load("dense:quickstart").model
  target = factor * models.param_counts(base)["non_embedding"]
  cfg, n = pb.dense_equivalent(base, target, scale)
  assert n == models.param_counts(cfg)["non_embedding"]
  step = cfg.depth if scale == "depth" else cfg.kv_heads
  error = abs(math.log(n / target))
  for other in (step - 1, step + 1):  # the neighbours on the grid are no closer (in ratio)
    if other >= 1:
      assert error <= abs(math.log(models.param_counts(pb.scaled(base, scale, other))["non_embedding"] / target))
  if scale == "width":  # head_dim, the GQA group and the FFN's ratio to width are kept; depth too
    assert (head_dim(cfg), cfg.heads // cfg.kv_heads, cfg.ffn_width / cfg.width, cfg.depth) == \
        (head_dim(base), base.heads // base.kv_heads, base.ffn_width / base.width, base.depth)
  else:
    assert (cfg.width, cfg.heads, cfg.ffn_width) == (base.width, base.heads, base.ffn_width)


def test_equal_loss_target_counts_the_parscale_parameters():
  cfgs, sizes = pb.equal_loss_configs(load("parscale:dense:quickstart,streams=4"), 0.39)
  d, layers, kv, hd, p, t_p = 128, 4, 4, 32, 4, 48
  n_base = models.param_counts(load("dense:quickstart").model)["non_embedding"]
  n_ps = n_base + layers * p * 2 * kv * t_p * hd + p * d * d + d + d * p + p  # prefixes and the aggregator
  assert (sizes["n_base"], sizes["n_parscale"]) == (n_base, n_ps)
  assert sizes["target"] == pytest.approx(n_ps * (0.39 * math.log(4) + 1))
  assert cfgs["base"].model.family == cfgs["dense"].model.family == "dense"
  assert cfgs["dense"].model.width == 192 and sizes["dense_vs_target"] == pytest.approx(sizes["n_dense"] /
                                                                                       sizes["target"])
  assert pb.equal_loss_configs(load("parscale:dense:quickstart,streams=4"), 0.39, "depth")[0]["dense"].model.depth == 8


def test_compare_increases_and_ratios_on_a_known_table():
  measured = dict(base=dict(param_bytes=1000, cache_bytes=100, step_bytes=10, ms_per_token=1.0),
                  parscale=dict(param_bytes=1100, cache_bytes=400, step_bytes=30, ms_per_token=1.5),
                  dense=dict(param_bytes=3000, cache_bytes=200, step_bytes=None, ms_per_token=2.5))
  rows = {r["model"]: r for r in pb.compare(8, measured, dict(dense=dict(config="dense width=192")))}
  assert [rows[m]["memory_bytes"] for m in pb.MODELS] == [1110, 1530, 3200]  # step_bytes None counts 0
  assert [rows[m]["memory_increase_bytes"] for m in pb.MODELS] == [0, 420, 2090]
  assert [rows[m]["latency_increase_ms"] for m in pb.MODELS] == [0.0, 0.5, 1.5]
  assert all(r["memory_ratio"] == pytest.approx(2090 / 420) and r["latency_ratio"] == pytest.approx(3.0)
             for r in rows.values())
  assert rows["dense"]["config"] == "dense width=192" and rows["dense"]["batch"] == 8
  assert "4.98x and 3.00x at batch 8" in pb.summary_sentence(list(rows.values()), 4)
  measured["parscale"]["ms_per_token"] = 0.9  # timing noise below the base: no ratio rather than a negative one
  assert pb.compare(8, measured, {})[0]["latency_ratio"] is None


def test_k_from_a_fit_file_or_a_sweep_directory(tmp_path):
  (tmp_path / "fit.json").write_text(json.dumps(dict(law="parscale", A=0.01, k=0.39, alpha=0.19, E=0.69)))
  assert pb.read_k(str(tmp_path), "") == pb.read_k(str(tmp_path / "fit.json"), "") == 0.39
  assert pb.read_k("", "0.25") == 0.25


def _fit(tmp_path, **doc) -> str:
  path = tmp_path / "fit" / "fit.json"
  path.parent.mkdir()
  path.write_text(json.dumps(doc))
  return str(path)


@pytest.mark.parametrize("args,needle", [
    (["--config", "dense:tiny", "--k", "0.39"], "model.family='dense' is not parscale"),
    (["--config", "parscale:dense:tiny,streams=1", "--k", "0.39"], "model.parscale.streams=1"),
    (["--k", "0"], "--k=0.0: must be > 0"),
    (["--k", "-0.3"], "must be > 0"),
    (["--k", "big"], "--k 'big': not a number"),
    ([], "give the ParScale law's k once"),
    (["--k", "0.39", "--fit", "FIT_K"], "give the ParScale law's k once"),
    (["--fit", "MISSING"], "no such file"),
    (["--fit", "EMPTY_DIR"], "no fit.json in that directory"),
    (["--fit", "FIT_NO_K"], "holds no k (law 'chinchilla')"),
    (["--fit", "FIT_BAD_K"], "k=-0.1: must be > 0"),
    (["--k", "0.39", "--batches", "1,0"], "--batches [1, 0]: give positive batch sizes"),
    (["--k", "0.39", "--tokens", "0"], "--tokens 0: must be >= 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, needle, tmp_path, capsys):
  paths = dict(FIT_K=_fit(tmp_path, law="parscale", k=0.39), MISSING=str(tmp_path / "nope.json"),
               EMPTY_DIR=str(tmp_path), FIT_NO_K=str(tmp_path / "c.json"), FIT_BAD_K=str(tmp_path / "b.json"))
  (tmp_path / "c.json").write_text(json.dumps(dict(law="chinchilla", E=1.8, A=400.0)))
  (tmp_path / "b.json").write_text(json.dumps(dict(law="parscale", k=-0.1)))
  args = [paths.get(a, a) for a in args]
  if "--config" not in args:
    args += ["--config", "parscale:dense:tiny,streams=2"]
  code = main(["parbench", "--workdir", str(tmp_path / "out")] + args)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and needle in err[0], err
  assert not (tmp_path / "out").exists()


def test_tiny_run_writes_the_table(tmp_path, capsys):
  workdir = tmp_path / "bench"
  p, t_p, prompt, tokens = 2, 4, 4, 2
  code = main(["parbench", "--config", f"parscale:dense:tiny,streams={p},prefix_len={t_p}", "--k", "0.39",
               "--batches", "1", "--prompt_len", str(prompt), "--tokens", str(tokens), "--workdir", str(workdir)])
  assert code == 0
  out = capsys.readouterr().out.splitlines()
  assert "at batch 1" in out[-1] and "ParScale P=2" in out[-1]
  with open(workdir / "parbench.csv") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == pb.COLUMNS
    rows = {r["model"]: r for r in reader}
  assert list(rows) == list(pb.MODELS) and all(r["status"] == "ok" for r in rows.values())
  for r in rows.values():
    assert all(float(r[k]) > 0 for k in ("param_bytes", "cache_bytes", "step_bytes", "memory_bytes", "ms_per_token"))
    assert int(r["memory_bytes"]) == int(r["param_bytes"]) + int(r["cache_bytes"]) + int(r["step_bytes"])
    assert int(r["step_bytes"]) >= 256 * 4  # the step's transient bytes hold at least its float32 logits
  # float32 parameters; the KV caches (float32 [batch, positions, kv_heads=2, head_dim=16] keys and values in each
  # of 2 layers, plus the int32 position) hold prompt + tokens positions: ParScale's hold P streams of them and,
  # per stream, its prefix of t_p positions.
  cfgs, sizes = pb.equal_loss_configs(load(f"parscale:dense:tiny,streams={p},prefix_len={t_p}"), 0.39)
  for name, c in cfgs.items():
    assert int(rows[name]["param_bytes"]) == 4 * models.param_counts(c.model)["total"]
  per_position = 2 * 2 * 2 * 16 * 4
  base_cache = int(rows["base"]["cache_bytes"])
  assert base_cache == (prompt + tokens) * per_position + 4
  assert int(rows["parscale"]["cache_bytes"]) == p * (base_cache - 4) + p * t_p * per_position + 4
  assert int(rows["dense"]["non_embedding_params"]) == sizes["n_dense"]
  increase = {m: int(rows[m]["memory_bytes"]) - base_cache - int(rows["base"]["param_bytes"])
              - int(rows["base"]["step_bytes"]) for m in ("parscale", "dense")}
  assert float(rows["dense"]["memory_ratio"]) == pytest.approx(increase["dense"] / increase["parscale"])
  doc = json.loads((workdir / "parbench.json").read_text())
  assert doc["k"] == 0.39 and doc["streams"] == p and len(doc["rows"]) == 3
  assert doc["ratios"][0]["memory_ratio"] == pytest.approx(float(rows["dense"]["memory_ratio"]))
