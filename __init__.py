"""scalezoo: a JAX/Flax NNX architecture zoo for scaling studies.

Subpackages: `scalezoo.models` (Flax NNX modules only), `scalezoo.train` (trainer, CLI, data, checkpoints),
`scalezoo.configs` (ml_collections `get_config(arg)` files).
"""

__version__ = "0.1.0"
