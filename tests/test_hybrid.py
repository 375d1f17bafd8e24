"""Family `hybrid`: attention placement, parameter and FLOP formulas, decoding with caches, the recall sweep.

Models are initialised inside one jit (each eager initialiser would compile on its own) and every comparison is
one jitted function, so each config costs one compile.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalezoo import configs
from scalezoo.models import build, flops_per_token, param_counts
from scalezoo.models import hybrid
from scalezoo.models.generate import generate
from scalezoo.models.linear.layers import LINEAR_MIXERS
from scalezoo.train import report
from scalezoo.train import sweep as sweep_lib

pytestmark = pytest.mark.usefixtures("fast_compile")


def hybrid_cfg(mixer="gated_deltanet", **overrides):
  cfg = configs.load(f"hybrid:tiny,mixer={mixer}").model
  cfg.chunk_size = 16
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def built(cfg, **options):
  """The model with its initialisers' weights, initialised in one compiled program."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), **options)))
  state = jax.jit(lambda: nnx.state(build(cfg, rngs=nnx.Rngs(0), **options)))()
  return nnx.merge(graphdef, state)


def tokens(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape), jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# placement


def test_attention_layers_follow_the_ratio():
  at = lambda ratio, depth=24, **kw: hybrid.attention_layers(hybrid_cfg(hybrid_ratio=ratio, depth=depth, **kw))
  assert at(3) == [3, 7, 11, 15, 19, 23]  # groups of three linear layers, then attention
  assert at(6) == [6, 13, 20]  # 7 does not divide 24: three trailing linear layers
  assert at(12) == [12]
  assert at(24) == []  # a group of 25 does not fit in 24 layers
  assert at(0) == []
  assert at(3, attn_layers=[0, 5]) == [0, 5]
  assert hybrid.attention_layers(hybrid_cfg("attention", depth=5)) == [0, 1, 2, 3, 4]
  d = hybrid.describe(hybrid_cfg(hybrid_ratio=3, depth=24))
  assert d["hybrid_ratio_effective"] == 3.0 and d["attention_fraction"] == 0.25
  assert hybrid.describe(hybrid_cfg(hybrid_ratio=6, depth=24))["hybrid_ratio_effective"] == 7.0
  assert hybrid.describe(hybrid_cfg(hybrid_ratio=0))["hybrid_ratio_effective"] is None
  # The scanned group and the unrolled rest.
  kinds = lambda ratio, depth: [(i + 1) % (ratio + 1) == 0 for i in range(depth)]
  assert hybrid.layer_plan(kinds(3, 24)) == (4, 6)
  assert hybrid.layer_plan(kinds(6, 24)) == (7, 3)  # 21 layers scanned, 3 unrolled
  assert hybrid.layer_plan([False] * 5) == (1, 5)


def test_built_layers_match_the_placement():
  cfg = hybrid_cfg(depth=9, hybrid_ratio=3)  # attention at 3 and 7; the 9th layer is a leftover linear layer
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), scan_layers=True))
  kinds = [type(b.mixer).__name__ for b in model.layers.blocks] * 2 + [type(model.suffix[0].blocks[0].mixer).__name__]
  assert [i for i, k in enumerate(kinds) if k == "Attention"] == [3, 7]
  assert len(kinds) == 9 and kinds[8] != "Attention"


# ---------------------------------------------------------------------------------------------------------------
# counts


@pytest.mark.parametrize("mixer", LINEAR_MIXERS + ("attention",))
def test_param_counts_match_built_model(mixer):
  cfg = hybrid_cfg(mixer, depth=6, hybrid_ratio=3)  # a scanned group and unrolled leftovers
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), scan_layers=True))
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  counts = param_counts(cfg)
  assert counts["total"] == sum(math.prod(v.shape) for _, v in params)
  vocab_sized = sum(math.prod(v.shape) for _, v in params if "vocab" in v.get_metadata()["out_sharding"])
  assert counts["embedding"] == vocab_sized
  assert counts["active"] == counts["total"]


def test_all_attention_twin_counts_as_dense():
  """mixer=attention builds the dense decoder (untied head): same parameters and FLOPs as the dense formulas."""
  cfg = hybrid_cfg("attention")
  dense = configs.load("dense:tiny").model
  dense.update(dict(depth=cfg.depth, tie_embeddings=False))
  assert param_counts(cfg) == param_counts(dense)
  assert flops_per_token(cfg, 64) == flops_per_token(dense, 64)


# ---------------------------------------------------------------------------------------------------------------
# decoding


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward_and_decode(graphdef, state, toks_bt, n_prefill):
  """(full forward logits, logits of a prefill of n_prefill tokens followed by one-token decode steps)."""
  model = nnx.merge(graphdef, state)
  full_btv, _ = model(toks_bt)
  b, t = toks_bt.shape
  first_btv, cache = model.decode(toks_bt[:, :n_prefill], model.init_cache(b, t + 3))

  def body(cache, tok_b):
    logits_btv, cache = model.decode(tok_b[:, None], cache)
    return cache, logits_btv[:, 0]

  cache, rest_tbv = jax.lax.scan(body, cache, toks_bt[:, n_prefill:].T)
  return full_btv, jnp.concatenate([first_btv, rest_tbv.swapaxes(0, 1)], axis=1), cache["index"]


@pytest.mark.parametrize("mixer,scan_layers,depth", [("gated_deltanet", True, 4), ("hgrn2", False, 6)])
def test_prefill_and_decode_equal_the_forward_pass(mixer, scan_layers, depth):
  """A 21-token prefill then 19 single-token steps (not chunk aligned: chunk 16) give the forward pass's logits.

  The prefill's logits see only the first 21 tokens, so equality also shows the model is causal there. The
  unrolled HGRN-2 model (lower bounds passed as context, leftover layers) also equals its scanned twin.
  """
  cfg = hybrid_cfg(mixer, depth=depth, hybrid_ratio=3)
  model = built(cfg, scan_layers=scan_layers)
  graphdef, state = nnx.split(model)
  toks = tokens((2, 40))
  full, decoded, index = _forward_and_decode(graphdef, state, toks, 21)
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), atol=2e-4, rtol=2e-4)
  assert int(index) == 40
  if not scan_layers:  # the same weights scanned: layer i initialises from key i either way
    scanned = jax.jit(lambda m, t: m(t)[0])(built(cfg, scan_layers=True), toks)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_only_attention_layers_cache_keys_and_values():
  cfg = hybrid_cfg(depth=8, hybrid_ratio=3)  # two scanned groups of three linear layers and one attention layer
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), scan_layers=True))
  short = jax.eval_shape(lambda: model.init_cache(2, 16))
  long = jax.eval_shape(lambda: model.init_cache(2, 4096))
  period = [jax.tree.leaves(c) for c in short["body"]]
  grown = [i for i, (a, b) in enumerate(zip(short["body"], long["body"]))
           if jax.tree.map(lambda x: x.shape, a) != jax.tree.map(lambda x: x.shape, b)]
  assert grown == [3]  # only the attention layer's cache grows with the context; linear layers keep a fixed state
  assert sorted(short["body"][3]) == ["k", "v"] and all(period)


def test_greedy_generation_follows_the_argmax_of_the_forward_pass():
  cfg = hybrid_cfg(depth=4, hybrid_ratio=3)
  model = built(cfg, scan_layers=True)
  prompt = tokens((2, 9), seed=3)
  out = generate(model, prompt, 6)
  logits, _ = jax.jit(lambda m, t: m(t))(model, out[:, :-1])
  np.testing.assert_array_equal(np.asarray(out[:, :9]), np.asarray(prompt))
  np.testing.assert_array_equal(np.asarray(out[:, 9:]), np.asarray(jnp.argmax(logits[:, 8:], -1)))


# ---------------------------------------------------------------------------------------------------------------
# recall sweep and report


def test_recall_sweep_covers_the_ratios():
  runs = sweep_lib.run_configs(sweep_lib.load_sweep("hybrid_recall:tiny", {}))
  layers = {name: hybrid.attention_layers(cfg.model) for name, cfg in runs}
  assert list(layers.values()) == [[], [12], [6, 13], [3, 7, 11], list(range(14))]
  assert all(cfg.data.source == "mqar" for _, cfg in runs)


def test_recall_report_plots_recall_against_ratio(tmp_path):
  sweep_dir = tmp_path / "sweep"
  fractions = {"pure": (0.0, None, 0.1), "r3": (3 / 14, 11 / 3, 0.6), "attn": (1.0, 0.0, 0.95)}
  with open(sweep_dir.parent / "sweep.json", "w") as f:  # a stray sweep.json elsewhere must not matter
    json.dump({}, f)
  os.makedirs(sweep_dir / "runs")
  with open(sweep_dir / "sweep.json", "w") as f:
    json.dump({"report": "recall"}, f)
  fields = ["name", "status", "params", "tokens", "eval_loss", "loss", "eval_bpb"]
  with open(sweep_dir / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fields)
    w.writeheader()
    for name, (frac, ratio, recall) in fractions.items():
      w.writerow(dict(name=name, status="completed", params=1000, tokens=5000, eval_loss=2.0, loss=2.0, eval_bpb=3))
      os.makedirs(sweep_dir / "runs" / name)
      with open(sweep_dir / "runs" / name / "summary.json", "w") as g:
        json.dump(dict(mixer="gla", attention_fraction=frac, hybrid_ratio_effective=ratio, eval_recall=recall), g)
      with open(sweep_dir / "runs" / name / "metrics.jsonl", "w") as g:
        g.write(json.dumps(dict(step=1, tokens=100, loss=3.0)) + "\n")
  written = report.write_report(str(sweep_dir))
  assert os.path.getsize(written["recall"]) > 0 and "fit" not in written
  text = open(written["report"]).read()
  assert "| pure | gla | pure linear | 0.000 | 0.100 |" in text
  assert "| r3 | gla | 3.67:1 | 0.214 | 0.600 |" in text


# ---------------------------------------------------------------------------------------------------------------
# training, summary and the generate command


def test_hybrid_run_reports_ratio_and_recall_and_generates(tmp_path, capsys):
  from scalezoo.train.cli import main
  workdir = tmp_path / "run"
  code = main(["train", "--workdir", str(workdir), "--quiet", "--config", "hybrid:tiny",
               # test_trainer.tiny_cfg's train keys: test_parallel compiled this train step already
               "--config.train.steps=2", "--config.train.batch_size=8", "--config.train.seq_len=32",
               "--config.train.compute_dtype=float32", "--config.train.schedule=constant", "--config.train.warmup=0",
               "--config.train.eval_batches=1", "--config.checkpoint.every=0",
               "--config.data.source=mqar", "--config.data.mqar_pairs=4", "--config.data.mqar_sequences=64",
               "--config.data.eval_fraction=0.25"])
  assert code == 0
  summary = json.load(open(workdir / "summary.json"))
  assert summary["attention_layers"] == [3] and summary["hybrid_ratio_effective"] == 3.0
  assert summary["attention_fraction"] == 0.25 and summary["mixer"] == "gated_deltanet"
  assert 0.0 <= summary["eval_recall"] <= 1.0
  capsys.readouterr()
  assert main(["generate", "--workdir", str(workdir), "--prompt", "ab", "--tokens", "5", "--temperature", "0"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("ab") and len(out.rstrip("\n").encode("utf-8", "surrogateescape")) >= 2


BAD_INPUTS = [
    pytest.param(["--config.model.mixer=gdn"], "model.mixer='gdn'", id="unknown_mixer"),
    pytest.param(["--config.model.hybrid_ratio=-1"], "model.hybrid_ratio=-1", id="negative_ratio"),
    pytest.param(["--config.model.attn_layers=[1, 9]"], "model.attn_layers", id="layer_out_of_range"),
    pytest.param(["--config.model.linear_heads=5"], "set model.linear_heads", id="heads_not_dividing"),
]


@pytest.mark.parametrize("extra,needle", BAD_INPUTS)
def test_bad_hybrid_config_is_one_line_exit_2_nothing_written(extra, needle, tmp_path, capsys):
  from scalezoo.train.cli import main
  workdir = tmp_path / "run"
  capsys.readouterr()
  code = main(["train", "--workdir", str(workdir), "--quiet", "--config", "hybrid:tiny"] + extra)
  out, err = capsys.readouterr()
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("scalezoo: error: ") and needle in lines[0], err
  assert not workdir.exists()


def test_generate_without_a_run_is_one_line(tmp_path, capsys):
  from scalezoo.train.cli import main
  (tmp_path / "empty").mkdir()
  for workdir, needle in [(tmp_path / "none", "no config.json"), (tmp_path / "empty", "no config.json")]:
    capsys.readouterr()
    assert main(["generate", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
  assert not (tmp_path / "none").exists()
