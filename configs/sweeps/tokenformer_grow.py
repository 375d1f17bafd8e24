"""Progressive scaling of a TokenFormer: grow the parameter tokens in three stages, against a from-scratch baseline.

Stage 1 trains a TokenFormer with a quarter of the final parameter tokens; stages 2 and 3 start from the previous
stage's checkpoint (`init_from`) with twice the tokens each, new key tokens at zero so training resumes exactly where
it stopped. The baseline trains the final size from scratch on as many tokens as the three stages together. tau is a
fixed constant (that of the final size) in every run, so growth leaves the logits unchanged. `scalezoo plot` draws
loss against cumulative training compute for both and states the compute the progressive path saved at equal loss.

  scalezoo sweep --config tokenformer_grow --workdir sweeps/grow

`tokenformer_grow:tiny` is a seconds-long version for tests.
"""

import math

import ml_collections

STAGES = ("stage1", "stage2", "stage3")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Three growth stages and the baseline; `tiny` for tests."""
  if arg not in (None, "", "tiny"):
    raise ValueError(f"tokenformer_grow takes no argument or tiny, not {arg!r}")
  tiny = arg == "tiny"
  width = 64 if tiny else 128
  qkv = [width // 4, width // 2, width]  # final: as many qkv/proj tokens as the width, ffn 4x (the paper's ratio)
  ffn = [4 * n for n in qkv]
  steps = 2 if tiny else 300
  c = ml_collections.ConfigDict()
  c.base = "tokenformer:tiny" if tiny else "tokenformer:quickstart"
  c.tokens_per_param = 0.0  # steps are set per run below
  c.devices_per_run = 0  # stages run one after another
  c.report = "progressive"
  c.baseline = "scratch"
  c.ladder = dict(
      name=list(STAGES) + ["scratch"],
      init_from=["", "run:stage1", "run:stage2", ""],
      model=dict(tokenformer=dict(qkv_tokens=qkv + [qkv[-1]], proj_tokens=qkv + [qkv[-1]],
                                  ffn_tokens=ffn + [ffn[-1]])),
      train=dict(steps=[steps] * 3 + [3 * steps]))
  tau = dict(qkv=math.sqrt(qkv[-1]), proj=math.sqrt(qkv[-1]), ffn=math.sqrt(ffn[-1]))
  if tiny:
    c.fixed = dict(model=dict(tokenformer=dict(tau=tau)),
                   # constant lr: stage 3 and the baseline (same shapes) then share compiled programs
                   train=dict(batch_size=8, seq_len=32, warmup=0, schedule="constant", log_every=1, eval_batches=1),
                   checkpoint=dict(every=0))
  else:
    c.fixed = dict(model=dict(tokenformer=dict(tau=tau)),
                   train=dict(batch_size=16, seq_len=128, warmup=10, log_every=10, eval_batches=8,
                              scan_layers=False),
                   checkpoint=dict(every=100))
  return c
