"""mqar: sequence layout, answer mask, windows = sequences, splits, recall accuracy in the eval, config errors."""

from __future__ import annotations

import collections
import json
import math

import jax
import ml_collections
import numpy as np
import pytest

from scalezoo import configs
from scalezoo.configs import ConfigError
from scalezoo.train import data, mqar
from scalezoo.train.metrics import read_jsonl
from scalezoo.train.step import recall_counts
from scalezoo.train.trainer import train
from scalezoo.train.validate import validate

PAIRS, VOCAB = 4, 32  # keys [1, 16), values [16, 32)


def cfg(**kw) -> ml_collections.ConfigDict:
  base = dict(source="mqar", path="", tokenizer="byte", eval_fraction=0.1, dtype="uint16", mqar_pairs=PAIRS,
              mqar_vocab=VOCAB, mqar_seed=0, mqar_sequences=500)
  base.update(kw)
  return ml_collections.ConfigDict(base)


@pytest.mark.parametrize("seq_len", [24, 23])  # seq_len + 1 - 2N odd (a pad token) and even (none)
def test_layout_and_answer_mask(seq_len):
  c = cfg()
  seqs = data.load_tokens(c, "train", seq_len).reshape(-1, seq_len + 1)
  assert seqs.shape == (500, seq_len + 1) and seqs.dtype == np.int32
  n, queries = PAIRS, (seq_len + 1 - 2 * PAIRS) // 2
  keys, values = seqs[:, 0:2 * n:2], seqs[:, 1:2 * n:2]
  qkeys, qvalues = seqs[:, 2 * n:2 * n + 2 * queries:2], seqs[:, 2 * n + 1:2 * n + 2 * queries:2]
  assert queries == 8 and qkeys.shape == (500, queries)  # 25 or 24 tokens less the 8 of the context
  assert all(len(set(row)) == n for row in keys.tolist())  # distinct keys within a sequence
  assert keys.min() >= 1 and keys.max() < VOCAB // 2 and values.min() >= VOCAB // 2 and values.max() < VOCAB
  assert set(keys.reshape(-1).tolist()) == set(range(1, VOCAB // 2))  # every key id gets used
  if seq_len == 24:
    assert (seqs[:, -1] == 0).all()  # 25 - 8 = 17 tokens: 8 query pairs and the pad
  for ks, vs, qs, ans in zip(keys.tolist(), values.tolist(), qkeys.tolist(), qvalues.tolist()):
    pairs = dict(zip(ks, vs))
    assert all(pairs[q] == a for q, a in zip(qs, ans))  # KeyError if a query key is not a context key
  # Queries are spread over the sequence's keys (uniform: each of the 4 slots about 1/4 of the queries).
  slot = (qkeys[:, :, None] == keys[:, None, :]).argmax(-1)
  assert np.allclose(np.bincount(slot.reshape(-1), minlength=n) / slot.size, 1 / n, atol=0.03)

  mask = data.recall_mask(c, seq_len)
  assert mask.dtype == bool and mask.shape == (seq_len,)
  assert np.flatnonzero(mask).tolist() == [2 * n + 2 * j for j in range(queries)]
  inputs, targets = seqs[:, :-1], seqs[:, 1:]
  # The marked targets are the answers: each is the value of the key just before it in the same sequence.
  for ks, vs, inp, tgt in zip(keys.tolist(), values.tolist(), inputs[:50].tolist(), targets[:50].tolist()):
    pairs = dict(zip(ks, vs))
    assert [tgt[t] for t in np.flatnonzero(mask)] == [pairs[inp[t]] for t in np.flatnonzero(mask)]
  assert data.recall_mask(cfg(source="stdlib"), seq_len) is None


def test_distinct_keys_uniform_subsets_and_order():
  # Floyd's algorithm alone would bias the order (the last slot takes the largest id more often).
  rows = mqar._distinct_keys(np.random.default_rng(0), 60_000, 2, 3)
  assert (rows[:, 0] != rows[:, 1]).all() and rows.min() == 0 and rows.max() == 2
  counts = collections.Counter(map(tuple, rows.tolist()))
  assert len(counts) == 6 and all(abs(v / 60_000 - 1 / 6) < 0.01 for v in counts.values()), counts
  wide = mqar._distinct_keys(np.random.default_rng(1), 100, 40, 50_000)  # large vocab: no [rows, k] array
  assert all(len(set(r)) == 40 for r in wide.tolist()) and wide.max() < 50_000


def test_windows_are_whole_sequences_and_splits():
  c, seq_len = cfg(), 16
  train_seqs = data.load_tokens(c, "train", seq_len).reshape(-1, seq_len + 1)
  eval_seqs = data.load_tokens(c, "eval", seq_len).reshape(-1, seq_len + 1)
  assert len(train_seqs) == 500 and len(eval_seqs) == 50
  known = {tuple(r) for r in train_seqs.tolist()}
  for batch in data.make_train_iterator(c, batch_size=8, seq_len=seq_len, seed=0, num_steps=3):
    assert batch.shape == (8, seq_len + 1) and all(tuple(r) in known for r in batch.tolist())
  batches = data.eval_batches(c, batch_size=8, seq_len=seq_len, num_batches=100)
  assert len(batches) == 6  # 50 eval sequences: 6 whole batches of 8
  np.testing.assert_array_equal(np.concatenate(batches), eval_seqs[:48])
  assert not {tuple(r) for r in eval_seqs.tolist()} & known  # (collisions of random sequences: ~never)

  data.mqar._generate.cache_clear()  # a fresh draw, not the cached arrays, gives the same tokens
  np.testing.assert_array_equal(data.load_tokens(c, "train", seq_len).reshape(-1, seq_len + 1), train_seqs)
  assert not np.array_equal(data.load_tokens(cfg(mqar_seed=1), "train", seq_len)[:500], train_seqs.reshape(-1)[:500])
  # The eval stream is its own: twice the train sequences (all different) with half the fraction gives the
  # same 50 eval sequences, and the eval fraction never changes the train split.
  other = cfg(mqar_sequences=1000, eval_fraction=0.05)
  np.testing.assert_array_equal(data.load_tokens(other, "eval", seq_len), eval_seqs.reshape(-1))
  assert not np.array_equal(data.load_tokens(other, "train", seq_len)[:500 * 17], train_seqs.reshape(-1))
  np.testing.assert_array_equal(data.load_tokens(cfg(eval_fraction=0.3), "train", seq_len), train_seqs.reshape(-1))
  assert len(data.load_tokens(cfg(mqar_sequences=5, eval_fraction=0.01), "eval", seq_len)) == seq_len + 1  # >= 1


def test_recall_counts_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 10, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(3, 10))
  targets[:, ::2] = logits[:, ::2].argmax(-1)  # some hits on and off the mask
  mask = np.zeros(10, bool)
  mask[[1, 2, 6, 8]] = True
  correct, answers = jax.jit(recall_counts)(logits, targets, mask)
  want = ((logits.argmax(-1) == targets) & mask).sum()
  assert int(answers) == 12 and int(correct) == want and 0 < want < 12
  perfect = np.eye(7, dtype=np.float32)[targets] * 5.0
  correct, answers = recall_counts(perfect, targets, mask)
  assert int(correct) == int(answers) == 12  # recall 1.0
  correct, answers = recall_counts(perfect, targets, np.zeros(10, bool))
  assert int(correct) == int(answers) == 0


@pytest.mark.usefixtures("fast_compile")
def test_trainer_reports_eval_recall(tmp_path):
  # As test_trainer.tiny_cfg (same programs except the eval one, so the suite's compile cache shares them).
  cfg_ = configs.load("dense:tiny")
  cfg_.train.update(dict(steps=2, batch_size=8, seq_len=32, compute_dtype="float32", schedule="constant",
                         warmup=0, eval_batches=1, log_every=1))
  cfg_.checkpoint.every = 0
  cfg_.data.source = "mqar"
  summary = train(cfg_, str(tmp_path), devices=jax.devices()[:1], quiet=True)
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2] and "eval_recall" not in rows[0]
  recall = on_disk["eval_recall"]
  assert 0.0 <= recall <= 1.0 and recall == summary["eval_recall"] == rows[-1]["eval_recall"]
  answers = 8 * 8  # 8 sequences x 8 query pairs (seq_len 32, 8 pairs)
  assert recall * answers == pytest.approx(round(recall * answers))  # a count over exactly these answers
  assert math.isfinite(on_disk["eval_loss"]) and rows[-1]["eval_loss"] == on_disk["eval_loss"]


def bad_runs() -> dict:
  """name -> (key the message must name, overrides of a dense:tiny mqar config at seq_len 32)."""
  return {
      "pairs too many for seq_len": ("data.mqar_pairs", {"data.mqar_pairs": 16, "data.mqar_vocab": 64}),
      "mqar_vocab too small": ("data.mqar_vocab", {"data.mqar_vocab": 17}),
      "mqar_vocab over model vocab": ("data.mqar_vocab", {"data.mqar_vocab": 512}),
      "pairs not positive": ("data.mqar_pairs", {"data.mqar_pairs": 0}),
      "sequences not positive": ("data.mqar_sequences", {"data.mqar_sequences": 0}),
      "seed negative": ("data.mqar_seed", {"data.mqar_seed": -1}),
  }


@pytest.mark.parametrize("case", list(bad_runs()))
def test_config_errors(case):
  key, overrides = bad_runs()[case]
  c = configs.load("dense:tiny")
  c.train.seq_len = 32
  c.data.source = "mqar"
  for k, v in overrides.items():
    group, name = k.split(".")
    c[group][name] = v
  with pytest.raises(ConfigError) as e:
    validate(c, 1)
  msg = str(e.value)
  assert "\n" not in msg and key in msg, msg
  if case != "mqar_vocab over model vocab":  # the data loaders reject the same keys without the model config
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      data.make_train_iterator(c.data, batch_size=2, seq_len=32, seed=0, num_steps=1)


def test_loader_errors():
  with pytest.raises(ValueError, match="seq_len"):
    data.load_tokens(cfg(), "train")  # the layout depends on seq_len
  with pytest.raises(ConfigError, match=r"data\.mqar_sequences"):
    data.eval_batches(cfg(mqar_sequences=20), batch_size=8, seq_len=16, num_batches=1)  # 2 eval sequences
  with pytest.raises(ConfigError, match=r"data\.mqar_sequences"):
    data.make_train_iterator(cfg(mqar_sequences=1), batch_size=1, seq_len=16, seed=0, num_steps=1, process_count=2)
