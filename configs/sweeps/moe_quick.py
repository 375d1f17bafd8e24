"""Dense vs MoE vs MoGE at equal active parameters: three sizes on the embedded stdlib data (the quickstart's).

Each size is a dense model (a ladder over width, heads and ffn_width, as in dense_quick) and its MoE and MoGE
twins from `configs/moe.py`: 8 experts of width ffn_width / 2, top-2 (MoGE: one expert from each of 2 groups),
so a token passes through the same FFN parameters. Active parameters and FLOPs per token are equal up to the
router (width x 8 per layer, 6 x that in FLOPs), and every run trains on the same tokens, so the runs of one
size use equal compute. The family is an axis through `grid.base`; run names are `<family>-width<W>`.

  scalezoo sweep --config moe_quick --workdir sweeps/moe_quick

results.csv then holds the three families side by side (active_params, flops_per_token, eval_loss,
tokens_per_s). `moe_quick:tiny` is a seconds-long version for tests.
"""

import ml_collections

FAMILIES = ("dense", "moe", "moge")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The comparison sweep; `tiny` for tests."""
  tiny = arg == "tiny"
  if arg not in (None, "", "tiny"):
    raise ValueError(f"moe_quick takes no argument or tiny, not {arg!r}")
  c = ml_collections.ConfigDict()
  c.tokens_per_param = 0.0  # equal tokens for every run: train.steps is fixed below
  c.devices_per_run = 0
  size = "tiny" if tiny else "quickstart"
  c.base = f"dense:{size}"
  c.grid = dict(base=[f"{family}:{size}" for family in FAMILIES])
  if tiny:
    c.fixed = dict(train=dict(steps=2, batch_size=8, seq_len=32, warmup=0, log_every=1, eval_batches=1),
                   checkpoint=dict(every=0))
    c.ladder = dict(model=dict(width=[32, 64], heads=[4, 4], kv_heads=[2, 2], ffn_width=[96, 192]))
  else:
    # As dense_quick: small models, short sequences, float32 on CPU (the quickstart sizes' default); 300 steps
    # of 32 x 64 tokens (614k) per run.
    c.fixed = dict(model=dict(depth=2),
                   train=dict(steps=300, batch_size=32, seq_len=64, warmup=10, eval_every=0, eval_batches=8,
                              log_every=10),
                   checkpoint=dict(every=100))
    c.ladder = dict(model=dict(width=[16, 32, 48], heads=[2, 2, 4], kv_heads=[2, 2, 4], ffn_width=[48, 96, 128]))
  c.name_keys = ["base", "model.width"]
  return c
