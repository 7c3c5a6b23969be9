"""Structured log lines: ``event key=value ...`` so every line about a training, round or agent
can be grepped by ``training_id=``, ``round=`` or ``agent_id=``."""

from __future__ import annotations

import logging
from typing import Any


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with ``fields`` rendered as sorted ``key=value`` pairs."""
    if not logger.isEnabledFor(level):
        return
    rendered = " ".join(f"{key}={fields[key]}" for key in sorted(fields) if fields[key] is not None)
    logger.log(level, "%s %s", event, rendered)
