"""Autoregressive generation with any decoder of the registry: prefill the prompt, then one token at a time.

Attention layers keep a KV cache of `max_len` positions; linear-attention layers keep a recurrent state and a short
convolution cache whose size does not depend on the sequence length, so their per-token cost and memory are constant.

  tokens = generate(model, prompt_bt, num_tokens=64, temperature=0.8, rng=jax.random.key(0))

`DecodeFns` exposes the two compiled pieces (prefill, one step) for benchmarks that time them separately.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx


def sample(logits_bv: jax.Array, key: jax.Array | None, temperature: float = 0.0, top_k: int = 0) -> jax.Array:
  """Next tokens int32 [B] from last-position logits: greedy at temperature 0, else softmax(logits / T) sampling,
  restricted to the `top_k` most likely tokens when top_k > 0."""
  if temperature <= 0.0 or key is None:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv.astype(jnp.float32) / temperature
  if top_k > 0:
    kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
  return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DecodeFns:
  """Jitted pure functions over the model's split state: `prefill(state, tokens_bt, cache) -> (logits_bv, cache)`
  (logits of the last position) and `step(state, tokens_b1, cache) -> (logits_bv, cache)` with the cache donated."""
  graphdef: Any
  init_cache: Callable
  prefill: Callable
  step: Callable


def decode_fns(model: nnx.Module) -> DecodeFns:
  """Splits `model` once and compiles its decoding functions (the caller passes `nnx.state(model)`)."""
  graphdef = nnx.graphdef(model)

  def run(state, tokens_bt, cache):
    logits_btv, cache = nnx.merge(graphdef, state).decode(tokens_bt, cache)
    return logits_btv[:, -1], cache

  def init_cache(state, batch: int, max_len: int):
    return nnx.merge(graphdef, state).init_cache(batch, max_len)

  return DecodeFns(graphdef=graphdef,
                   init_cache=jax.jit(init_cache, static_argnums=(1, 2)),
                   prefill=jax.jit(run),
                   step=jax.jit(run, donate_argnums=(2,)))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "max_len", "temperature", "top_k"))
def _generate(graphdef, state, prompt_bt, key, *, num_tokens: int, max_len: int, temperature: float, top_k: int):
  model = nnx.merge(graphdef, state)
  b = prompt_bt.shape[0]
  logits_btv, cache = model.decode(prompt_bt, model.init_cache(b, max_len))
  keys = jax.random.split(key, num_tokens)

  def body(carry, k):
    logits_bv, cache = carry
    tok_b = sample(logits_bv, k, temperature, top_k)
    logits_btv, cache = model.decode(tok_b[:, None], cache)
    return (logits_btv[:, -1], cache), tok_b

  _, new_nb = jax.lax.scan(body, (logits_btv[:, -1], cache), keys)
  return jnp.concatenate([prompt_bt, new_nb.T], axis=1)


def generate(model: nnx.Module, prompt_bt: jax.Array, num_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             rng: jax.Array | None = None, max_len: int | None = None) -> jax.Array:
  """Prompt int32 [B, P] -> prompt and `num_tokens` generated tokens, int32 [B, P + num_tokens].

  Greedy when temperature is 0 (or no rng is given). `max_len` (default P + num_tokens) sizes the KV caches.
  """
  prompt_bt = jnp.asarray(prompt_bt, jnp.int32)
  if prompt_bt.ndim != 2 or prompt_bt.shape[1] < 1:
    raise ValueError(f"prompt must be int32 [batch, length >= 1], got shape {prompt_bt.shape}")
  if num_tokens < 1:
    raise ValueError(f"num_tokens={num_tokens} must be >= 1")
  need = prompt_bt.shape[1] + num_tokens
  max_len = max_len or need
  if max_len < need:
    raise ValueError(f"max_len={max_len} is shorter than the prompt plus num_tokens ({need})")
  key = rng if rng is not None and temperature > 0 else jax.random.key(0)
  return _generate(nnx.graphdef(model), nnx.state(model), prompt_bt, key, num_tokens=num_tokens, max_len=max_len,
                   temperature=float(temperature if rng is not None else 0.0), top_k=int(top_k))
