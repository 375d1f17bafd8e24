"""Family `hybrid`: linear-attention layers mixed with softmax attention at any ratio.

`model.mixer` names the linear token mixer (`retnet`, `gla`, `hgrn`, `hgrn2`, `deltanet`, `gated_deltanet`; or
`attention` for an all-attention twin built the same way). `model.hybrid_ratio` r puts softmax attention at the
0-based layers with (l + 1) mod (r + 1) == 0, i.e. groups of r linear layers followed by one attention layer
(3 over 24 layers: 3, 7, ..., 23); 0 is pure linear. `model.attn_layers`, a non-empty list, names the attention
layers explicitly instead. When the group does not divide the depth (6:1 over 24 layers: attention at 6, 13, 20)
the leftover layers are linear; the effective ratio is reported (`describe`, in summary.json).

Every layer is `x + mixer(norm(x))`, then `x + SwiGLU(norm(x))` (the dense family's attention and MLP). The
repeating group is scanned; leftover layers are unrolled. HGRN and HGRN-2 share one model-level lower-bound matrix
(softmax over layers), passed to each layer as the decoder's context.

Counts: the linear mixers' parameters and projection FLOPs come from `linear.layers`; their token-mixing op (the
chunked scan: intra-chunk products, state read-out and update, the delta rule's solve) is counted honestly by
`mixer_op_flops`, x3 for training, on top of 6 x matmul parameters.
"""

from __future__ import annotations


from scalezoo.models.decoder import Decoder
from scalezoo.models.linear.layers import (LINEAR_MIXERS, LowerBound, make_linear_mixer, mixer_dims,
                                           mixer_matmul_params, mixer_op_flops, mixer_param_count)
from scalezoo.models.registry import (DENSE_KEYS, Family, attention_factory, attention_flops_per_token,
                                      attention_matmul_params, embedding_params, head_dim, mlp_factory,
                                      mlp_matmul_params, register)

MIXERS = LINEAR_MIXERS + ("attention",)
# Mixers whose layers share the model-level lower bound (spec: a softmax over all layers, attention rows included).
BOUNDED = ("hgrn", "hgrn2")
HYBRID_KEYS = DENSE_KEYS | {"mixer", "hybrid_ratio", "attn_layers", "chunk_size", "linear_heads", "linear_head_dim",
                            "conv_size"}


def attention_layers(cfg) -> list[int]:
  """The 0-based layers that use softmax attention."""
  if cfg.mixer == "attention":
    return list(range(cfg.depth))
  explicit = list(cfg.get("attn_layers", ()) or ())
  if explicit:
    return sorted(int(i) for i in explicit)
  r = cfg.hybrid_ratio
  return [] if r == 0 else [i for i in range(cfg.depth) if (i + 1) % (r + 1) == 0]


def describe(cfg) -> dict:
  """Summary fields: the attention layers, the effective linear:attention ratio (None when pure linear) and the
  fraction of attention layers (0 pure linear, 1 all attention)."""
  attn = attention_layers(cfg)
  n_linear = cfg.depth - len(attn)
  return dict(mixer=cfg.mixer, attention_layers=attn, hybrid_ratio_effective=n_linear / len(attn) if attn else None,
              attention_fraction=len(attn) / cfg.depth)


def layer_plan(kinds: list[bool]) -> tuple[int, int]:
  """(period p, periods m): kinds[:m*p] repeats kinds[:p], m >= 2, m*p as long as possible (ties: smallest p);
  (len, 1) when nothing repeats. The rest, kinds[m*p:], is the unrolled suffix."""
  n = len(kinds)
  best, covered = (n, 1), 0
  for p in range(1, n // 2 + 1):
    m = 1
    while (m + 1) * p <= n and kinds[m * p:(m + 1) * p] == kinds[:p]:
      m += 1
    if m >= 2 and m * p > covered:
      best, covered = (p, m), m * p
  return best


def check_config(cfg) -> None:
  """Raises ValueError naming the model key and the fix when the hybrid keys are inconsistent."""
  if cfg.mixer not in MIXERS:
    raise ValueError(f"config key model.mixer={cfg.mixer!r}: choose one of {', '.join(MIXERS)}")
  r = cfg.hybrid_ratio
  if not isinstance(r, int) or r < 0:
    raise ValueError(f"config key model.hybrid_ratio={r!r}: must be an integer >= 0 (linear layers per attention "
                     f"layer; 0 = pure linear)")
  for i in cfg.get("attn_layers", ()) or ():
    if not isinstance(i, int) or not 0 <= i < cfg.depth:
      raise ValueError(f"config key model.attn_layers={list(cfg.attn_layers)!r}: entries must be layer indices in "
                       f"[0, model.depth={cfg.depth})")
  if not isinstance(cfg.chunk_size, int) or cfg.chunk_size < 1:
    raise ValueError(f"config key model.chunk_size={cfg.chunk_size!r}: must be a positive integer (16, 32 or 64)")
  if cfg.mixer != "attention":
    _linear_kw(cfg)  # raises ValueError naming the width / heads that do not divide


def _linear_kw(cfg) -> dict:
  kw = dict(heads=cfg.linear_heads, head_dim=cfg.linear_head_dim)
  try:
    mixer_dims(cfg.mixer, cfg.width, **kw)
  except ValueError as e:
    raise ValueError(f"config key model.mixer={cfg.mixer!r} at model.width={cfg.width}: {e}; set model.linear_heads "
                     f"or model.linear_head_dim") from None
  return kw


def _build(cfg, *, rngs, compute_dtype, param_dtype, scan_layers, remat, streams=None):
  dtypes = dict(compute_dtype=compute_dtype, param_dtype=param_dtype)
  attention, mlp = attention_factory(cfg, dtypes), mlp_factory(cfg, dtypes)
  if cfg.mixer == "attention":
    linear = attention
  else:
    kw = _linear_kw(cfg)
    linear = lambda r: make_linear_mixer(cfg.mixer, cfg.width, rngs=r, chunk_size=cfg.chunk_size,
                                         conv_size=cfg.conv_size, **kw, **dtypes)
  attn = set(attention_layers(cfg))
  kinds = [i in attn for i in range(cfg.depth)]
  period, periods = layer_plan(kinds)
  layer = lambda is_attn: (attention if is_attn else linear, mlp)
  context = None
  if cfg.mixer in BOUNDED:
    context = lambda r: LowerBound(cfg.depth, cfg.width, param_dtype=param_dtype)
  return Decoder(vocab_size=cfg.vocab_size, width=cfg.width, depth=cfg.depth, rngs=rngs,
                 pattern=[layer(k) for k in kinds[:period]], suffix=[layer(k) for k in kinds[period * periods:]],
                 tie_embeddings=cfg.tie_embeddings, scan_layers=scan_layers, remat=remat, context=context,
                 streams=streams, **dtypes)


def _counts(cfg) -> tuple[int, int]:
  n_attn = len(attention_layers(cfg))
  return n_attn, cfg.depth - n_attn


def _param_counts(cfg) -> dict:
  n_attn, n_linear = _counts(cfg)
  attn = attention_matmul_params(cfg) + (2 * head_dim(cfg) if cfg.qk_norm else 0)
  linear = mixer_param_count(cfg.mixer, cfg.width, cfg.linear_heads, cfg.linear_head_dim, cfg.conv_size) \
      if n_linear else 0
  per_layer = mlp_matmul_params(cfg) + 2 * cfg.width
  bound = cfg.depth * cfg.width if cfg.mixer in BOUNDED else 0
  embedding = embedding_params(cfg)
  total = embedding + cfg.depth * per_layer + n_attn * attn + n_linear * linear + bound + cfg.width
  return dict(total=total, active=total, embedding=embedding, non_embedding=total - embedding)


def _flops_per_token(cfg, seq_len: int) -> float:
  n_attn, n_linear = _counts(cfg)
  matmul = n_attn * attention_matmul_params(cfg) + cfg.depth * mlp_matmul_params(cfg) + cfg.vocab_size * cfg.width
  op = 0.0
  if n_linear:
    matmul += n_linear * mixer_matmul_params(cfg.mixer, cfg.width, cfg.linear_heads, cfg.linear_head_dim)
    op = n_linear * 3.0 * mixer_op_flops(cfg.mixer, cfg.width, seq_len, cfg.linear_heads, cfg.linear_head_dim,
                                         cfg.chunk_size)
  return 6.0 * matmul + op + attention_flops_per_token(cfg, seq_len, n_attn)


register("hybrid", Family(_build, _param_counts, _flops_per_token, HYBRID_KEYS, describe=describe))
