"""The project's error hierarchy and the one table that maps errors to CLI exit codes.

Every error a user can cause or fix carries a message that says what went wrong and what to do. Entry points map
them: the CLI through ``EXIT_CODES``; the HTTP API (a later stage) through its own status table.
"""

from __future__ import annotations


class MmragError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(MmragError):
    """The configuration or a profile is invalid or names something that does not exist."""


class ModelUnavailableError(MmragError):
    """A model role cannot be resolved offline; the message names what to install or configure."""


class BadInputError(MmragError):
    """One input (file, query, image) is unusable; the message is a one-line reason."""


class EncoderMismatchError(MmragError):
    """A collection was filled by other encoders than the ones now configured."""


class StoreError(MmragError):
    """Milvus or the blob store failed or cannot be reached."""


class NotFoundError(MmragError):
    """A named document, chunk or blob does not exist."""


EXIT_CODES: dict[type[MmragError], int] = {
    ConfigError: 3,
    ModelUnavailableError: 4,
    BadInputError: 5,
    EncoderMismatchError: 6,
    StoreError: 7,
    NotFoundError: 8,
}


def exit_code(error: BaseException) -> int:
    """Exit code for an error: the most specific entry of ``EXIT_CODES``, 1 for anything else."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1
