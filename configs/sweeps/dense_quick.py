"""A small width x depth sweep of the dense family on the embedded stdlib data (the quickstart's sweep).

`scalezoo sweep --config dense_quick --workdir DIR`; `dense_quick:tiny` is a seconds-long version for tests.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Widths x depths at a fixed number of tokens per parameter; `tiny` shrinks everything for tests."""
  c = ml_collections.ConfigDict()
  if arg == "tiny":
    c.base = "dense:tiny"
    c.fixed = dict(train=dict(batch_size=8, seq_len=32, log_every=1, eval_batches=1), checkpoint=dict(every=0))
    c.grid = dict(model=dict(width=[32, 64], depth=[1, 2]))
    c.tokens_per_param = 0.05
  else:
    c.base = "dense:quickstart"
    c.fixed = dict(train=dict(eval_every=0, eval_batches=8), checkpoint=dict(every=50))
    c.grid = dict(model=dict(width=[64, 96, 128], depth=[2, 4]))
    c.tokens_per_param = 0.0
  c.ladder = dict()
  return c
