"""Dashboard pages for operators (staff login): all trainings, one training live, the agents.

Views only read (selectors and plain queries) and render. Live data reach the browser two ways: events
over the WebSocket ``/ws/dashboard-<random>`` (same channel layer as the workers), and polling of the
REST API every 3 s, which also works in embedded mode, where the in-memory channel layer reaches only the
process that sent the event. Operator actions (stop) go through the REST API, which calls services.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone

from clients.models import Agent
from clients.selectors import agent_is_online
from monitoring.health import health_read
from monitoring.models import Alert
from monitoring.selectors import alerts_query, system_health
from trainings.models import Round, Task, Training
from trainings.selectors import training_metrics_series, training_status

ACCURACY_SERIES = ("accuracy", "federated_accuracy")
LOSS_SERIES = ("loss", "federated_loss", "train_loss")
MAX_ROUNDS_SHOWN = 200
MAX_VERSIONS_SHOWN = 50
MAX_ALERTS_SHOWN = 50


def _online_cutoff() -> Any:
    return timezone.now() - timedelta(seconds=settings.FEDSITE_AGENT_TIMEOUT)


def _first_of(metrics: dict[str, Any], names: tuple[str, ...]) -> float | None:
    for name in names:
        value = metrics.get(name)
        if isinstance(value, int | float):
            return float(value)
    return None


@staff_member_required
def dashboard_index(request: HttpRequest) -> HttpResponse:
    trainings = list(Training.objects.order_by("-created_at")[:100])
    status_counts = dict(Training.objects.values_list("status").annotate(n=Count("pk")).order_by())
    context = {
        "nav": "trainings",
        "trainings": [{"training": t, "max_rounds": (t.config or {}).get("max_rounds")} for t in trainings],
        "training_counts": [(label, status_counts.get(value, 0)) for value, label in Training.Status.choices],
        "alerts": list(Alert.objects.select_related("training")[:20]),
        "open_alerts": Alert.objects.filter(acknowledged_at__isnull=True).count(),
        "agents_total": Agent.objects.count(),
        "agents_online": Agent.objects.filter(last_seen_at__gte=_online_cutoff()).count(),
        # a short CPU interval: a page load must not wait the beat task's full interval
        "health": system_health(
            reading=health_read(
                role="web",
                include_workers=False,
                cpu_interval=min(0.2, settings.FEDSITE_HEALTH_CPU_INTERVAL_SECONDS),
            )
        ),
    }
    return render(request, "monitoring/index.html", context)


def _training_tables_context(training: Training) -> dict[str, Any]:
    rounds = (
        Round.objects.filter(training=training)
        .select_related("base_version")
        .annotate(
            task_total=Count("tasks"),
            task_completed=Count("tasks", filter=Q(tasks__status=Task.Status.COMPLETED)),
        )
        .order_by("-number")[:MAX_ROUNDS_SHOWN]
    )
    return {
        "training": training,
        "rounds": [
            {
                "round": round_,
                "accuracy": _first_of(round_.metrics or {}, ACCURACY_SERIES),
                "loss": _first_of(round_.metrics or {}, LOSS_SERIES),
                "duration": (round_.completed_at - round_.opened_at).total_seconds()
                if round_.completed_at and round_.opened_at
                else None,
            }
            for round_ in rounds
        ],
        "versions": [
            {"version": version, "accuracy": _first_of(version.metrics or {}, ACCURACY_SERIES)}
            for version in training.versions.order_by("-number")[:MAX_VERSIONS_SHOWN]
        ],
        "current_version_id": training.current_version_id,
        "alerts": list(alerts_query(training_id=str(training.pk))[:MAX_ALERTS_SHOWN]),
    }


@staff_member_required
def training_page(request: HttpRequest, training_id: Any) -> HttpResponse:
    training = get_object_or_404(Training.objects.select_related("current_version"), pk=training_id)
    series = training_metrics_series(training)
    context = {
        **_training_tables_context(training),
        "nav": "trainings",
        "status": training_status(training),
        "chart_metrics": {name: series.get(name, []) for name in (*ACCURACY_SERIES, *LOSS_SERIES)},
        "urls": {
            # The seed's REST paths are a contract; their URL names collide with the router's actions.
            "status": f"/api/training/{training.pk}/status",
            "metrics": f"/api/training/{training.pk}/metrics",
            "stop": f"/api/training/{training.pk}/stop",
            "tables": reverse("dashboard-training-tables", args=[training.pk]),
            "admin": reverse("admin:trainings_training_change", args=[training.pk]),
        },
    }
    return render(request, "monitoring/training.html", context)


@staff_member_required
def training_tables(request: HttpRequest, training_id: Any) -> HttpResponse:
    """The rounds, versions and alerts tables alone, for the page to refresh in place."""
    training = get_object_or_404(Training, pk=training_id)
    return render(request, "monitoring/_training_tables.html", _training_tables_context(training))


@staff_member_required
def agents_page(request: HttpRequest) -> HttpResponse:
    agents = list(Agent.objects.order_by("agent_id"))
    rows = [{"agent": agent, "online": agent_is_online(agent)} for agent in agents]
    context = {
        "nav": "agents",
        "rows": rows,
        "agents_online": sum(1 for row in rows if row["online"]),
        "agents_total": len(rows),
        "timeout": settings.FEDSITE_AGENT_TIMEOUT,
    }
    return render(request, "monitoring/agents.html", context)
