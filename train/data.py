"""grain input pipelines: token streams from a source, packed into fixed-length windows.

A source yields one flat 1-D token stream per split ("train" or "eval"):

- `stdlib` (default): the running interpreter's standard library `*.py` files, byte tokens.
- `text`: the files a glob (`data.path`) matches, byte tokens.
- `tokens`: a `.npy` or raw binary file of token ids (`data.dtype`), memory-mapped.
- `markov`: a synthetic stationary first-order Markov chain of known entropy rate (`markov_entropy_rate`), so a
  fitted irreducible loss can be checked; train and eval are two samples of the same chain.
- `mqar`: synthetic multi-query associative recall (`scalezoo.train.mqar`) in sequences of exactly seq_len + 1
  tokens (one per window), so loading it needs seq_len; `recall_mask` marks the answers the eval scores.

Documents (files) are joined with `eos` between them; text/stdlib files go to eval by a hash of their
path relative to the corpus root, so the split is stable across machines, runs and added files.
Training windows are non-overlapping slices of `seq_len + 1` tokens, shuffled lazily by grain.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import math
import os
import pathlib
import sysconfig
from typing import NamedTuple

import grain
import numpy as np

from scalezoo.configs import ConfigError
from scalezoo.train import mqar

SOURCES = ("stdlib", "text", "tokens", "markov", "mqar")
TOKENIZERS = ("byte",)
SPLITS = ("train", "eval")


class ByteTokenizer:
  """UTF-8 bytes as tokens. NUL (id 0) separates documents; it does not occur in text."""

  vocab_size = 256
  eos_id = 0

  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns the UTF-8 bytes of `text` as an int32 array."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """Returns the text of byte ids; invalid UTF-8 (e.g. a window cut mid-character) becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"byte token ids must be in [0, {self.vocab_size}); got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _get(data_cfg, key: str, default):
  # ConfigDict raises AttributeError for a missing key, so getattr's default covers partial configs.
  return getattr(data_cfg, key, default)


def _check(data_cfg) -> tuple[str, str, float]:
  """Validates the keys every entry point reads; returns (source, path, eval_fraction)."""
  source = _get(data_cfg, "source", "stdlib")
  if source not in SOURCES:
    raise ConfigError(f"data.source={source!r} is unknown; set data.source to one of {', '.join(SOURCES)}")
  make_tokenizer(data_cfg)
  fraction = _get(data_cfg, "eval_fraction", 0.05)
  if not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
    raise ConfigError(f"data.eval_fraction={fraction!r} must be in (0, 1); set e.g. data.eval_fraction=0.05")
  path = _get(data_cfg, "path", "") or ""
  if source == "markov":
    markov_chain(data_cfg)  # cached; also rejects a nearly reducible draw before anything runs
  elif source == "mqar":
    mqar.mqar_params(data_cfg)
  elif source != "stdlib" and not path:
    what = "a glob of text files" if source == "text" else "a .npy or raw binary token file"
    raise ConfigError(f"data.path is empty but data.source={source!r} needs it; set data.path to {what}")
  return source, path, float(fraction)


def make_tokenizer(data_cfg) -> ByteTokenizer:
  """Returns the tokenizer `data.tokenizer` names (only "byte" for now)."""
  name = _get(data_cfg, "tokenizer", "byte")
  if name not in TOKENIZERS:
    raise ConfigError(f"data.tokenizer={name!r} is unknown; set data.tokenizer to one of {', '.join(TOKENIZERS)}")
  return ByteTokenizer()


def in_eval_split(rel_path: str, eval_fraction: float) -> bool:
  """Whether a file goes to eval: sha1 of its POSIX relative path, read as a fraction, below eval_fraction.

  hashlib (not `hash()`, which is salted per process) keeps the split identical across processes and runs;
  hashing each path on its own keeps a file's split fixed when other files are added or removed.
  """
  digest = hashlib.sha1(rel_path.encode("utf-8")).hexdigest()
  return int(digest[:8], 16) / 2**32 < eval_fraction


def _stdlib_files() -> tuple[pathlib.Path, list[str]]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  rels = [p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file()]
  return root, sorted(r for r in rels if "site-packages" not in r.split("/"))


def _glob_root(pattern: str) -> str:
  # The directories before the first wildcard: hashing paths relative to them keeps the split stable when
  # the corpus moves. The last component is the file name (pattern), so it never counts as the root.
  parts = pattern.split(os.sep)
  root = []
  for part in parts[:-1]:
    if any(c in part for c in "*?["):
      break
    root.append(part)
  return os.sep.join(root) or ("." if not pattern.startswith(os.sep) else os.sep)


def _text_files(path: str) -> tuple[pathlib.Path, list[str]]:
  pattern = os.path.expanduser(path)
  matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
  if not matches:
    raise ConfigError(f"data.path={path!r} matches no files; point data.path at existing text files")
  root = _glob_root(pattern)
  return pathlib.Path(root), sorted(pathlib.Path(os.path.relpath(m, root)).as_posix() for m in matches)


def _concat_documents(root: pathlib.Path, rels: list[str], eos_id: int) -> np.ndarray:
  # A stray NUL in a file would read as a document boundary, so it is dropped.
  eos = bytes([eos_id])
  data = b"".join((root / rel).read_bytes().replace(eos, b"") + eos for rel in rels)
  return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def _open_token_file(path: str, dtype_name: str) -> np.ndarray:
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ConfigError(f"data.path={path!r} does not exist; point data.path at a .npy or raw binary token file")
  if path.endswith(".npy"):
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
      raise ConfigError(f"data.path={path!r} holds a {tokens.dtype} array of shape {tokens.shape}; "
                        f"save a 1-D integer array of token ids")
    return tokens
  try:
    dtype = np.dtype(dtype_name)
  except TypeError:
    raise ConfigError(f"data.dtype={dtype_name!r} is not a numpy dtype; set data.dtype to e.g. 'uint16'") from None
  if dtype.kind not in "iu":
    raise ConfigError(f"data.dtype={dtype_name!r} is not an integer dtype; set data.dtype to e.g. 'uint16'")
  size = os.path.getsize(path)
  if size == 0 or size % dtype.itemsize:
    raise ConfigError(f"data.path={path!r} has {size} bytes, not a positive multiple of data.dtype={dtype_name!r}'s "
                      f"{dtype.itemsize}; set data.dtype to the dtype the file was written with")
  return np.memmap(path, dtype=dtype, mode="r")


# --- markov: a synthetic source whose entropy rate is known exactly -------------------------------------------
#
# First order, not order k: the entropy rate then needs only the V x V matrix and its stationary vector (order
# k would need V**k states), every predicted token of a training window has its one relevant token of context,
# so the minimal loss is the entropy rate at every position (order k would add a seq_len-dependent warm-up),
# and a bigram is learnt by a tiny model in a few hundred steps, which keeps the known-entropy test cheap.

MARKOV_DEFAULTS = dict(markov_vocab=64, markov_branching=4, markov_alpha=1.0, markov_seed=0,
                       markov_tokens=2_000_000)
# Symbols are byte tokens, so every byte-level model (vocab_size >= 256) trains on the chain unchanged.
MARKOV_MAX_VOCAB = ByteTokenizer.vocab_size
# A chain that needs longer than this on average to reach its most probable symbol from some symbol is nearly
# reducible: a sample of practical length would not represent it, and `sample_markov` would stall on it.
MARKOV_MAX_HITTING_TIME = 10_000
# Sampling runs this many chain segments side by side (see `sample_markov`); each is at least this long.
_MARKOV_MAX_CHAINS, _MARKOV_MIN_SEGMENT = 1024, 2048


class MarkovChain(NamedTuple):
  """A first-order chain over symbols 0..V-1; every array is read-only float64/int64."""

  transition: np.ndarray  # [V, V] P[i, j] = Pr(next = j | current = i); rows sum to 1
  stationary: np.ndarray  # [V] pi with pi P = pi; > 0 in exact arithmetic (the chain is irreducible)
  support: np.ndarray  # [V, B] row i's B possible next symbols
  cumulative: np.ndarray  # [V, B] running sums of P[i, support[i]]; the last column is exactly 1


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _markov_params(data_cfg) -> tuple[int, int, float, int, int]:
  """Validates the markov keys; returns (vocab, branching, alpha, seed, tokens)."""
  vocab, branching, alpha, seed, tokens = (_get(data_cfg, k, v) for k, v in MARKOV_DEFAULTS.items())
  if not _is_int(vocab) or not 2 <= vocab <= MARKOV_MAX_VOCAB:
    raise ConfigError(f"data.markov_vocab={vocab!r} must be an integer in [2, {MARKOV_MAX_VOCAB}] (symbols are byte "
                      f"tokens); set e.g. data.markov_vocab=64")
  if not _is_int(branching) or not 1 <= branching <= vocab:
    raise ConfigError(f"data.markov_branching={branching!r} must be an integer in [1, data.markov_vocab={vocab}]; "
                      f"set e.g. data.markov_branching=4")
  if _is_int(alpha) or isinstance(alpha, float):
    alpha = float(alpha)
  if not isinstance(alpha, float) or not 0.0 < alpha < math.inf:
    raise ConfigError(f"data.markov_alpha={alpha!r} must be a positive finite number; set e.g. data.markov_alpha=1.0")
  if not _is_int(seed) or seed < 0:
    raise ConfigError(f"data.markov_seed={seed!r} must be a non-negative integer; set e.g. data.markov_seed=0")
  if not _is_int(tokens) or tokens < 1:
    raise ConfigError(f"data.markov_tokens={tokens!r} must be a positive integer; set e.g. "
                      f"data.markov_tokens=2000000")
  return int(vocab), int(branching), alpha, int(seed), int(tokens)


def _seeds(seed: int) -> list[np.random.SeedSequence]:
  # Children of one SeedSequence: the chain, the train sample and the eval sample draw independent streams.
  return np.random.SeedSequence(seed).spawn(3)


@functools.lru_cache(maxsize=8)
def _build_chain(vocab: int, branching: int, alpha: float, seed: int) -> MarkovChain:
  rng = np.random.default_rng(_seeds(seed)[0])
  # Each row's support holds its successor on one random cycle through all symbols, so the chain is irreducible
  # whatever the other draws are: pi is unique and positive, and every symbol recurs (which `sample_markov`'s
  # splicing needs). The other branching-1 next symbols are uniform over the rest, self included.
  cycle = rng.permutation(vocab)
  successor = np.empty(vocab, np.int64)
  successor[cycle] = np.roll(cycle, -1)
  support = np.empty((vocab, branching), np.int64)
  for i in range(vocab):
    others = np.delete(np.arange(vocab), successor[i])
    support[i] = np.concatenate([[successor[i]], rng.choice(others, branching - 1, replace=False)])
  weights = rng.dirichlet(np.full(branching, alpha), size=vocab)
  # A small alpha can underflow a weight to exactly 0; the floor keeps every support edge (the cycle's above all)
  # possible, and is far below anything a finite sample or a float32 loss can see.
  weights = np.maximum(weights, 1e-12)
  weights /= weights.sum(axis=1, keepdims=True)
  transition = np.zeros((vocab, vocab))
  np.put_along_axis(transition, support, weights, axis=1)
  cumulative = np.cumsum(weights, axis=1)
  cumulative[:, -1] = 1.0
  # pi is the eigenvector of P^T for eigenvalue 1, normalised to sum 1. Solving (P^T - I) pi = 0 with one
  # (redundant: the rows of P^T - I sum to zero) equation swapped for sum(pi) = 1 finds exactly that vector and
  # is better conditioned than a general eigensolver when the chain is nearly periodic.
  system = transition.T - np.eye(vocab)
  system[-1] = 1.0
  rhs = np.zeros(vocab)
  rhs[-1] = 1.0
  stationary = np.linalg.solve(system, rhs)
  # Entries far below 1e-16 (rarely visited symbols of a skewed chain) can come out a rounding error negative.
  stationary = np.maximum(stationary, 0.0) / np.maximum(stationary, 0.0).sum()
  _check_hitting_times(transition, int(np.argmax(stationary)), alpha, branching)
  assert np.abs(stationary @ transition - stationary).max() < 1e-10, "pi is not stationary"
  for a in (transition, stationary, support, cumulative):
    a.flags.writeable = False
  return MarkovChain(transition, stationary, support, cumulative)


def _check_hitting_times(transition: np.ndarray, anchor: int, alpha: float, branching: int) -> None:
  """Raises ConfigError if some symbol takes over MARKOV_MAX_HITTING_TIME steps on average to reach `anchor`.

  Small alpha puts nearly all of a row's mass on one next symbol, which makes the chain almost a deterministic
  map whose cycles it leaves only after ~1/weight steps. The expected hitting times h of the anchor z (the
  symbol `sample_markov` splices at) solve h_z = 0, h_i = 1 + sum_j P_ij h_j: exact, and cheap at V <= 256.
  The check comes before pi is trusted: on a nearly reducible chain the solve for pi is ill-conditioned too.
  """
  rest = np.arange(len(transition)) != anchor
  try:
    hitting = np.linalg.solve(np.eye(len(transition) - 1) - transition[np.ix_(rest, rest)], np.ones(rest.sum()))
    worst = float(hitting.max())
  except np.linalg.LinAlgError:
    worst = math.inf
  if not worst <= MARKOV_MAX_HITTING_TIME:
    raise ConfigError(f"data.markov_alpha={alpha!r} with data.markov_branching={branching} draws a nearly reducible "
                      f"chain (up to {worst:.3g} steps to reach symbol {anchor}, limit {MARKOV_MAX_HITTING_TIME}); "
                      f"raise data.markov_alpha (e.g. 1.0) or change data.markov_seed")


def markov_chain(data_cfg) -> MarkovChain:
  """Returns the chain `data.markov_{vocab,branching,alpha,seed}` define (cached per process).

  Row i of P is Dirichlet(alpha, ..., alpha) over `markov_branching` next symbols: its successor on a random
  cycle through all symbols (which makes the chain irreducible) and branching-1 others drawn uniformly.
  The entropy rate grows with the branching (it is at most log branching) and with alpha; the defaults give
  1.08 nats against log 64 = 4.16.
  """
  vocab, branching, alpha, seed, _ = _markov_params(data_cfg)
  return _build_chain(vocab, branching, alpha, seed)


def markov_entropy_rate(data_cfg) -> float:
  """Entropy rate of the chain in nats per token: H = -sum_i pi_i sum_j P_ij log P_ij (float64, exact)."""
  chain = markov_chain(data_cfg)
  p = chain.transition
  row_entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
  return float(chain.stationary @ row_entropy)


def markov_min_loss(data_cfg, seq_len: int) -> float:
  """The minimal mean next-token cross-entropy (nats) any model can reach on `markov` windows of `seq_len`.

  A window is seq_len + 1 consecutive tokens x_0..x_seq_len of one stationary chain; the model reads
  x_0..x_seq_len-1 and predicts x_1..x_seq_len, so target x_t always has x_{t-1} in its context. For a
  first-order chain Pr(x_t | x_0..x_{t-1}) = P[x_{t-1}, x_t] with x_{t-1} ~ pi, so the Bayes loss is the
  entropy rate H at every one of the seq_len positions and the mean is H whatever seq_len is. (A setup that
  also scored x_0 from an empty context would pay the stationary entropy H(pi) there, giving
  (H(pi) + (seq_len - 1) H) / seq_len; this pipeline never does.) The stream has no segment boundaries to
  account for: `sample_markov` splices its segments into one exact chain.
  """
  if not _is_int(seq_len) or seq_len < 1:
    raise ValueError(f"seq_len={seq_len!r} must be a positive integer")
  return markov_entropy_rate(data_cfg)


def sample_markov(chain: MarkovChain, num_tokens: int, rng: np.random.Generator,
                  num_chains: int | None = None) -> np.ndarray:
  """Returns `num_tokens` int32 symbols: one path of the stationary chain, x_0 ~ pi, sampled in parallel.

  A Python loop over millions of steps is slow, so `num_chains` segments (default: one per 2048 tokens, at
  most 1024) step side by side, each step one vectorised inverse-CDF draw. Joining segments that start
  independently would put a transition at every seam that the chain cannot make (and that a model cannot
  predict). Instead the seams sit at visits of an anchor symbol z (the most probable one): segment 0 starts
  at x_0 ~ pi, every later one starts at z, and segment k is cut just before its first visit of z at or after
  step ceil(num_tokens / num_chains). That cut is a stopping time, so by the strong Markov property what
  follows a cut of a path has the law of a fresh path from z: the concatenation is exactly one path of the
  chain started from pi, hence stationary, with every transition drawn from P and no boundary tokens. The
  steps past each cut are discarded, as is the stream's end beyond `num_tokens`.
  """
  if num_tokens <= 0:
    return np.zeros(0, np.int32)
  vocab, branching = chain.support.shape
  k = num_chains or int(np.clip(num_tokens // _MARKOV_MIN_SEGMENT, 1, _MARKOV_MAX_CHAINS))
  min_len = -(-num_tokens // k)
  anchor = int(np.argmax(chain.stationary))
  # All rows' running sums in one sorted array, row i offset by i: a single searchsorted of i + u then finds
  # the inverse CDF of row i for every segment at once. Offsets cost < 6e-14 of resolution (float64 at 256).
  keys = (np.arange(vocab)[:, None] + chain.cumulative).reshape(-1)
  next_symbol = chain.support.reshape(-1)
  row_last = np.arange(vocab) * branching + branching - 1  # u rounding up to i + 1 must stay in row i

  def step(x):
    flat = np.searchsorted(keys, x + rng.random(k), side="right")
    return next_symbol[np.minimum(flat, row_last[x])]

  start_cdf = np.cumsum(chain.stationary)
  start_cdf[-1] = 1.0
  x = np.full(k, anchor, np.int64)
  x[0] = min(int(np.searchsorted(start_cdf, rng.random(), side="right")), vocab - 1)
  dtype = np.uint8 if vocab <= 256 else np.int32  # a compact path buffer: 1 byte per step
  rows = []
  for _ in range(min_len):
    rows.append(x.astype(dtype))
    x = step(x)
  done = x == anchor
  while not done.all():
    rows.append(x.astype(dtype))
    x = step(x)
    done |= x == anchor
  rows.append(x.astype(dtype))
  path_tk = np.stack(rows)  # [T, K] each column one segment's path
  cut = min_len + np.argmax(path_tk[min_len:] == anchor, axis=0)  # [K] first anchor visit at step >= min_len
  keep_kt = np.arange(len(path_tk))[None, :] < cut[:, None]
  # Boolean indexing reads row-major: segment 0's kept steps, then segment 1's, ...: the concatenation.
  return path_tk.T[keep_kt][:num_tokens].astype(np.int32)


@functools.lru_cache(maxsize=4)
def _markov_splits(vocab: int, branching: int, alpha: float, seed: int, tokens: int,
                   eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  chain = _build_chain(vocab, branching, alpha, seed)
  _, train_seed, eval_seed = _seeds(seed)
  train = sample_markov(chain, tokens, np.random.default_rng(train_seed))
  eval_ = sample_markov(chain, int(tokens * eval_fraction), np.random.default_rng(eval_seed))
  train.flags.writeable = eval_.flags.writeable = False
  return train, eval_


@functools.lru_cache(maxsize=8)
def _load_splits(source: str, path: str, eval_fraction: float, dtype: str) -> tuple[np.ndarray, np.ndarray]:
  # Both splits in one pass, cached: the stdlib is ~2000 files and the trainer asks for train, eval and
  # bytes-per-token separately. Arrays are made read-only so no caller can corrupt the cached copy.
  if source == "tokens":
    tokens = _open_token_file(path, dtype)
    n_eval = int(len(tokens) * eval_fraction)
    return tokens[:len(tokens) - n_eval], tokens[len(tokens) - n_eval:]
  root, rels = _stdlib_files() if source == "stdlib" else _text_files(path)
  eos_id = ByteTokenizer.eos_id
  train = _concat_documents(root, [r for r in rels if not in_eval_split(r, eval_fraction)], eos_id)
  eval_ = _concat_documents(root, [r for r in rels if in_eval_split(r, eval_fraction)], eos_id)
  train.flags.writeable = eval_.flags.writeable = False
  return train, eval_


def load_tokens(data_cfg, split: str, seq_len: int | None = None) -> np.ndarray:
  """Returns the 1-D token stream of `split` ("train" or "eval"): int32, or a read-only memmap for `tokens`.

  stdlib/text: each file's bytes followed by eos, files sorted by relative path, eval files chosen by
  `in_eval_split`. tokens: eval is the last `eval_fraction` of the stream, train the rest. markov:
  `data.markov_tokens` train tokens and int(markov_tokens * eval_fraction) eval tokens, independent samples of
  one chain (see `sample_markov`). mqar: the split's sequences of `seq_len + 1` tokens back to back (see
  `scalezoo.train.mqar`); the layout depends on it, so mqar needs `seq_len` and the other sources ignore it.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be one of {SPLITS}")
  source, path, fraction = _check(data_cfg)
  if source == "mqar":
    return mqar.sequences(data_cfg, split, seq_len, fraction).reshape(-1)
  if source == "markov":
    train, eval_ = _markov_splits(*_markov_params(data_cfg), fraction)
    return train if split == "train" else eval_
  dtype = str(_get(data_cfg, "dtype", "uint16"))
  train, eval_ = _load_splits(source, "" if source == "stdlib" else path, fraction, dtype)
  return train if split == "train" else eval_


def _num_windows(data_cfg, tokens: np.ndarray, split: str, seq_len: int, needed: int, fix: str) -> int:
  n = len(tokens) // (seq_len + 1)
  if n < needed:
    source = _get(data_cfg, "source", "stdlib")
    if source == "mqar":  # a window is one sequence whatever seq_len is: only more sequences help
      where = f"data.source='mqar' (data.mqar_sequences={_get(data_cfg, 'mqar_sequences', None)!r})"
      fix = "raise data.mqar_sequences" + (", data.eval_fraction or lower train.batch_size" if split == "eval" else "")
    elif source == "markov":
      where = f"data.source='markov' (data.markov_tokens={_get(data_cfg, 'markov_tokens', None)!r})"
    elif source == "stdlib":
      where = "data.source='stdlib'"
    else:
      where = f"data.path={_get(data_cfg, 'path', '')!r}"
    raise ConfigError(f"{where}: the {split} split has {len(tokens)} tokens, {n} sequences of train.seq_len+1="
                      f"{seq_len + 1} tokens but {needed} are needed; {fix}")
  return n


class _Window:
  """grain map: window index i -> int32 copy of tokens[i*w:(i+1)*w] (a memmap slice is read here)."""

  def __init__(self, tokens: np.ndarray, width: int):
    self.tokens, self.width = tokens, width

  def __call__(self, index: int) -> np.ndarray:
    start = int(index) * self.width
    return np.asarray(self.tokens[start:start + self.width], dtype=np.int32)


def _shuffle_seed(seed: int) -> int:
  # grain shuffles epoch e with seed + e, so raw seeds s and s+1 would share permutations one epoch apart;
  # hashing the seed makes different seeds give unrelated orders.
  return int(hashlib.sha1(f"scalezoo.data/{seed}".encode()).hexdigest()[:8], 16)


def make_train_iterator(data_cfg, *, batch_size: int, seq_len: int, seed: int, num_steps: int,
                        process_index: int = 0, process_count: int = 1):
  """Returns a grain iterator of exactly `num_steps` int32 batches [batch_size, seq_len + 1] of train windows.

  Inputs are `batch[:, :-1]`, targets `batch[:, 1:]`. `batch_size` is per process. Window i is
  tokens[i*(seq_len+1):(i+1)*(seq_len+1)]; every epoch is a fresh permutation of the windows, and process p
  takes positions p, p+P, ... of it, so processes never share a window within an epoch. The iterator has
  `get_state()` (a JSON-serialisable dict) and `set_state(state)` for checkpointing.
  """
  if batch_size < 1 or seq_len < 1 or num_steps < 1:
    raise ValueError(f"batch_size={batch_size}, seq_len={seq_len} and num_steps={num_steps} must be positive")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  tokens = load_tokens(data_cfg, "train", seq_len)
  n = _num_windows(data_cfg, tokens, "train", seq_len, process_count,
                   "use a larger corpus or a smaller train.seq_len")
  # Each process gets the same number of windows per epoch (the last n % P positions of each permutation are
  # skipped), so epochs stay aligned across processes. When P divides the window count, the union of the
  # processes' step-t batches is the step-t batch one process would see with batch_size * P: the data order
  # then does not depend on how many hosts run the job.
  per_process = n // process_count
  ds = grain.MapDataset.range(n).shuffle(seed=_shuffle_seed(seed))
  ds = ds[process_index:per_process * process_count:process_count]
  # Shuffle before repeat: grain reseeds the shuffle per epoch, so each epoch visits every window exactly
  # once in a new order. Shuffling after repeat would permute across epochs: a window could come twice
  # before another came once, and epoch e would no longer be a clean pass for per-epoch accounting.
  epochs = math.ceil(num_steps * batch_size / per_process)
  ds = ds.repeat(epochs).map(_Window(tokens, seq_len + 1))
  ds = ds.batch(batch_size, drop_remainder=True)[:num_steps]
  # Windows are cheap slices of memory, so two threads hide the copy; a short buffer bounds host memory
  # for large batches (grain's default buffer is 500 elements, here whole batches).
  read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
  return iter(ds.to_iter_dataset(read_options=read))


def eval_batches(data_cfg, *, batch_size: int, seq_len: int, num_batches: int) -> list[np.ndarray]:
  """Returns the first min(num_batches, available) batches of unshuffled eval windows, int32 [B, seq_len + 1].

  Batch j row r is eval window j*batch_size + r, so every run with the same data config evaluates on
  identical tokens. Raises ConfigError if the eval split cannot fill even one batch.
  """
  if batch_size < 1 or seq_len < 1 or num_batches < 1:
    raise ValueError(f"batch_size={batch_size}, seq_len={seq_len} and num_batches={num_batches} must be positive")
  tokens = load_tokens(data_cfg, "eval", seq_len)
  n = _num_windows(data_cfg, tokens, "eval", seq_len, batch_size,
                   "raise data.eval_fraction, use a larger corpus or lower train.seq_len or the eval batch size")
  width, count = seq_len + 1, min(num_batches, n // batch_size)
  size = batch_size * width
  return [np.asarray(tokens[j * size:(j + 1) * size], dtype=np.int32).reshape(batch_size, width)
          for j in range(count)]


def recall_mask(data_cfg, seq_len: int) -> np.ndarray | None:
  """bool [seq_len] over a window's targets: where recall accuracy is scored (mqar's answers); None if no task."""
  return mqar.answer_mask(data_cfg, seq_len) if _get(data_cfg, "source", "stdlib") == "mqar" else None


def bytes_per_token(data_cfg) -> float:
  """Average UTF-8 bytes per token on the eval split, to turn nats per token into bits per byte.

  Exactly 1.0 for the byte tokenizer (each token is one byte, a document separator counts as one).
  """
  _check(data_cfg)
  # A subword tokenizer will measure len(decode(eval).encode()) / len(eval) here instead.
  return 1.0
