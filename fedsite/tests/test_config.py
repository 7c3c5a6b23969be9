"""The seed's config.json keys, read from FEDSITE_CONFIG, with environment overrides and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsite.config import ConfigFileError, load_seed_config


def _write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_seed_keys_are_read_and_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    for key in (
        "FEDSITE_CPU_CORES",
        "FEDSITE_MAX_CONCURRENT_TRAININGS",
        "FEDSITE_MIN_CLIENTS_PER_ROUND",
        "FEDSITE_MAX_CLIENTS_PER_ROUND",
        "FEDSITE_DEFAULT_PRIVACY_LEVEL",
        "FEDSITE_DASHBOARD_PORT",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(
        "FEDSITE_CONFIG",
        _write(
            tmp_path,
            {
                "redis_url": "redis://example:6379",
                "cpu_cores": 12,
                "max_concurrent_trainings": 2,
                "default_privacy_level": "none",
                "dashboard_port": 8081,
                "min_clients_per_round": 4,
                "max_clients_per_round": 9,
            },
        ),
    )
    config = load_seed_config()
    assert (config.redis_url, config.cpu_cores, config.max_concurrent_trainings) == (
        "redis://example:6379",
        12,
        2,
    )
    assert (config.min_clients_per_round, config.max_clients_per_round, config.dashboard_port) == (4, 9, 8081)
    monkeypatch.setenv("FEDSITE_MAX_CONCURRENT_TRAININGS", "5")
    assert load_seed_config().max_concurrent_trainings == 5


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"cpu_cores": "twelve"}, "cpu_cores must be an integer"),
        ({"max_clients": 3}, "unknown keys ['max_clients']"),
        ({"min_clients_per_round": 5, "max_clients_per_round": 2}, "min_clients_per_round must be"),
        ({"default_privacy_level": "extreme"}, "default_privacy_level must be one of"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_bad_config_files_stop_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: object, fragment: str
) -> None:
    for key in ("FEDSITE_MIN_CLIENTS_PER_ROUND", "FEDSITE_MAX_CLIENTS_PER_ROUND", "FEDSITE_CPU_CORES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FEDSITE_CONFIG", _write(tmp_path, data))
    with pytest.raises(ConfigFileError) as info:
        load_seed_config()
    assert fragment in str(info.value)


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSITE_CONFIG", "/nonexistent/config.json")
    with pytest.raises(ConfigFileError, match=r"/nonexistent/config\.json"):
        load_seed_config()
