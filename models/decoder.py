"""The generic decoder: embed -> blocks (token mixer + channel mixer per layer) -> norm -> head.

Every family builds this decoder from a per-layer *pattern*: a list of `period` block factories that repeats
`depth / period` times (dense: period 1; a hybrid with ratio 3: three linear layers then one softmax layer).
With `scan_layers` the repeating unit is stacked along a leading `layers` axis and run by `jax.lax.scan`, so
compile time does not grow with depth; without it the layers are a plain Python loop. Both lay out the same
random draws (layer i always initialises from key i), so they hold the same weights and give the same outputs.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from scalezoo.models.layers import Embed, Linear, RMSNorm, constrain, scaled_normal

# A factory builds one layer's token mixer or channel mixer from its rngs.
MixerFactory = Callable[[nnx.Rngs], nnx.Module]

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _split_aux(out):
  """Mixers return y or (y, aux); aux is a dict of scalars (arrays for `layer/` entries)."""
  return out if isinstance(out, tuple) else (out, {})


def _merge_aux(total: dict, aux: dict) -> dict:
  out = dict(total)
  for k, v in aux.items():
    out[k] = out.get(k, 0.0) + v
  return out


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm(x)), then x + channel(norm(x))."""

  def __init__(self, width: int, make_mixer: MixerFactory, make_channel: MixerFactory, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.mixer_norm = RMSNorm(width, param_dtype=param_dtype)
    self.mixer = make_mixer(rngs)
    self.channel_norm = RMSNorm(width, param_dtype=param_dtype)
    self.channel = make_channel(rngs)

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> tuple[jax.Array, dict]:
    y, aux_m = _split_aux(self.mixer(self.mixer_norm(x_btd), positions_bt))
    x_btd = constrain(x_btd + y.astype(x_btd.dtype), ("batch", "seq", "embed"))
    y, aux_c = _split_aux(self.channel(self.channel_norm(x_btd)))
    x_btd = constrain(x_btd + y.astype(x_btd.dtype), ("batch", "seq", "embed"))
    return x_btd, _merge_aux(aux_m, aux_c)


class Period(nnx.Module):
  """One repeat of the layer pattern: `len(pattern)` blocks applied in order."""

  def __init__(self, width: int, pattern: Sequence[tuple[MixerFactory, MixerFactory]], keys: jax.Array,
               param_dtype=jnp.float32):
    self.blocks = nnx.List([
        Block(width, mixer, channel, rngs=nnx.Rngs(params=keys[i]), param_dtype=param_dtype)
        for i, (mixer, channel) in enumerate(pattern)
    ])

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> tuple[jax.Array, dict]:
    aux = {}
    for block in self.blocks:
      x_btd, a = block(x_btd, positions_bt)
      aux = _merge_aux(aux, a)
    return x_btd, aux


def _apply(graphdef, state, x_btd, positions_bt):
  """One period as a pure function: (y, aux, its non-parameter state after the call).

  Layers may update non-parameter variables in their forward pass (an MoE layer counts its expert load);
  returning them lets scan and remat carry the update out, where `Decoder.__call__` writes it back.
  """
  module = nnx.merge(graphdef, state, copy=True)  # fresh Variables at this trace level (scan, remat)
  y, aux = module(x_btd, positions_bt)
  return y, aux, nnx.state(module, nnx.Not(nnx.Param))


class Decoder(nnx.Module):
  """tokens int32 [B, T] -> (logits float32 [B, T, V], aux dict of scalars)."""

  def __init__(self, *, vocab_size: int, width: int, depth: int,
               pattern: Sequence[tuple[MixerFactory, MixerFactory]], rngs: nnx.Rngs, tie_embeddings: bool = True,
               scan_layers: bool = False, remat: str = "none", logit_scale: float = 1.0, compute_dtype=jnp.float32,
               param_dtype=jnp.float32, prefix: Sequence[tuple[MixerFactory, MixerFactory]] = ()):
    """`logit_scale` multiplies the logits (muP's readout multiplier base_width / width; 1.0 leaves them as is).

    `prefix`: layers that come first, before the repeating pattern, always unrolled (an MoE model's first
    dense layers); `depth` counts them, and layer i still initialises from key i.
    """
    period, n_prefix = len(pattern), len(prefix)
    if n_prefix > depth or (depth - n_prefix) % period:
      raise ValueError(f"depth={depth} minus {n_prefix} prefix layers is not a multiple of the layer pattern's "
                       f"period {period}")
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r} is not one of {sorted(REMAT_POLICIES)}")
    self.depth, self.period, self.scan_layers, self.remat = depth, period, scan_layers, remat
    self.compute_dtype, self.logit_scale = compute_dtype, logit_scale
    kw = dict(compute_dtype=compute_dtype, param_dtype=param_dtype)
    self.embed = Embed(vocab_size, width, rngs=rngs, **kw)
    all_keys = jax.random.split(rngs.params(), depth)
    self.prefix = nnx.List([Period(width, [layer], all_keys[i:i + 1], param_dtype=param_dtype)
                            for i, layer in enumerate(prefix)]) if prefix else None
    keys = all_keys[n_prefix:].reshape((depth - n_prefix) // period, period)
    if scan_layers:
      make = functools.partial(Period, width, pattern, param_dtype=param_dtype)
      self.layers = nnx.vmap(make, in_axes=0, out_axes=0,
                             transform_metadata={nnx.PARTITION_NAME: "layers"})(keys)
    else:
      self.layers = nnx.List([Period(width, pattern, k, param_dtype=param_dtype) for k in keys])
    self.final_norm = RMSNorm(width, param_dtype=param_dtype)
    self.head = None if tie_embeddings else Linear(
        width, vocab_size, in_axes=("embed",), out_axes=("vocab",), rngs=rngs, init=scaled_normal(width), **kw)

  def _loop(self, periods, x_btd, positions_bt):
    """Runs `periods` one after another: (x, aux summed, how many periods reported each aux key)."""
    aux, per_layer, counts = {}, {}, collections.Counter()
    for layer in periods:
      graphdef, state = nnx.split(layer)
      x_btd, a, updated = self._layer_fn(graphdef)(state, x_btd, positions_bt)
      nnx.update(layer, updated)
      counts.update(a.keys())
      for k in [k for k in a if k.startswith("layer/")]:
        per_layer.setdefault(k, []).append(a.pop(k))
      aux = _merge_aux(aux, a)
    aux.update({k: jnp.stack(v) for k, v in per_layer.items()})
    return x_btd, aux, counts

  def _layer_fn(self, graphdef):
    fn = functools.partial(_apply, graphdef)
    policy = REMAT_POLICIES[self.remat]
    if self.remat != "none":
      fn = jax.checkpoint(fn, policy=policy)
    return fn

  def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None) -> tuple[jax.Array, dict]:
    b, t = tokens_bt.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x_btd = constrain(self.embed(tokens_bt), ("batch", "seq", "embed"))
    aux, counts = {}, collections.Counter()
    if self.prefix is not None:
      x_btd, aux, counts = self._loop(self.prefix, x_btd, positions_bt)
    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)
      layer_fn = self._layer_fn(graphdef)

      def body(x, layer_state):
        y, a, updated = layer_fn(layer_state, x, positions_bt)
        return y, (a, updated)

      x_btd, (aux_l, updated) = jax.lax.scan(body, x_btd, state)
      nnx.update(self.layers, updated)
      n_periods = (self.depth - (len(self.prefix) if self.prefix is not None else 0)) // self.period
      body_aux = {k: v if k.startswith("layer/") else jnp.sum(v) for k, v in aux_l.items()}
      body_counts = collections.Counter({k: n_periods for k in aux_l})
    else:
      x_btd, body_aux, body_counts = self._loop(self.layers, x_btd, positions_bt)
    for k, v in body_aux.items():
      aux[k] = jnp.concatenate([aux[k], v]) if k in aux and k.startswith("layer/") else _merge_aux(aux, {k: v})[k]
    counts.update(body_counts)
    # `layer/` entries stay per period (stacked on a leading axis, logged as lists); `metric/` entries are
    # averaged over the periods that report them; losses add up.
    aux = {k: (v / counts[k] if k.startswith("metric/") else v) for k, v in aux.items()}
    x_btd = self.final_norm(x_btd)
    logits_btv = self.embed.attend(x_btd) if self.head is None else self.head(x_btd)
    logits_btv = logits_btv.astype(jnp.float32)
    if self.logit_scale != 1.0:  # skipped at 1.0 so the default program is unchanged
      logits_btv = logits_btv * self.logit_scale
    logits_btv = constrain(logits_btv, ("batch", "seq", "vocab"))
    return logits_btv, aux
