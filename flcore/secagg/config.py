"""The ``secure_aggregation`` section of a training configuration, and which aggregation rules it admits.

Invariants: a :class:`SecureAggregationConfig` is immutable and valid by construction (:meth:`from_dict`
and ``__post_init__`` raise a :class:`~flcore.errors.ConfigError` that names the field, the bad value and
what is allowed); ``SecureAggregationConfig.from_dict(c.to_dict()) == c``; what depends on the number of
parties (the neighbour degree, the per-neighbourhood threshold, whether ``bits`` suffice) is checked by
:meth:`validate_for` when a round's parties are known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flcore.errors import ConfigError
from flcore.secagg.graph import default_neighbours
from flcore.secagg.quantisation import MAX_BITS, MIN_BITS, quantisation_levels
from flcore.strategies.base import AggregationAlgorithm

__all__ = [
    "COMPATIBLE_ALGORITHMS",
    "PROTOCOLS",
    "SecureAggregationConfig",
    "check_strategy_compatible",
]

SECAGG = "secagg"
SECAGG_PLUS = "secagg+"
PROTOCOLS = (SECAGG, SECAGG_PLUS)
"""``secagg``: the complete graph (Bonawitz et al. 2017); ``secagg+``: O(log n) (Bell et al. 2020)."""

COMPATIBLE_ALGORITHMS = frozenset(
    {
        AggregationAlgorithm.FEDAVG,
        AggregationAlgorithm.FEDAVGM,
        AggregationAlgorithm.FEDPROX,
        AggregationAlgorithm.FEDADAM,
        AggregationAlgorithm.FEDYOGI,
        AggregationAlgorithm.FEDADAGRAD,
    }
)
"""Rules that need only the (weighted) sum of the round's deltas, which is all secure aggregation reveals."""

_REFUSED_REASONS = {
    AggregationAlgorithm.KRUM: "scores every individual update against the others",
    AggregationAlgorithm.MULTIKRUM: "scores every individual update against the others",
    AggregationAlgorithm.MEDIAN: "takes a coordinate-wise median over individual updates",
    AggregationAlgorithm.TRIMMED_MEAN: "sorts individual updates coordinate by coordinate",
    AggregationAlgorithm.NORM_BOUNDED: (
        "has the server clip each individual update (with secure aggregation the agents clip to "
        "'clip_norm' themselves)"
    ),
    AggregationAlgorithm.FEDBUFF: "is asynchronous (secure aggregation sums one synchronous round)",
    AggregationAlgorithm.FEDASYNC: "is asynchronous (secure aggregation sums one synchronous round)",
}

_FIELDS = ("protocol", "threshold", "neighbours", "clip_norm", "bits")
DEFAULT_BITS = 32


def _field_error(field: str, allowed: str, value: object) -> ConfigError:
    return ConfigError(f"secure_aggregation {field!r} must be {allowed}. Found {value!r}.")


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Parameters of secure aggregation (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020).

    Parameters
    ----------
    protocol : {"secagg+", "secagg"}
        ``secagg+`` masks and shares with ``neighbours`` random neighbours; ``secagg`` with every party.
    threshold : int, float or None
        Shares needed to rebuild a party's secrets, per neighbourhood (the party and its neighbours):
        an integer ``>= 2`` is absolute, a float in ``(0, 1]`` a fraction ``t = max(2, ceil(f m))`` of the
        neighbourhood size ``m``, ``None`` a strict majority ``floor(m / 2) + 1`` (which also stops a
        server from collecting both kinds of share of one party from two disjoint groups).
    neighbours : int or None
        ``secagg+`` only: the even degree ``k`` of the graph; ``None`` for ``3 log2 n`` rounded up to even.
        Must be ``None`` for ``secagg``.
    clip_norm : float
        L2 norm every agent clips its update to before quantising.
    bits : int
        The modulus is ``2**bits``; the quantisation leaves room for the sum of all parties
        (``floor((2**bits - 1) / 2n)`` levels per side).
    """

    clip_norm: float
    protocol: str = SECAGG_PLUS
    threshold: int | float | None = None
    neighbours: int | None = None
    bits: int = DEFAULT_BITS

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise _field_error("protocol", f"one of {list(PROTOCOLS)}", self.protocol)
        threshold = self.threshold
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise _field_error("threshold", "an integer >= 2, a fraction in (0, 1] or null", threshold)
            if isinstance(threshold, int) and threshold < 2:
                raise _field_error(
                    "threshold", "an integer >= 2 (one share would reveal the secret)", threshold
                )
            if isinstance(threshold, float) and not (math.isfinite(threshold) and 0 < threshold <= 1):
                raise _field_error("threshold", "a fraction in (0, 1] when given as a decimal", threshold)
        neighbours = self.neighbours
        if neighbours is not None:
            if self.protocol == SECAGG:
                raise _field_error(
                    "neighbours", "null for protocol 'secagg' (every party is a neighbour)", neighbours
                )
            if (
                isinstance(neighbours, bool)
                or not isinstance(neighbours, int)
                or neighbours < 2
                or neighbours % 2
            ):
                raise _field_error("neighbours", "an even integer >= 2 or null", neighbours)
        clip_norm = self.clip_norm
        if (
            isinstance(clip_norm, bool)
            or not isinstance(clip_norm, int | float)
            or not (math.isfinite(clip_norm) and clip_norm > 0)
        ):
            raise _field_error("clip_norm", "a finite number > 0", clip_norm)
        object.__setattr__(self, "clip_norm", float(clip_norm))
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise _field_error("bits", f"an integer in [{MIN_BITS}, {MAX_BITS}]", bits)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SecureAggregationConfig:
        """Validate the JSON ``secure_aggregation`` section (unknown and missing keys name themselves)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"secure_aggregation must be a JSON object. Found {type(data).__name__}.")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"secure_aggregation has unknown keys {unknown}; allowed: {list(_FIELDS)}.")
        if "clip_norm" not in data:
            raise ConfigError(
                "secure_aggregation 'clip_norm' is required: the L2 norm agents clip their update to."
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (:meth:`from_dict` rebuilds an equal config)."""
        return {name: getattr(self, name) for name in _FIELDS}

    def neighbours_for(self, num_parties: int) -> int:
        """The degree of every party among ``num_parties`` (``n - 1`` for the complete graph)."""
        if self.protocol == SECAGG:
            return num_parties - 1
        k = default_neighbours(num_parties) if self.neighbours is None else self.neighbours
        return min(k, num_parties - 1)

    def threshold_for(self, neighbourhood_size: int) -> int:
        """``t`` for a neighbourhood of ``neighbourhood_size`` parties (the party and its neighbours)."""
        m = neighbourhood_size
        if self.threshold is None:
            t = m // 2 + 1
        elif isinstance(self.threshold, float):
            t = max(2, math.ceil(self.threshold * m - 1e-12))
        else:
            t = self.threshold
        if t > m:
            raise ConfigError(
                f"secure_aggregation 'threshold' = {self.threshold!r} asks for {t} shares, but a "
                f"neighbourhood has only {m} parties; lower it or select more parties."
            )
        return t

    def validate_for(self, num_parties: int) -> None:
        """Check the configuration against a round of ``num_parties`` (threshold, neighbours and bits)."""
        if num_parties < 2:
            raise ConfigError(f"Secure aggregation needs at least 2 parties. Found {num_parties}.")
        self.threshold_for(self.neighbours_for(num_parties) + 1)
        quantisation_levels(bits=self.bits, num_parties=num_parties)


def check_strategy_compatible(algorithm: str) -> None:
    """Raise a :class:`ConfigError` unless ``algorithm`` needs only the weighted sum of the round's deltas.

    Secure aggregation reveals the sum of the survivors' (clipped, quantised) updates and nothing else, so
    FedAvg, FedAvgM, FedProx and the FedOpt family (FedAdam, FedYogi, FedAdagrad) work unchanged, and the
    rules that look at individual updates cannot run.
    """
    try:
        key = AggregationAlgorithm(algorithm)
    except ValueError:
        raise ConfigError(
            f"Unknown aggregation algorithm {algorithm!r}; "
            f"available: {[a.value for a in AggregationAlgorithm]}."
        ) from None
    if key in COMPATIBLE_ALGORITHMS:
        return
    raise ConfigError(
        f"Aggregation algorithm {key.value!r} cannot run with secure_aggregation: "
        f"it {_REFUSED_REASONS[key]}, "
        "and the server sees only the sum of the updates. Use one of "
        f"{sorted(a.value for a in COMPATIBLE_ALGORITHMS)}, or turn secure_aggregation off."
    )
