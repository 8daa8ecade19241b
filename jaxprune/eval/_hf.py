"""``transformers`` for tokenizers only, without its "PyTorch was not found" advice on every run.

The library never uses transformers' models (the core install has no torch), so that warning is noise here; every
other transformers message is left alone.
"""

from __future__ import annotations

import logging

_ADVICE = "PyTorch was not found"


class _DropNoTorchAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVICE)


def quiet_transformers() -> None:
    """Install the filter on the ``transformers`` logger (idempotent); call before importing transformers."""
    log = logging.getLogger("transformers")
    if not any(isinstance(f, _DropNoTorchAdvice) for f in log.filters):
        log.addFilter(_DropNoTorchAdvice())
