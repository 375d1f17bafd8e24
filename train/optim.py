"""AdamW with a weight-decay mask, global-norm clipping, muP learning-rate multipliers, and constant | cosine |
wsd | power schedules with warmup; plus the Step Law for choosing lr and batch size from N and D.

References (see ../shared/specs/scaling_laws.md 1e, 1g): the Power scheduler of Shen et al. 2024
(arXiv 2408.13359), the Step Law of Li et al. 2025 (arXiv 2503.04715), and muP for Adam (Yang et al., TP-V).
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

SCHEDULES = ("constant", "cosine", "wsd", "power")


def make_schedule(train_cfg) -> optax.Schedule:
  """Learning rate of update i (0-based): linear warmup, then the chosen shape down to lr * min_lr_ratio.

  Evaluated at i + 1 so the first update already moves (lr/warmup) and the last one uses the end value.
  """
  base = _base_schedule(train_cfg)
  return lambda count: base(count + 1)


def _decay_steps(train_cfg) -> int:
  return max(1, int(round(train_cfg.steps * train_cfg.decay_fraction)))


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
    decay = _decay_steps(train_cfg)
    stable_end = max(warmup, steps - decay)
    return optax.join_schedules([
        optax.linear_schedule(0.0, lr, warmup),
        optax.constant_schedule(lr),
        optax.linear_schedule(lr, end, decay),
    ], [warmup, stable_end])
  if train_cfg.schedule == "power":
    return _power_schedule(train_cfg)
  raise ValueError(f"train.schedule={train_cfg.schedule!r} is not one of {SCHEDULES}")


def power_lr(train_cfg, n):
  """The Power scheduler's curve at update count n >= 1 (1-based): min(lr, batch_size * a * tokens^b).

  tokens = n * batch_size * seq_len are the tokens seen after n updates. The spec (1e) writes the law as
  eta = beta * a * T^b with beta "the batch size" and leaves its unit open; IBM's dolomite_engine folds beta into
  `a` (its config comment sets a = batch_size). We take beta = train.batch_size in *sequences*: with a = 4,
  b = -0.51 that gives ~3e-3 for a 1024-sequence batch at 1T tokens, in line with PowerLM's muP runs, whereas
  beta in tokens (4M) would pin the rate at lr_max for the whole run and beta = 1 would give ~3e-6. To use the
  formula without beta, set train.power_a = a / train.batch_size.
  """
  tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
  tokens = jnp.asarray(n, jnp.float32) * tokens_per_step
  curve = train_cfg.batch_size * train_cfg.power_a * tokens ** train_cfg.power_b
  return jnp.minimum(jnp.float32(train_cfg.lr), curve)


def _power_schedule(train_cfg) -> optax.Schedule:
  # Warmup rises linearly to the curve's value at the end of warmup (no jump), the curve then decays as a power
  # of tokens seen (capped at lr), and the last decay_fraction of steps decays linearly from the curve's value
  # there to that value * min_lr_ratio: wsd's decay shape, started wherever the power curve has got to.
  steps, warmup = train_cfg.steps, train_cfg.warmup
  decay = _decay_steps(train_cfg)
  stable_end = max(warmup, steps - decay)
  at_warmup = power_lr(train_cfg, max(warmup, 1))
  at_decay = power_lr(train_cfg, max(stable_end, 1))

  def schedule(n):
    n = jnp.asarray(n)
    nf = n.astype(jnp.float32)
    warm = at_warmup * nf / max(warmup, 1)
    frac = jnp.clip((nf - stable_end) / decay, 0.0, 1.0)
    decayed = at_decay * (1.0 - frac * (1.0 - train_cfg.min_lr_ratio))
    stable = power_lr(train_cfg, jnp.maximum(n, 1))
    return jnp.where(n < warmup, warm, jnp.where(n <= stable_end, stable, decayed))

  return schedule


# ---------------------------------------------------------------------------------------------------------------
# Step Law (Li et al. 2025): lr and batch size from non-embedding params N and training tokens D.


def step_law(n_params: float, tokens: float) -> tuple[float, float]:
  """(lr, batch size in tokens) of the Step Law: 1.79 N^-0.713 D^0.307 and 0.58 D^0.571."""
  return 1.79 * n_params ** -0.713 * tokens ** 0.307, 0.58 * tokens ** 0.571


def data_parallel_size(cfg, n_devices: int) -> int:
  """Devices the batch is split over: the product of the mesh axes the `batch` rule maps to."""
  from scalezoo.train import sharding  # train.sharding is heavier; keep `import optim` light
  sizes = sharding.mesh_shape(cfg.mesh, n_devices)
  return math.prod(sizes[a] for a in sharding.parse_rules(cfg.mesh.rules)["batch"])


def apply_step_law(cfg, dp: int):
  """A copy of `cfg` with train.lr and train.batch_size from the Step Law when train.step_law, else `cfg`.

  N = non-embedding parameters of cfg.model, D = train.steps * batch_size * seq_len of `cfg` as given. The batch
  is max(1, round(B_tokens / seq_len)) sequences, rounded to a multiple of dp * train.microbatches (so it splits
  over the data-parallel devices and the microbatches) and at least one such multiple; train.steps is then
  recomputed so the run still sees about D tokens, and train.warmup keeps its share of the run. The lr uses D as
  given, so applying the law again to its own output changes lr by at most the rounding of steps.
  """
  t = cfg.train
  if not t.get("step_law", False):
    return cfg
  from scalezoo import models  # the registry imports the model zoo; only needed here
  from scalezoo.train.validate import validate_step_law_inputs  # validate imports this module
  validate_step_law_inputs(cfg)
  n_params = models.param_counts(cfg.model)["non_embedding"]
  tokens = t.steps * t.batch_size * t.seq_len
  lr, batch_tokens = step_law(n_params, tokens)
  unit = max(1, dp) * t.microbatches
  batch = max(1, round(batch_tokens / t.seq_len))
  batch = max(unit, round(batch / unit) * unit)
  steps = max(1, round(tokens / (batch * t.seq_len)))
  out = copy.deepcopy(cfg)
  out.train.lr = float(lr)
  out.train.batch_size = int(batch)
  out.train.steps = int(steps)
  out.train.warmup = int(min(steps, round(t.warmup * steps / t.steps)))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Parameter groups: weight decay and muP


def _axes(v) -> tuple:
  return v.get_metadata().get("out_sharding") or (None,) * jnp.ndim(v.get_value())


def decay_mask(params):
  """Decay matrices only: a parameter with two or more non-`layers` axes (not norms' gains, not biases)."""
  def one(v):
    return v.replace(sum(a != "layers" for a in _axes(v)) >= 2)
  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


# Logical axes whose size grows with model width. `heads`/`kv_heads` next to `head_dim` are one feature axis
# split in two (the width lives in heads * head_dim), so they count only when no head_dim is present.
_WIDTH_AXES = ("embed", "mlp", "head_dim")
_HEAD_AXES = ("heads", "kv_heads")


def is_hidden_matrix(axes) -> bool:
  """muP's matrix-like parameters: both fan-in and fan-out grow with width (two or more width axes).

  Embedding tables [vocab, embed], a readout [embed, vocab], routers [embed, experts] and norm gains have one
  width axis at most: vector-like, their Adam lr does not scale.
  """
  n = sum(a in _WIDTH_AXES for a in axes)
  if "head_dim" not in axes:
    n += sum(a in _HEAD_AXES for a in axes)
  return n >= 2


def model_width(params) -> int:
  """The model width d: the size of the `embed` axis, which every decoder's parameters carry."""
  for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = _axes(v)
    if "embed" in axes:
      return int(jnp.shape(v.get_value())[axes.index("embed")])
  raise ValueError("no parameter has an `embed` axis; cannot infer the width for muP")


def mup_lr_multipliers(params, base_width: int):
  """Per-parameter Adam lr multipliers of muP: base_width / width for hidden matrices, 1 for the rest."""
  ratio = base_width / model_width(params)
  def one(v):
    return v.replace(ratio if is_hidden_matrix(_axes(v)) else 1.0)
  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by its entry of a static tree of Python floats (same structure as the params); an
  entry of 0 gives exact zeros (frozen parameters), whatever the update held."""
  factors = jax.tree.leaves(multipliers)

  def scale(u, f):
    # Entries of 1 are left untouched, so parameters outside the scaled groups update bit-identically.
    return u if f == 1.0 else jnp.zeros_like(u) if f == 0.0 else u * jnp.asarray(f, u.dtype)

  def update(updates, state, params=None):
    leaves, treedef = jax.tree.flatten(updates)
    scaled = [scale(u, f) for u, f in zip(leaves, factors)]
    return jax.tree.unflatten(treedef, scaled), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train_cfg, params, frozen=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for `params` (an nnx.State of Params: decay mask, muP groups, width) and its schedule.

  With train.mup the whole AdamW update, decoupled weight decay included (as in torch AdamW with per-group lr),
  of every hidden matrix is scaled by train.mup_base_width / width. The logits multiplier and attention scale
  of muP live in the model (models.build(..., mup_base_width=...)).
  `frozen` (a tree of bools like `params`, or None) marks parameters that never change: their gradients are zeroed
  before clipping, so Adam's moments and update stay exactly zero, and they get no weight decay.
  """
  schedule = make_schedule(train_cfg)
  parts = []
  decay = decay_mask(params)
  if frozen is not None:
    parts.append(scale_by_tree(jax.tree.map(lambda f: 0.0 if f else 1.0, frozen)))
    decay = jax.tree.map(lambda d, f: d and not f, decay, frozen)
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                           weight_decay=train_cfg.weight_decay, mask=decay))
  if train_cfg.get("mup", False):
    parts.append(scale_by_tree(mup_lr_multipliers(params, train_cfg.mup_base_width)))
  return optax.chain(*parts), schedule
