"""Typed errors of the secure-aggregation core.

Invariants: every error is a :class:`~flcore.errors.FlcoreError` (a ``ValueError``) whose message names the
party, the phase or the field at fault; :class:`NotEnoughSurvivors` is raised BEFORE anything that would
help unmask is revealed (a client refuses to send shares, a server refuses to reconstruct), so catching it
and re-opening the round is always safe.
"""

from __future__ import annotations

from flcore.errors import FlcoreError

__all__ = [
    "InvalidSignature",
    "MessageError",
    "NotEnoughShares",
    "NotEnoughSurvivors",
    "ProtocolViolation",
    "SecAggError",
]


class SecAggError(FlcoreError):
    """Base class of every secure-aggregation error."""


class MessageError(SecAggError):
    """A received message is malformed: a missing or mistyped field, a wrong length, an unknown party."""


class ProtocolViolation(SecAggError):
    """A message or request breaks the protocol: wrong phase, duplicate, or a request that would unmask."""


class InvalidSignature(ProtocolViolation):
    """An advertised public key does not carry a valid Ed25519 signature of its owner (a swapped key)."""


class NotEnoughShares(SecAggError):
    """Fewer Shamir shares than the threshold were given: the secret cannot (and must not) be rebuilt."""


class NotEnoughSurvivors(SecAggError):
    """Too few parties are left for the threshold; the round fails safe and reveals nothing."""
