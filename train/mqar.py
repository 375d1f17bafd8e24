"""mqar: multi-query associative recall (Zoology, Arora et al. 2023), a synthetic source that measures recall.

Every sequence is exactly `train.seq_len + 1` tokens, so the pipeline's non-overlapping windows of that width
are whole sequences. With N = `data.mqar_pairs` and h = `data.mqar_vocab // 2`:

  k_1 v_1 k_2 v_2 ... k_N v_N   q_1 a_1 q_2 a_2 ... q_Q a_Q   [0]

Keys k_i are N distinct ids drawn uniformly from [1, h), values v_i uniform (repeats allowed) from
[h, mqar_vocab). Then Q = (seq_len + 1 - 2N) // 2 query pairs fill the rest: each query key q_j is drawn
uniformly from the sequence's own N keys and followed by its answer a_j, the value paired with q_j in the
context. One pad token 0 (never a key or value) ends the sequence when the remaining length is odd.

The model trains on every next-token target as usual. Context keys and values and the query keys are random,
so no model predicts them beyond chance; only the answers (and the pad) are determined by the context. Recall
accuracy is therefore scored on the answers alone: `answer_mask` marks them in target coordinates, and the
eval step counts argmax predictions that hit them (`scalezoo.train.step.recall_counts`).

The train split holds `data.mqar_sequences` sequences and the eval split max(1, int(eval_fraction *
mqar_sequences)); each split draws from its own child of SeedSequence(`data.mqar_seed`), so no eval sequence
depends on a train draw. Generation is vectorised numpy and cached per (keys, seq_len, split).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from scalezoo.configs import ConfigError

MQAR_DEFAULTS = dict(mqar_pairs=8, mqar_vocab=64, mqar_seed=0, mqar_sequences=20_000)
PAD_ID = 0
_STREAMS = {"train": 0, "eval": 1}


class MqarParams(NamedTuple):
  pairs: int
  vocab: int
  seed: int
  sequences: int


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def mqar_params(data_cfg) -> MqarParams:
  """Validates the `data.mqar_*` keys that do not depend on seq_len or the model; returns them as ints."""
  # ConfigDict raises AttributeError for a missing key, so getattr's default covers partial configs.
  pairs, vocab, seed, sequences = (getattr(data_cfg, k, v) for k, v in MQAR_DEFAULTS.items())
  if not _is_int(pairs) or pairs < 1:
    raise ConfigError(f"data.mqar_pairs={pairs!r} must be a positive integer; set e.g. data.mqar_pairs=8")
  if not _is_int(vocab):
    raise ConfigError(f"data.mqar_vocab={vocab!r} must be an integer; set e.g. data.mqar_vocab=64")
  if vocab < 2 * pairs + 2:
    raise ConfigError(f"data.mqar_vocab={vocab!r} is too small for data.mqar_pairs={pairs}: keys are ids [1, "
                      f"mqar_vocab // 2) and a sequence needs {pairs} distinct ones; set data.mqar_vocab >= "
                      f"{2 * pairs + 2} (e.g. {max(64, 2 * pairs + 2)}) or lower data.mqar_pairs")
  if not _is_int(seed) or seed < 0:
    raise ConfigError(f"data.mqar_seed={seed!r} must be a non-negative integer; set e.g. data.mqar_seed=0")
  if not _is_int(sequences) or sequences < 1:
    raise ConfigError(f"data.mqar_sequences={sequences!r} must be a positive integer (train sequences); set e.g. "
                      f"data.mqar_sequences=20000")
  return MqarParams(int(pairs), int(vocab), int(seed), int(sequences))


def num_queries(pairs: int, seq_len: int) -> int:
  """Query pairs per sequence of seq_len + 1 tokens; ConfigError unless there is at least one."""
  if not _is_int(seq_len) or seq_len < 1:
    raise ValueError(f"seq_len={seq_len!r} must be a positive integer")
  queries = (seq_len + 1 - 2 * pairs) // 2
  if queries < 1:
    raise ConfigError(f"data.mqar_pairs={pairs} does not fit train.seq_len={seq_len}: a sequence of seq_len + 1 "
                      f"tokens needs the {2 * pairs} context tokens and one query pair, so train.seq_len >= "
                      f"{2 * pairs + 1}; raise train.seq_len or lower data.mqar_pairs")
  return queries


def split_sizes(data_cfg, eval_fraction: float) -> dict[str, int]:
  """Sequences per split: train `mqar_sequences`, eval max(1, int(eval_fraction * mqar_sequences))."""
  sequences = mqar_params(data_cfg).sequences
  return {"train": sequences, "eval": max(1, int(eval_fraction * sequences))}


def _distinct_keys(rng: np.random.Generator, rows: int, n: int, k: int) -> np.ndarray:
  """[rows, n] int64: each row n distinct ids of [0, k) in uniformly random order.

  Floyd's algorithm vectorised over rows: O(rows * n^2) work and memory, independent of k, where a per-row
  permutation of k ids would cost rows * k (too much for a large mqar_vocab). Floyd draws a uniform subset but
  not a uniform order, so a random shuffle of each row follows.
  """
  chosen = np.empty((rows, n), np.int64)
  for i, j in enumerate(range(k - n, k)):
    t = rng.integers(0, j + 1, size=rows)
    taken = (chosen[:, :i] == t[:, None]).any(axis=1)
    chosen[:, i] = np.where(taken, j, t)
  order = np.argsort(rng.random((rows, n)), axis=1)
  return np.take_along_axis(chosen, order, axis=1)


@functools.lru_cache(maxsize=8)
def _generate(pairs: int, vocab: int, seed: int, count: int, seq_len: int, split: str) -> np.ndarray:
  rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(len(_STREAMS))[_STREAMS[split]])
  queries, half = num_queries(pairs, seq_len), vocab // 2
  keys = _distinct_keys(rng, count, pairs, half - 1) + 1
  values = rng.integers(half, vocab, size=(count, pairs))
  which = rng.integers(0, pairs, size=(count, queries))
  seqs = np.full((count, seq_len + 1), PAD_ID, np.int32)
  seqs[:, 0:2 * pairs:2] = keys
  seqs[:, 1:2 * pairs:2] = values
  end = 2 * pairs + 2 * queries
  seqs[:, 2 * pairs:end:2] = np.take_along_axis(keys, which, axis=1)
  seqs[:, 2 * pairs + 1:end:2] = np.take_along_axis(values, which, axis=1)
  seqs.flags.writeable = False  # cached: no caller may corrupt it
  return seqs


def sequences(data_cfg, split: str, seq_len: int | None, eval_fraction: float) -> np.ndarray:
  """The `split` sequences as a read-only int32 array [S, seq_len + 1] (cached per keys, seq_len and split)."""
  if split not in _STREAMS:
    raise ValueError(f"split={split!r} must be one of {tuple(_STREAMS)}")
  if seq_len is None:
    raise ValueError("data.source='mqar' lays each sequence out for train.seq_len; pass it, e.g. "
                     "data.load_tokens(data_cfg, split, seq_len=cfg.train.seq_len)")
  p = mqar_params(data_cfg)
  return _generate(p.pairs, p.vocab, p.seed, split_sizes(data_cfg, eval_fraction)[split], seq_len, split)


def answer_mask(data_cfg, seq_len: int) -> np.ndarray:
  """bool [seq_len], in target coordinates (targets = window[1:]): True exactly at the query answers.

  Answer j sits at window index 2N + 2j + 1, so it is target 2N + 2j, predicted from its query key at input
  index 2N + 2j.
  """
  pairs = mqar_params(data_cfg).pairs
  queries = num_queries(pairs, seq_len)
  mask = np.zeros(seq_len, bool)
  mask[2 * pairs:2 * pairs + 2 * queries:2] = True
  return mask
