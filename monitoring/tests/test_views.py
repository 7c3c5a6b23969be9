"""Dashboard pages: staff only, and they show what the database holds."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from django.urls import reverse

from clients.models import Agent
from monitoring.models import Alert, Metric
from monitoring.tests.factories import make_agent, make_alert, make_round, make_training
from trainings.models import Round, Training

pytestmark = pytest.mark.django_db


@pytest.fixture
def training():
    """Running, round 1 completed (metrics only), round 2 completed with metrics on the round too."""
    training = make_training("digits-demo", start=True, max_rounds=7)
    Round.objects.filter(training=training, number=1).update(status=Round.Status.COMPLETED)
    Metric.objects.create(training=training, round_number=1, name="accuracy", value=0.25)
    Metric.objects.create(training=training, round_number=1, name="federated_loss", value=1.25)
    Metric.objects.create(training=training, round_number=1, name="num_examples", value=100)
    make_round(training, 2, Round.Status.COMPLETED, {"accuracy": 0.5, "train_loss": 1.0})
    Training.objects.filter(pk=training.pk).update(current_round=2)
    return training


def _pages(training_id):
    return [
        reverse("dashboard"),
        reverse("dashboard-agents"),
        reverse("dashboard-training", args=[training_id]),
        reverse("dashboard-training-tables", args=[training_id]),
    ]


def test_pages_redirect_anonymous_users_to_the_login(client, training):
    for url in _pages(training.pk):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/admin/login/"), url


def test_pages_redirect_logged_in_non_staff_users(client, django_user_model, training):
    client.force_login(django_user_model.objects.create_user(username="viewer", password="x-very-long-pass"))

    for url in _pages(training.pk):
        assert client.get(url).status_code == 302, url


def test_pages_render_for_staff(admin_client, training):
    for url in _pages(training.pk):
        assert admin_client.get(url).status_code == 200, url


def test_index_lists_trainings_alerts_agents_and_health(admin_client, training):
    make_agent("online-1", seen_seconds_ago=3)
    make_agent("online-2", seen_seconds_ago=10)
    make_agent("offline", seen_seconds_ago=10_000)
    make_alert(training, message="disk is filling up", severity=Alert.Severity.CRITICAL)
    for index in range(25):
        make_alert(message=f"old alert {index:02d}")

    response = admin_client.get(reverse("dashboard"))

    content = response.content.decode()
    assert "digits-demo" in content
    assert reverse("dashboard-training", args=[training.pk]) in content
    assert "2 / 7" in content  # round 2 of max_rounds 7
    assert "disk is filling up" not in content  # older than the latest 20
    assert content.count('class="alert severity-') == 20
    assert response.context["agents_online"] == 2
    assert response.context["agents_total"] == 3
    assert response.context["health"]["components"]["database"]["status"] == "ok"
    assert "celery" not in response.context["health"]["components"]
    assert 'id="system-health"' in content


def test_training_page_embeds_metrics_status_and_the_stop_form(admin_client, training):
    response = admin_client.get(reverse("dashboard-training", args=[training.pk]))

    content = response.content.decode()
    metrics = json.loads(
        re.search(
            r'<script id="initial-metrics" type="application/json">(.*?)</script>', content, re.S
        ).group(1)
    )
    assert metrics["accuracy"] == [{"round": 1, "value": 0.25}, {"round": 2, "value": 0.5}]
    assert metrics["federated_loss"] == [{"round": 1, "value": 1.25}]
    assert metrics["train_loss"] == [{"round": 2, "value": 1.0}]
    assert "num_examples" not in metrics
    status = json.loads(
        re.search(r'<script id="initial-status" type="application/json">(.*?)</script>', content, re.S).group(
            1
        )
    )
    assert status["training_id"] == str(training.pk)
    assert status["status"] == "running"
    assert f'data-stop-url="/api/training/{training.pk}/stop"' in content
    assert f'data-metrics-url="/api/training/{training.pk}/metrics"' in content
    assert 'id="stop-form"' in content and "csrfmiddlewaretoken" in content
    assert 'id="stop-form" method="post" action="/api/training/' in content  # visible: not terminal
    assert "/static/monitoring/chart.js" in content


def test_training_page_hides_stop_for_a_finished_training(admin_client, training):
    admin_client.post(f"/api/training/{training.pk}/stop")

    content = admin_client.get(reverse("dashboard-training", args=[training.pk])).content.decode()

    assert re.search(r'id="stop-form"[^>]* hidden', content)


def test_training_tables_list_rounds_versions_and_alerts(admin_client, training):
    make_alert(training, message="round 2 was slow")

    response = admin_client.get(reverse("dashboard-training-tables", args=[training.pk]))

    content = response.content.decode()
    rounds = re.findall(r'<td class="num">(\d+)</td>\s*<td><span class="badge status-', content)
    assert rounds == ["2", "1"]
    assert "0.5000" in content
    assert "v0" in content
    assert "round 2 was slow" in content


def test_unknown_training_is_404(admin_client):
    assert admin_client.get(reverse("dashboard-training", args=[uuid.uuid4()])).status_code == 404


def test_agents_page_shows_online_state_and_reliability(admin_client):
    make_agent("fresh", seen_seconds_ago=1)
    stale = make_agent("stale", seen_seconds_ago=100_000)
    Agent.objects.filter(pk=stale.pk).update(tasks_completed=3, tasks_failed=1)

    response = admin_client.get(reverse("dashboard-agents"))

    content = response.content.decode()
    rows = {row["agent"].agent_id: row["online"] for row in response.context["rows"]}
    assert rows == {"fresh": True, "stale": False}
    assert "1 online of 2" in content
    assert "0.67" in content  # (3 + 1) / (4 + 2)


def test_the_page_wiring_reaches_the_seed_api_with_session_and_csrf(client, admin_user, training):
    """What training.js does: poll metrics and status, then POST stop with the page's CSRF token."""
    browser = type(client)(enforce_csrf_checks=True)
    browser.force_login(admin_user)
    page = browser.get(reverse("dashboard-training", args=[training.pk])).content.decode()
    urls = {
        name: re.search(rf'data-{name}-url="([^"]+)"', page).group(1)
        for name in ("metrics", "status", "stop")
    }
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)

    metrics = browser.get(urls["metrics"], HTTP_ACCEPT="application/json").json()
    status = browser.get(urls["status"], HTTP_ACCEPT="application/json").json()
    refused = browser.post(urls["stop"], HTTP_ACCEPT="application/json")
    stopped = browser.post(urls["stop"], HTTP_ACCEPT="application/json", HTTP_X_CSRFTOKEN=token)

    assert metrics["metrics"]["accuracy"][-1] == {"round": 2, "value": 0.5}
    assert status["status"] == "running"
    assert refused.status_code == 403
    assert stopped.status_code == 200
    training.refresh_from_db()
    assert training.status == Training.Status.STOPPED


def test_the_health_card_takes_cpu_and_workers_from_the_newest_recent_worker_sample(admin_client, settings):
    from datetime import timedelta

    from django.utils import timezone

    from monitoring.health import health_read
    from monitoring.models import SystemHealthSample
    from monitoring.services import health_sample_record

    sample = health_sample_record(reading=health_read(role="worker", cpu_interval=0.3))
    # distinct figures, to tell which reading the card shows
    SystemHealthSample.objects.filter(pk=sample.pk).update(cpu_percent=37.0, workers_alive=2)

    fresh = admin_client.get(reverse("dashboard"))
    SystemHealthSample.objects.filter(pk=sample.pk).update(
        created_at=timezone.now() - timedelta(seconds=4 * settings.FEDSITE_HEALTH_SAMPLE_SECONDS)
    )
    stale = admin_client.get(reverse("dashboard"))

    card = fresh.context["health"]
    assert card["cpu"]["percent"] == 37.0 and card["cpu"]["source"] == "worker sample"
    assert card["cpu"]["interval_seconds"] == pytest.approx(0.3)
    assert "37 % of all" in fresh.content.decode()
    assert stale.context["health"]["cpu"]["source"] == "this page"
    assert stale.context["health"]["workers"]["alive"] is None
    if settings.EMBEDDED:
        assert "tasks run in the web process" in fresh.content.decode()
    else:
        assert card["workers"]["alive"] == 2
        assert "2 workers alive" in fresh.content.decode()
        assert "no worker sample in the last" in stale.content.decode()
