import pytest


@pytest.fixture(autouse=True)
def _media_in_tmp(settings, tmp_path):
    """Version blobs go to a temporary directory, not the checkout's var/."""
    settings.MEDIA_ROOT = str(tmp_path / "media")


@pytest.fixture
def eager_celery():
    """Run the aggregation task in the test process (as the embedded mode does)."""
    from fedsite.celery import app as celery_app

    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


@pytest.fixture
def rest_round(client, eager_celery, django_capture_on_commit_callbacks):
    """``rest_round(training, agents, make_update)``: one round over the agent protocol (federation.py)."""
    from monitoring.tests.federation import run_round

    def play(training, agents, make_update):
        return run_round(client, training, agents, make_update, django_capture_on_commit_callbacks)

    return play
