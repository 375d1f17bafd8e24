"""`scalezoo seqbench`: rows per (config, length), ratios against the first config, files, and bad arguments.

Times are never asserted (benchmarks measure speed); the cache sizes are exact: a KV cache has a slot per position,
a linear layer's state does not depend on the length.
"""

from __future__ import annotations

import csv
import json

import pytest

from scalezoo.train.cli import main

pytestmark = pytest.mark.usefixtures("fast_compile")

FLAGS = ["--config.model.width=32", "--config.model.heads=2", "--config.model.kv_heads=2",
         "--config.model.ffn_width=64", "--config.model.depth=2", "--config.model.chunk_size=16",
         "--config.train.compute_dtype=float32"]


# ~15 s of compiles (train, prefill and decode programs of two models); the pieces it drives have fast tests
# (decoding in test_hybrid.py, the train step everywhere): `pytest -m slow` runs it.
@pytest.mark.slow
def test_rows_ratios_and_cache_sizes(tmp_path, capsys):
  workdir = tmp_path / "bench"
  code = main(["seqbench", "--config", "hybrid:tiny,mixer=attention", "--config", "hybrid:tiny,ratio=0",
               "--seq_lens", "16", "--steps", "1", "--decode_tokens", "2", "--workdir", str(workdir)] + FLAGS)
  assert code == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].split()[:3] == ["config", "seq", "status"] and len(out) == 3
  with open(workdir / "seqbench.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["config"], int(r["seq_len"])) for r in rows] == [("hybrid:tiny,mixer=attention", 16),
                                                              ("hybrid:tiny,ratio=0", 16)]
  assert all(r["status"] == "ok" for r in rows), rows
  ref, other = rows
  assert float(ref["train_vs_ref"]) == 1.0 and float(ref["decode_vs_ref"]) == 1.0
  assert float(other["train_vs_ref"]) == pytest.approx(
      float(other["train_tokens_per_s"]) / float(ref["train_tokens_per_s"]))
  # Caches sized for 16 + 2 + 1 positions, plus the int32 position index: attention's KV cache is 2 layers x
  # (k, v) x 19 positions x 32 floats; each Gated DeltaNet layer holds a [6 heads, 4, 8] state and conv caches of
  # the last 3 q, k (24 channels) and v (48) inputs, whatever the length.
  assert float(ref["cache_mib"]) * 2 ** 20 == pytest.approx(2 * 2 * 19 * 32 * 4 + 4)
  assert float(other["cache_mib"]) * 2 ** 20 == pytest.approx(2 * (6 * 4 * 8 + 3 * (24 + 24 + 48)) * 4 + 4)
  meta = json.loads((workdir / "seqbench.json").read_text())
  assert meta["configs"] == ["hybrid:tiny,mixer=attention", "hybrid:tiny,ratio=0"] and len(meta["rows"]) == 2


@pytest.mark.parametrize("args,needle", [
    (["--seq_lens", "1k"], "--seq_lens '1k'"),
    (["--seq_lens", "0,16"], "positive sequence lengths"),
    (["--decode_tokens", "0"], "--decode_tokens 0"),
    (["--config.model.mixer=gdn"], "model.mixer='gdn'"),
])
def test_bad_arguments_are_one_line(args, needle, tmp_path, capsys):
  code = main(["seqbench", "--config", "hybrid:tiny", "--workdir", str(tmp_path / "b")] + args)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and needle in err[0], err
  assert not (tmp_path / "b").exists()
