"""The quickstart sweep: three dense model sizes x three compute budgets on the embedded stdlib data.

Each compute budget C = 6ND is an IsoFLOP group of three sizes, so the report has both the Chinchilla fit
(approach 3, all nine runs) and IsoFLOP minima (approach 2). `dense_quick:tiny` is a seconds-long version for tests.
`scalezoo sweep --config dense_quick --workdir DIR`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Sizes (a ladder over width, heads and ffn_width) crossed with compute budgets; `tiny` for tests."""
  c = ml_collections.ConfigDict()
  c.base = "dense:quickstart"
  c.tokens_per_param = 0.0
  c.devices_per_run = 0  # > 0 packs runs onto groups of that many devices, several at once
  if arg == "tiny":
    c.base = "dense:tiny"
    c.fixed = dict(train=dict(batch_size=8, seq_len=32, log_every=1, eval_batches=1), checkpoint=dict(every=0))
    c.grid = dict(budget=dict(compute=[1e9, 3e9]))
    c.ladder = dict(model=dict(width=[32, 64], ffn_width=[96, 192]))
    c.name_keys = ["budget.compute", "model.width"]
    return c
  # Small models and short sequences: on two CPU cores the nine runs take a few minutes together.
  c.fixed = dict(model=dict(depth=2),
                 train=dict(batch_size=32, seq_len=64, warmup=10, eval_every=0, eval_batches=8, log_every=10),
                 checkpoint=dict(every=200))
  c.grid = dict(budget=dict(compute=[3e10, 1e11, 3e11]))
  # Sizes bracket the compute-optimal N of each budget (about sqrt(C / 120) at D/N = 20: 16k, 29k, 50k).
  c.ladder = dict(model=dict(width=[16, 32, 48], heads=[2, 2, 4], kv_heads=[2, 2, 4], ffn_width=[48, 96, 128]))
  c.name_keys = ["budget.compute", "model.width"]
  return c
