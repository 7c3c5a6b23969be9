"""Adaptive quantile clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially Private
Learning with Adaptive Clipping", NeurIPS, Algorithm 1).

Instead of a fixed clip norm ``C``, the server tracks the ``gamma``-quantile of the clients' update norms
with a private, geometric online update, one step per round:

1. each client reports ``b_i = 1[||Delta_i||_2 <= C]`` (its update was not clipped);
2. the server releases the noised unclipped fraction
   ``b_bar = (sum_i b_i + N(0, sigma_b^2)) / m`` with ``m`` the expected number of clients per round;
3. ``C <- C * exp(-eta_C (b_bar - gamma))``.

Implementation detail of step 2, as in the paper's reference implementation (TensorFlow Privacy,
``QuantileEstimatorQuery``): the counts are centred, ``b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m
+ 1/2``, so one client changes the noised sum by at most 1/2 (L2 sensitivity 1/2, i.e. noise multiplier
``2 sigma_b``) — the factor 2 in the corrected multiplier below relies on it. With exactly ``m`` clients
this is the paper's formula; ``b_bar`` is then clamped to ``[0, 1]`` (post-processing).

Privacy (Andrew et al. 2021, Section 3.1): one round releases two Gaussian queries, the clipped update sum
with noise multiplier ``z_Delta`` and the centred count with multiplier ``2 sigma_b``; together they are
one Gaussian mechanism with ``z = (z_Delta^-2 + (2 sigma_b)^-2)^(-1/2)``. To spend exactly a target ``z``,
the update sum uses :func:`update_noise_multiplier`,
``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, which needs ``z < 2 sigma_b``.

Defaults from the paper (Section 3 and the experiments): target quantile ``gamma = 0.5`` (the median),
clip learning rate ``eta_C = 0.2``, ``sigma_b = m / 20``.

Invariants: every draw comes from an explicit ``rng``; :class:`AdaptiveClipState` is immutable and
round-trips through :meth:`AdaptiveClipState.to_json` and :meth:`AdaptiveClipState.from_json`; the clip
norm stays positive and finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flcore.dp._checks import count, generator, non_negative, positive
from flcore.errors import FlcoreError

__all__ = [
    "CLIPPED_COUNT_STDDEV_FRACTION",
    "DEFAULT_CLIP_LEARNING_RATE",
    "DEFAULT_TARGET_QUANTILE",
    "AdaptiveClipConfig",
    "AdaptiveClipState",
    "adaptive_clip_step",
    "default_clipped_count_stddev",
    "effective_noise_multiplier",
    "geometric_clip_update",
    "noised_unclipped_fraction",
    "unclipped_indicator",
    "update_noise_multiplier",
]

DEFAULT_TARGET_QUANTILE = 0.5
"""``gamma``: the fraction of updates that should be left unclipped (Andrew et al. 2021: the median)."""

DEFAULT_CLIP_LEARNING_RATE = 0.2
"""``eta_C`` of the geometric update (Andrew et al. 2021, recommended for geometric updating)."""

CLIPPED_COUNT_STDDEV_FRACTION = 1.0 / 20.0
"""``sigma_b = m / 20`` by default (Andrew et al. 2021)."""


def default_clipped_count_stddev(expected_clients_per_round: float) -> float:
    """Return ``sigma_b = expected_clients_per_round / 20`` (Andrew et al. 2021)."""
    return positive("expected_clients_per_round", expected_clients_per_round) * CLIPPED_COUNT_STDDEV_FRACTION


def update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """Return ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, the multiplier of the update sum.

    Andrew et al. (2021, Section 3.1): with this ``z_Delta`` on the clipped sum and ``sigma_b`` on the
    centred clipped count, the round is one Gaussian mechanism with total multiplier ``z``.

    Raises
    ------
    FlcoreError
        If ``z <= 0`` or ``z >= 2 sigma_b`` (the count alone would spend more than the budget; increase
        ``sigma_b`` or the clients per round, or decrease ``z``).
    """
    z = positive("noise_multiplier", noise_multiplier)
    sigma_b = positive("clipped_count_stddev", clipped_count_stddev)
    if z >= 2.0 * sigma_b:
        raise FlcoreError(
            f"clipped_count_stddev ({sigma_b:g}) is too low for the noise multiplier {z:g}: adaptive "
            f"clipping needs noise_multiplier < 2 * clipped_count_stddev = {2.0 * sigma_b:g}. Increase "
            "clipped_count_stddev (default expected_clients_per_round / 20) or the clients per round, or "
            "decrease noise_multiplier."
        )
    return float((z**-2 - (2.0 * sigma_b) ** -2) ** -0.5)


def effective_noise_multiplier(update_multiplier: float, clipped_count_stddev: float) -> float:
    """Return ``z = (z_Delta^-2 + (2 sigma_b)^-2)^(-1/2)``, the multiplier of one adaptive-clipping round.

    The inverse of :func:`update_noise_multiplier` (Andrew et al. 2021, Section 3.1).
    """
    z_delta = positive("update_multiplier", update_multiplier)
    sigma_b = positive("clipped_count_stddev", clipped_count_stddev)
    return float((z_delta**-2 + (2.0 * sigma_b) ** -2) ** -0.5)


def unclipped_indicator(norm: float, clip_norm: float) -> int:
    """Return ``b_i = 1[norm <= clip_norm]`` (Andrew et al. 2021, Algorithm 1)."""
    return int(norm <= clip_norm)


def noised_unclipped_fraction(
    num_unclipped: int,
    num_updates: int,
    expected_clients_per_round: float,
    clipped_count_stddev: float,
    rng: np.random.Generator,
) -> float:
    """Return ``b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2``, clamped to ``[0, 1]``.

    Andrew et al. (2021), Algorithm 1, ``b_bar = (sum_i b_i + N(0, sigma_b^2)) / m``, with the counts centred
    as in their reference implementation (module docstring): identical when ``num_updates == m``.

    Parameters
    ----------
    num_unclipped : int
        ``sum_i b_i``, the updates whose norm was at most the clip norm.
    num_updates : int
        Updates in the round (``>= num_unclipped``).
    expected_clients_per_round : float
        ``m > 0``, the fixed denominator.
    clipped_count_stddev : float
        ``sigma_b >= 0`` (0 releases the exact fraction: no privacy for the count).
    rng : numpy.random.Generator
        Source of the noise (one standard normal draw when ``sigma_b > 0``).
    """
    unclipped = count("num_unclipped", num_unclipped)
    total = count("num_updates", num_updates)
    if unclipped > total:
        raise FlcoreError(f"num_unclipped ({unclipped}) cannot exceed num_updates ({total}).")
    m = positive("expected_clients_per_round", expected_clients_per_round)
    sigma_b = non_negative("clipped_count_stddev", clipped_count_stddev)
    source = generator(rng)
    noise = float(source.normal(0.0, sigma_b)) if sigma_b > 0 else 0.0
    fraction = (unclipped - 0.5 * total + noise) / m + 0.5
    return min(1.0, max(0.0, fraction))


def geometric_clip_update(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """Return ``C * exp(-eta_C (b_bar - gamma))`` (Andrew et al. 2021, Algorithm 1, geometric update).

    Too many unclipped updates (``b_bar > gamma``) shrink ``C``; too few grow it; each step changes ``C``
    by a factor of at most ``exp(eta_C)``.
    """
    c = positive("clip_norm", clip_norm)
    fraction = non_negative("unclipped_fraction", unclipped_fraction)
    gamma = non_negative("target_quantile", target_quantile)
    if fraction > 1 or gamma > 1:
        raise FlcoreError(
            f"unclipped_fraction and target_quantile must be in [0, 1]. Found {unclipped_fraction!r} and "
            f"{target_quantile!r}."
        )
    eta = non_negative("learning_rate", learning_rate)
    updated = c * math.exp(-eta * (fraction - gamma))
    if not (math.isfinite(updated) and updated > 0):  # pragma: no cover - needs C near the float limits
        raise FlcoreError(f"The clip norm left the positive floats: {c!r} -> {updated!r}.")
    return updated


@dataclass(frozen=True)
class AdaptiveClipConfig:
    """Hyperparameters of adaptive quantile clipping (Andrew et al. 2021).

    Parameters
    ----------
    expected_clients_per_round : float
        ``m > 0``, the fixed denominator of the noised fraction.
    target_quantile : float
        ``gamma`` in ``[0, 1]``; default 0.5.
    learning_rate : float
        ``eta_C >= 0``; default 0.2.
    clipped_count_stddev : float, optional
        ``sigma_b >= 0``; default ``m / 20``.
    """

    expected_clients_per_round: float
    target_quantile: float = DEFAULT_TARGET_QUANTILE
    learning_rate: float = DEFAULT_CLIP_LEARNING_RATE
    clipped_count_stddev: float | None = None

    def __post_init__(self) -> None:
        m = positive("expected_clients_per_round", self.expected_clients_per_round)
        gamma = non_negative("target_quantile", self.target_quantile)
        if gamma > 1:
            raise FlcoreError(f"target_quantile must be in [0, 1]. Found {self.target_quantile!r}.")
        eta = non_negative("learning_rate", self.learning_rate)
        sigma_b = (
            default_clipped_count_stddev(m)
            if self.clipped_count_stddev is None
            else non_negative("clipped_count_stddev", self.clipped_count_stddev)
        )
        object.__setattr__(self, "expected_clients_per_round", m)
        object.__setattr__(self, "target_quantile", gamma)
        object.__setattr__(self, "learning_rate", eta)
        object.__setattr__(self, "clipped_count_stddev", sigma_b)

    @property
    def count_stddev(self) -> float:
        """``sigma_b`` (the default filled in)."""
        assert self.clipped_count_stddev is not None  # set in __post_init__
        return self.clipped_count_stddev


@dataclass(frozen=True)
class AdaptiveClipState:
    """The adaptive clip norm between rounds.

    Parameters
    ----------
    clip_norm : float
        The clip norm ``C`` of the next round (finite, ``> 0``).
    step : int
        Updates of ``C`` so far (``>= 0``).
    """

    clip_norm: float
    step: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip_norm", positive("clip_norm", self.clip_norm))
        object.__setattr__(self, "step", count("step", self.step))

    def to_json(self) -> dict[str, Any]:
        """Return ``{"clip_norm": C, "step": t}``."""
        return {"clip_norm": self.clip_norm, "step": self.step}

    @classmethod
    def from_json(cls, data: Any) -> AdaptiveClipState:
        """Build and validate a state from :meth:`to_json`'s output.

        Raises
        ------
        FlcoreError
            If ``data`` is not an object with exactly ``clip_norm`` and ``step``, or a value is invalid.
        """
        if not isinstance(data, dict) or set(data) != {"clip_norm", "step"}:
            raise FlcoreError(
                "An adaptive clip state must be a JSON object with keys 'clip_norm' and 'step'. "
                f"Found {data!r}."
            )
        return cls(clip_norm=data["clip_norm"], step=data["step"])


def adaptive_clip_step(
    state: AdaptiveClipState,
    num_unclipped: int,
    num_updates: int,
    config: AdaptiveClipConfig,
    rng: np.random.Generator,
) -> tuple[AdaptiveClipState, float]:
    """Take one step of Andrew et al. (2021), Algorithm 1: noise the unclipped fraction, update ``C``.

    Parameters
    ----------
    state : AdaptiveClipState
        The clip norm the round's updates were clipped with.
    num_unclipped : int
        ``sum_i 1[||Delta_i|| <= C]`` over the round's updates.
    num_updates : int
        Updates in the round.
    config : AdaptiveClipConfig
        ``m``, ``gamma``, ``eta_C``, ``sigma_b``.
    rng : numpy.random.Generator
        Source of the count noise.

    Returns
    -------
    tuple of (AdaptiveClipState, float)
        The next state and the released (noised) unclipped fraction ``b_bar``.
    """
    fraction = noised_unclipped_fraction(
        num_unclipped, num_updates, config.expected_clients_per_round, config.count_stddev, rng
    )
    clip_norm = geometric_clip_update(state.clip_norm, fraction, config.target_quantile, config.learning_rate)
    return AdaptiveClipState(clip_norm=clip_norm, step=state.step + 1), fraction
