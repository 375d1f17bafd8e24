"""muP coordinate check: how far each layer's activations move in a few Adam steps, across model widths.

Under muP (train.mup) the size of the change stays flat as the width grows, so a learning rate tuned at one
width transfers; under the standard parameterisation it grows with width (Adam moves every weight entry by about
lr, and a width-d matmul adds d such moves up coherently). `coord_check` trains the same config at several
widths on one fixed random batch and measures, per layer, RMS(x_t - x_0) of the residual stream after each
layer and of the logits; `plot_coord_check` draws it (`scalezoo plot` can call it on a saved result).
"""

from __future__ import annotations

import copy
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from scalezoo import models
from scalezoo.train.optim import make_optimizer
from scalezoo.train.step import loss_fn


def width_config(cfg, width: int):
  """A copy of `cfg` at model width `width`: heads fixed, head_dim (when set) and ffn_width scaled alike."""
  out = copy.deepcopy(cfg)
  m, base = out.model, cfg.model.width
  m.width = width
  m.ffn_width = max(1, round(cfg.model.ffn_width * width / base))
  if m.get("head_dim", 0):
    m.head_dim = max(2, 2 * round(cfg.model.head_dim * width / base / 2))  # rotary needs an even head_dim
  return out


def _build(cfg):
  t = cfg.train
  # Unscanned so the activations after each period can be read off one by one.
  return models.build(cfg.model, rngs=nnx.Rngs(t.seed), compute_dtype=t.compute_dtype, param_dtype=t.param_dtype,
                      scan_layers=False, remat="none", mup_base_width=t.mup_base_width if t.mup else 0)


def activations(model, tokens_bt: jax.Array) -> list[jax.Array]:
  """The residual stream after every period of a `Decoder` (one layer each for dense), then the logits."""
  b, t = tokens_bt.shape
  positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x_btd = model.embed(tokens_bt)
  out = []
  for period in model.layers:
    x_btd, _ = period(x_btd, positions_bt)
    out.append(x_btd.astype(jnp.float32))
  # The decoder's head, as in Decoder.__call__ (kept in step by the coord-check test's logits entry).
  x_btd = model.final_norm(x_btd)
  logits_btv = model.embed.attend(x_btd) if model.head is None else model.head(x_btd)
  return out + [logits_btv.astype(jnp.float32) * model.logit_scale]


def _run_one(cfg, steps: int) -> list[float]:
  box = {}

  def init():
    box["graphdef"], params, rest = nnx.split(_build(cfg), nnx.Param, ...)
    return params, rest

  # Built abstractly, then initialised inside the one jitted program: eager init dispatches op by op.
  abs_params, _ = jax.eval_shape(init)
  graphdef = box["graphdef"]
  tx, _ = make_optimizer(cfg.train, abs_params)
  t = cfg.train
  batch_bt = jax.random.randint(jax.random.key(t.seed + 1), (t.batch_size, t.seq_len + 1), 0, cfg.model.vocab_size)
  tokens_bt = batch_bt[:, :-1]

  def step(rest, carry, _):
    params, opt = carry
    grads = jax.grad(lambda p: loss_fn(graphdef, p, rest, batch_bt)[0])(params)
    updates, opt = tx.update(grads, opt, params)
    return (jax.tree.map(jnp.add, params, updates), opt), None

  @jax.jit
  def run():
    # One program per width (init, steps scanned, activations), since compiling dominates at these sizes.
    params, rest = init()
    acts = lambda p: activations(nnx.merge(graphdef, p, rest), tokens_bt)
    before = acts(params)
    (params, _), _ = jax.lax.scan(functools.partial(step, rest), (params, tx.init(params)), None, length=steps)
    return [jnp.sqrt(jnp.mean(jnp.square(a - b))) for a, b in zip(acts(params), before)]

  return [float(r) for r in run()]


def coord_check(cfg, widths: Sequence[int], steps: int) -> dict[int, list[float]]:
  """{width: [RMS change of the residual stream after layer 1..L, RMS change of the logits]} after `steps` steps.

  Every width trains `cfg` (muP or not as train.mup says) with its train.lr schedule, batch_size and seq_len
  on the same fixed random batch, from the same seed. Use a constant schedule without warmup to compare widths
  at one learning rate.
  """
  return {int(w): _run_one(width_config(cfg, int(w)), steps) for w in widths}


def plot_coord_check(result: dict, path: str, title: str = "coordinate check") -> None:
  """Log-log plot of `coord_check`'s result (keys may be strings, as after a JSON round trip) to `path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  widths = sorted(int(w) for w in result)
  rows = [result[w] if w in result else result[str(w)] for w in widths]
  n = len(rows[0])
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for i in range(n):
    label = "logits" if i == n - 1 else f"layer {i + 1}"
    ax.plot(widths, [r[i] for r in rows], marker="o", label=label)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("width")
  ax.set_ylabel("RMS of activation change")
  ax.set_title(title)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
