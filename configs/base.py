"""Defaults shared by every family: train, data, mesh and checkpoint keys (see DESIGN.md for names)."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns the full key set with defaults; family files fill `model` and adjust the rest."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=16, seq_len=256, seed=0,
      lr=3e-3, schedule="cosine", warmup=100, min_lr_ratio=0.1,  # cosine/wsd end at lr * min_lr_ratio
      decay_fraction=0.2,  # wsd and power: the last 20% of steps decay
      power_a=4.0, power_b=-0.51,  # power: lr = min(lr, batch_size * a * tokens^b) (Shen et al. 2024)
      step_law=False,  # True: lr and batch_size from the Step Law (Li et al. 2025), steps keep the tokens
      mup=False, mup_base_width=128,  # muP: hidden-matrix Adam lr and logits x base/width, attention 1/d_head
      weight_decay=0.1, grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-8,
      microbatches=1, compute_dtype="bfloat16", param_dtype="float32", remat="none", scan_layers=True,
      log_every=10, eval_every=0, eval_batches=8,  # eval_every 0: evaluate at the end only
      max_nonfinite=5,  # stop after this many non-finite steps in a row
      peak_flops=0.0,  # per-device peak FLOP/s for MFU; 0 looks the device kind up
  ))
  c.data = ml_collections.ConfigDict(dict(
      source="stdlib", path="", tokenizer="byte", eval_fraction=0.05, dtype="uint16",
      # source="markov": a random chain of known entropy rate (scalezoo.train.data.markov_entropy_rate) over
      # markov_vocab (<= 256) symbols, each with markov_branching Dirichlet(markov_alpha) next symbols.
      markov_vocab=64, markov_branching=4, markov_alpha=1.0, markov_seed=0, markov_tokens=2_000_000,
      # source="mqar": multi-query associative recall (scalezoo.train.mqar): mqar_pairs key-value pairs, then
      # queries, in each sequence of seq_len + 1 tokens; keys are ids [1, mqar_vocab/2), values [mqar_vocab/2,
      # mqar_vocab) (<= model.vocab_size); mqar_sequences train sequences, eval_fraction of that many for eval.
      mqar_pairs=8, mqar_vocab=64, mqar_seed=0, mqar_sequences=20_000,
  ))
  c.mesh = ml_collections.ConfigDict(dict(
      data=1, fsdp=-1, tensor=1, expert=1,
      preset="",  # dp | fsdp | fsdp_tp | ep (train/sharding.py PRESETS); "" uses the sizes above as given
      dcn_data=1, dcn_fsdp=1, dcn_tensor=1, dcn_expert=1,  # multi-slice: slices along each axis
      rules="",  # overrides of the logical-axis rules table, e.g. "embed=;mlp=tensor,fsdp"
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3))
  # A run directory whose newest checkpoint initialises the parameters (train/init_from.py: TokenFormer growth);
  # in a sweep, "run:NAME" names another run of the sweep.
  c.init_from = ""
  c.overwrite = False  # True lets a run replace a run directory that holds a different config
  return c


def parse_arg(arg: str | None, default_size: str) -> dict:
  """Parses a `get_config` argument: "M" or "size=M,steps=10" (big_vision style)."""
  out = {"size": default_size}
  for part in filter(None, (arg or "").split(",")):
    if "=" in part:
      k, v = part.split("=", 1)
      out[k.strip()] = v.strip()
    else:
      out["size"] = part.strip()
  return out
