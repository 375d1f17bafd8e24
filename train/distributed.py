"""Multi-process (multi-host) start-up: join the job before JAX touches a device.

One process per host (TPU pod slices: one per TPU VM worker; GPU clusters: usually one per host). Every process
runs the same command; JAX then sees the global device list, each process feeds its own slice of the batch,
orbax writes each process's shards of a checkpoint, and only process 0 writes metrics, summaries and reports.

A job is multi-process when it is started with explicit coordinator flags (`--coordinator HOST:PORT
--num_processes N --process_id I`, for GPU or CPU clusters) or when the environment says so: a multi-host TPU
VM (`TPU_WORKER_HOSTNAMES` lists several workers, or a multi-slice `MEGASCALE_COORDINATOR_ADDRESS`), SLURM
with more than one task, or Open MPI with more than one rank. In those cases `jax.distributed.initialize()`
finds the coordinator itself.
"""

from __future__ import annotations

import os

import jax

from scalezoo.configs import ConfigError


def launched_multiprocess(env=None) -> bool:
  """True when the environment describes one process of several (TPU pod, multi-slice, SLURM, Open MPI)."""
  env = os.environ if env is None else env
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    try:
      if int(env.get(key, "1")) > 1:
        return True
    except ValueError:
      pass
  return False


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
  """Joins the multi-process job if there is one; returns True if this is one process of several.

  Must run before anything creates a JAX backend. CPU processes talk through gloo collectives.
  """
  explicit = bool(coordinator) or num_processes > 0 or process_id >= 0
  if explicit:
    if not coordinator or num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"multi-process flags --coordinator={coordinator!r} --num_processes={num_processes} "
                        f"--process_id={process_id}: give all three, with 0 <= process_id < num_processes")
    if ":" not in coordinator:
      raise ConfigError(f"--coordinator {coordinator!r}: write HOST:PORT (process 0's address), e.g. "
                        f"10.0.0.1:1234")
  elif not launched_multiprocess():
    return False
  try:
    # Multi-process CPU collectives need gloo (the default "none" cannot cross processes); ignored by GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):
    pass
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  return jax.process_count() > 1


def is_main_process() -> bool:
  """Process 0 writes the files every process would otherwise write alike (metrics, summaries, reports)."""
  return jax.process_index() == 0
