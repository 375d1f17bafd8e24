"""Family `tokenformer`: TokenFormer (Wang et al. 2024), every linear map a Pattention, and growth by tokens.

A block is pre-norm with a LayerNorm without gain or bias (eps 1e-5): x + Proj(Attn(Q(h), K(h), V(h))) with
h = LN(x), where Q, K, V (width -> heads x head_dim, `qkv_tokens` each) and Proj (`proj_tokens`) are Pattentions
(models/pattention.py), attention is causal softmax with scale 1/sqrt(head_dim) and RoPE on the first `rotary_pct`
of each head; then x + FFN(LN(x)) with the FFN one Pattention width -> width (`ffn_tokens`, its only nonlinearity
is Theta). The final norm is a LayerNorm with gain and bias; embeddings are tied. Key tokens start N(0, 0.02),
value tokens N(0, 2 / (depth sqrt(width))) (GPT-NeoX's "wang" init) in all five Pattentions of a layer.

Config: `model.tokenformer` = {qkv_tokens, proj_tokens, ffn_tokens, norm, tau={qkv, proj, ffn}}. The config file
sets each tau to sqrt of its initial token count and growth keeps it (see models/pattention.py: recomputing tau as
sqrt(n_new) changes the function). `grow_params(old, fresh)` maps a trained model's parameters onto one with more
tokens: old tokens first, new key tokens zero, new value tokens from their fresh init, so the logits are unchanged.

Counts: per layer 2 width (3 qkv_tokens + proj_tokens + ffn_tokens) parameters (each Pattention's keys and values),
all of them matmul parameters; plus the tied embedding and the final norm's 2 width.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from scalezoo.models.attention import IMPLEMENTATIONS, Attention, rotary_dims
from scalezoo.models.decoder import Decoder
from scalezoo.models.pattention import NORMS, LayerNorm, Pattention
from scalezoo.models.registry import Family, attention_flops_per_token, register

TOKENFORMER_KEYS = frozenset({"family", "width", "depth", "heads", "vocab_size", "rope_theta", "attention_impl",
                              "tie_embeddings", "rotary_pct", "tokenformer"})
TOKEN_KEYS = ("qkv_tokens", "proj_tokens", "ffn_tokens")
TAU_KEYS = ("qkv", "proj", "ffn")
# The model keys init_from may raise (train/init_from.py); tau stays, so growth keeps the function.
GROWABLE = frozenset(f"tokenformer.{k}" for k in TOKEN_KEYS)


class TokenFormerAttention(Attention):
  """Causal multi-head attention whose q, k, v and output projections are Pattentions.

  Reuses Attention's forward pass, RoPE on the first `rope_fraction` of each head and KV-cache decoding
  (`init_cache`, `step`); only the projections differ.
  """

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, qkv_tokens: int, proj_tokens: int, tau_qkv: float,
               tau_proj: float, value_std: float, key_std: float = 0.02, norm: str = "l2_norm_gelu",
               rope_theta: float = 10000.0, rope_fraction: float = 0.25, implementation: str = "auto",
               compute_dtype=jnp.float32, param_dtype=jnp.float32):
    if width % heads:
      raise ValueError(f"heads={heads} must divide width={width}")
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    head_dim = width // heads
    # Attention.__init__ would build Linear projections; set the fields its methods read instead.
    self.heads, self.kv_heads, self.head_dim = heads, heads, head_dim
    self.rope_theta, self.implementation, self.attn_scale = rope_theta, implementation, None
    self.rope_dims = rotary_dims(head_dim, rope_fraction)
    self.q_norm = self.k_norm = None
    self.param_dtype = param_dtype
    kw = dict(rngs=rngs, norm=norm, key_std=key_std, value_std=value_std, compute_dtype=compute_dtype,
              param_dtype=param_dtype)
    qkv = dict(tau=tau_qkv, in_axis="embed", out_axes=("heads", "head_dim"), **kw)
    self.q = Pattention(width, (heads, head_dim), qkv_tokens, **qkv)
    self.k = Pattention(width, (heads, head_dim), qkv_tokens, **qkv)
    self.v = Pattention(width, (heads, head_dim), qkv_tokens, **qkv)
    self.o = Pattention((heads, head_dim), width, proj_tokens, tau=tau_proj, in_axis=("heads", "head_dim"),
                        out_axes=("embed",), **kw)


# ---------------------------------------------------------------------------------------------------------------
# config


def _bad(key: str, value, reason: str) -> ValueError:
  return ValueError(f"config key model.{key}={value!r}: {reason}")


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_config(cfg) -> None:
  """Raises ValueError naming the model key and the fix when a tokenformer key is bad (one line)."""
  for key in ("width", "depth", "heads", "vocab_size"):
    if not _positive_int(cfg[key]):
      raise _bad(key, cfg[key], "must be a positive integer")
  if cfg.width % cfg.heads:
    raise _bad("heads", cfg.heads, f"must divide model.width={cfg.width}")
  if cfg.tie_embeddings is not True:
    raise _bad("tie_embeddings", cfg.tie_embeddings, "TokenFormer ties the output head to the embedding; set true")
  if cfg.attention_impl not in IMPLEMENTATIONS:
    raise _bad("attention_impl", cfg.attention_impl, f"choose one of {', '.join(IMPLEMENTATIONS)}")
  head_dim = cfg.width // cfg.heads
  try:
    rotary_dims(head_dim, cfg.rotary_pct)
  except (ValueError, TypeError):
    raise _bad("rotary_pct", cfg.rotary_pct, f"int(head_dim={head_dim} x rotary_pct) must be an even number >= 2 "
               f"(0.25 in TokenFormer)") from None
  if not (isinstance(cfg.rope_theta, (int, float)) and cfg.rope_theta > 0):
    raise _bad("rope_theta", cfg.rope_theta, "must be a positive number (10000 in TokenFormer)")
  t = cfg.tokenformer
  unknown = sorted(set(t.keys()) - set(TOKEN_KEYS + ("norm", "tau")))
  if unknown:
    raise _bad(f"tokenformer.{unknown[0]}", t[unknown[0]], f"unknown key; known: {', '.join(TOKEN_KEYS)}, norm, tau")
  for key in TOKEN_KEYS:
    if not _positive_int(t[key]):
      raise _bad(f"tokenformer.{key}", t[key], "must be a positive integer (parameter tokens)")
  if t.norm not in NORMS:
    raise _bad("tokenformer.norm", t.norm, f"choose one of {', '.join(NORMS)}")
  unknown = sorted(set(t.tau.keys()) - set(TAU_KEYS))
  if unknown:
    raise _bad(f"tokenformer.tau.{unknown[0]}", t.tau[unknown[0]], f"unknown key; known: {', '.join(TAU_KEYS)}")
  for key in TAU_KEYS:
    tau = t.tau[key]
    if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0):
      raise _bad(f"tokenformer.tau.{key}", tau, "must be a positive finite number: sqrt of the initial token count, "
                 "kept when the model grows")


# ---------------------------------------------------------------------------------------------------------------
# builder and counts


def value_std(cfg) -> float:
  """The value tokens' init std 2 / (depth sqrt(width))."""
  return 2.0 / (cfg.depth * math.sqrt(cfg.width))


def _build(cfg, *, rngs, compute_dtype, param_dtype, scan_layers, remat, streams=None):
  check_config(cfg)
  t = cfg.tokenformer
  kw = dict(norm=t.norm, value_std=value_std(cfg), compute_dtype=compute_dtype, param_dtype=param_dtype)
  attention = lambda r: TokenFormerAttention(
      cfg.width, cfg.heads, rngs=r, qkv_tokens=t.qkv_tokens, proj_tokens=t.proj_tokens, tau_qkv=t.tau.qkv,
      tau_proj=t.tau.proj, rope_theta=cfg.rope_theta, rope_fraction=cfg.rotary_pct,
      implementation=cfg.attention_impl, **kw)
  ffn = lambda r: Pattention(cfg.width, cfg.width, t.ffn_tokens, tau=t.tau.ffn, rngs=r, **kw)
  return Decoder(vocab_size=cfg.vocab_size, width=cfg.width, depth=cfg.depth, pattern=[(attention, ffn)], rngs=rngs,
                 tie_embeddings=True, scan_layers=scan_layers, remat=remat, compute_dtype=compute_dtype,
                 param_dtype=param_dtype, make_norm=lambda w: LayerNorm(w, parametric=False, param_dtype=param_dtype),
                 make_final_norm=lambda w: LayerNorm(w, param_dtype=param_dtype), streams=streams)


def layer_params(cfg) -> int:
  """Parameters of one layer: keys [n, width] and values [n, width] of q, k, v, proj and the FFN."""
  t = cfg.tokenformer
  return 2 * cfg.width * (3 * t.qkv_tokens + t.proj_tokens + t.ffn_tokens)


def _param_counts(cfg) -> dict:
  embedding = cfg.vocab_size * cfg.width
  total = embedding + cfg.depth * layer_params(cfg) + 2 * cfg.width
  return dict(total=total, active=total, embedding=embedding, non_embedding=total - embedding)


def _flops_per_token(cfg, seq_len: int) -> float:
  # Each Pattention is two matmuls, X K^T and Theta V: every key and value token is a matmul parameter.
  matmul = cfg.depth * layer_params(cfg) + cfg.vocab_size * cfg.width
  return 6.0 * matmul + attention_flops_per_token(cfg, seq_len, cfg.depth)


# ---------------------------------------------------------------------------------------------------------------
# growth


def _name(path) -> str:
  return "/".join(str(p) for p in path)


def _config_key(path) -> str:
  """The model key that sizes a parameter's token axis (for messages)."""
  names = [str(p) for p in path]
  if "channel" in names:
    return "model.tokenformer.ffn_tokens"
  if "mixer" in names and "o" in names:
    return "model.tokenformer.proj_tokens"
  return "model.tokenformer.qkv_tokens"


def _token_axis(variable) -> int | None:
  axes = tuple(variable.get_metadata().get("out_sharding") or ())
  return axes.index("param_tokens") if "param_tokens" in axes else None


def _value(x):
  return x.get_value() if isinstance(x, nnx.Variable) else x


def _growth_plan(old: nnx.State, fresh: nnx.State) -> dict:
  """{path: (token axis, old tokens) for leaves that grow, None for leaves copied as they are}; ValueError else."""
  old_flat = dict(nnx.to_flat_state(old))
  fresh_flat = dict(nnx.to_flat_state(fresh))
  extra = sorted((p for p in old_flat if p not in fresh_flat), key=_name)
  if extra:
    raise ValueError(f"parameter {_name(extra[0])} of the old model is missing from the new one; growth keeps every "
                     f"parameter and only appends parameter tokens (same family, width, depth and heads)")
  plan = {}
  for path, v in fresh_flat.items():
    if path not in old_flat:
      raise ValueError(f"parameter {_name(path)} of the new model is missing from the old one; growth only appends "
                       f"parameter tokens (same family, width, depth and heads)")
    old_shape, new_shape = tuple(jnp.shape(_value(old_flat[path]))), tuple(jnp.shape(_value(v)))
    if old_shape == new_shape:
      plan[path] = None
      continue
    axis = _token_axis(v)
    where = f"parameter {_name(path)}: old shape {old_shape}, new shape {new_shape}"
    others_equal = (axis is not None and len(old_shape) == len(new_shape)
                    and all(a == b for i, (a, b) in enumerate(zip(old_shape, new_shape)) if i != axis))
    if not others_equal:
      raise ValueError(f"{where} differ outside the parameter-token axis; growth only appends parameter tokens "
                       f"(same family, width, depth, heads and vocabulary)")
    if old_shape[axis] > new_shape[axis]:
      raise ValueError(f"{where}: {_config_key(path)} shrinks ({old_shape[axis]} -> {new_shape[axis]}); growth only "
                       f"appends parameter tokens")
    plan[path] = (axis, old_shape[axis])
  return plan


def grow_params(old: nnx.State, fresh: nnx.State) -> nnx.State:
  """`fresh` (the new model's initialised Param state) with the trained parameters of `old` (a smaller model of the
  same family and width) in place.

  Equal shapes take the old value. A leaf that is longer only along its `param_tokens` axis (read from the fresh
  Variable's `out_sharding`; a scanned model has `layers` first) takes the old tokens first, then the fresh ones:
  key tokens are set to exactly 0 there, so with tau unchanged every Pattention's output and the logits stay the
  same, and value tokens keep their fresh init. Anything else (a token count that shrinks, another width, depth or
  vocabulary, a missing parameter) raises ValueError naming the parameter and both shapes. Every leaf is checked
  before anything is computed.
  """
  plan = _growth_plan(old, fresh)
  old_flat = dict(nnx.to_flat_state(old))

  def one(path, v):
    old_x = _value(old_flat[path])
    new_x = v.get_value()
    if plan[path] is None:
      return v.replace(jnp.asarray(old_x, new_x.dtype))
    axis, n_old = plan[path]
    index = tuple(slice(0, n_old) if i == axis else slice(None) for i in range(new_x.ndim))
    base = jnp.zeros_like(new_x) if path[-1] == "key_tokens" else new_x
    return v.replace(base.at[index].set(jnp.asarray(old_x, new_x.dtype)))

  flat = [(path, one(path, v)) for path, v in nnx.to_flat_state(fresh)]
  return nnx.from_flat_state(flat)


register("tokenformer", Family(_build, _param_counts, _flops_per_token, TOKENFORMER_KEYS, growable=GROWABLE))
