"""Project-wide pytest fixtures (factories for agents and trainings)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def make_agent(db: Any):
    from clients.services import agent_create, agent_touch

    counter = {"n": 0}

    def factory(agent_id: str | None = None, *, online: bool = True) -> tuple[Any, str]:
        counter["n"] += 1
        agent, token = agent_create(agent_id=agent_id or f"agent-{counter['n']:03d}")
        if online:
            agent_touch(agent=agent)
        return agent, token

    return factory


@pytest.fixture
def make_training(db: Any):
    from trainings.configuration import TrainingConfiguration
    from trainings.services import training_create, training_create_and_start

    def factory(*, start: bool = True, **overrides: Any) -> Any:
        config = {
            "name": "test training",
            "model_type": "logreg",
            "input_dim": 4,
            "num_classes": 3,
            "min_clients_per_round": 2,
            "max_clients_per_round": 3,
            "max_rounds": 3,
            **overrides,
        }
        configuration = TrainingConfiguration.from_dict(config)
        if start:
            return training_create_and_start(configuration=configuration)
        return training_create(configuration=configuration)

    return factory


@pytest.fixture
def eager_celery() -> Any:
    """Celery tasks run in the calling process for the test (the embedded default runs them so anyway)."""
    from fedsite.celery import app as celery_app

    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


@pytest.fixture
def staff_client(db: Any, client: Any):
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user(
        "operator",
        password="operator-password",
        is_staff=True,
    )
    client.force_login(user)
    client.user = user
    return client


@pytest.fixture(autouse=True)
def _fresh_auth_failure_counters(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test counts failed authentications afresh (the counters live in the shared Redis cache), in
    this process and in every server it starts (they inherit the environment): otherwise the failures one
    test's live server counted for 127.0.0.1 throttle the next test's requests for the counter's window."""
    import uuid

    namespace = uuid.uuid4().hex
    settings.FEDSITE_AUTH_FAILURE_NAMESPACE = namespace
    monkeypatch.setenv("FEDSITE_AUTH_FAILURE_NAMESPACE", namespace)


@pytest.fixture(autouse=True)
def _fedagent_logger_restored() -> Any:
    """``fedagent.cli.main`` run in-process (the CLI tests) configures the ``fedagent`` logger for a
    terminal: its own handler, no propagation. Put it back afterwards, or a later test in the same process
    that reads the agent's logs with ``caplog`` sees none (which one that is depends on the order)."""
    logger = logging.getLogger("fedagent")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """In a parallel run (pytest-xdist) the slow tests go first: the end-to-end ones, then the rest of
    ``tests/`` (browsers, live servers), so that ``--dist load --maxschedchunk 1`` (make test) hands them out
    a few at a time to each worker at the start and the many short tests fill in around them, instead of
    one of them starting last and running alone.
    Every worker collects in the same order (xdist requires it); a run in one process keeps its order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    live = Path(__file__).resolve().parent / "tests"

    def rank(item: Any) -> int:
        if item.get_closest_marker("e2e"):
            return 0
        return 1 if Path(item.path).is_relative_to(live) else 2

    items.sort(key=rank)
