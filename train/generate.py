"""`scalezoo generate`: text from a trained run, decoded token by token with the model's caches.

  scalezoo generate --workdir runs/hybrid --prompt "def main(" --tokens 200 --temperature 0.8

The run directory's config.json rebuilds the model; its newest readable checkpoint gives the weights (restored onto
one device). Attention layers decode with a KV cache, linear-attention layers with their recurrent state.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from scalezoo.configs import ConfigError
from scalezoo.models.generate import generate
from scalezoo.train import data as data_lib
from scalezoo.train.checkpoint import Checkpointer
from scalezoo.train.init_from import read_run_config
from scalezoo.train.sharding import make_mesh
from scalezoo.train.step import make_program

ONE_DEVICE_MESH = dict(data=1, fsdp=1, tensor=1, expert=1, preset="", dcn_data=1, dcn_fsdp=1, dcn_tensor=1,
                       dcn_expert=1)


def load_run(workdir: str):
  """(config, model with the newest checkpoint's weights) of a run directory, on one device."""
  cfg = read_run_config(workdir, f"--workdir {workdir}")
  cfg.mesh.update(ONE_DEVICE_MESH)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ConfigError(f"--workdir {workdir}: no checkpoints/; train the run first (scalezoo train)")
  device = jax.devices()[:1]
  mesh = make_mesh(cfg.mesh, device)
  with jax.set_mesh(mesh):
    program = make_program(cfg, mesh)
    with Checkpointer(ckpt_dir, processes=[jax.process_index()]) as ckpt:
      restored = ckpt.restore_latest(program.abstract_state())
  if restored is None:
    raise ConfigError(f"--workdir {workdir}: no readable checkpoint in {ckpt_dir}; train the run first")
  _, state, _ = restored
  return cfg, nnx.merge(program.graphdef, state["params"], state["rest"])


def generate_text(workdir: str, prompt: str, *, num_tokens: int, temperature: float, top_k: int, seed: int) -> str:
  """The prompt's continuation (text) by the run in `workdir`."""
  if num_tokens < 1:
    raise ConfigError(f"--tokens {num_tokens}: must be >= 1")
  if temperature < 0:
    raise ConfigError(f"--temperature {temperature}: must be >= 0 (0 is greedy)")
  cfg, model = load_run(workdir)
  tokenizer = data_lib.make_tokenizer(cfg.data)
  ids = tokenizer.encode(prompt) if prompt else jnp.zeros((1,), jnp.int32)  # empty prompt: start from token 0
  prompt_bt = jnp.asarray(ids, jnp.int32)[None]
  out = generate(model, prompt_bt, num_tokens, temperature=temperature, top_k=top_k, rng=jax.random.key(seed))
  return tokenizer.decode(jax.device_get(out[0, prompt_bt.shape[1]:]))
