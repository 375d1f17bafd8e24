"""Everything that runs: CLI, trainer, sharding, data, checkpoints, plots."""
