"""Test setup: 8 fake host CPU devices, set before JAX is imported anywhere."""

import os
import subprocess
import sys

# XLA:CPU compiles the suite's many small programs ~1.5x faster with its legacy emitters than with the fusion
# emitters (compile time dominates the suite). An XLA that no longer knows the flag would abort on it, so it is
# probed once in a child process and left out there.
LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  probe = "import jax, jax.numpy as jnp; jax.jit(lambda x: x + 1)(jnp.ones(2)).block_until_ready()"
  try:
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=300).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "fusion_emitters" not in _flags and _xla_accepts(LEGACY_EMITTERS):
  _flags += " " + LEGACY_EMITTERS
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 host devices; import jax only after conftest"


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def fast_compile(tmp_path_factory):
  """For the whole suite: a persistent compilation cache shared across the session, and XLA's backend (LLVM)
  optimisations off, which halves compile time for these tiny programs; HLO passes, sharding propagation
  included, still run, and every comparison in the suite is between programs compiled the same way."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_disable_most_optimizations")
  old = {k: jax.config.values[k] for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "jax_compile_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_disable_most_optimizations", True)
  cc.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  cc.reset_cache()
