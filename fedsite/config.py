"""The seed's ``config.json`` keys, read from the file named by ``FEDSITE_CONFIG``.

Precedence, lowest first: built-in defaults, the JSON file, environment variables. Unknown keys and
values of the wrong type stop start-up with a message naming the key, so a typo is never silently ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED_KEYS: dict[str, type] = {
    "redis_url": str,
    "cpu_cores": int,
    "max_concurrent_trainings": int,
    "default_privacy_level": str,
    "dashboard_port": int,
    "min_clients_per_round": int,
    "max_clients_per_round": int,
}

PRIVACY_LEVELS = ("none", "low", "medium", "high")


class ConfigFileError(Exception):
    """The configuration file or an environment value is unusable."""


@dataclass(frozen=True)
class SeedConfig:
    redis_url: str | None
    cpu_cores: int
    max_concurrent_trainings: int
    default_privacy_level: str
    dashboard_port: int
    min_clients_per_round: int
    max_clients_per_round: int


def _read_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigFileError(f"FEDSITE_CONFIG names {path!r}, which is not a file.")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigFileError(f"{path} is not valid JSON: {exc}.") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path} must hold a JSON object with the keys {sorted(SEED_KEYS)}.")
    unknown = sorted(set(data) - set(SEED_KEYS))
    if unknown:
        raise ConfigFileError(f"{path}: unknown keys {unknown}; the accepted keys are {sorted(SEED_KEYS)}.")
    for key, value in data.items():
        expected = SEED_KEYS[key]
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigFileError(f"{path}: {key} must be an integer. Found {value!r}.")
        if expected is str and not isinstance(value, str):
            raise ConfigFileError(f"{path}: {key} must be a string. Found {value!r}.")
    return data


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigFileError(f"{name} must be an integer. Found {raw!r}.") from exc


def load_seed_config() -> SeedConfig:
    """Merge defaults, the ``FEDSITE_CONFIG`` file and the environment, then validate."""
    data: dict[str, Any] = {}
    if os.environ.get("FEDSITE_CONFIG"):
        data = _read_file(os.environ["FEDSITE_CONFIG"])
    cpu_default = os.cpu_count() or 1
    config = SeedConfig(
        redis_url=os.environ.get("REDIS_URL") or data.get("redis_url"),
        cpu_cores=_env_int("FEDSITE_CPU_CORES", data.get("cpu_cores", cpu_default)),
        max_concurrent_trainings=_env_int(
            "FEDSITE_MAX_CONCURRENT_TRAININGS", data.get("max_concurrent_trainings", 3)
        ),
        default_privacy_level=os.environ.get(
            "FEDSITE_DEFAULT_PRIVACY_LEVEL", data.get("default_privacy_level", "none")
        ),
        dashboard_port=_env_int("FEDSITE_DASHBOARD_PORT", data.get("dashboard_port", 8080)),
        min_clients_per_round=_env_int("FEDSITE_MIN_CLIENTS_PER_ROUND", data.get("min_clients_per_round", 3)),
        max_clients_per_round=_env_int(
            "FEDSITE_MAX_CLIENTS_PER_ROUND", data.get("max_clients_per_round", 20)
        ),
    )
    if config.cpu_cores < 1:
        raise ConfigFileError(f"cpu_cores must be at least 1. Found {config.cpu_cores}.")
    if config.max_concurrent_trainings < 1:
        raise ConfigFileError(
            f"max_concurrent_trainings must be at least 1. Found {config.max_concurrent_trainings}."
        )
    if config.default_privacy_level not in PRIVACY_LEVELS:
        raise ConfigFileError(
            f"default_privacy_level must be one of {PRIVACY_LEVELS}. Found {config.default_privacy_level!r}."
        )
    if not 1 <= config.min_clients_per_round <= config.max_clients_per_round:
        raise ConfigFileError(
            "min_clients_per_round must be >= 1 and <= max_clients_per_round. Found "
            f"{config.min_clients_per_round} and {config.max_clients_per_round}."
        )
    if not 1 <= config.dashboard_port <= 65535:
        raise ConfigFileError(f"dashboard_port must be a TCP port. Found {config.dashboard_port}.")
    return config
