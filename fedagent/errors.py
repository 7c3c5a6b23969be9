"""Errors raised by the agent SDK.

Every error the SDK raises derives from :class:`AgentError`, so a caller can catch one type. Errors that
come from the server carry the fields of the protocol's error shape
(``{"error": {"code", "message", "details"}}``) so that a caller can branch on ``code`` and show
``message`` (which the server writes as a sentence saying what to do).
"""

from __future__ import annotations

from typing import Any


class AgentError(Exception):
    """Base class of every error raised by ``fedagent``."""


class AgentApiError(AgentError):
    """The server answered with an error status (4xx or 5xx).

    Parameters
    ----------
    status : int
        The HTTP status code.
    code : str
        The snake_case error code from the body (``"http_<status>"`` when the body had no error shape,
        e.g. a proxy's 502 page).
    message : str
        The human sentence from the body.
    details : dict, optional
        The ``details`` object from the body.
    retry_after : float, optional
        Seconds from a ``Retry-After`` header, when the server sent one.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Whether the protocol says to try again later (408, 429, 502, 503, 504)."""
        return self.status in RETRYABLE_STATUSES


class AgentConnectionError(AgentError):
    """The server could not be reached (connection refused, reset or timed out) after all retries."""


class ProtocolError(AgentError):
    """The server sent something the protocol does not allow (a malformed task, a bad response body)."""


class ModelIntegrityError(AgentError):
    """A downloaded model does not match the SHA-256 the task announced, or does not parse."""


class AgentStopped(AgentError):
    """The agent was asked to stop while it was waiting (long-poll or back-off sleep)."""


#: Statuses after which the protocol says to retry later, honouring ``Retry-After``. 408: the server did not
#: receive the body in time and stored nothing (a slow link, or a server that was just restarting).
RETRYABLE_STATUSES = frozenset({408, 429, 502, 503, 504})
