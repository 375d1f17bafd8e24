"""Data pipelines: tokenizer, sources and their splits, window packing, shuffling, sharding, state, errors."""

from __future__ import annotations

import hashlib
import json
import pathlib
import sysconfig

import ml_collections
import numpy as np
import pytest

from scalezoo.configs import ConfigError
from scalezoo.train import data


def cfg(**kw) -> ml_collections.ConfigDict:
  base = dict(source="stdlib", path="", tokenizer="byte", eval_fraction=0.05, dtype="uint16")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def window_ids(batch: np.ndarray, width: int) -> list[int]:
  """For an arange token stream: the window index of each row, after checking the row is that exact window."""
  ids = []
  for row in batch:
    assert row[0] % width == 0, row
    np.testing.assert_array_equal(row, np.arange(row[0], row[0] + width))
    ids.append(int(row[0]) // width)
  return ids


@pytest.fixture
def arange_npy(tmp_path):
  """tokens source whose token i is i: a row's values say exactly which slice it came from."""
  path = tmp_path / "tokens.npy"
  np.save(path, np.arange(4000, dtype=np.int32))
  return cfg(source="tokens", path=str(path), eval_fraction=0.1)  # train: 3600 tokens


def write_corpus(root: pathlib.Path, n: int = 40) -> dict[str, bytes]:
  files = {}
  for i in range(n):
    rel = f"d{i % 3}/doc{i:02d}.txt"
    files[rel] = (f"document {i} " * (5 + i)).encode() + "é\n".encode()
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(files[rel])
  return files


def test_byte_tokenizer_round_trip():
  tok = data.make_tokenizer(cfg())
  assert tok.vocab_size == 256 and tok.eos_id == 0
  text = "héllo, wörld → ∑ 🐍"
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.encode(text.encode()).tolist() == ids.tolist()
  assert tok.decode(ids[:2].tolist() + [0xFF]) == "h\ufffd\ufffd"  # é cut after its first byte, then 0xFF
  with pytest.raises(ValueError):
    tok.decode([256])


def test_text_split_by_path_hash_and_concatenation(tmp_path):
  files = write_corpus(tmp_path / "corpus")
  c = cfg(source="text", path=str(tmp_path / "corpus" / "**" / "*.txt"), eval_fraction=0.3)
  expect = {"train": [], "eval": []}
  for rel in sorted(files):
    frac = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 2**32
    expect["eval" if frac < 0.3 else "train"].append(rel)
  assert expect["train"] and expect["eval"]  # the corpus really exercises both splits
  for split in ("train", "eval"):
    stream = data.load_tokens(c, split)
    want = b"".join(files[rel] + b"\0" for rel in expect[split])
    assert stream.dtype == np.int32
    assert stream.tobytes() == np.frombuffer(want, np.uint8).astype(np.int32).tobytes()
  # The split depends on paths relative to the glob root only: a moved copy splits identically.
  write_corpus(tmp_path / "elsewhere" / "copy")
  moved = cfg(source="text", path=str(tmp_path / "elsewhere" / "copy" / "**" / "*.txt"), eval_fraction=0.3)
  for split in ("train", "eval"):
    np.testing.assert_array_equal(data.load_tokens(moved, split), data.load_tokens(c, split))


def test_text_drops_nul_bytes(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"ab\0cd")
  stream = data.load_tokens(cfg(source="text", path=str(tmp_path / "*.txt"), eval_fraction=1e-9), "train")
  assert stream.tolist() == list(b"abcd\0")


def test_stdlib_split_disjoint_and_stable():
  c = cfg()
  train, eval_ = data.load_tokens(c, "train"), data.load_tokens(c, "eval")
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                if "site-packages" not in p.relative_to(root).parts)
  n_eval = sum(data.in_eval_split(r, 0.05) for r in rels)
  # One eos per file: the files are partitioned between the splits, none dropped or duplicated.
  assert int((eval_ == 0).sum()) == n_eval and int((train == 0).sum()) == len(rels) - n_eval
  assert 0.02 < n_eval / len(rels) < 0.09
  assert train.max() < 256 and eval_.size > 100_000
  assert data.load_tokens(c, "eval") is eval_  # cached per process
  first = sorted(r for r in rels if data.in_eval_split(r, 0.05))[0]
  text = (root / first).read_bytes()
  assert eval_[:len(text)].astype(np.uint8).tobytes() == text and eval_[len(text)] == 0
  assert data.bytes_per_token(c) == 1.0


def test_stdlib_train_batches_are_slices_of_the_stream():
  c = cfg()
  train = data.load_tokens(c, "train")
  windows = train[:len(train) // 65 * 65].reshape(-1, 65)
  batch = next(data.make_train_iterator(c, batch_size=4, seq_len=64, seed=0, num_steps=2))
  assert batch.shape == (4, 65) and batch.dtype == np.int32
  for row in batch:
    assert (windows == row).all(axis=1).any()


def test_windows_are_contiguous_and_one_epoch_is_a_permutation(arange_npy):
  # 3600 train tokens / 9 = 400 windows of seq_len + 1 = 9; 50 steps of 8 = one epoch exactly.
  it = data.make_train_iterator(arange_npy, batch_size=8, seq_len=8, seed=3, num_steps=100)
  epochs = [[], []]
  for step, batch in enumerate(it):
    assert batch.shape == (8, 9) and batch.dtype == np.int32
    epochs[step // 50].extend(window_ids(batch, 9))
  assert step == 99  # exactly num_steps batches
  for ids in epochs:
    assert sorted(ids) == list(range(400))
  assert epochs[0] != sorted(epochs[0])  # shuffled
  assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_determinism_and_seed_dependence(arange_npy):
  def take(seed):
    return np.stack(list(data.make_train_iterator(arange_npy, batch_size=4, seq_len=15, seed=seed, num_steps=5)))
  np.testing.assert_array_equal(take(0), take(0))
  assert not np.array_equal(take(0), take(1))
  assert not np.array_equal(take(1), take(2))


def test_state_restore_mid_stream(arange_npy):
  kw = dict(batch_size=4, seq_len=15, seed=7, num_steps=60)  # 225 windows: crosses epoch boundaries
  it = data.make_train_iterator(arange_npy, **kw)
  for _ in range(37):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = list(it)
  assert len(rest) == 23
  fresh = data.make_train_iterator(arange_npy, **kw)
  fresh.set_state(state)
  restored = list(fresh)
  assert len(restored) == 23
  for a, b in zip(rest, restored):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n_tokens", [400 * 9, 401 * 9])
def test_processes_get_disjoint_windows(tmp_path, n_tokens):
  path = tmp_path / "t.npy"
  np.save(path, np.arange(n_tokens, dtype=np.int32))
  c = cfg(source="tokens", path=str(path), eval_fraction=1e-6)  # int(n * 1e-6) = 0 eval tokens
  kw = dict(seq_len=8, seed=11, num_steps=50)
  parts = [[window_ids(b, 9) for b in data.make_train_iterator(c, batch_size=4, process_index=p,
                                                               process_count=2, **kw)] for p in range(2)]
  single = [window_ids(b, 9) for b in data.make_train_iterator(c, batch_size=8, **kw)]
  seen = [sum(p, []) for p in parts]
  assert not set(seen[0]) & set(seen[1])
  assert len(seen[0]) == len(set(seen[0])) == 200
  assert set(seen[0]) | set(seen[1]) <= set(range(401))
  if n_tokens == 400 * 9:
    # Step by step the two hosts together see what one host with twice the batch sees.
    for t in range(50):
      assert sorted(parts[0][t] + parts[1][t]) == sorted(single[t])


@pytest.mark.parametrize("dtype", ["uint16", "int32", "uint32"])
def test_tokens_raw_binary(tmp_path, dtype):
  stream = (np.arange(1000) * 37 % 50_000).astype(dtype)
  path = tmp_path / "tokens.bin"
  stream.tofile(path)
  c = cfg(source="tokens", path=str(path), dtype=dtype, eval_fraction=0.25)
  train, eval_ = data.load_tokens(c, "train"), data.load_tokens(c, "eval")
  np.testing.assert_array_equal(train, stream[:750])
  np.testing.assert_array_equal(eval_, stream[750:])
  batch = next(data.make_train_iterator(c, batch_size=3, seq_len=9, seed=0, num_steps=1))
  assert batch.dtype == np.int32
  for row in batch:
    assert any(np.array_equal(row, train[i * 10:(i + 1) * 10]) for i in range(75))


def test_eval_batches_are_the_first_windows(arange_npy):
  batches = data.eval_batches(arange_npy, batch_size=4, seq_len=9, num_batches=3)
  assert len(batches) == 3
  for j, b in enumerate(batches):
    assert b.dtype == np.int32 and b.shape == (4, 10)
    np.testing.assert_array_equal(b, 3600 + np.arange(j * 40, (j + 1) * 40).reshape(4, 10))
  # 400 eval tokens hold 40 windows of 10: only 10 batches of 4 exist.
  assert len(data.eval_batches(arange_npy, batch_size=4, seq_len=9, num_batches=100)) == 10
  assert len(data.eval_batches(arange_npy, batch_size=40, seq_len=9, num_batches=100)) == 1


def bad_cases(tmp_path) -> dict:
  """name -> (the key the message must name, a call that must raise ConfigError)."""
  (tmp_path / "small.txt").write_bytes(b"x" * 100)
  np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.int32))
  np.save(tmp_path / "t2d.npy", np.zeros((4, 4), np.int32))
  (tmp_path / "odd.bin").write_bytes(b"abc")
  text, npy, odd = str(tmp_path / "*.txt"), str(tmp_path / "t.npy"), str(tmp_path / "odd.bin")
  load = lambda **kw: data.load_tokens(cfg(**kw), "train")  # noqa: E731
  cases = {
      "unknown source": ("data.source", lambda: load(source="web")),
      "unknown tokenizer": ("data.tokenizer", lambda: data.make_tokenizer(cfg(tokenizer="sentencepiece"))),
      "unknown tokenizer via load": ("data.tokenizer", lambda: load(tokenizer="bpe")),
      "text without path": ("data.path", lambda: load(source="text")),
      "tokens without path": ("data.path", lambda: load(source="tokens")),
      "glob matches nothing": ("data.path", lambda: load(source="text", path=str(tmp_path / "none/*.txt"))),
      "token file missing": ("data.path", lambda: load(source="tokens", path=str(tmp_path / "no.npy"))),
      "npy not 1-D": ("data.path", lambda: load(source="tokens", path=str(tmp_path / "t2d.npy"))),
      "raw size not a multiple": ("data.dtype", lambda: load(source="tokens", path=odd)),
      "float dtype": ("data.dtype", lambda: load(source="tokens", path=odd, dtype="float32")),
      "unknown dtype": ("data.dtype", lambda: load(source="tokens", path=odd, dtype="nope")),
      "train too small": ("train.seq_len", lambda: data.make_train_iterator(
          cfg(source="text", path=text, eval_fraction=1e-9), batch_size=2, seq_len=101, seed=0, num_steps=1)),
      "eval too small": ("data.eval_fraction", lambda: data.eval_batches(
          cfg(source="tokens", path=npy, eval_fraction=0.1), batch_size=8, seq_len=16, num_batches=1)),
  }
  for f in (0.0, 1.0, -0.1, 1.5, "0.1"):
    cases[f"eval_fraction={f!r}"] = ("data.eval_fraction", lambda f=f: load(source="text", path=text, eval_fraction=f))
  return cases


BAD_CASES = ["unknown source", "unknown tokenizer", "unknown tokenizer via load", "text without path",
             "tokens without path", "glob matches nothing", "token file missing", "npy not 1-D",
             "raw size not a multiple", "float dtype", "unknown dtype", "train too small", "eval too small",
             "eval_fraction=0.0", "eval_fraction=1.0", "eval_fraction=-0.1", "eval_fraction=1.5",
             "eval_fraction='0.1'"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_config_errors(tmp_path, case):
  cases = bad_cases(tmp_path)
  assert sorted(cases) == sorted(BAD_CASES)
  key, fn = cases[case]
  with pytest.raises(ConfigError) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg and key in msg, msg


def test_too_small_for_one_window(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"x" * 100)  # 101 tokens with eos
  c = cfg(source="text", path=str(tmp_path / "*.txt"), eval_fraction=1e-9)
  with pytest.raises(ConfigError, match="train split"):
    data.make_train_iterator(c, batch_size=1, seq_len=101, seed=0, num_steps=1)
  # 101 tokens hold exactly one window of 101: a batch of that single window repeated is allowed.
  batch = next(data.make_train_iterator(c, batch_size=2, seq_len=100, seed=0, num_steps=1))
  assert batch.tolist() == [[ord("x")] * 100 + [0]] * 2
  with pytest.raises(ConfigError, match="train split"):
    data.make_train_iterator(c, batch_size=1, seq_len=100, seed=0, num_steps=1, process_count=2)
