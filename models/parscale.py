"""Family `parscale`: P parallel streams over any other family (Chen et al. 2025, spec variants.md 2).

`model.family = "parscale"` with `model.parscale = {base, streams, prefix_len, smoothing, init_std, freeze_base}`;
every other model key is the base family's (`model.parscale.base`: dense, moe, moge, hybrid or tokenformer). The
model is the base family's decoder built with `Streams` (models/streams.py): a per-layer KV prefix per stream in softmax-attention
layers, a per-stream initial state in linear-attention layers, and the aggregator after the final norm. One stream
is the base model exactly: the same parameter tree, the same random draws, the same logits.

Counts: parameters are the base's plus the prefixes (L_attn P 2 K T_p H), the initial states (L_linear P x the
layer's state) and the aggregator (P d^2 + d + d P + P); all of it is non-embedding, which is the N of the ParScale
law. Training FLOPs per token: P x the base's layers (the embedding and the head run once per token, on the
aggregated state), the attention over the prefix (12 T_p N H per attention layer and stream) and the aggregator.

`freeze_base` trains only the ParScale parameters (`is_stream_param`), the paper's second stage on a recycled
model; `recycle_params` maps a base run's parameters onto a ParScale model for `init_from`.
"""

from __future__ import annotations

import inspect

import jax
import ml_collections
from flax import nnx

from scalezoo.models import registry
from scalezoo.models.registry import Family, head_dim, register
from scalezoo.models.streams import Streams, aggregator_flops, aggregator_params

KEYS = ("base", "streams", "prefix_len", "smoothing", "init_std", "freeze_base")
# Names of the modules that hold ParScale's own parameters (a Block's `parscale`, the Decoder's `aggregator`).
STREAM_MODULES = ("parscale", "aggregator")


def _bad(key: str, value, reason: str) -> ValueError:
  return ValueError(f"config key model.parscale.{key}={value!r}: {reason}")


def check_config(cfg) -> None:
  """Raises ValueError (one line naming the key and the fix) when a `model.parscale` key is bad."""
  p = cfg.get("parscale")
  if not isinstance(p, ml_collections.ConfigDict):
    raise ValueError("config key model.parscale is missing; start from a parscale config (parscale:dense:tiny)")
  unknown = sorted(set(p.keys()) - set(KEYS))
  if unknown:
    raise _bad(unknown[0], p[unknown[0]], f"unknown key; known: {', '.join(KEYS)}")
  bases = sorted(set(registry.FAMILIES) - {"parscale"})
  if p.base not in bases:
    raise _bad("base", p.base, f"choose the family to wrap: one of {', '.join(bases)}")
  for key in ("streams", "prefix_len"):
    if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 1:
      raise _bad(key, p[key], "must be a positive integer")
  if not isinstance(p.smoothing, (int, float)) or not 0 <= p.smoothing < 1:
    raise _bad("smoothing", p.smoothing, "must lie in [0, 1) (the aggregation weights' label smoothing, 0.01)")
  if not isinstance(p.init_std, (int, float)) or isinstance(p.init_std, bool) or not p.init_std >= 0:
    raise _bad("init_std", p.init_std, "must be a number >= 0 (the std of the prefixes' and initial states' init)")
  if not isinstance(p.freeze_base, bool):
    raise _bad("freeze_base", p.freeze_base, "must be true or false")
  if "streams" not in inspect.signature(registry.FAMILIES[p.base].build).parameters:
    raise _bad("base", p.base, "that family's builder takes no streams, so it cannot be wrapped")


def base_config(cfg) -> ml_collections.ConfigDict:
  """The base family's model config: `cfg` with family = model.parscale.base and no parscale group."""
  d = cfg.to_dict()
  base = d.pop("parscale")["base"]
  d["family"] = base
  return ml_collections.ConfigDict(d)


def streams_of(cfg) -> Streams:
  p = cfg.parscale
  return Streams(p.streams, p.prefix_len, float(p.smoothing), float(p.init_std))


def _build(cfg, *, rngs, compute_dtype, param_dtype, scan_layers, remat, mup_base_width: int = 0):
  check_config(cfg)
  base = base_config(cfg)
  return registry.family_of(base).build(base, rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype,
                                        scan_layers=scan_layers, remat=remat, streams=streams_of(cfg),
                                        **registry.mup_options(base, mup_base_width))


def _layers(base) -> tuple[int, int, int]:
  """(softmax-attention layers, linear layers, floats in one linear layer's state per sequence)."""
  if base.family != "hybrid":
    return base.depth, 0, 0
  from scalezoo.models.hybrid import attention_layers
  from scalezoo.models.linear.layers import mixer_dims
  n_attn = len(attention_layers(base))
  if base.mixer == "hgrn":
    state = base.width  # a vector state
  elif base.mixer == "attention":
    state = 0
  else:
    d = mixer_dims(base.mixer, base.width, base.linear_heads, base.linear_head_dim)
    state = d["heads"] * d["key_dim"] * d["value_dim"]
  return n_attn, base.depth - n_attn, state


def stream_param_count(cfg) -> int:
  """ParScale's own parameters: prefixes, initial states and the aggregator (0 for one stream)."""
  n = cfg.parscale.streams
  if n == 1:
    return 0
  base = base_config(cfg)
  n_attn, n_linear, state = _layers(base)
  kv_heads = base.get("kv_heads", base.heads)
  prefix = n_attn * n * 2 * cfg.parscale.prefix_len * kv_heads * head_dim(base)
  return prefix + n_linear * n * state + aggregator_params(base.width, n)


def _param_counts(cfg) -> dict:
  counts = dict(registry.param_counts(base_config(cfg)))
  extra = stream_param_count(cfg)
  for key in ("total", "active", "non_embedding"):
    counts[key] += extra
  return counts


def _flops_per_token(cfg, seq_len: int) -> float:
  base = base_config(cfg)
  n = cfg.parscale.streams
  flops = registry.flops_per_token(base, seq_len)
  if n == 1:
    return flops
  head = 6.0 * base.vocab_size * base.width  # runs once per token, after aggregation
  n_attn = _layers(base)[0]
  prefix = n_attn * 12.0 * cfg.parscale.prefix_len * base.heads * head_dim(base)
  return n * (flops - head + prefix) + head + aggregator_flops(base.width, n)


def describe(cfg) -> dict:
  """Summary fields: the base family, streams and prefix length, and the base family's own facts."""
  base = base_config(cfg)
  out = dict(registry.describe(base))
  out.update(base_family=base.family, streams=cfg.parscale.streams, prefix_len=cfg.parscale.prefix_len)
  return out


# ---------------------------------------------------------------------------------------------------------------
# recycling and freezing


def _path_names(path) -> tuple:
  """Names along a state path: nnx flat-state keys as they are, jax key-path entries by their key or name."""
  return tuple(k if isinstance(k, (str, int)) else getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
               for k in path)


def is_stream_param(path) -> bool:
  """Whether a parameter (by its path in the model's state) is one of ParScale's own."""
  return any(name in STREAM_MODULES for name in _path_names(path))


def _name(path) -> str:
  return "/".join(map(str, path))


def recycle_params(old: nnx.State, fresh: nnx.State) -> nnx.State:
  """`fresh` (a ParScale model's initialised Param state) with a trained base model's parameters `old` in place.

  Every parameter of `old` must appear in `fresh` with its shape and take the old value; ParScale's own parameters
  (prefixes, initial states, aggregator) keep their fresh init. Raises ValueError naming the first parameter that
  does not fit.
  """
  old_flat = dict(nnx.to_flat_state(old))
  fresh_flat = dict(nnx.to_flat_state(fresh))
  extra = sorted(_name(p) for p in old_flat if p not in fresh_flat)
  if extra:
    raise ValueError(f"parameter {extra[0]} of the init_from run has no place in this model; recycling needs a run "
                     f"of the base model (same family and sizes)")
  out = []
  for path, v in fresh_flat.items():
    if path not in old_flat:
      if not is_stream_param(path):
        raise ValueError(f"parameter {_name(path)} is missing from the init_from run; recycling needs a run of the "
                         f"base model (same family and sizes)")
      out.append((path, v))
      continue
    old_x, new_x = old_flat[path], v.get_value()
    old_x = old_x.get_value() if isinstance(old_x, nnx.Variable) else old_x
    if tuple(old_x.shape) != tuple(new_x.shape):
      raise ValueError(f"parameter {_name(path)} has shape {tuple(old_x.shape)} in the init_from run and "
                       f"{tuple(new_x.shape)} here; recycling needs a run of the base model (same sizes)")
    out.append((path, v.replace(jax.numpy.asarray(old_x, new_x.dtype))))
  return nnx.from_flat_state(out)


def frozen_mask(params, cfg) -> object | None:
  """True for the parameters `model.parscale.freeze_base` keeps fixed (every base parameter); None if none."""
  if cfg.get("family") != "parscale" or not cfg.parscale.freeze_base:
    return None
  return jax.tree_util.tree_map_with_path(lambda path, v: v.replace(not is_stream_param(path)), params,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


register("parscale", Family(_build, _param_counts, _flops_per_token, frozenset({"family", "parscale"}),
                            describe=describe))
