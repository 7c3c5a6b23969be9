"""Parallel test workers (pytest-xdist) share no Redis database, var directory or test database."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from tests import xdist_workers
from tests.xdist_workers import worker_redis_url


def test_each_worker_takes_its_own_redis_database(monkeypatch):
    monkeypatch.delenv("FEDSITE_TEST_REDIS_DBS", raising=False)
    urls = [worker_redis_url("redis://127.0.0.1:6379/15", index, 4) for index in range(4)]
    assert urls == [f"redis://127.0.0.1:6379/{db}" for db in (15, 14, 13, 12)]
    assert worker_redis_url("redis://:pw@redis.example:6380/1?timeout=3", 1, 2) == (
        "redis://:pw@redis.example:6380/0?timeout=3"
    )


def test_the_listed_redis_databases_go_one_to_a_worker(monkeypatch):
    monkeypatch.setenv("FEDSITE_TEST_REDIS_DBS", "1 8,9 10")
    urls = [worker_redis_url("redis://127.0.0.1:6379/1", index, 4) for index in range(4)]
    assert urls == [f"redis://127.0.0.1:6379/{db}" for db in (1, 8, 9, 10)]
    with pytest.raises(RuntimeError, match="lists 4 Redis databases"):
        worker_redis_url("redis://127.0.0.1:6379/1", 4, 5)


def test_this_worker_runs_on_its_own_stack(db):
    """Under xdist the settings this process loaded (and its children inherit) are this worker's alone."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        assert "_gw" not in connection.settings_dict["NAME"]
        assert "xdist-" not in str(settings.VAR_DIR)
        return
    index = int(worker.removeprefix("gw"))
    count = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    assert connection.settings_dict["NAME"].endswith(f"_{worker}")  # pytest-django's suffix
    assert Path(settings.VAR_DIR).name == f"xdist-{worker}"
    assert f"xdist-{worker}" in Path(settings.MEDIA_ROOT).parts
    if settings.EMBEDDED:
        return
    configured = xdist_workers.CONFIGURED_REDIS_URL
    assert settings.REDIS_URL == worker_redis_url(configured, index, count) == os.environ["REDIS_URL"]
    assert len({worker_redis_url(configured, other, count) for other in range(count)}) == count
    assert settings.CELERY_BROKER_URL == settings.CELERY_RESULT_BACKEND == settings.REDIS_URL
    assert settings.CACHES["default"]["LOCATION"] == settings.REDIS_URL
    assert settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] == [settings.REDIS_URL]
