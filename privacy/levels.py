"""Privacy levels: presets of (epsilon, delta, clip norm) an operator can pick instead of numbers.

``high`` privacy means a small epsilon. The noise multiplier is not part of a preset: it is calibrated
with dp-accounting for the training's planned rounds and sampling rate, so a preset means the same
guarantee whatever the federation's size.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrivacyLevel:
    name: str
    epsilon: float
    delta: float
    clip_norm: float
    description: str


LEVELS: dict[str, PrivacyLevel] = {
    "low": PrivacyLevel("low", 8.0, 1e-5, 1.0, "epsilon 8: weak formal protection, small accuracy cost"),
    "medium": PrivacyLevel("medium", 3.0, 1e-5, 1.0, "epsilon 3: a common choice for production FL"),
    "high": PrivacyLevel("high", 1.0, 1e-5, 1.0, "epsilon 1: strong protection, needs many agents"),
}
