"""The privacy section of a training configuration: parse, apply presets, validate.

Accepted forms (the seed's names too):
- ``"privacy": {"mode": "central"|"local", "level": "low"|"medium"|"high"}`` or with explicit
  ``"epsilon"``, ``"delta"`` and optional ``"noise_multiplier"``, ``"clip_norm"``, ``"mechanism"``,
  ``"accountant"``, ``"population"``;
- ``"privacy_level": "medium"`` and/or ``"privacy_budget": {"total_epsilon": 1.0, "total_delta": 1e-5}``.
With none of them, ``default_privacy_level`` applies ("none" disables differential privacy).

Distributed DP (agents add Skellam noise, secure aggregation sums it): ``"mechanism":
"distributed_skellam"`` (or ``"mode": "distributed"``) with ``"epsilon"`` or a ``"level"``, ``"delta"``,
``"clip_norm"`` and optional ``"bits"`` (the modulus ``2^bits`` of the sum, default 20), ``"min_agents"``
(agents whose noise the accounting counts, default ``min_clients_per_round``) and ``"rounding_beta"``
(conditional rounding, default ``e^-0.5``). It needs the training's ``secure_aggregation`` section: without
it the server would aggregate the agents' shares in the clear.
"""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings

from flcore.dp.skellam import DEFAULT_BETA
from privacy.levels import LEVELS

MODES = ("central", "local", "distributed")
MECHANISMS = ("gaussian", "laplace")
DISTRIBUTED_MECHANISM = "distributed_skellam"
"""The configuration's name of the distributed Skellam mechanism (stored as mode distributed, mechanism
skellam)."""
DEFAULT_BITS = 20
DISTRIBUTED_KEYS = ("bits", "min_agents", "rounding_beta")
ACCOUNTANTS = ("rdp", "pld")
# Central DP bounds one agent's influence on a clipped, unweighted mean; only mean-based rules keep that.
CENTRAL_DP_ALGORITHMS = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")
KEYS = {
    "mode",
    "level",
    "epsilon",
    "delta",
    "noise_multiplier",
    "clip_norm",
    "mechanism",
    "accountant",
    "population",
    "adaptive_clipping",
    "target_quantile",
    "clip_learning_rate",
    *DISTRIBUTED_KEYS,
}


def _number(
    errors: dict[str, str],
    section: dict[str, Any],
    key: str,
    *,
    low: float,
    high: float,
    low_inclusive: bool = False,
) -> float | None:
    if key not in section or section[key] is None:
        return None
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        errors[key] = f"must be a finite number. Found {value!r}."
        return None
    if value < low or (value == low and not low_inclusive) or value > high:
        errors[key] = f"must be in {'[' if low_inclusive else '('}{low}, {high}]. Found {value!r}."
        return None
    return float(value)


def parse_privacy(
    data: dict[str, Any], *, algorithm: str, default_level: str
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Return (normalised privacy settings or None, errors keyed by field)."""
    errors: dict[str, str] = {}
    section = data.get("privacy")
    level = data.get("privacy_level")
    seed_budget = data.get("privacy_budget")
    if hasattr(seed_budget, "total_epsilon"):  # the seed's PrivacyBudget dataclass
        seed_budget = {"total_epsilon": seed_budget.total_epsilon, "total_delta": seed_budget.total_delta}
    if level is not None:
        level = str(level)
    if section is None and level is None and seed_budget is None:
        if "privacy" in data or default_level in (None, "", "none"):  # explicit null: no DP
            return None, {}
        level = default_level
    if section is not None and not isinstance(section, dict):
        return None, {"privacy": "Must be a JSON object."}
    section = dict(section or {})
    unknown = sorted(set(section) - KEYS)
    if unknown:
        errors["privacy"] = f"Unknown keys {unknown}; known: {sorted(KEYS)}."
    if level is not None:
        section.setdefault("level", level)
    if seed_budget is not None:
        if not isinstance(seed_budget, dict) or not {"total_epsilon", "total_delta"} >= set(seed_budget):
            errors["privacy_budget"] = 'Must be {"total_epsilon": number, "total_delta": number}.'
        else:
            section.setdefault("epsilon", seed_budget.get("total_epsilon"))
            section.setdefault("delta", seed_budget.get("total_delta"))
    level_name = section.get("level")
    if level_name in ("none", None) and "epsilon" not in section:
        return None, errors
    preset = None
    if level_name not in (None, "none"):
        preset = LEVELS.get(level_name)
        if preset is None:
            errors["privacy_level"] = (
                f"Unknown privacy level {level_name!r}; use one of {sorted(LEVELS)} or none."
            )
    distributed = section.get("mechanism") == DISTRIBUTED_MECHANISM or section.get("mode") == "distributed"
    mode = section.get("mode", "distributed" if distributed else "central")
    if distributed:
        distributed_settings = _parse_distributed(errors, section, data, algorithm=algorithm, mode=mode)
    else:
        distributed_settings = {}
        for key in DISTRIBUTED_KEYS:
            if key in section:
                errors[f"privacy.{key}"] = (
                    f"is a distributed-DP setting; use mechanism {DISTRIBUTED_MECHANISM!r}."
                )
    if mode not in MODES:
        errors["privacy.mode"] = f"must be one of {MODES}. Found {mode!r}."
    mechanism = "skellam" if distributed else section.get("mechanism", "gaussian")
    if not distributed and mechanism not in MECHANISMS:
        errors["privacy.mechanism"] = f"must be one of {MECHANISMS}. Found {mechanism!r}."
    accountant = section.get("accountant", "pld" if mechanism == "laplace" else "rdp")
    if accountant not in ACCOUNTANTS:
        errors["privacy.accountant"] = f"must be one of {ACCOUNTANTS}. Found {accountant!r}."
    if mechanism == "laplace" and accountant == "rdp":
        errors["privacy.accountant"] = "RDP cannot account Laplace noise under sampling; use 'pld'."
    if mode == "central" and mechanism != "gaussian":
        errors["privacy.mechanism"] = "central DP adds Gaussian noise to the clipped sum; use 'gaussian'."
    epsilon = _number(errors, section, "epsilon", low=0, high=1e3)
    delta = _number(errors, section, "delta", low=0, high=0.1)
    noise = _number(errors, section, "noise_multiplier", low=0, high=1e4)
    clip = _number(errors, section, "clip_norm", low=0, high=1e6)
    population = section.get("population")
    if population is not None and (
        isinstance(population, bool) or not isinstance(population, int) or population < 1
    ):
        errors["privacy.population"] = f"must be a positive integer. Found {population!r}."
    if preset is not None:
        epsilon = epsilon if epsilon is not None else preset.epsilon
        delta = delta if delta is not None else preset.delta
        clip = clip if clip is not None else preset.clip_norm
    if epsilon is None and "privacy.epsilon" not in errors and "epsilon" not in errors:
        errors["privacy.epsilon"] = "Give a privacy level or an epsilon budget."
    if delta is None:
        delta = 1e-5
    if clip is None:
        clip = 1.0
    if mode in ("central", "distributed") and algorithm not in CENTRAL_DP_ALGORITHMS:
        errors["privacy.mode"] = (
            f"{mode} DP needs a mean-based rule {CENTRAL_DP_ALGORITHMS}: the influence of one agent on "
            f"{algorithm!r} is not bounded by the clip norm, so the guarantee would not hold. Use local DP."
        )
    adaptive = section.get("adaptive_clipping", False)
    if not isinstance(adaptive, bool):
        errors["privacy.adaptive_clipping"] = f"must be true or false. Found {adaptive!r}."
    elif adaptive and mode != "central":
        errors["privacy.adaptive_clipping"] = (
            "adaptive clipping is a central-DP technique; use mode 'central'."
        )
    quantile = _number(errors, section, "target_quantile", low=0, high=1, low_inclusive=True)
    clip_rate = _number(errors, section, "clip_learning_rate", low=0, high=10, low_inclusive=True)
    if algorithm in ("fedbuff", "fedasync"):
        errors["privacy"] = (
            "differential privacy accounting assumes rounds of sampled agents; asynchronous trainings "
            "(fedbuff, fedasync) cannot carry a privacy budget yet."
        )
    if errors:
        return None, errors
    return {
        "mode": mode,
        "level": level_name if preset else None,
        "epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": noise,
        "clip_norm": clip,
        "mechanism": mechanism,
        "accountant": accountant,
        "population": population,
        "adaptive_clipping": bool(adaptive),
        "target_quantile": 0.5 if quantile is None else quantile,
        "clip_learning_rate": 0.2 if clip_rate is None else clip_rate,
        **distributed_settings,
    }, {}


def _parse_distributed(
    errors: dict[str, str], section: dict[str, Any], data: dict[str, Any], *, algorithm: str, mode: Any
) -> dict[str, Any]:
    """Validate the distributed-Skellam keys (errors keyed ``privacy.<field>``); return their settings."""
    if mode != "distributed":
        errors["privacy.mode"] = (
            f"mechanism {DISTRIBUTED_MECHANISM!r} is distributed DP; use mode 'distributed' or omit mode. "
            f"Found {mode!r}."
        )
    mechanism = section.get("mechanism", DISTRIBUTED_MECHANISM)
    if mechanism not in (DISTRIBUTED_MECHANISM, "skellam"):
        errors["privacy.mechanism"] = (
            f"distributed DP adds Skellam noise on the agents; use {DISTRIBUTED_MECHANISM!r}. "
            f"Found {mechanism!r}."
        )
    if section.get("accountant", "rdp") != "rdp":
        errors["privacy.accountant"] = (
            "the Skellam mechanism is accounted with its RDP bound (Agarwal et al. 2021); use 'rdp'. "
            f"Found {section.get('accountant')!r}."
        )
    if section.get("noise_multiplier") is not None:
        errors["privacy.noise_multiplier"] = (
            "distributed DP calibrates each agent's Skellam noise to the budget; give epsilon, not a "
            "noise multiplier."
        )
    if not data.get("secure_aggregation"):
        errors["privacy.mode"] = (
            "distributed DP needs secure aggregation (the training's 'secure_aggregation' section): each "
            "agent's share carries only part of the noise, so the server must see nothing but the sum."
        )
    bits = section.get("bits", DEFAULT_BITS)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 8 <= bits <= 32:
        errors["privacy.bits"] = (
            f"must be an integer in [8, 32] (the sum lives in Z_(2^bits)). Found {bits!r}."
        )
    min_agents = section.get(
        "min_agents", data.get("min_clients_per_round", settings.FEDSITE_MIN_CLIENTS_PER_ROUND)
    )
    if isinstance(min_agents, bool) or not isinstance(min_agents, int) or min_agents < 1:
        errors["privacy.min_agents"] = f"must be a positive integer. Found {min_agents!r}."
    beta = _number(errors, section, "rounding_beta", low=0, high=0.99, low_inclusive=True)
    if "rounding_beta" in errors:
        errors["privacy.rounding_beta"] = errors.pop("rounding_beta")
    return {
        "bits": bits,
        "min_agents": min_agents,
        "rounding_beta": DEFAULT_BETA if beta is None else beta,
    }
