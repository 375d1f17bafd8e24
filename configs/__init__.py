"""ml_collections configs: `get_config(arg)` per family, loaded by name (`dense:M`) or file path."""

from scalezoo.configs.loader import ConfigError, apply_overrides, load

__all__ = ["ConfigError", "apply_overrides", "load"]
