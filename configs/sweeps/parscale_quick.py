"""ParScale scaling study: P parallel streams in {1, 2, 4, 8} x three dense model sizes on the embedded stdlib data.

Every run trains on the same tokens, so the losses differ only by N (non-embedding parameters, ParScale prefixes and
aggregator included) and P, as in the ParScale law L(N, P) = (A / (N (k ln P + 1)))^alpha + E. The report
(`report = "parscale"`) fits that law with bootstrap intervals, plots eval loss against N per P with the fitted
curves, and states the parameter multiplier k ln P + 1 the fit gives each P.

Sizes: widths 32, 64 and 96 at depth 2 (27k-222k non-embedding parameters at P = 1), 8 prefix tokens per layer and
stream; 300 steps of 16 x 64 bytes (307k tokens) per run. At these sizes ParScale's own parameters are no longer
negligible (the aggregator's P d^2 is about P/26 of a depth-2 model), so N grows with P. The twelve runs took 16.5
minutes on a 2-core x86-64 CPU that was also running other jobs.

  scalezoo sweep --config parscale_quick --workdir sweeps/parscale
  scalezoo fit --workdir sweeps/parscale --law parscale --bootstrap 200

`parscale_quick:tiny` (P = 1 and 2 at one size, 2 steps) is a seconds-long version for tests.
"""

import ml_collections

STREAMS = [1, 2, 4, 8]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Streams (grid) x sizes (a ladder over width, heads and ffn_width) at fixed tokens; `tiny` for tests."""
  if arg not in (None, "", "tiny"):
    raise ValueError(f"parscale_quick takes no argument or tiny, not {arg!r}")
  c = ml_collections.ConfigDict()
  c.tokens_per_param = 0.0  # fixed tokens: train.steps is the same for every run
  c.devices_per_run = 0
  c.report = "parscale"
  c.name_keys = ["model.parscale.streams", "model.width"]  # run names: streams4-width64
  if arg == "tiny":
    # Two runs, one per P: enough to exercise the sweep, the streams column and the report (which says that two
    # runs cannot fit four constants); the fit itself is tested on synthetic sweeps.
    c.base = "parscale:dense:tiny"
    c.grid = dict(model=dict(parscale=dict(streams=[1, 2])))
    c.fixed = dict(model=dict(width=32, ffn_width=96, parscale=dict(prefix_len=4)),
                   train=dict(steps=2, batch_size=8, seq_len=32, warmup=0, log_every=1, eval_batches=1),
                   checkpoint=dict(every=0))
    return c
  c.base = "parscale:dense:quickstart"
  c.grid = dict(model=dict(parscale=dict(streams=STREAMS)))
  c.ladder = dict(model=dict(width=[32, 64, 96], heads=[2, 4, 4], kv_heads=[2, 4, 4], ffn_width=[96, 192, 256]))
  c.fixed = dict(model=dict(depth=2, parscale=dict(prefix_len=8)),
                 train=dict(steps=300, batch_size=16, seq_len=64, warmup=20, eval_every=0, eval_batches=16,
                            log_every=10),
                 checkpoint=dict(every=100))
  return c
