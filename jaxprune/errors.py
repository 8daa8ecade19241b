"""The base of every error jaxprune raises on purpose.

Each error class keeps the built-in base it always had (``ConfigError``, ``InputError``,
``ShardingError``, ``LoraError``, ``BudgetError`` and the benchmark-file errors are ``ValueError`` s; the
checkpoint errors are plain ``Exception`` s), so ``except ValueError`` keeps working, and also derives
from :class:`JaxpruneError`, so one ``except jaxprune.JaxpruneError`` catches any of them. Every class is
importable from the top-level package (``jaxprune.CheckpointFileError``, ``jaxprune.BudgetError``, ...).
"""

from __future__ import annotations


class JaxpruneError(Exception):
    """A user-facing jaxprune error; the message says what is wrong and where (file, key, field, budget)."""


__all__ = ["JaxpruneError"]
