"""The README's user-layer snippet runs as written, and its layer is causal."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _snippet(name: str) -> str:
  text = open(README).read()
  match = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
  assert match, f"README has no snippet {name}"
  return match.group(1)


def test_user_layer_snippet_runs_and_is_causal():
  scope: dict = {}
  exec(compile(_snippet("user-layer"), "README.md", "exec"), scope)
  block = scope["block"]
  x = jax.random.normal(jax.random.key(1), (2, 16, 64))
  y = block(x)
  # Changing positions >= 8 leaves outputs before 8 unchanged: the attention in the snippet is causal.
  x2 = x.at[:, 8:].set(jax.random.normal(jax.random.key(2), (2, 8, 64)))
  y2 = block(x2)
  np.testing.assert_array_equal(np.asarray(y[:, :8]), np.asarray(y2[:, :8]))
  assert not np.allclose(np.asarray(y[:, 8:]), np.asarray(y2[:, 8:]))
  assert jnp.isfinite(y).all()


def test_user_linear_layer_snippet_decodes_like_the_training_form():
  scope: dict = {}
  exec(compile(_snippet("user-linear-layer"), "README.md", "exec"), scope)
  y, y_first, y_next = scope["y"], scope["y_first"], scope["y_next"]
  np.testing.assert_allclose(np.asarray(y_first), np.asarray(y[:, :10]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(y_next), np.asarray(y[:, 10:11]), atol=1e-5)
  assert scope["cache"]["state"].shape == (2, 4, 16, 32)
