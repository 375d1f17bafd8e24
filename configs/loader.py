"""Loads `get_config(arg)` files by name or path and applies `--config.KEY=VALUE` overrides."""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os

import ml_collections


class ConfigError(ValueError):
  """A bad config value; its message is one line naming the key, the reason and the fix."""


def load(spec: str) -> ml_collections.ConfigDict:
  """`NAME[:ARG]` (a module in scalezoo.configs, e.g. `dense:M`) or `FILE.py[:ARG]`."""
  name, _, arg = spec.partition(":")
  if name.endswith(".py") or os.sep in name:
    if not os.path.isfile(name):
      raise ConfigError(f"--config {spec}: no such file {name!r}; pass a config file path or a name like dense:tiny")
    module_spec = importlib.util.spec_from_file_location("scalezoo_user_config", name)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    try:
      module = importlib.import_module(f"scalezoo.configs.{name}")
    except ModuleNotFoundError:
      known = sorted(f[:-3] for f in os.listdir(os.path.dirname(__file__))
                     if f.endswith(".py") and f not in ("__init__.py", "base.py", "loader.py"))
      raise ConfigError(f"--config {spec}: unknown config {name!r}; known: {', '.join(known)}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config {spec}: {name} defines no get_config(arg)")
  try:
    return module.get_config(arg or None)
  except (ValueError, KeyError) as e:
    raise ConfigError(f"--config {spec}: {e}") from None


def _parse_value(text: str, current):
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ValueError("expected true or false")
  if isinstance(current, int):
    return int(float(text)) if float(text) == int(float(text)) else int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  return ast.literal_eval(text)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
  """Sets dotted keys from strings, typed like the existing value; unknown keys are a ConfigError."""
  for key, text in overrides.items():
    parts = key.split(".")
    node = cfg
    for i, p in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        scope = ".".join(parts[:i])
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        near = difflib.get_close_matches(p, known, n=1)
        hint = f"did you mean {'.'.join(parts[:i] + near)}?" if near else \
            f"known keys{' under ' + scope if scope else ''}: {', '.join(known)}"
        raise ConfigError(f"unknown config key {key!r}; {hint}")
      if i < len(parts) - 1:
        node = node[p]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"config key {key!r} is a group; set one of its keys: {', '.join(current.keys())}")
    try:
      node[parts[-1]] = _parse_value(str(text), current)
    except (ValueError, SyntaxError, TypeError, OverflowError):
      raise ConfigError(f"config key {key}={text!r}: expected a {type(current).__name__} "
                        f"like {current!r}") from None
  return cfg
