"""AdamW with a weight-decay mask, global-norm clipping and constant | cosine | wsd schedules with warmup."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

SCHEDULES = ("constant", "cosine", "wsd")


def make_schedule(train_cfg) -> optax.Schedule:
  """Learning rate of update i (0-based): linear warmup, then the chosen shape down to lr * min_lr_ratio.

  Evaluated at i + 1 so the first update already moves (lr/warmup) and the last one uses the end value.
  """
  base = _base_schedule(train_cfg)
  return lambda count: base(count + 1)


def _base_schedule(train_cfg) -> optax.Schedule:
  lr, steps, warmup = train_cfg.lr, train_cfg.steps, train_cfg.warmup
  end = lr * train_cfg.min_lr_ratio
  if train_cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                [warmup])
  if train_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=end)
  if train_cfg.schedule == "wsd":
    # Warmup-stable-decay: constant until the last decay_fraction of steps, then linear to the end value,
    # so one long run can be branched into shorter-horizon runs by decaying from any stable checkpoint.
    decay = max(1, int(round(steps * train_cfg.decay_fraction)))
    stable_end = max(warmup, steps - decay)
    return optax.join_schedules([
        optax.linear_schedule(0.0, lr, warmup),
        optax.constant_schedule(lr),
        optax.linear_schedule(lr, end, decay),
    ], [warmup, stable_end])
  raise ValueError(f"train.schedule={train_cfg.schedule!r} is not one of {SCHEDULES}")


def decay_mask(params):
  """Decay matrices only: a parameter with two or more non-`layers` axes (not norms' gains, not biases)."""
  def one(v):
    axes = v.get_metadata().get("out_sharding") or (None,) * jnp.ndim(v.get_value())
    return v.replace(sum(a != "layers" for a in axes) >= 2)
  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(train_cfg, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for `params` (an nnx.State of Params, used for the decay mask) and its schedule."""
  schedule = make_schedule(train_cfg)
  parts = []
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                           weight_decay=train_cfg.weight_decay, mask=decay_mask(params)))
  return optax.chain(*parts), schedule
