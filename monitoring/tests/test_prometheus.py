"""The scrape-time collector: values from a known database state, idempotent registration."""

from __future__ import annotations

import importlib

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clients.models import Agent
from monitoring import prometheus
from monitoring.models import Alert, Metric
from monitoring.tests.factories import make_agent, make_alert, make_round, make_training
from trainings.models import Round, Training
from trainings.services import training_stop

pytestmark = pytest.mark.django_db


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def known_state():
    """2 running, 1 pending, 1 stopped; 4 agents (2 online); 3 open alerts; accuracies on one training."""
    scored = make_training("scored", start=True)
    idle = make_training("idle", start=True)
    make_training("waiting")
    stopped = make_training("stopped", start=True)
    training_stop(training_id=stopped.pk)
    Metric.objects.create(training=stopped, round_number=1, name="accuracy", value=0.99)
    Round.objects.filter(training=scored, number=1).update(status=Round.Status.COMPLETED)
    Metric.objects.create(training=scored, round_number=1, name="accuracy", value=0.5)
    make_round(scored, 2, Round.Status.COMPLETED, {"accuracy": 0.7, "federated_accuracy": 0.65, "loss": 0.9})
    make_round(scored, 3, Round.Status.COLLECTING)
    Training.objects.filter(pk=scored.pk).update(current_round=3)

    make_agent("online-active", seen_seconds_ago=5)
    make_agent("online-quarantined", seen_seconds_ago=5, status=Agent.Status.QUARANTINED)
    make_agent("offline", seen_seconds_ago=100_000)
    make_agent("never-seen", status=Agent.Status.DISABLED)

    Alert.objects.all().delete()  # the too-few-agents alerts the starts raised
    make_alert(scored, severity=Alert.Severity.WARNING)
    make_alert(idle, severity=Alert.Severity.WARNING)
    make_alert(severity=Alert.Severity.CRITICAL)
    make_alert(severity=Alert.Severity.CRITICAL, acknowledged=True)
    return {"scored": scored, "idle": idle, "stopped": stopped}


def test_metrics_endpoint_exposes_the_gauges_with_database_values(staff_client, known_state):
    response = staff_client.get("/metrics")

    assert response.status_code == 200
    samples = _samples(response.content.decode())
    assert _value(samples, "fedsite_collector_up") == 1
    trainings = {
        status: _value(samples, "fedsite_trainings", status=status) for status in Training.Status.values
    }
    assert trainings == {
        "pending": 1,
        "running": 2,
        "completed": 0,
        "stopped": 1,
        "failed": 0,
        "budget_exhausted": 0,
    }
    rounds = {status: _value(samples, "fedsite_rounds", status=status) for status in Round.Status.values}
    assert rounds == {
        "waiting_for_agents": 1,
        "collecting": 1,
        "aggregating": 0,
        "completed": 2,
        "failed": 0,
        "cancelled": 1,
    }
    assert _value(samples, "fedsite_agents_total") == 4
    assert _value(samples, "fedsite_agents_online") == 2
    assert _value(samples, "fedsite_agents", status="quarantined") == 1
    alerts = {s: _value(samples, "fedsite_alerts_open", severity=s) for s in Alert.Severity.values}
    assert alerts == {"info": 0, "warning": 2, "critical": 1}

    scored = str(known_state["scored"].pk)
    accuracy = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "fedsite_training_last_round_accuracy"
    }
    assert accuracy == {
        frozenset({"training_id": scored, "training_name": "scored", "metric": "accuracy"}.items()): 0.7,
        frozenset(
            {"training_id": scored, "training_name": "scored", "metric": "federated_accuracy"}.items()
        ): 0.65,
    }
    assert _value(samples, "fedsite_training_current_round", training_id=scored, training_name="scored") == 3
    idle = str(known_state["idle"].pk)
    assert _value(samples, "fedsite_training_current_round", training_id=idle, training_name="idle") == 1


def test_gauges_follow_the_database_between_scrapes(staff_client, known_state):
    client = staff_client
    training_stop(training_id=known_state["idle"].pk)
    Alert.objects.update(acknowledged_by="ops")
    Alert.objects.filter(severity=Alert.Severity.WARNING).update(acknowledged_at="2026-01-01T00:00:00Z")

    samples = _samples(client.get("/metrics").content.decode())

    assert _value(samples, "fedsite_trainings", status="running") == 1
    assert _value(samples, "fedsite_trainings", status="stopped") == 2
    assert _value(samples, "fedsite_alerts_open", severity="warning") == 0


def test_a_database_error_reports_collector_down_instead_of_failing(monkeypatch):
    def broken(families):
        raise RuntimeError("database is gone")

    monkeypatch.setattr(prometheus.FedsiteCollector, "_fill", staticmethod(broken))
    registry = CollectorRegistry()
    registry.register(prometheus.FedsiteCollector())

    samples = _samples(generate_latest(registry).decode())

    assert samples == {("fedsite_collector_up", frozenset()): 0}


def test_registration_is_idempotent_even_after_a_reimport():
    registry = CollectorRegistry()
    first = prometheus.register_collector(registry)
    second = prometheus.register_collector(registry)
    reloaded = importlib.reload(prometheus)
    reloaded.register_collector(registry)  # would raise "Duplicated timeseries" if not guarded
    from prometheus_client import REGISTRY

    reloaded.register_collector()

    assert first is second
    families = [
        line
        for line in generate_latest(registry).decode().splitlines()
        if line == "# TYPE fedsite_trainings gauge"
    ]
    assert families == ["# TYPE fedsite_trainings gauge"]
    default = [
        line
        for line in generate_latest(REGISTRY).decode().splitlines()
        if line == "# TYPE fedsite_trainings gauge"
    ]
    assert default == ["# TYPE fedsite_trainings gauge"]
