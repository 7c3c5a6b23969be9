"""The ``secure_aggregation`` section of a training configuration, as the coordinator runs it.

The protocol's own parameters (``protocol``, ``threshold``, ``neighbours``, ``clip_norm``, ``bits``) are
validated by :class:`flcore.secagg.SecureAggregationConfig`; this module adds what wiring it into REST
rounds needs (``weight_cap``, ``phase_timeout_seconds``) and the checks against the rest of the
training's configuration (the aggregation rule, differential privacy).

Weighted FedAvg under secure aggregation: agent ``i`` clips its delta ``u_i`` to ``clip_norm`` C, takes
``w_i = min(num_examples_i, weight_cap) / weight_cap`` in (0, 1] and inputs the vector
``[w_i u_i, w_i C]`` (its length is the model's plus one). The server learns only the sums
``S = sum_i w_i u_i`` and ``T = C sum_i w_i`` and hands ``S C / T = sum_i w_i u_i / sum_i w_i`` to the
strategy, the FedAvg weighted mean of the clipped deltas (exactly, while no agent has more than
``weight_cap`` examples). The vector's norm is at most ``w_i C sqrt(2)``, so the quantiser's clip norm is
``C sqrt(2)`` and it never rescales an input a second time.

Invariants: :func:`secure_aggregation_parse` returns ``(None, errors)`` or ``(normalised dict, {})``; the
dict round-trips through :meth:`SecAggTrainingConfig.from_dict`; errors are keyed
``secure_aggregation`` or ``secure_aggregation.<field>`` and name the bad value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flcore.errors import ConfigError
from flcore.secagg import SecureAggregationConfig, check_strategy_compatible

DEFAULT_WEIGHT_CAP = 1000
DEFAULT_PHASE_TIMEOUT_SECONDS = 60.0
_EXTRA_FIELDS = ("weight_cap", "phase_timeout_seconds")


@dataclass(frozen=True)
class SecAggTrainingConfig:
    """Secure aggregation of one training: the protocol's parameters and the coordinator's."""

    protocol: SecureAggregationConfig
    weight_cap: int = DEFAULT_WEIGHT_CAP
    phase_timeout_seconds: float = DEFAULT_PHASE_TIMEOUT_SECONDS

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SecAggTrainingConfig:
        """Rebuild from the stored (already validated) dict; raises :class:`ConfigError` on bad input."""
        if not isinstance(data, dict):
            raise ConfigError(f"secure_aggregation must be a JSON object. Found {type(data).__name__}.")
        extra = {key: data[key] for key in _EXTRA_FIELDS if key in data}
        rest = {key: value for key, value in data.items() if key not in _EXTRA_FIELDS}
        weight_cap = extra.get("weight_cap", DEFAULT_WEIGHT_CAP)
        if isinstance(weight_cap, bool) or not isinstance(weight_cap, int) or not 1 <= weight_cap <= 10**9:
            raise ConfigError(
                f"secure_aggregation 'weight_cap' must be an integer in [1, 10^9]. Found {weight_cap!r}."
            )
        timeout = extra.get("phase_timeout_seconds", DEFAULT_PHASE_TIMEOUT_SECONDS)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not (math.isfinite(timeout) and 1 <= timeout <= 7 * 24 * 3600)
        ):
            raise ConfigError(
                "secure_aggregation 'phase_timeout_seconds' must be a number of seconds in [1, 604800]. "
                f"Found {timeout!r}."
            )
        try:
            protocol = SecureAggregationConfig.from_dict(rest)
        except TypeError as exc:
            raise ConfigError(f"secure_aggregation is malformed: {exc}") from None
        return cls(protocol=protocol, weight_cap=weight_cap, phase_timeout_seconds=float(timeout))

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.protocol.to_dict(),
            "weight_cap": self.weight_cap,
            "phase_timeout_seconds": self.phase_timeout_seconds,
        }

    @property
    def clip_norm(self) -> float:
        """C: the L2 norm every agent clips its delta to."""
        return self.protocol.clip_norm

    def quantiser_config(self) -> SecureAggregationConfig:
        """The protocol parameters of a round: the quantiser clips ``[w u, w C]`` at ``C sqrt(2)``."""
        data = self.protocol.to_dict()
        data["clip_norm"] = self.protocol.clip_norm * math.sqrt(2.0)
        return SecureAggregationConfig.from_dict(data)


def secure_aggregation_parse(
    value: Any, *, algorithm: str, privacy: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Validate the ``secure_aggregation`` section against the training's rule and privacy settings."""
    if value is None:
        return None, {}
    try:
        parsed = SecAggTrainingConfig.from_dict(value)
    except ConfigError as exc:
        return None, {"secure_aggregation": str(exc)}
    errors: dict[str, str] = {}
    try:
        check_strategy_compatible(algorithm)
    except ConfigError as exc:
        errors["algorithm"] = str(exc)
    if privacy is not None and privacy.get("mode") != "distributed":
        errors["privacy"] = (
            "secure_aggregation cannot be combined with central or local differential privacy: central DP "
            "clips and noises individual updates, which the server never sees with secure aggregation, and "
            "local DP is not wired into the masked input. Use privacy.mechanism 'distributed_skellam' "
            "(each agent adds Skellam noise before masking), set privacy to null, or turn "
            "secure_aggregation off."
        )
    return (None, errors) if errors else (parsed.to_dict(), {})
