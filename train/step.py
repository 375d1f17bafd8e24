"""The functional training step: split the model once, jit a pure step with explicit shardings and donation.

State is a dict {params, rest, opt, step}: `params` the nnx.Param state, `rest` every other model variable,
`opt` the optax state. The step scans over microbatches (gradients summed in float32, then averaged, which
equals the full-batch gradient), skips the update when the loss or gradient is non-finite, and returns
metrics as device scalars so the host can fetch them a step later.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from scalezoo import models
from scalezoo.models import parscale
from scalezoo.models.layers import axis_rules
from scalezoo.train import data as data_lib
from scalezoo.train import sharding
from scalezoo.train.optim import make_optimizer


def is_loss_term(name: str) -> bool:
  """Aux entries prefixed `metric/` (scalars) or `layer/` (one value per layer) are logged only; every other
  entry is an already-weighted loss."""
  return not name.startswith(("metric/", "layer/"))


def loss_fn(graphdef, params, rest, batch_bt):
  """(loss, (aux, rest after the forward pass)) on a [B, T+1] batch: mean next-token cross entropy plus the
  model's auxiliary losses; `rest` comes back because layers may update non-parameter state as they run."""
  # copy=True: fresh Variables at this trace level, so layers may update their non-parameter state under grad.
  model = nnx.merge(graphdef, params, rest, copy=True)
  logits_btv, aux = model(batch_bt[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch_bt[:, 1:]).mean()
  loss = ce + sum((v for k, v in aux.items() if is_loss_term(k)), jnp.zeros((), jnp.float32))
  return loss, (dict(aux, ce=ce), jax.lax.stop_gradient(nnx.state(model, nnx.Not(nnx.Param))))


def after_step(graphdef, params, rest):
  """Non-gradient updates once per optimizer step: every module with an `after_step()` method runs it (an MoE
  layer moves its balancing bias by its expert load); returns the new non-parameter state."""
  model = nnx.merge(graphdef, params, rest, copy=True)
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "after_step"):
      module.after_step()
  return nnx.state(model, nnx.Not(nnx.Param))


def recall_counts(logits_btv, targets_bt, mask_t):
  """(correct, answers) as int32 scalars: targets where `mask_t` [T] is set, and those whose argmax is right.

  Recall accuracy is correct / answers summed over batches; the model's loss on the other targets plays no part.
  """
  mask_bt = jnp.broadcast_to(jnp.asarray(mask_t, bool), targets_bt.shape)
  hit_bt = (jnp.argmax(logits_btv, axis=-1) == targets_bt) & mask_bt
  return hit_bt.sum(dtype=jnp.int32), mask_bt.sum(dtype=jnp.int32)


@dataclasses.dataclass
class TrainProgram:
  """Everything compiled for one (config, mesh): the jitted init, train and eval steps and their shardings."""
  graphdef: Any
  mesh: jax.sharding.Mesh
  rules: dict
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any
  batch_sharding: NamedSharding
  init: Callable[[], dict]
  train_step: Callable
  eval_step: Callable

  def abstract_state(self) -> Any:
    """ShapeDtypeStructs with shardings, for checkpoint restore."""
    shapes = jax.eval_shape(self.init)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        self.state_shardings)


def _build_model(cfg, seed):
  t = cfg.train
  return models.build(cfg.model, rngs=nnx.Rngs(seed), compute_dtype=t.compute_dtype, param_dtype=t.param_dtype,
                      scan_layers=t.scan_layers, remat=t.remat, mup_base_width=t.mup_base_width if t.mup else 0)


def abstract_split(cfg):
  """(graphdef, params, rest) of the model with ShapeDtypeStruct leaves; allocates nothing.

  jax.eval_shape rather than nnx.eval_shape: the latter turns `out_sharding` metadata into NamedShardings on
  the current mesh, and our metadata holds logical names, not mesh axes.
  """
  box = {}

  def split():
    box["graphdef"], params, rest = nnx.split(_build_model(cfg, cfg.train.seed), nnx.Param, ...)
    return params, rest

  params, rest = jax.eval_shape(split)
  return box["graphdef"], params, rest


def make_program(cfg, mesh: jax.sharding.Mesh) -> TrainProgram:
  """Builds the abstract model, derives every sharding from logical axes, and jits the steps."""
  rules = sharding.parse_rules(cfg.mesh.rules)
  graphdef, abs_params, abs_rest = abstract_split(cfg)
  tx, schedule = make_optimizer(cfg.train, abs_params, frozen=parscale.frozen_mask(abs_params, cfg.model))
  param_specs = sharding.state_specs(abs_params, mesh, rules, strict=True)
  rest_specs = sharding.state_specs(abs_rest, mesh, rules)
  opt_specs = sharding.opt_state_specs(tx, jax.eval_shape(tx.init, abs_params), param_specs)
  specs = dict(params=param_specs, rest=rest_specs, opt=opt_specs, step=PartitionSpec())
  state_shardings = sharding.named(specs, mesh)
  batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(
      ("batch", None), (cfg.train.batch_size, cfg.train.seq_len + 1), mesh, rules))
  to_spec = sharding.spec_fn(mesh, rules)
  n_micro = cfg.train.microbatches

  def init():
    _, params, rest = nnx.split(_build_model(cfg, cfg.train.seed), nnx.Param, ...)
    return dict(params=params, rest=rest, opt=tx.init(params), step=jnp.zeros((), jnp.int32))

  def grads_of(params, rest, batch_bt):
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, graphdef), has_aux=True)
    if n_micro == 1:
      (loss, (aux, rest)), grads = grad_fn(params, rest, batch_bt)
      return loss, aux, grads, rest
    b = batch_bt.shape[0]
    # Microbatch j takes rows j, j+M, j+2M, ...: each device's contiguous block of rows feeds every
    # microbatch equally, so splitting needs no communication.
    micro = batch_bt.reshape(b // n_micro, n_micro, -1).swapaxes(0, 1)

    def body(carry, mb):
      acc_loss, acc_aux, acc_grads, rest = carry
      # `rest` is carried: state a forward pass accumulates (expert load) sums over the whole batch.
      (loss, (aux, rest)), grads = grad_fn(params, rest, mb)
      return (acc_loss + loss, jax.tree.map(jnp.add, acc_aux, aux),
              jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads), rest), None

    zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                            jax.eval_shape(lambda: grad_fn(params, rest, micro[0])[0][1][0]))
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, aux, grads, rest), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zero_aux, zero_grads, rest),
                                               micro)
    scale = 1.0 / n_micro
    return loss * scale, jax.tree.map(lambda a: a * scale, aux), jax.tree.map(lambda g: g * scale, grads), rest

  def train_step(state, batch_bt):
    with axis_rules(to_spec):
      batch_bt = jax.lax.with_sharding_constraint(batch_bt, batch_sharding)
      loss, aux, grads, rest = grads_of(state["params"], state["rest"], batch_bt)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state["opt"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    if jax.tree.leaves(rest):  # skipped for models without such state, so their program is unchanged
      rest = after_step(graphdef, new_params, rest)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = dict(params=keep(new_params, state["params"]), rest=keep(rest, state["rest"]),
                     opt=keep(new_opt, state["opt"]), step=state["step"] + 1)
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, lr=schedule(state["step"]),
                   nonfinite=jnp.logical_not(finite).astype(jnp.int32))
    return new_state, metrics

  # A source with a recall task (mqar) also counts correct answers; every other source keeps the plain
  # eval program (same HLO, so the same compile-cache entry and the same numbers as before recall existed).
  recall_mask_t = data_lib.recall_mask(cfg.data, cfg.train.seq_len)

  def eval_step(state, batch_bt):
    if recall_mask_t is None:
      with axis_rules(to_spec):
        _, (aux, _) = loss_fn(graphdef, state["params"], state["rest"], batch_bt)
      return aux["ce"]
    with axis_rules(to_spec):
      # One forward pass for both numbers: loss_fn does not return the logits the counts need.
      logits_btv, _ = nnx.merge(graphdef, state["params"], state["rest"], copy=True)(batch_bt[:, :-1])
    targets_bt = batch_bt[:, 1:]
    correct, answers = recall_counts(logits_btv, targets_bt, recall_mask_t)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt).mean()
    return dict(ce=ce, recall_correct=correct, recall_answers=answers)

  replicated = NamedSharding(mesh, PartitionSpec())
  return TrainProgram(
      graphdef=graphdef, mesh=mesh, rules=rules, tx=tx, schedule=schedule, state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init=jax.jit(init, out_shardings=state_shardings),
      train_step=jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
      eval_step=jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=replicated),
  )


def tokens_per_step(cfg) -> int:
  return cfg.train.batch_size * cfg.train.seq_len


def model_flops_per_step(cfg) -> float:
  return models.flops_per_token(cfg.model, cfg.train.seq_len) * tokens_per_step(cfg)
