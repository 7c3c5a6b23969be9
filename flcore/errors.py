"""Typed errors raised by flcore.

Invariants: every error raised for bad input is a :class:`FlcoreError` (a ``ValueError``), and its message
says what is wrong and what is expected, naming the offending value or tensor.
"""

from __future__ import annotations

__all__ = ["ConfigError", "FlcoreError", "SerdeError"]


class FlcoreError(ValueError):
    """Base class of every error raised by flcore for invalid input."""


class SerdeError(FlcoreError):
    """A serialised parameter blob is malformed, hostile or does not match the expected model.

    Parameters
    ----------
    code : str
        Machine-readable reason, one of ``"too_large"``, ``"bad_header"``, ``"wrong_dtype"``,
        ``"name_mismatch"``, ``"shape_mismatch"``, ``"non_finite"``, ``"empty"``.
    message : str
        Human-readable explanation naming the tensor and what was expected.
    """

    CODES = frozenset(
        {"too_large", "bad_header", "wrong_dtype", "name_mismatch", "shape_mismatch", "non_finite", "empty"}
    )

    def __init__(self, code: str, message: str) -> None:
        if code not in self.CODES:
            raise ValueError(f"Unknown SerdeError code {code!r}; expected one of {sorted(self.CODES)}.")
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[SerdeError], tuple[str, str]]:
        return (type(self), (self.code, self.message))


class ConfigError(FlcoreError):
    """A model, data or training configuration value is invalid."""
