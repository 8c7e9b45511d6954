"""The aggregator: trains the server half, averages, checkpoints (`aggregator` command)."""
