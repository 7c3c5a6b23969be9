"""Structured logging for agents: every line carries ``agent_id``, ``training_id`` and ``round``.

The SDK logs through :class:`ContextLogger` adapters that attach those fields as ``extra``; the handler
installed by :func:`configure_logging` fills a ``-`` for any field a record lacks, so that every line has
the same keys and ``grep training_id=...`` finds everything about one training.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

#: The context fields rendered on every line, in this order.
CONTEXT_FIELDS = ("agent_id", "training_id", "round", "task_id")


class ContextLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger adapter that merges fixed context fields into each record's ``extra``.

    Parameters
    ----------
    logger : logging.Logger
        Where records go.
    context : mapping
        Fields to attach, e.g. ``{"agent_id": "agent_001"}``.
    """

    def __init__(self, logger: logging.Logger, context: Mapping[str, Any]) -> None:
        super().__init__(logger, dict(context))

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        """Put the context under the call's own ``extra`` (the call's keys win)."""
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs

    def bind(self, **context: Any) -> ContextLogger:
        """Return a new adapter with more context fields."""
        return ContextLogger(self.logger, {**(self.extra or {}), **context})


class _ContextDefaults(logging.Filter):
    """Give every record all :data:`CONTEXT_FIELDS`, ``-`` when unknown."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, "-")
        return True


class KeyValueFormatter(logging.Formatter):
    """Text lines: ``<time> INFO fedagent.client <message> agent_id=a training_id=t round=3 task_id=k``."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as a line of text followed by ``key=value`` fields."""
        timestamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        fields = " ".join(f"{name}={getattr(record, name, '-')}" for name in CONTEXT_FIELDS)
        line = f"{timestamp} {record.levelname} {record.name} {record.getMessage()} {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line with ``time``, ``level``, ``logger``, ``message`` and the context fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as a JSON line."""
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            payload[name] = getattr(record, name, "-")
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send ``fedagent`` logs to ``stream`` (stderr by default) as text or JSON lines.

    Parameters
    ----------
    level : str
        ``debug``, ``info``, ``warning`` or ``error``.
    fmt : {"text", "json"}
        Line format.
    stream : file, optional
        Destination; default ``sys.stderr``.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"Unknown log level {level!r}; expected debug, info, warning or error.")
    if fmt not in {"text", "json"}:
        raise ValueError(f"Unknown log format {fmt!r}; expected 'text' or 'json'.")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_ContextDefaults())
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger("fedagent")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    root.propagate = False
    # httpx logs every request at INFO; keep it for debug runs only.
    logging.getLogger("httpx").setLevel(logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING)
