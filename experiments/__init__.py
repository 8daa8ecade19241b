"""Experiments: evaluation CLI, benchmarks and their results (``experiments/results``)."""
