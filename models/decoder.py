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
from scalezoo.models.streams import Aggregator, Streams, fold

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
  """Pre-norm residual block: x + mixer(norm(x)), then x + channel(norm(x)).

  `make_norm(width)` builds the two norms (default RMSNorm with a gain; TokenFormer: LayerNorm without one).
  `streams` (ParScale, more than one stream) adds `parscale`, the token mixer's per-stream parameters (its
  `stream_params`: an attention layer's KV prefix, a linear layer's initial state), made after the layer's own
  weights so those draw the same random numbers as the base model's.
  """

  def __init__(self, width: int, make_mixer: MixerFactory, make_channel: MixerFactory, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, make_norm: Callable[[int], nnx.Module] | None = None,
               streams: Streams | None = None):
    make_norm = make_norm or (lambda w: RMSNorm(w, param_dtype=param_dtype))
    self.mixer_norm = make_norm(width)
    self.mixer = make_mixer(rngs)
    self.channel_norm = make_norm(width)
    self.channel = make_channel(rngs)
    if streams is not None and streams.n > 1:
      if not hasattr(self.mixer, "stream_params"):
        raise ValueError(f"token mixer {type(self.mixer).__name__} has no ParScale stream parameters")
      self.parscale = self.mixer.stream_params(streams, rngs)

  def _context(self, context) -> dict:
    # Only mixers that declare `takes_context` (HGRN's per-layer lower bound) receive the decoder's context;
    # only ParScale blocks pass their per-stream parameters.
    kw = {"context": context} if getattr(self.mixer, "takes_context", False) else {}
    if hasattr(self, "parscale"):
      kw["streams"] = self.parscale
    return kw

  def _channel(self, x_btd: jax.Array) -> tuple[jax.Array, dict]:
    y, aux_c = _split_aux(self.channel(self.channel_norm(x_btd)))
    return constrain(x_btd + y.astype(x_btd.dtype), ("batch", "seq", "embed")), aux_c

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, context=None) -> tuple[jax.Array, dict]:
    y, aux_m = _split_aux(self.mixer(self.mixer_norm(x_btd), positions_bt, **self._context(context)))
    x_btd = constrain(x_btd + y.astype(x_btd.dtype), ("batch", "seq", "embed"))
    x_btd, aux_c = self._channel(x_btd)
    return x_btd, _merge_aux(aux_m, aux_c)

  def init_cache(self, batch: int, max_len: int):
    """The token mixer's decoding cache (channel mixers keep none)."""
    kw = {"streams": self.parscale} if hasattr(self, "parscale") else {}
    return self.mixer.init_cache(batch, max_len, **kw)

  def step(self, x_btd: jax.Array, positions_bt: jax.Array, cache, context=None):
    """Decoding: the block on new tokens given its mixer's cache; returns (x, updated cache)."""
    y, cache = self.mixer.step(self.mixer_norm(x_btd), positions_bt, cache, **self._context(context))
    x_btd = constrain(x_btd + y.astype(x_btd.dtype), ("batch", "seq", "embed"))
    return self._channel(x_btd)[0], cache


class Period(nnx.Module):
  """One repeat of the layer pattern: `len(pattern)` blocks applied in order."""

  def __init__(self, width: int, pattern: Sequence[tuple[MixerFactory, MixerFactory]], keys: jax.Array,
               param_dtype=jnp.float32, make_norm: Callable[[int], nnx.Module] | None = None,
               streams: Streams | None = None):
    self.blocks = nnx.List([
        Block(width, mixer, channel, rngs=nnx.Rngs(params=keys[i]), param_dtype=param_dtype, make_norm=make_norm,
              streams=streams)
        for i, (mixer, channel) in enumerate(pattern)
    ])

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, context_p=None) -> tuple[jax.Array, dict]:
    aux = {}
    for i, block in enumerate(self.blocks):
      x_btd, a = block(x_btd, positions_bt, None if context_p is None else context_p[i])
      aux = _merge_aux(aux, a)
    return x_btd, aux

  def init_cache(self, batch: int, max_len: int) -> list:
    return [block.init_cache(batch, max_len) for block in self.blocks]

  def step(self, x_btd: jax.Array, positions_bt: jax.Array, cache: list, context_p=None):
    new = []
    for i, block in enumerate(self.blocks):
      x_btd, c = block.step(x_btd, positions_bt, cache[i], None if context_p is None else context_p[i])
      new.append(c)
    return x_btd, new


def _apply(graphdef, state, x_btd, positions_bt, context_p=None):
  """One period as a pure function: (y, aux, its non-parameter state after the call).

  Layers may update non-parameter variables in their forward pass (an MoE layer counts its expert load);
  returning them lets scan and remat carry the update out, where `Decoder.__call__` writes it back.
  """
  module = nnx.merge(graphdef, state, copy=True)  # fresh Variables at this trace level (scan, remat)
  y, aux = module(x_btd, positions_bt, context_p)
  return y, aux, nnx.state(module, nnx.Not(nnx.Param))


def _apply_step(graphdef, state, x_btd, positions_bt, cache, context_p=None):
  """One period's decoding step as a pure function: (y, updated cache). Variable updates made in a forward pass
  (expert load counts) are training statistics and are dropped here."""
  module = nnx.merge(graphdef, state, copy=True)
  return module.step(x_btd, positions_bt, cache, context_p)


def _combine(parts: Sequence[tuple[dict, collections.Counter]]) -> tuple[dict, collections.Counter]:
  """Joins the aux of consecutive layer segments: `layer/` entries concatenate in layer order, others add up."""
  aux, counts = {}, collections.Counter()
  for a, c in parts:
    for k, v in a.items():
      aux[k] = jnp.concatenate([aux[k], v]) if k in aux and k.startswith("layer/") else _merge_aux(aux, {k: v})[k]
    counts.update(c)
  return aux, counts


class Decoder(nnx.Module):
  """tokens int32 [B, T] -> (logits float32 [B, T, V], aux dict of scalars).

  Layers come in three segments: `prefix` (unrolled), the repeating `pattern` (scanned with `scan_layers`), and
  `suffix` (unrolled). Decoding: `init_cache(batch, max_len)` then `decode(tokens, cache) -> (logits, cache)`
  for a prefill of any length and then one token at a time.

  With `streams` of n > 1 (ParScale) the embeddings are repeated into a stream-major batch of n * B rows, each
  block's token mixer gets its per-stream parameters, and `aggregator` folds the streams back after the final norm;
  caches hold n * B rows.
  """

  def __init__(self, *, vocab_size: int, width: int, depth: int,
               pattern: Sequence[tuple[MixerFactory, MixerFactory]], rngs: nnx.Rngs, tie_embeddings: bool = True,
               scan_layers: bool = False, remat: str = "none", logit_scale: float = 1.0, compute_dtype=jnp.float32,
               param_dtype=jnp.float32, prefix: Sequence[tuple[MixerFactory, MixerFactory]] = (),
               suffix: Sequence[tuple[MixerFactory, MixerFactory]] = (),
               context: Callable[[nnx.Rngs], nnx.Module] | None = None,
               make_norm: Callable[[int], nnx.Module] | None = None,
               make_final_norm: Callable[[int], nnx.Module] | None = None, streams: Streams | None = None):
    """`logit_scale` multiplies the logits (muP's readout multiplier base_width / width; 1.0 leaves them as is).

    `prefix` / `suffix`: layers before / after the repeating pattern, always unrolled (an MoE model's first dense
    layers; the linear layers left over when a hybrid's group does not divide the depth); `depth` counts them, and
    layer i still initialises from key i.
    `context`: builds a module whose call returns one entry per layer ([depth, ...]); layer i's token mixer gets
    entry i when it declares `takes_context` (HGRN's lower bounds, which couple layers by a softmax over depth).
    `make_norm(width)` / `make_final_norm(width)`: the blocks' norms and the final norm (default RMSNorm).
    `streams`: ParScale's parallel streams (models.streams); None or one stream builds exactly the plain decoder.
    """
    period, n_prefix, n_suffix = len(pattern), len(prefix), len(suffix)
    n_body = depth - n_prefix - n_suffix
    if n_body <= 0 or n_body % period:
      raise ValueError(f"depth={depth} minus {n_prefix} prefix and {n_suffix} suffix layers must be a positive "
                       f"multiple of the layer pattern's period {period}")
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r} is not one of {sorted(REMAT_POLICIES)}")
    self.depth, self.period, self.scan_layers, self.remat = depth, period, scan_layers, remat
    self.n_prefix, self.n_body = n_prefix, n_body
    self.compute_dtype, self.logit_scale = compute_dtype, logit_scale
    kw = dict(compute_dtype=compute_dtype, param_dtype=param_dtype)
    streams = streams if streams is not None and streams.n > 1 else None
    self.n_streams = 1 if streams is None else streams.n
    period_kw = dict(param_dtype=param_dtype, make_norm=make_norm, streams=streams)
    self.embed = Embed(vocab_size, width, rngs=rngs, **kw)
    all_keys = jax.random.split(rngs.params(), depth)
    self.prefix = nnx.List([Period(width, [layer], all_keys[i:i + 1], **period_kw)
                            for i, layer in enumerate(prefix)]) if prefix else None
    keys = all_keys[n_prefix:n_prefix + n_body].reshape(n_body // period, period)
    if scan_layers:
      make = functools.partial(Period, width, pattern, **period_kw)
      self.layers = nnx.vmap(make, in_axes=0, out_axes=0,
                             transform_metadata={nnx.PARTITION_NAME: "layers"})(keys)
    else:
      self.layers = nnx.List([Period(width, pattern, k, **period_kw) for k in keys])
    first = n_prefix + n_body
    self.suffix = nnx.List([Period(width, [layer], all_keys[first + i:first + i + 1], **period_kw)
                            for i, layer in enumerate(suffix)]) if suffix else None
    self.final_norm = (make_final_norm or (lambda w: RMSNorm(w, param_dtype=param_dtype)))(width)
    self.head = None if tie_embeddings else Linear(
        width, vocab_size, in_axes=("embed",), out_axes=("vocab",), rngs=rngs, init=scaled_normal(width), **kw)
    self.context = context(rngs) if context is not None else None
    if streams is not None:  # last, so every other parameter draws what the base model's does
      self.aggregator = Aggregator(width, streams, rngs=rngs, **kw)

  # -- layer segments -------------------------------------------------------------------------------------------

  def _contexts(self):
    """Per segment, the context of each of its periods ([period, ...] arrays), or Nones."""
    n_periods = self.n_body // self.period
    n_suffix = self.depth - self.n_prefix - self.n_body
    if self.context is None:
      return [None] * self.n_prefix, None, [None] * n_suffix
    ctx = self.context()
    first = self.n_prefix + self.n_body
    body = ctx[self.n_prefix:first].reshape((n_periods, self.period) + ctx.shape[1:])
    return ([ctx[i:i + 1] for i in range(self.n_prefix)], body,
            [ctx[first + i:first + i + 1] for i in range(n_suffix)])

  def _loop(self, periods, x_btd, positions_bt, contexts):
    """Runs `periods` one after another: (x, aux summed, how many periods reported each aux key)."""
    aux, per_layer, counts = {}, {}, collections.Counter()
    for layer, ctx in zip(periods, contexts):
      graphdef, state = nnx.split(layer)
      x_btd, a, updated = self._layer_fn(graphdef)(state, x_btd, positions_bt, ctx)
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

  def _embed(self, tokens_bt: jax.Array, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embeddings and positions, repeated into the stream-major batch when there are streams."""
    x_btd = constrain(self.embed(tokens_bt), ("batch", "seq", "embed"))
    if self.n_streams > 1:
      x_btd = constrain(fold(x_btd, self.n_streams), ("batch", "seq", "embed"))
      positions_bt = fold(positions_bt, self.n_streams)
    return x_btd, positions_bt

  def _logits(self, x_btd: jax.Array) -> jax.Array:
    x_btd = self.final_norm(x_btd)
    if self.n_streams > 1:
      x_btd = self.aggregator(x_btd)
    logits_btv = self.embed.attend(x_btd) if self.head is None else self.head(x_btd)
    logits_btv = logits_btv.astype(jnp.float32)
    if self.logit_scale != 1.0:  # skipped at 1.0 so the default program is unchanged
      logits_btv = logits_btv * self.logit_scale
    return constrain(logits_btv, ("batch", "seq", "vocab"))

  def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None) -> tuple[jax.Array, dict]:
    b, t = tokens_bt.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x_btd, positions_bt = self._embed(tokens_bt, positions_bt)
    ctx_prefix, ctx_body, ctx_suffix = self._contexts()
    parts = []
    if self.prefix is not None:
      x_btd, aux, counts = self._loop(self.prefix, x_btd, positions_bt, ctx_prefix)
      parts.append((aux, counts))
    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)
      layer_fn = self._layer_fn(graphdef)

      def body(x, xs):
        layer_state, ctx = xs
        y, a, updated = layer_fn(layer_state, x, positions_bt, ctx)
        return y, (a, updated)

      x_btd, (aux_l, updated) = jax.lax.scan(body, x_btd, (state, ctx_body))
      nnx.update(self.layers, updated)
      n_periods = self.n_body // self.period
      parts.append(({k: v if k.startswith("layer/") else jnp.sum(v) for k, v in aux_l.items()},
                    collections.Counter({k: n_periods for k in aux_l})))
    else:
      ctx_periods = [None] * len(self.layers) if ctx_body is None else list(ctx_body)
      x_btd, aux, counts = self._loop(self.layers, x_btd, positions_bt, ctx_periods)
      parts.append((aux, counts))
    if self.suffix is not None:
      x_btd, aux, counts = self._loop(self.suffix, x_btd, positions_bt, ctx_suffix)
      parts.append((aux, counts))
    aux, counts = _combine(parts)
    # `layer/` entries stay per period (stacked on a leading axis, logged as lists); `metric/` entries are
    # averaged over the periods that report them; losses add up.
    aux = {k: (v / counts[k] if k.startswith("metric/") else v) for k, v in aux.items()}
    return self._logits(x_btd), aux

  # -- decoding -------------------------------------------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int) -> dict:
    """Zero decoding state for `batch` sequences of up to `max_len` tokens: a KV cache in attention layers, a
    recurrent state and conv cache in linear layers (their size does not grow with `max_len`). With streams:
    n_streams * batch rows, starting from each stream's prefix or initial state."""
    rows = batch * self.n_streams

    def unrolled(periods):
      return [p.init_cache(rows, max_len) for p in periods] if periods is not None else []

    if self.scan_layers and self.n_streams > 1:
      # Each period starts from its own prefixes: build its cache from its slice of the stacked parameters.
      graphdef, state = nnx.split(self.layers)
      body = jax.vmap(lambda s: nnx.merge(graphdef, s, copy=True).init_cache(rows, max_len))(state)
    elif self.scan_layers:
      # The scanned period's caches depend only on its static sizes; one per period along a leading axis.
      one = self.layers.init_cache(rows, max_len)
      n_periods = self.n_body // self.period
      body = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_periods,) + a.shape), one)
    else:
      body = unrolled(self.layers)
    return dict(index=jnp.zeros((), jnp.int32), prefix=unrolled(self.prefix), body=body,
                suffix=unrolled(self.suffix))

  def decode(self, tokens_bt: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Runs `tokens` (positions cache["index"] onwards) through the model given `cache`: (logits, new cache).

    A prefill of the prompt followed by one-token calls gives the logits of a forward pass over the whole
    sequence. The caller keeps index + T within the cache's max_len.
    """
    b, t = tokens_bt.shape
    positions_bt = jnp.broadcast_to(cache["index"] + jnp.arange(t, dtype=jnp.int32), (b, t))
    x_btd, positions_bt = self._embed(tokens_bt, positions_bt)
    ctx_prefix, ctx_body, ctx_suffix = self._contexts()

    def unrolled(periods, caches, contexts, x):
      new = []
      for layer, c, ctx in zip(periods or [], caches, contexts):
        graphdef, state = nnx.split(layer)
        x, c = _apply_step(graphdef, state, x, positions_bt, c, ctx)
        new.append(c)
      return x, new

    x_btd, prefix = unrolled(self.prefix, cache["prefix"], ctx_prefix, x_btd)
    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)

      def body(x, xs):
        layer_state, c, ctx = xs
        return _apply_step(graphdef, layer_state, x, positions_bt, c, ctx)

      x_btd, body_cache = jax.lax.scan(body, x_btd, (state, cache["body"], ctx_body))
    else:
      ctx_periods = [None] * len(self.layers) if ctx_body is None else list(ctx_body)
      x_btd, body_cache = unrolled(self.layers, cache["body"], ctx_periods, x_btd)
    x_btd, suffix = unrolled(self.suffix, cache["suffix"], ctx_suffix, x_btd)
    new_cache = dict(index=cache["index"] + t, prefix=prefix, body=body_cache, suffix=suffix)
    return self._logits(x_btd), new_cache
