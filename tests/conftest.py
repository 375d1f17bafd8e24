"""Test setup: 8 fake host CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
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
