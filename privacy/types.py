"""The seed's privacy names for the Python API: ``PrivacyBudget(total_epsilon, total_delta)`` and
``PrivacyLevel``. They only describe what an operator asks for; the stored budget and its ledger are
``privacy.models.PrivacyBudget`` and ``PrivacyLedgerEntry``."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivacyBudget:
    """A total (epsilon, delta) budget for a training."""

    total_epsilon: float
    total_delta: float = 1e-5


class PrivacyLevel(enum.StrEnum):
    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
