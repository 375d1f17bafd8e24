"""Config validation before anything compiles: each problem is one ConfigError line naming key, reason, fix."""

from __future__ import annotations

import glob
import math
import os

from scalezoo.configs import ConfigError
from scalezoo.configs.base import base_config
from scalezoo.models.attention import IMPLEMENTATIONS
from scalezoo.models.decoder import REMAT_POLICIES
from scalezoo.models.registry import DTYPES, FAMILIES
from scalezoo.train import data as data_lib
from scalezoo.train import mqar
from scalezoo.train import sharding
from scalezoo.train.optim import SCHEDULES

DATA_SOURCES = data_lib.SOURCES
TOKENIZERS = data_lib.TOKENIZERS
BYTE_VOCAB = 256


def _require(ok: bool, key: str, value, reason: str) -> None:
  if not ok:
    raise ConfigError(f"config key {key}={value!r}: {reason}")


def _check_known_keys(cfg) -> None:
  base = base_config()
  for group in ("train", "data", "mesh", "checkpoint"):
    unknown = sorted(set(cfg[group].keys()) - set(base[group].keys()))
    if unknown:
      raise ConfigError(f"unknown config key {group}.{unknown[0]}; known keys under {group}: "
                        f"{', '.join(base[group].keys())}")
  extra = sorted(set(cfg.keys()) - set(base.keys()))
  if extra:
    raise ConfigError(f"unknown config key {extra[0]}; top-level groups: {', '.join(base.keys())}")


def validate_model(m) -> None:
  """Checks the keys every decoder family shares."""
  _require(m.get("family") in FAMILIES, "model.family", m.get("family"), f"known families: {', '.join(FAMILIES)}")
  if m.family == "parscale":  # the ParScale keys, then the wrapped family's own
    from scalezoo.models import parscale
    try:
      parscale.check_config(m)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    validate_model(parscale.base_config(m))
    return
  keys = FAMILIES[m.family].keys
  unknown = sorted(set(m.keys()) - keys)
  if unknown:
    raise ConfigError(f"unknown config key model.{unknown[0]} for family {m.family}; known: {', '.join(sorted(keys))}")
  if m.family == "tokenformer":  # no kv_heads, head_dim or ffn_width: its own check covers the shared keys
    from scalezoo.models.tokenformer import check_config
    try:
      check_config(m)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    return
  for key in ("width", "depth", "heads", "kv_heads", "vocab_size", "ffn_width"):
    _require(isinstance(m[key], int) and m[key] > 0, f"model.{key}", m[key], "must be a positive integer")
  _require(m.head_dim > 0 or m.width % m.heads == 0, "model.heads", m.heads,
           f"must divide model.width={m.width} (or set model.head_dim)")
  _require(m.heads % m.kv_heads == 0, "model.kv_heads", m.kv_heads, f"must divide model.heads={m.heads}")
  head_dim = m.head_dim or m.width // m.heads
  _require(head_dim % 2 == 0, "model.head_dim", head_dim, "must be even for rotary embeddings")
  _require(m.attention_impl in IMPLEMENTATIONS, "model.attention_impl", m.attention_impl,
           f"choose one of {', '.join(IMPLEMENTATIONS)}")
  if "moe" in m:
    validate_moe(m)
  if m.family == "hybrid":
    from scalezoo.models.hybrid import check_config
    try:
      check_config(m)
    except ValueError as e:
      raise ConfigError(str(e)) from None


def validate_moe(m) -> None:
  """Checks `model.moe` (families moe and moge)."""
  from scalezoo.models.moe import ROUTINGS, SCORES
  e = m.moe
  for key in ("num_experts", "top_k", "groups", "topk_groups"):
    _require(isinstance(e[key], int) and e[key] > 0, f"model.moe.{key}", e[key], "must be a positive integer")
  _require(isinstance(e.first_dense, int) and 0 <= e.first_dense <= m.depth, "model.moe.first_dense",
           e.first_dense, f"must lie in [0, model.depth={m.depth}] (leading layers with a dense FFN)")
  for key in ("shared_experts", "expert_width"):
    _require(isinstance(e[key], int) and e[key] >= 0, f"model.moe.{key}", e[key], "must be an integer >= 0")
  _require(e.routing in ROUTINGS, "model.moe.routing", e.routing, f"choose one of {', '.join(ROUTINGS)}")
  _require(e.score in SCORES, "model.moe.score", e.score, f"choose one of {', '.join(SCORES)}")
  _require(e.top_k <= e.num_experts, "model.moe.top_k", e.top_k,
           f"must be <= model.moe.num_experts={e.num_experts}")
  _require(e.num_experts % e.groups == 0, "model.moe.num_experts", e.num_experts,
           f"must be divisible by model.moe.groups={e.groups} (groups are contiguous blocks of experts)")
  if m.family == "moge" or e.routing == "moge":
    _require(e.top_k % e.groups == 0, "model.moe.top_k", e.top_k,
             f"must be divisible by model.moe.groups={e.groups}: MoGE takes top_k / groups experts per group")
  _require(e.topk_groups <= e.groups, "model.moe.topk_groups", e.topk_groups,
           f"must be <= model.moe.groups={e.groups}")
  if e.routing == "group_limited" and m.family != "moge":
    eligible = e.topk_groups * (e.num_experts // e.groups)
    _require(e.top_k <= eligible, "model.moe.top_k", e.top_k,
             f"must be <= the {eligible} experts of model.moe.topk_groups={e.topk_groups} groups of "
             f"{e.num_experts // e.groups}; raise topk_groups or lower top_k")
  _require(e.capacity_factor >= 0, "model.moe.capacity_factor", e.capacity_factor, "must be >= 0 (0: dropless)")
  for key in ("balance_coef", "z_coef", "bias_rate"):
    _require(e[key] >= 0, f"model.moe.{key}", e[key], "must be >= 0")


def validate_platform(cfg, platform: str) -> None:
  """Checks the options that depend on the devices the run will use."""
  _require(cfg.model.get("attention_impl") != "cudnn" or platform == "gpu", "model.attention_impl", "cudnn",
           f"needs NVIDIA GPUs but the devices are {platform}; use auto or xla")


def validate_step_law_inputs(cfg) -> None:
  """Checks the keys the Step Law reads (train.apply_step_law runs before `validate`)."""
  validate_model(cfg.model)
  t = cfg.train
  for key in ("steps", "batch_size", "seq_len", "microbatches"):
    _require(isinstance(t[key], int) and t[key] > 0, f"train.{key}", t[key], "must be a positive integer")
  _require(isinstance(t.warmup, int) and 0 <= t.warmup <= t.steps, "train.warmup", t.warmup,
           f"must lie in [0, train.steps={t.steps}]")


def _validate_mup_and_power(t) -> None:
  for key in ("step_law", "mup"):
    _require(isinstance(t[key], bool), f"train.{key}", t[key], "must be true or false")
  _require(isinstance(t.mup_base_width, int) and t.mup_base_width > 0, "train.mup_base_width", t.mup_base_width,
           "must be a positive integer (the width whose learning rate muP transfers)")
  _require(isinstance(t.power_a, (int, float)) and math.isfinite(t.power_a) and t.power_a > 0, "train.power_a",
           t.power_a, "must be a positive finite number")
  _require(isinstance(t.power_b, (int, float)) and math.isfinite(t.power_b) and t.power_b <= 0, "train.power_b",
           t.power_b, "must be a finite number <= 0 (the lr falls as tokens grow)")


def validate(cfg, n_devices: int) -> None:
  """Raises ConfigError on the first bad key of `cfg` for a run on `n_devices` devices."""
  _check_known_keys(cfg)
  validate_model(cfg.model)
  _require(isinstance(cfg.get("init_from", ""), str), "init_from", cfg.get("init_from"),
           "must be a run directory (or run:NAME inside a sweep)")
  t = cfg.train
  for key in ("steps", "batch_size", "seq_len", "microbatches", "max_nonfinite", "eval_batches"):
    _require(isinstance(t[key], int) and t[key] > 0, f"train.{key}", t[key], "must be a positive integer")
  for key in ("lr", "min_lr_ratio", "decay_fraction", "weight_decay", "grad_clip", "b1", "b2", "eps", "peak_flops"):
    _require(math.isfinite(t[key]), f"train.{key}", t[key], "must be a finite number")
  _require(t.lr > 0, "train.lr", t.lr, "must be positive")
  _require(t.schedule in SCHEDULES, "train.schedule", t.schedule, f"choose one of {', '.join(SCHEDULES)}")
  _require(0 <= t.warmup <= t.steps, "train.warmup", t.warmup, f"must lie in [0, train.steps={t.steps}]")
  _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must lie in [0, 1]")
  _require(0 < t.decay_fraction <= 1, "train.decay_fraction", t.decay_fraction, "must lie in (0, 1]")
  _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
  _require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)")
  _require(t.compute_dtype in DTYPES, "train.compute_dtype", t.compute_dtype, f"choose one of {', '.join(DTYPES)}")
  _require(t.param_dtype in DTYPES, "train.param_dtype", t.param_dtype, f"choose one of {', '.join(DTYPES)}")
  _require(t.remat in REMAT_POLICIES, "train.remat", t.remat, f"choose one of {', '.join(REMAT_POLICIES)}")
  _require(t.log_every > 0, "train.log_every", t.log_every, "must be positive")
  _require(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0: evaluate at the end)")
  _require(t.peak_flops >= 0, "train.peak_flops", t.peak_flops, "must be >= 0 (0 looks the device up)")
  _validate_mup_and_power(t)
  _require(t.batch_size % t.microbatches == 0, "train.microbatches", t.microbatches,
           f"must divide train.batch_size={t.batch_size}")

  sizes = sharding.mesh_shape(cfg.mesh, n_devices)
  rules = sharding.parse_rules(cfg.mesh.rules)
  dp = 1
  for axis in rules["batch"]:
    dp *= sizes[axis]
  _require(t.batch_size % (dp * t.microbatches) == 0, "train.batch_size", t.batch_size,
           f"must be a multiple of microbatches x data-parallel devices = {t.microbatches} x {dp}")

  d = cfg.data
  _require(d.source in DATA_SOURCES, "data.source", d.source, f"choose one of {', '.join(DATA_SOURCES)}")
  _require(d.tokenizer in TOKENIZERS, "data.tokenizer", d.tokenizer, f"choose one of {', '.join(TOKENIZERS)}")
  _require(0 < d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction, "must lie in (0, 1)")
  if d.source == "text":
    _require(bool(d.path) and bool(glob.glob(os.path.expanduser(d.path), recursive=True)), "data.path", d.path,
             "matches no files; point it at existing text files (a glob like 'corpus/**/*.txt')")
  if d.source == "tokens":
    _require(bool(d.path) and os.path.isfile(os.path.expanduser(d.path)), "data.path", d.path,
             "no such file; point it at a .npy or raw binary file of token ids")
  if d.source == "markov":
    data_lib.markov_chain(d)  # the markov keys, and a draw that is not nearly reducible (cached, milliseconds)
  if d.source == "mqar":
    mqar.num_queries(mqar.mqar_params(d).pairs, t.seq_len)  # the mqar keys, and pairs that fit train.seq_len
    _require(d.mqar_vocab <= cfg.model.vocab_size, "data.mqar_vocab", d.mqar_vocab,
             f"must be <= model.vocab_size={cfg.model.vocab_size} (task ids are token ids); lower data.mqar_vocab")
  _require(cfg.model.vocab_size >= BYTE_VOCAB, "model.vocab_size", cfg.model.vocab_size,
           f"must be >= {BYTE_VOCAB} for the byte tokenizer")

  _require(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "must be >= 0 (0: only at the end)")
  _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep, "must be >= 1")
