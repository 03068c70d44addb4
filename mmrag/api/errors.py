"""HTTP errors: one table maps the project's error classes to statuses and stable codes.

Every error response is JSON ``{"code": "...", "message": "..."}``; ``code`` is stable (clients branch on it),
``message`` says what went wrong and what to do. A stack trace never reaches a client.
"""

from __future__ import annotations

from mmrag.errors import (BadInputError, ConfigError, EncoderMismatchError, MmragError, ModelUnavailableError,
                          NotFoundError, StoreError)

# The project's errors -> (HTTP status, code). The most specific class in an error's MRO wins.
STATUS: dict[type[MmragError], tuple[int, str]] = {
    BadInputError: (400, "bad_input"),
    NotFoundError: (404, "not_found"),
    EncoderMismatchError: (409, "encoder_mismatch"),
    ConfigError: (500, "configuration"),
    ModelUnavailableError: (503, "model_unavailable"),
    StoreError: (503, "store_unavailable"),
    MmragError: (400, "bad_request"),
}


class ApiError(Exception):
    """An error the API answers with directly: a status, a stable code, a message and optional headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def status_of(error: MmragError) -> tuple[int, str]:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500, "internal_error"


def not_found(what: str) -> ApiError:
    """The same answer for "does not exist" and "belongs to another tenant": existence never leaks."""
    return ApiError(404, "not_found", f"no {what} with that id")
