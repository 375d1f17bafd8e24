"""Recall vs hybrid ratio: one linear mixer pure, at 12:1, 6:1 and 3:1, and the all-attention twin, on MQAR.

Multi-query associative recall (data.source=mqar): each sequence lists 8 key-value pairs, then asks for the values
of keys drawn from them; `eval_recall` is the fraction of asked values the model predicts. Softmax attention
recalls by lookup; a linear layer must hold the pairs in its fixed-size state, so recall is where the hybrid ratio
shows. 14 layers, so that the ratios give distinct placements: 12:1 -> attention at 12 (13 linear layers per
attention layer), 6:1 -> 6 and 13 (exactly 6:1), 3:1 -> 3, 7 and 11 (11:3); each run's summary.json has the
effective ratio. `scalezoo plot` draws recall against the fraction of attention layers.

  scalezoo sweep --config hybrid_recall --workdir sweeps/recall                   # Gated DeltaNet
  scalezoo sweep --config hybrid_recall:mixer=gla --workdir sweeps/recall_gla

`hybrid_recall:tiny` is a seconds-long version for tests.
"""

import ml_collections

from scalezoo.configs.base import parse_arg

RATIOS = (0, 12, 6, 3)  # linear layers per attention layer; 0 = pure linear


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The ratio sweep for `mixer=` (default gated_deltanet); `tiny` for tests."""
  args = parse_arg(arg, "full")
  size, mixer = args.pop("size"), args.pop("mixer", "gated_deltanet")
  if size not in ("full", "tiny") or args:
    raise ValueError(f"hybrid_recall takes [tiny][,mixer=NAME], not {arg!r}")
  c = ml_collections.ConfigDict()
  c.base = "hybrid:tiny"
  c.tokens_per_param = 0.0  # every run trains on the same tokens
  c.devices_per_run = 0
  c.report = "recall"  # plot recall vs ratio instead of fitting a scaling law
  c.ladder = dict(model=dict(mixer=[mixer] * len(RATIOS) + ["attention"], hybrid_ratio=list(RATIOS) + [0]))
  c.name_keys = ["model.mixer", "model.hybrid_ratio"]
  data = dict(source="mqar", mqar_pairs=8, mqar_vocab=64)
  if size == "tiny":
    c.fixed = dict(model=dict(width=32, depth=14, heads=2, kv_heads=2, ffn_width=64, chunk_size=16),
                   train=dict(steps=2, batch_size=8, seq_len=32, warmup=0, log_every=1, eval_batches=1),
                   data=dict(data, mqar_pairs=4, mqar_sequences=64, eval_fraction=0.25), checkpoint=dict(every=0))
    return c
  c.fixed = dict(model=dict(width=64, depth=14, heads=4, kv_heads=4, ffn_width=128, chunk_size=32),
                 train=dict(steps=600, batch_size=32, seq_len=64, lr=3e-3, warmup=30, log_every=20,
                            eval_batches=8, scan_layers=True),
                 data=data, checkpoint=dict(every=200))
  return c
