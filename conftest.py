"""Project-wide pytest fixtures (factories for agents and trainings)."""

from __future__ import annotations

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
def _fresh_auth_failure_counters(settings: Any) -> None:
    """Each test counts failed authentications afresh (the counters live in the shared Redis cache)."""
    import uuid

    settings.FEDSITE_AUTH_FAILURE_NAMESPACE = uuid.uuid4().hex
