"""The markov source: exact entropy rate, an exactly stationary sampled path, splits, config errors, and a tiny
model that learns the chain down to its entropy rate but never below it.

Statistical checks use bounds of 4-5 standard errors, so a correct implementation fails one of them with
probability well under 1e-4; all draws are seeded, so the outcome is fixed anyway. Standard errors of stream
averages come from batch means: the tokens of one path are correlated, so the i.i.d. formula would be too tight.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
import pytest

from scalezoo import configs
from scalezoo.configs import ConfigError
from scalezoo.configs.base import base_config
from scalezoo.configs.loader import apply_overrides
from scalezoo.train import data
from scalezoo.train.trainer import train
from scalezoo.train.validate import validate

SMALL = dict(markov_vocab=16, markov_branching=3)  # learnable by dense:tiny in ~150 steps


def cfg(**kw) -> ml_collections.ConfigDict:
  base = dict(source="markov", path="", tokenizer="byte", eval_fraction=0.05, dtype="uint16")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def batch_means(values: np.ndarray, num_batches: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """Mean and standard error of a correlated series (along axis 0), from the spread of `num_batches` block means."""
  size = len(values) // num_batches
  blocks = values[:size * num_batches].reshape(num_batches, size, *values.shape[1:]).mean(axis=1)
  return blocks.mean(axis=0), blocks.std(axis=0, ddof=1) / math.sqrt(num_batches)


def transition_counts(stream: np.ndarray, vocab: int) -> np.ndarray:
  pairs = stream[:-1].astype(np.int64) * vocab + stream[1:]
  return np.bincount(pairs, minlength=vocab * vocab).reshape(vocab, vocab)


def assert_counts_match(counts: np.ndarray, chain: data.MarkovChain) -> None:
  """Transitions the chain cannot make never occur; the rest pass a chi-square bound against P.

  Given the visits to each state, a Markov path's transition counts are asymptotically multinomial per row
  (Anderson & Goodman 1957), so the statistic is chi-square with V (B - 1) degrees of freedom.
  """
  p = chain.transition
  assert counts[p == 0].sum() == 0
  visits = counts.sum(axis=1, keepdims=True)
  expected = visits * p
  on = (p > 0) & (visits > 0)  # a state never visited contributes no rows
  chi2 = float((((counts - expected) ** 2)[on] / expected[on]).sum())
  df = int(on.sum()) - int((visits > 0).sum())
  assert chi2 < df + 5 * math.sqrt(2 * max(df, 1)), (chi2, df)


def assert_marginal_is_stationary(stream: np.ndarray, chain: data.MarkovChain) -> None:
  vocab = len(chain.stationary)
  onehot = np.zeros((len(stream), vocab), np.float32)
  onehot[np.arange(len(stream)), stream] = 1.0
  freq, se = batch_means(onehot)
  assert (np.abs(freq - chain.stationary) < 5 * se + 1e-6).all(), np.abs(freq - chain.stationary).max()


@pytest.mark.parametrize("keys", [{}, SMALL, dict(markov_vocab=256, markov_branching=2, markov_alpha=0.3)],
                         ids=["default", "small", "byte-vocab"])
def test_entropy_rate_matches_monte_carlo(keys):
  c = cfg(**keys)
  chain = data.markov_chain(c)
  vocab, branching = chain.support.shape
  h = data.markov_entropy_rate(c)
  # pi really is the eigenvector of P^T for eigenvalue 1 (computed here by a general eigensolver).
  values, vectors = np.linalg.eig(chain.transition.T)
  pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
  np.testing.assert_allclose(pi / pi.sum(), chain.stationary, rtol=1e-9, atol=1e-12)
  assert 0 < h <= math.log(branching) + 1e-12 and h < 0.5 * math.log(vocab)
  stream = data.load_tokens(c, "train")
  nll = -np.log(chain.transition[stream[:-1], stream[1:]])
  assert np.isfinite(nll).all()  # every transition is one the chain can make: no seams between segments
  mean, se = batch_means(nll)
  assert abs(mean - h) < 4 * se, (mean, h, se)


@pytest.mark.parametrize("keys", [{}, SMALL], ids=["default", "small"])
def test_transition_and_state_frequencies_match_the_chain(keys):
  c = cfg(**keys)
  chain, stream = data.markov_chain(c), data.load_tokens(c, "train")
  assert_counts_match(transition_counts(stream, len(chain.stationary)), chain)
  assert_marginal_is_stationary(stream, chain)


def test_spliced_segments_form_one_stationary_chain():
  # 20000 segments of ~20 tokens: a seam every ~20 tokens, so any bias at the seams would show.
  chain = data.markov_chain(cfg(**SMALL))
  stream = data.sample_markov(chain, 400_000, np.random.default_rng(1), num_chains=20_000)
  assert stream.shape == (400_000,) and stream.dtype == np.int32
  assert_counts_match(transition_counts(stream, 16), chain)
  assert_marginal_is_stationary(stream, chain)
  # The path starts stationary too: x_0 ~ pi, and so does every training window's first token.
  rng = np.random.default_rng(2)
  firsts = np.array([data.sample_markov(chain, 1, rng)[0] for _ in range(3000)])
  window_starts = stream[::33]
  for sample in (firsts, window_starts):
    counts = np.bincount(sample, minlength=16)
    expected = len(sample) * chain.stationary
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 15 + 5 * math.sqrt(30), chi2


def test_determinism_splits_and_caching():
  c = cfg(**SMALL, markov_tokens=50_000, markov_seed=3)
  train_, eval_ = data.load_tokens(c, "train"), data.load_tokens(c, "eval")
  assert train_.shape == (50_000,) and eval_.shape == (2_500,)
  assert train_.dtype == eval_.dtype == np.int32 and train_.max() < 16 and eval_.max() < 16
  assert not train_.flags.writeable and not eval_.flags.writeable
  assert data.load_tokens(c, "train") is train_  # cached per process
  assert not np.array_equal(train_[:2_500], eval_)  # same chain, different sampling seeds
  data._markov_splits.cache_clear()
  data._build_chain.cache_clear()
  np.testing.assert_array_equal(data.load_tokens(c, "train"), train_)  # a fresh process draws the same
  np.testing.assert_array_equal(data.load_tokens(c, "eval"), eval_)
  other = cfg(**SMALL, markov_tokens=50_000, markov_seed=4)
  assert not np.array_equal(data.markov_chain(other).transition, data.markov_chain(c).transition)
  assert not np.array_equal(data.load_tokens(other, "train"), train_)


def test_pipeline_entry_points_work_unchanged():
  c = cfg(**SMALL, markov_tokens=20_000, eval_fraction=0.1)
  stream = data.load_tokens(c, "train")
  batch = next(data.make_train_iterator(c, batch_size=4, seq_len=32, seed=0, num_steps=1))
  windows = stream[:len(stream) // 33 * 33].reshape(-1, 33)
  assert batch.shape == (4, 33) and batch.dtype == np.int32
  for row in batch:
    assert (windows == row).all(axis=1).any()
  evals = data.eval_batches(c, batch_size=4, seq_len=32, num_batches=100)
  assert len(evals) == 2_000 // (4 * 33)
  np.testing.assert_array_equal(evals[0].reshape(-1), data.load_tokens(c, "eval")[:4 * 33])
  assert data.bytes_per_token(c) == 1.0
  with pytest.raises(ConfigError, match="data.markov_tokens"):
    data.eval_batches(c, batch_size=64, seq_len=32, num_batches=1)


def test_min_loss_is_the_entropy_rate_at_every_seq_len():
  c = cfg(**SMALL)
  h = data.markov_entropy_rate(c)
  for seq_len in (1, 33, 1024):
    assert data.markov_min_loss(c, seq_len) == h
  with pytest.raises(ValueError):
    data.markov_min_loss(c, 0)


def test_defaults_match_base_config_and_validate_accepts_markov():
  base = base_config()
  assert {k: base.data[k] for k in data.MARKOV_DEFAULTS} == data.MARKOV_DEFAULTS
  full = configs.load("dense:tiny")
  full.data.source = "markov"
  validate(full, 1)
  assert data.markov_entropy_rate(full.data) == data.markov_entropy_rate(cfg())
  full.data.markov_branching = 65
  with pytest.raises(ConfigError, match="data.markov_branching"):
    validate(full, 1)  # bad markov keys fail validation too, so a sweep rejects them before its first run


BAD = {
    "markov_vocab": [257, 1, 16.0, True],
    "markov_branching": [0, 17, 2.5],
    "markov_alpha": [0.0, -1.0, float("nan"), float("inf"), "1", 1e-3],  # 1e-3: nearly reducible draw
    "markov_seed": [-1, 0.5],
    "markov_tokens": [0, -5],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in BAD.items() for v in vs])
def test_config_errors(key, value):
  c = cfg(**{**SMALL, key: value})
  calls = (lambda: data.load_tokens(c, "train"), lambda: data.markov_entropy_rate(c), lambda: data.bytes_per_token(c))
  for fn in calls:
    with pytest.raises(ConfigError) as e:
      fn()
    msg = str(e.value)
    assert "\n" not in msg and f"data.{key}" in msg, msg


# ~14 s; the markov data and the trainer have fast tests, and the slow E-fit below checks the same bound.
@pytest.mark.slow
@pytest.mark.usefixtures("fast_compile")
def test_tiny_model_reaches_but_never_beats_the_entropy_rate(tmp_path):
  """The known-entropy check of what a scaling-law fit calls irreducible loss: no model beats H.

  An eval loss below H by more than 3 standard errors would mean a wrong entropy rate or train/eval leakage;
  one far above it would mean the source is not learnable as documented. The standard error is that of the
  Bayes-optimal per-token loss -log P[x_{t-1}, x_t] on exactly the eval tokens, from its per-batch spread.
  """
  cfg_ = configs.load("dense:tiny")
  # As `--config.data.source=markov --config.data.markov_vocab=16 ...` on the command line would set them.
  apply_overrides(cfg_, {"data.source": "markov", "data.markov_vocab": "16", "data.markov_branching": "3",
                         "data.markov_tokens": "200000", "data.eval_fraction": "0.1"})
  cfg_.train.update(dict(steps=150, batch_size=8, seq_len=32, lr=3e-3, warmup=10, schedule="cosine",
                         eval_batches=32, log_every=50))
  cfg_.checkpoint.every = 0
  h = data.markov_entropy_rate(cfg_.data)
  summary = train(cfg_, str(tmp_path), devices=jax.devices()[:1], quiet=True)
  chain = data.markov_chain(cfg_.data)
  evals = np.stack(data.eval_batches(cfg_.data, batch_size=8, seq_len=32, num_batches=32))  # [32, 8, 33]
  assert evals.shape == (32, 8, 33)
  bayes = -np.log(chain.transition[evals[..., :-1], evals[..., 1:]]).reshape(32, -1).mean(axis=1)
  se = bayes.std(ddof=1) / math.sqrt(len(bayes))
  assert abs(bayes.mean() - h) < 4 * se  # the eval tokens are a typical sample of the chain
  loss = summary["eval_loss"]
  assert loss > h - 3 * se, (loss, h, se)
  assert loss < h + 0.1, (loss, h)


@pytest.mark.slow  # ~60 s; every piece (markov data, sweep, trainer, fit) has faster tests: `pytest -m slow`
@pytest.mark.usefixtures("fast_compile")
def test_sweep_fits_irreducible_loss_at_the_entropy_rate(tmp_path):
  """A tiny sweep (2 widths x 4 step budgets) on a chain of known entropy rate H: the Chinchilla fit's
  irreducible loss E lands on H.

  Tolerance 0.05 nats (6% of H): each eval loss is measured on 8192 tokens (standard error about 0.007), and E is
  an extrapolation from losses 0.01-0.3 above it, which widens that by a few times. A wrong entropy rate, a data
  leak (eval below H) or a fitter that mis-weights the floor moves E by 0.1 or more (a sweep of shorter runs,
  8-128 steps, already fits E = 0.79 against H = 0.89)."""
  from scalezoo.train import laws
  from scalezoo.train.sweep import sweep

  s = ml_collections.ConfigDict()
  s.base = "dense:tiny"
  s.fixed = dict(data=dict(source="markov", markov_vocab=16, markov_branching=3),
                 train=dict(batch_size=8, seq_len=32, warmup=2, eval_batches=32, schedule="cosine"),
                 checkpoint=dict(every=0))
  s.grid = dict(train=dict(steps=[32, 64, 128, 256]))
  s.ladder = dict(model=dict(width=[32, 64], ffn_width=[96, 192]))
  s.name_keys = ["train.steps", "model.width"]
  single = lambda cfg, run_dir, quiet: train(cfg, run_dir, devices=jax.devices()[:1], quiet=quiet)
  rows = sweep(s, str(tmp_path), quiet=True, train_fn=single)
  assert [r["status"] for r in rows] == ["completed"] * 8
  h = data.markov_entropy_rate(apply_overrides(base_config(), {"data.markov_vocab": "16",
                                                               "data.markov_branching": "3"}).data)
  losses = np.array([r["eval_loss"] for r in rows])
  assert losses.min() > h - 0.02  # nothing beats the entropy rate (3 standard errors)
  fit = laws.fit_chinchilla(np.array([r["params"] for r in rows], float), np.array([r["tokens"] for r in rows], float),
                            losses)
  assert abs(fit["E"] - h) < 0.05, (fit, h)
