"""Error types of the checkpoint converter.

Every error a *user* can cause (a bad path, a corrupt or truncated file, a checkpoint whose
parameters do not match its config, an existing destination) derives from :class:`ConvertError`,
so the command line can print the message and exit with status 2 instead of a traceback.
Config problems raise :class:`jaxprune.config.ConfigError`, which the command line treats the
same way.
"""

from __future__ import annotations


class ConvertError(Exception):
    """A user-facing conversion error; the message says what is wrong and where."""


class CheckpointFileError(ConvertError):
    """A checkpoint file (or its index) is missing, truncated or corrupt. The message names the file."""


class ParamMismatchError(ConvertError):
    """The checkpoint's tensors do not match the parameters the config implies.

    ``missing``, ``unexpected`` and ``mis_shaped`` hold every problem found, so one run reports
    them all at once.
    """

    def __init__(self, message: str, missing: list[str] | None = None, unexpected: list[str] | None = None,
                 mis_shaped: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or ())
        self.unexpected = list(unexpected or ())
        self.mis_shaped = list(mis_shaped or ())


class DestinationExistsError(ConvertError):
    """The destination directory exists and ``force`` was not given."""
