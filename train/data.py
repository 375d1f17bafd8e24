"""grain input pipelines: token streams from a source, packed into fixed-length windows.

A source yields one flat 1-D token stream per split ("train" or "eval"):

- `stdlib` (default): the running interpreter's standard library `*.py` files, byte tokens.
- `text`: the files a glob (`data.path`) matches, byte tokens.
- `tokens`: a `.npy` or raw binary file of token ids (`data.dtype`), memory-mapped.

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

import grain
import numpy as np

from scalezoo.configs import ConfigError

SOURCES = ("stdlib", "text", "tokens")
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
  if source != "stdlib" and not path:
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


def load_tokens(data_cfg, split: str) -> np.ndarray:
  """Returns the 1-D token stream of `split` ("train" or "eval"): int32, or a read-only memmap for `tokens`.

  stdlib/text: each file's bytes followed by eos, files sorted by relative path, eval files chosen by
  `in_eval_split`. tokens: eval is the last `eval_fraction` of the stream, train the rest.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be one of {SPLITS}")
  source, path, fraction = _check(data_cfg)
  dtype = str(_get(data_cfg, "dtype", "uint16"))
  train, eval_ = _load_splits(source, "" if source == "stdlib" else path, fraction, dtype)
  return train if split == "train" else eval_


def _num_windows(data_cfg, tokens: np.ndarray, split: str, seq_len: int, needed: int, fix: str) -> int:
  n = len(tokens) // (seq_len + 1)
  if n < needed:
    source = _get(data_cfg, "source", "stdlib")
    where = "data.source='stdlib'" if source == "stdlib" else f"data.path={_get(data_cfg, 'path', '')!r}"
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
  tokens = load_tokens(data_cfg, "train")
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
  tokens = load_tokens(data_cfg, "eval")
  n = _num_windows(data_cfg, tokens, "eval", seq_len, batch_size,
                   "raise data.eval_fraction, use a larger corpus or lower train.seq_len or the eval batch size")
  width, count = seq_len + 1, min(num_batches, n // batch_size)
  size = batch_size * width
  return [np.asarray(tokens[j * size:(j + 1) * size], dtype=np.int32).reshape(batch_size, width)
          for j in range(count)]


def bytes_per_token(data_cfg) -> float:
  """Average UTF-8 bytes per token on the eval split, to turn nats per token into bits per byte.

  Exactly 1.0 for the byte tokenizer (each token is one byte, a document separator counts as one).
  """
  _check(data_cfg)
  # A subword tokenizer will measure len(decode(eval).encode()) / len(eval) here instead.
  return 1.0
