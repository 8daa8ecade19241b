"""Error types of checkpoint reading, conversion and export.

Every error a *user* can cause (a bad path, a corrupt or truncated file, a checkpoint whose
parameters do not match its config, an existing destination) derives from :class:`CheckpointError`
(``ConvertError`` is its former name, kept as an alias), so the command line can print the message
and exit with status 2 instead of a traceback. Config problems raise
:class:`jaxprune.config.ConfigError`, which the command line treats the same way. All of them are
:class:`jaxprune.JaxpruneError` s and importable from ``jaxprune``.
"""

from __future__ import annotations

from jaxprune.errors import JaxpruneError


class CheckpointError(JaxpruneError):
    """A user-facing checkpoint error; the message says what is wrong and where."""


#: The former name of :class:`CheckpointError` (the same class).
ConvertError = CheckpointError


class CheckpointFileError(CheckpointError):
    """A checkpoint file (or its index) is missing, truncated or corrupt. The message names the file."""


class ParamMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the parameters the config implies.

    ``missing`` (canonical names), ``unexpected`` and ``mis_shaped`` hold every problem found, so one
    run reports them all at once. The message spells each missing tensor as the checkpoint's own
    files would (e.g. ``language_model.model.layers.0...`` in a legacy llava-hf file) and names the file.
    """

    def __init__(self, message: str, missing: list[str] | None = None, unexpected: list[str] | None = None,
                 mis_shaped: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or ())
        self.unexpected = list(unexpected or ())
        self.mis_shaped = list(mis_shaped or ())


class DestinationExistsError(CheckpointError):
    """The destination directory exists and ``force`` was not given."""


__all__ = ["CheckpointError", "CheckpointFileError", "ConvertError", "DestinationExistsError", "ParamMismatchError"]
