"""Family `parscale`: one stream is the base model, the spec's invariants, counts, decoding, recycling, sharding.

Each comparison runs one jitted function per model config, so the invariants share compiles.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalezoo import configs
from scalezoo.configs import ConfigError
from scalezoo.models import flops_per_token, param_counts
from scalezoo.models.parscale import base_config, is_stream_param, recycle_params, stream_param_count
from scalezoo.models.streams import Aggregator, Streams
from scalezoo.train import init_from
from scalezoo.train.checkpoint import Checkpointer
from scalezoo.train.metrics import read_jsonl
from scalezoo.train.sharding import make_mesh
from scalezoo.train.step import make_program
from scalezoo.train.trainer import train
from scalezoo.train.validate import validate
from tests.test_hybrid import _forward_and_decode, built, tokens
from tests.test_registry import xla_flops_per_token
from tests.test_tokenformer import abstract_params
from tests.test_trainer import ONE_DEVICE, tiny_cfg, train_batches

pytestmark = pytest.mark.usefixtures("fast_compile")


# The hybrid base of these tests: one Gated DeltaNet layer and one attention layer (both kinds of stream inputs)
HYBRID = "hybrid:tiny,ratio=1"


def ps_cfg(base: str = "dense:tiny", **parscale):
  """The model config of parscale:BASE with `parscale` keys set (prefix 4 by default: short test sequences)."""
  cfg = configs.load(f"parscale:{base}").model
  cfg.parscale.update(dict(dict(prefix_len=4), **parscale))
  if base == HYBRID:
    cfg.update(dict(depth=2, chunk_size=16))
  return cfg


def base_cfg(base: str):
  return base_config(ps_cfg(base, streams=1))


def logits_fn(model):
  graphdef = nnx.graphdef(model)
  return jax.jit(lambda state, toks: nnx.merge(graphdef, state)(toks)[0])


def flat(model_or_state) -> dict:
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def with_values(state: nnx.State, values: dict) -> nnx.State:
  """`state` with the leaves named in `values` ({path: array}) replaced."""
  return nnx.from_flat_state([(p, v.replace(jnp.asarray(values[p], v.get_value().dtype)) if p in values else v)
                              for p, v in nnx.to_flat_state(state)])


# ---------------------------------------------------------------------------------------------------------------
# one stream is the base model


@pytest.mark.parametrize("base", ["dense:tiny", HYBRID])
def test_one_stream_is_the_base_model_exactly(base):
  """Same parameter tree and values (same random draws), bit-identical logits, same counts and FLOPs."""
  base_model = built(base_cfg(base))
  one = ps_cfg(base, streams=1)
  ps_model = built(one)
  a, b = flat(base_model), flat(ps_model)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  toks = tokens((2, 24))
  np.testing.assert_array_equal(np.asarray(logits_fn(base_model)(nnx.state(base_model), toks)),
                                np.asarray(logits_fn(ps_model)(nnx.state(ps_model), toks)))
  assert param_counts(one) == param_counts(base_cfg(base))
  assert flops_per_token(one, 64) == flops_per_token(base_cfg(base), 64)


# ---------------------------------------------------------------------------------------------------------------
# invariants (spec variants.md 2)


@pytest.fixture(scope="module")
def three_streams():
  """A 3-stream dense model with distinct random prefixes, its jitted logits and a batch."""
  model = built(ps_cfg(streams=3))
  return model, logits_fn(model), tokens((2, 16), seed=1)


def _stream_leaves(state) -> dict:
  return {p: v for p, v in flat(state).items() if is_stream_param(p) and p[-2] != "aggregator"}


def _random_aggregator(state, seed: int) -> dict:
  # std 0.2: weights far from uniform, but stream logits of O(1), so float rounding is not amplified by a
  # saturated softmax when the summation order over streams changes
  rng = np.random.default_rng(seed)
  return {p: rng.normal(0.0, 0.2, v.shape) for p, v in flat(state).items() if "aggregator" in p}


def test_equal_prefixes_give_one_stream_for_any_aggregator(three_streams):
  """All streams equal -> every stream's hidden state is the same, so any weights summing to 1 give it back."""
  model, fn, toks = three_streams
  state = nnx.state(model)
  equal = {p: np.broadcast_to(v[:1], v.shape) for p, v in _stream_leaves(state).items()}
  outs = [np.asarray(fn(with_values(state, {**equal, **_random_aggregator(state, s)}), toks)) for s in (0, 1)]
  np.testing.assert_allclose(outs[0], outs[1], atol=2e-6, rtol=0)
  # With distinct prefixes the aggregator matters: the check above is not vacuous.
  distinct = [np.asarray(fn(with_values(state, _random_aggregator(state, s)), toks)) for s in (0, 1)]
  assert np.abs(distinct[0] - distinct[1]).max() > 1e-3


def test_permuting_streams_leaves_the_output_unchanged(three_streams):
  """Prefixes and the matching aggregator blocks (W1's stream axis, W2's columns, b2) permuted together."""
  model, fn, toks = three_streams
  state = nnx.state(model)
  values = {**_stream_leaves(state), **_random_aggregator(state, 2)}
  perm = np.array([2, 0, 1])
  permuted = {}
  for p, v in values.items():
    # The hidden bias has no streams axis; W1 and W2 have it second, the rest first.
    permuted[p] = v if p[-1] == "b1" else np.take(v, perm, axis=1 if p[-1] in ("w1", "w2") else 0)
  np.testing.assert_allclose(np.asarray(fn(with_values(state, permuted), toks)),
                             np.asarray(fn(with_values(state, values), toks)), atol=2e-6, rtol=0)


def test_logits_at_t_do_not_depend_on_later_tokens(three_streams):
  """The prefix is visible to every position, and the causal mask still holds among real tokens (the hybrid's
  linear layers are covered by the decoding test: its prefill sees no later token)."""
  model, fn, toks = three_streams
  changed = toks.at[:, 9:].set((toks[:, 9:] + 7) % 256)
  a, b = np.asarray(fn(nnx.state(model), toks)), np.asarray(fn(nnx.state(model), changed))
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
  assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-3


def test_aggregation_weights_sum_to_one_and_are_at_least_eps_over_p():
  """Large random logits drive the softmax to 0 for some streams: smoothing is what keeps them at eps / P."""
  streams = Streams(4, prefix_len=1, smoothing=0.05)
  agg = Aggregator(8, streams, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  agg.w2.set_value(jnp.asarray(rng.normal(0, 30.0, agg.w2.shape), jnp.float32))
  w = np.asarray(agg.weights(jnp.asarray(rng.normal(0, 3.0, (4 * 2, 5, 8)), jnp.float32)))
  assert w.shape == (2, 5, 4)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  assert w.min() >= 0.05 / 4 - 1e-7 and w.min() < 0.05 / 4 + 1e-4


@pytest.mark.parametrize("base,scan_layers", [("dense:tiny", True), (HYBRID, False)])
def test_cached_prefix_decoding_equals_the_forward_pass(base, scan_layers):
  """An 11-token prefill, then one-token steps from caches that start with each stream's prefix (attention) or
  initial state (Gated DeltaNet). The prefill's logits see no later token, so this also shows causality."""
  cfg = ps_cfg(base, streams=3 if base == "dense:tiny" else 2)
  graphdef, state = nnx.split(built(cfg, scan_layers=scan_layers))
  full, decoded, index = _forward_and_decode(graphdef, state, tokens((2, 20)), 11)
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), atol=2e-5, rtol=2e-5)
  assert int(index) == 20


# ---------------------------------------------------------------------------------------------------------------
# counts


@pytest.mark.parametrize("base", ["dense:tiny", "hybrid:tiny", "hybrid:tiny,mixer=hgrn", "moe:tiny",
                                  "tokenformer:tiny"])
def test_param_counts_match_the_built_model(base):
  cfg = ps_cfg(base, streams=3)
  sizes = {p: int(np.prod(v.get_value().shape)) for p, v in nnx.to_flat_state(abstract_params(cfg, scan_layers=True))}
  total = sum(sizes.values())
  own = sum(n for p, n in sizes.items() if is_stream_param(p))
  assert param_counts(cfg)["total"] == total
  assert stream_param_count(cfg) == own > 0
  assert param_counts(cfg)["non_embedding"] - param_counts(base_config(cfg))["non_embedding"] == own


def test_flops_per_token_matches_xla():
  """P x the base's layers + attention over the prefix + the aggregator, with the head once per token.

  Width 256, 2 streams, prefix 16, against XLA's count of the loss and its gradient (never run). The formula
  counts causal attention at half: the masked half XLA computes is added, per stream. The prefix attention is 3% of
  the total and the head 8%, so a [0.999, 1.03] band catches either counted the wrong number of times."""
  cfg = ps_cfg("dense:tiny", streams=2, prefix_len=16)
  cfg.update(dict(width=256, depth=2, heads=4, kv_heads=4, ffn_width=704))
  batch, seq = 2, 128
  xla_train, xla_fwd = xla_flops_per_token(cfg, batch, seq)
  formula = flops_per_token(cfg, seq) + 2 * 6.0 * cfg.depth * seq * cfg.width
  assert 0.999 <= xla_train / formula <= 1.03, (xla_train, formula)
  assert 0.999 <= xla_fwd / (formula / 3.0) <= 1.03, (xla_fwd, formula / 3.0)


# ---------------------------------------------------------------------------------------------------------------
# recycling a trained run


@pytest.fixture(scope="module")
def recycled(tmp_path_factory):
  """A 3-step dense run, then a 2-stream ParScale run recycling it for 8 steps with the base frozen."""
  root = tmp_path_factory.mktemp("recycle")
  base = tiny_cfg(steps=3)
  train(base, str(root / "base"), devices=ONE_DEVICE, quiet=True)
  cfg = configs.load("parscale:dense:tiny,streams=2,prefix_len=4,freeze_base=true")
  cfg.train.update(base.train.to_dict())
  cfg.train.update(dict(steps=8, lr=1e-2))
  cfg.checkpoint.every = 0
  cfg.init_from = str(root / "base")
  summary = train(cfg, str(root / "parscale"), devices=ONE_DEVICE, quiet=True)
  return root, cfg, summary


def _loss(program, state, batch) -> float:
  out = program.eval_step(state, jax.device_put(batch, program.batch_sharding))
  return float(out["loss"] if isinstance(out, dict) else out)


def test_recycling_starts_from_the_base_weights_and_lowers_the_loss(recycled):
  """The start state holds the dense run's weights and fresh ParScale parameters; the run's first training loss is
  that state's loss on its first batch (so training started there). After 8 steps the frozen base weights are still
  the dense run's exactly, the ParScale parameters moved, and the loss on every one of those batches went down."""
  root, cfg, summary = recycled
  batches = train_batches(cfg, 8)
  mesh = make_mesh(cfg.mesh, ONE_DEVICE)
  with jax.set_mesh(mesh):
    base_program = make_program(tiny_cfg(steps=3), mesh)
    with Checkpointer(str(root / "base" / "checkpoints")) as ckpt:
      base = flat(ckpt.restore_latest(base_program.abstract_state())[1]["params"])
    program = make_program(cfg, mesh)
    fresh = program.init()
    start = init_from.initial_state(cfg, init_from.check(cfg), program, mesh, fresh)
    with Checkpointer(str(root / "parscale" / "checkpoints")) as ckpt:
      final = ckpt.restore_latest(program.abstract_state())[1]
    before = [_loss(program, start, b) for b in batches]
    after = [_loss(program, final, b) for b in batches]
  start_params, fresh_params = flat(start["params"]), flat(fresh["params"])
  assert set(base) < set(start_params)
  for p, v in start_params.items():
    np.testing.assert_array_equal(v, fresh_params[p] if is_stream_param(p) else base[p], err_msg=str(p))
  first = read_jsonl(str(root / "parscale" / "metrics.jsonl"))[0]
  assert first["step"] == 1
  np.testing.assert_allclose(first["loss"], before[0], rtol=2e-6)
  final_params = flat(final["params"])
  for p, v in final_params.items():
    assert np.array_equal(v, start_params[p]) != is_stream_param(p), p
  # Only prefixes and the aggregator learn, so the drop is small (about 0.01 per batch), but on every batch.
  assert all(a < b for a, b in zip(after, before)), (before, after)
  assert summary["streams"] == 2 and summary["base_family"] == "dense"


def test_recycle_params_rejects_another_model():
  fresh = abstract_params(ps_cfg(streams=2))
  narrower = configs.load("dense:tiny").model
  narrower.width = 32
  with pytest.raises(ValueError, match="embed/embedding has shape"):
    recycle_params(abstract_params(narrower), fresh)


def _fake_run(tmp_path, cfg) -> str:
  run = tmp_path / "source"
  run.mkdir()
  (run / "config.json").write_text(json.dumps(cfg.to_dict()))
  return str(run)


@pytest.mark.parametrize("source,needle", [("hybrid:tiny", "family 'hybrid'"), ("dense:tiny,width", "model.width")])
def test_init_from_another_model_is_one_line(tmp_path, source, needle):
  src = configs.load(source.split(",")[0])
  if source.endswith("width"):
    src.model.width = 128
  cfg = configs.load("parscale:dense:tiny")
  cfg.init_from = _fake_run(tmp_path, src)
  with pytest.raises(ConfigError, match=needle) as e:
    init_from.check(cfg)
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# config (sharded == single device: tests/test_parallel.py runs this family under fsdp_tp)


BAD = [("streams", 0, "model.parscale.streams=0"), ("base", "parscale", "model.parscale.base='parscale'"),
       ("smoothing", 1.0, "model.parscale.smoothing=1.0"), ("prefix_len", -1, "model.parscale.prefix_len=-1"),
       ("init_std", -0.1, "model.parscale.init_std=-0.1"), ("streamz", 2, "model.parscale.streamz=2")]


@pytest.mark.parametrize("key,value,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_naming_the_key(key, value, needle):
  cfg = configs.load("parscale:dense:tiny")
  validate(cfg, 1)
  cfg.model.parscale[key] = value
  with pytest.raises(ConfigError) as e:
    validate(cfg, 1)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_base_keys_are_checked_like_the_base_family():
  cfg = configs.load("parscale:hybrid:tiny")
  cfg.model.mixer = "lstm"
  with pytest.raises(ConfigError, match="model.mixer='lstm'"):
    validate(cfg, 1)
  with pytest.raises(ConfigError, match="unknown base config 'densse'"):
    configs.load("parscale:densse:tiny")
