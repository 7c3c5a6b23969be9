"""Dashboard pages for operators (staff login): trainings (list, form, live page, versions, comparison),
alerts, system health, agents (list, an agent's page, creating agents and enrolment keys).

Views only read (selectors and plain queries) and render; the training form validates through
``TrainingConfiguration`` and creates/starts through the trainings services, and the enrolment page
creates through the clients services (secrets stored hashed, shown once from the session). Live data
reach the browser as events over the WebSocket ``/ws/dashboard-<random>`` (same channel layer as the
workers), with polling of the REST API as the fallback (the embedded mode's in-memory channel layer
reaches only the process that sent the event), and none once a training is finished. Other operator
actions (stop, roll back, acknowledge, quarantine) go through the REST API, which calls services and
writes the audit log.
"""

from __future__ import annotations

import csv
import json
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.db.models import Count, Q
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from clients import services as client_services
from clients.models import Agent, EnrollmentKey
from clients.selectors import agent_is_online
from fedsite.errors import ServiceError
from monitoring.contributions import agent_contributions, agents_leaderboard, training_leaderboard
from monitoring.forms import (
    AgentCreateForm,
    EnrollmentKeyForm,
    TrainingForm,
    algorithm_hyperparameters,
    initial_from_configuration,
)
from monitoring.health import health_read
from monitoring.models import Alert
from monitoring.selectors import (
    agent_reliability_series,
    agent_tasks_recent,
    agent_updates_recent,
    alerts_query,
    health_card,
)
from trainings import services as training_services
from trainings.models import Round, Task, Training
from trainings.selectors import training_metrics_series, training_status
from versioning.models import ModelVersion, Rollback

ACCURACY_SERIES = ("accuracy", "federated_accuracy")
LOSS_SERIES = ("loss", "federated_loss", "train_loss")
# Per-round series the live page draws besides accuracy and loss (all recorded by the aggregation).
ROUND_SERIES = ("privacy_epsilon_spent", "round_seconds", "aggregation_seconds")
CHART_SERIES = (*ACCURACY_SERIES, *LOSS_SERIES, *ROUND_SERIES)
TERMINAL_STATUSES = sorted(Training.TERMINAL)
DROPPED_TASKS = (Task.Status.FAILED, Task.Status.EXPIRED)
MAX_COMPARED = 6
MAX_ALERTS_PAGE = 500
MAX_ROUNDS_SHOWN = 200
MAX_VERSIONS_SHOWN = 50
MAX_ALERTS_SHOWN = 50
MAX_OPEN_ALERT_IDS = 1000  # /api/alerts's largest limit
MAX_AGENT_TASKS_SHOWN = 50
MAX_AGENT_UPDATES_SHOWN = 50
MAX_RELIABILITY_POINTS = 500
# The session key of a secret just created, shown by the next GET of the enrolment page and then dropped.
ONE_TIME_SECRET_SESSION_KEY = "dashboard_one_time_secret"  # noqa: S105 - a session key name, not a secret
ONE_TIME_SECRET_SECONDS = 120


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
    open_alerts = Alert.objects.filter(resolved_at__isnull=True, acknowledged_at__isnull=True)
    context = {
        "nav": "trainings",
        "trainings": [{"training": t, "max_rounds": (t.config or {}).get("max_rounds")} for t in trainings],
        "training_counts": [
            (value, label, status_counts.get(value, 0)) for value, label in Training.Status.choices
        ],
        # the trainings whose rows can still change: the page subscribes to their events
        "live_trainings": [str(t.pk) for t in trainings if not t.is_terminal],
        "alerts": list(Alert.objects.select_related("training")[:20]),
        "open_alerts": open_alerts.count(),
        # the page keeps the count from alert events: it starts from the ids (as many as /api/alerts gives)
        "open_alert_ids": list(open_alerts.values_list("pk", flat=True)[:MAX_OPEN_ALERT_IDS]),
        "agents_total": Agent.objects.count(),
        "agents_online": Agent.objects.filter(last_seen_at__gte=_online_cutoff()).count(),
        "embedded": settings.EMBEDDED,
        "terminal_statuses": TERMINAL_STATUSES,
        # a short CPU interval for the fallback figure: a page load must not wait the beat task's interval
        "health": health_card(
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


def _round_rows(training: Training, *, after: int = 0) -> list[dict[str, Any]]:
    """Participation and duration of each round numbered ``after`` or higher (for the charts)."""
    rounds = (
        Round.objects.filter(training=training, number__gte=after)
        .annotate(
            selected=Count("tasks"),
            reported=Count("tasks", filter=Q(tasks__status=Task.Status.COMPLETED)),
            dropped=Count("tasks", filter=Q(tasks__status__in=DROPPED_TASKS)),
        )
        .order_by("number")[:MAX_ROUNDS_SHOWN]
    )
    return [
        {
            "round": round_.number,
            "status": round_.status,
            "attempt": round_.attempt,
            "selected": round_.selected,
            "reported": round_.reported,
            "dropped": round_.dropped,
            "duration": (round_.completed_at - round_.opened_at).total_seconds()
            if round_.completed_at and round_.opened_at
            else None,
        }
        for round_ in rounds
    ]


@staff_member_required
def training_page(request: HttpRequest, training_id: Any) -> HttpResponse:
    training = get_object_or_404(Training.objects.select_related("current_version"), pk=training_id)
    series = training_metrics_series(training)
    context = {
        **_training_tables_context(training),
        "nav": "trainings",
        "status": training_status(training),
        "chart_metrics": {name: series.get(name, []) for name in CHART_SERIES},
        "round_rows": _round_rows(training),
        "leaderboard": training_leaderboard(training=training)["agents"],
        "embedded": settings.EMBEDDED,
        "terminal_statuses": TERMINAL_STATUSES,
        "urls": {
            # The seed's REST paths are a contract; their URL names collide with the router's actions.
            "status": f"/api/training/{training.pk}/status",
            "metrics": f"/api/training/{training.pk}/metrics",
            "stop": f"/api/training/{training.pk}/stop",
            "tables": reverse("dashboard-training-tables", args=[training.pk]),
            "rounds": reverse("dashboard-training-rounds", args=[training.pk]),
            "admin": reverse("admin:trainings_training_change", args=[training.pk]),
        },
    }
    return render(request, "monitoring/training.html", context)


@staff_member_required
def training_rounds_json(request: HttpRequest, training_id: Any) -> JsonResponse:
    """Participation per round from ``?after=<n>`` on: the live page asks only for what changed."""
    training = get_object_or_404(Training, pk=training_id)
    text = request.GET.get("after", "0")
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        return JsonResponse(
            {
                "error": {
                    "code": "invalid",
                    "message": f"after must be a round number (0 or more). Found {text!r}.",
                }
            },
            status=400,
        )
    return JsonResponse({"training_id": str(training.pk), "rounds": _round_rows(training, after=int(text))})


@staff_member_required
def training_tables(request: HttpRequest, training_id: Any) -> HttpResponse:
    """The rounds, versions and alerts tables alone, for the page to refresh in place."""
    training = get_object_or_404(Training, pk=training_id)
    return render(request, "monitoring/_training_tables.html", _training_tables_context(training))


AGENT_SORTS = {
    "agent": "agent_id",
    "status": "status",
    "reliability": "reliability",
    "participation": "participation",
    "contribution": "contribution",
    "completed": "tasks_completed",
    "failed": "tasks_failed",
    "expired": "tasks_expired",
    "last_seen": "last_seen_at",
}


@staff_member_required
def agents_page(request: HttpRequest) -> HttpResponse:
    """The agents as a sortable table (``?sort=reliability&order=desc``; JS re-sorts in place)."""
    sort = request.GET.get("sort", "agent")
    if sort not in AGENT_SORTS:
        sort = "agent"
    descending = request.GET.get("order") == "desc"
    agents = list(Agent.objects.all())
    key = AGENT_SORTS[sort]
    # the contribution of /api/v1/agents/leaderboard (the mean over trainings of the latest estimate)
    contributions = {row["agent_id"]: row["contribution"] for row in agents_leaderboard()["agents"]}

    def sort_value(agent: Agent) -> Any:
        if key == "participation":
            return agent.tasks_completed + agent.tasks_failed + agent.tasks_expired
        if key == "contribution":
            return contributions.get(agent.agent_id)
        return getattr(agent, key)

    # agents without a value (never seen, no contribution yet) come last in either order, as in the API
    known = [agent for agent in agents if sort_value(agent) is not None]
    known.sort(key=sort_value, reverse=descending)
    rows = [
        {
            "agent": agent,
            "online": agent_is_online(agent),
            "assigned": agent.tasks_completed + agent.tasks_failed + agent.tasks_expired,
            "contribution": contributions.get(agent.agent_id),
        }
        for agent in known + [agent for agent in agents if sort_value(agent) is None]
    ]
    context = {
        "nav": "agents",
        "rows": rows,
        "agents_online": sum(1 for row in rows if row["online"]),
        "agents_total": len(rows),
        "timeout": settings.FEDSITE_AGENT_TIMEOUT,
        "sort": sort,
        "order": "desc" if descending else "asc",
        "columns": [
            ("agent", "Agent", False),
            ("status", "Status", False),
            ("reliability", "Reliability", True),
            ("participation", "Participation", True),
            ("contribution", "Contribution", True),
            ("completed", "Completed", True),
            ("failed", "Failed", True),
            ("expired", "Expired", True),
            ("last_seen", "Last seen", False),
        ],
        "actions": AGENT_ACTIONS,
        "embedded": settings.EMBEDDED,
    }
    return render(request, "monitoring/agents.html", context)


# (REST action, button text, the status after which the button is not offered)
AGENT_ACTIONS = [
    ("quarantine", "quarantine", Agent.Status.QUARANTINED),
    ("activate", "activate", Agent.Status.ACTIVE),
    ("disable", "disable", Agent.Status.DISABLED),
]


@staff_member_required
def agent_page(request: HttpRequest, agent_id: str) -> HttpResponse:
    """One agent: its tasks, its updates with their statistics and flags, reliability over its tasks,
    contribution per training, and the status buttons."""
    agent = get_object_or_404(Agent, agent_id=agent_id)
    contribution = agent_contributions(agent=agent)
    context = {
        "nav": "agents",
        "agent": agent,
        "online": agent_is_online(agent),
        "assigned": agent.tasks_completed + agent.tasks_failed + agent.tasks_expired,
        "tasks": agent_tasks_recent(agent=agent, limit=MAX_AGENT_TASKS_SHOWN),
        "updates": agent_updates_recent(agent=agent, limit=MAX_AGENT_UPDATES_SHOWN),
        "reliability_series": agent_reliability_series(agent=agent, limit=MAX_RELIABILITY_POINTS),
        "contribution": contribution,
        "capabilities_json": json.dumps(agent.capabilities, indent=2, sort_keys=True),
        "actions": AGENT_ACTIONS,
        "embedded": settings.EMBEDDED,
        "task_limit": MAX_AGENT_TASKS_SHOWN,
        "update_limit": MAX_AGENT_UPDATES_SHOWN,
    }
    return render(request, "monitoring/agent.html", context)


def _one_time_secret(request: HttpRequest) -> dict[str, Any] | None:
    """Take the secret the last POST stored (it leaves the session now), unless it is older than
    ``ONE_TIME_SECRET_SECONDS``: a redirect that was never followed does not show it later."""
    secret = request.session.pop(ONE_TIME_SECRET_SESSION_KEY, None)
    if not isinstance(secret, dict):
        return None
    if timezone.now().timestamp() - float(secret.get("created", 0)) > ONE_TIME_SECRET_SECONDS:
        return None
    return secret


@never_cache
@staff_member_required
def enrolment_page(request: HttpRequest) -> HttpResponse:
    """Register an agent (its token) or make an enrolment key, through the clients services (which store
    the secret hashed and write the audit log). The clear secret is kept in the session only until the
    redirect's GET shows it, so a reload or the back button never shows it again."""
    agent_form = AgentCreateForm(prefix="agent")
    key_form = EnrollmentKeyForm(prefix="key")
    if request.method == "POST":
        secret: dict[str, str] | None = None
        if request.POST.get("create") == "agent":
            agent_form = AgentCreateForm(request.POST, prefix="agent")
            if agent_form.is_valid():
                try:
                    agent, token = client_services.agent_create(
                        agent_id=agent_form.cleaned_data["agent_id"], actor=request.user
                    )
                except ServiceError as exc:
                    agent_form.add_error("agent_id", exc.message)
                else:
                    secret = {"kind": "agent", "name": agent.agent_id, "value": token}
        elif request.POST.get("create") == "key":
            key_form = EnrollmentKeyForm(request.POST, prefix="key")
            if key_form.is_valid():
                days = key_form.cleaned_data["expires_in_days"]
                key, value = client_services.enrollment_key_create(
                    label=key_form.cleaned_data["label"],
                    max_uses=key_form.cleaned_data["max_uses"],
                    expires_at=timezone.now() + timedelta(days=days) if days else None,
                    created_by=request.user,
                )
                secret = {"kind": "key", "name": key.label, "value": value}
        else:
            messages.error(request, "Pick what to create: an agent or an enrolment key.")
        if secret is not None:
            request.session[ONE_TIME_SECRET_SESSION_KEY] = {**secret, "created": timezone.now().timestamp()}
            return redirect("dashboard-enrolment")
    context = {
        "nav": "agents",
        "agent_form": agent_form,
        "key_form": key_form,
        "secret": _one_time_secret(request) if request.method == "GET" else None,
        "keys": list(EnrollmentKey.objects.order_by("-created_at")[:20]),
        "server_url": request.build_absolute_uri("/").rstrip("/"),
        "now": timezone.now(),
    }
    # 200 with the errors shown, as the training form (a 400 is a failed load to the browser)
    return render(request, "monitoring/enrolment.html", context)


# --- the training form ----------------------------------------------------------------------------------
@staff_member_required
def training_new(request: HttpRequest) -> HttpResponse:
    """Create a training from form fields or JSON; "Create and start" also starts it."""
    if request.method == "POST":
        form = TrainingForm(request.POST)
        if form.is_valid() and form.configuration is not None:
            start = "start" in request.POST
            try:
                if start:
                    training = training_services.training_create_and_start(
                        configuration=form.configuration, created_by=request.user
                    )
                else:
                    training = training_services.training_create(
                        configuration=form.configuration, created_by=request.user
                    )
            except ServiceError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(
                    request, f"Training {training.name!r} {'started' if start else 'created (pending)'}."
                )
                return redirect("dashboard-training", training.pk)
    else:
        initial: dict[str, Any] = {}
        clone = request.GET.get("clone")
        if clone:
            source = _training_or_404(clone)
            initial = initial_from_configuration(source.config or {})
        form = TrainingForm(initial=initial)
    context = {
        "nav": "new",
        "form": form,
        "hyperparameters": {
            algorithm: [h.name for h in declared]
            for algorithm, declared in algorithm_hyperparameters().items()
        },
        "clone_of": request.GET.get("clone", ""),
    }
    # 200 with the errors shown (a 400 would make the browser log a failed load for a normal re-render)
    return render(request, "monitoring/training_form.html", context)


def _training_or_404(training_id: Any) -> Training:
    try:
        return Training.objects.get(pk=uuid.UUID(str(training_id)))
    except (ValueError, Training.DoesNotExist) as exc:
        raise Http404(f"No training with id {training_id!r}.") from exc


@staff_member_required
@require_POST
def training_start_view(request: HttpRequest, training_id: Any) -> HttpResponse:
    """Start a pending training (a plain form post: works without JavaScript)."""
    training = get_object_or_404(Training, pk=training_id)
    try:
        training_services.training_start(training_id=training.pk, actor=request.user)
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Training {training.name!r} started.")
    return redirect("dashboard-training", training.pk)


# --- versions ----------------------------------------------------------------------------------------
@staff_member_required
def versions_page(request: HttpRequest, training_id: Any) -> HttpResponse:
    training = get_object_or_404(Training.objects.select_related("current_version"), pk=training_id)
    versions = list(
        ModelVersion.objects.filter(training=training).select_related("parent").order_by("-number")[:500]
    )
    rollbacks = list(
        Rollback.objects.filter(training=training)
        .select_related("target", "version")
        .order_by("-created_at")[:200]
    )
    context = {
        "nav": "trainings",
        "training": training,
        "versions": [
            {"version": version, "accuracy": _first_of(version.metrics or {}, ACCURACY_SERIES)}
            for version in versions
        ],
        "current_version_id": training.current_version_id,
        "rollbacks": rollbacks,
        "urls": {
            "compare": reverse("training-versions-compare", args=[training.pk]),
            "rollback": reverse("training-rollback", args=[training.pk]),
        },
    }
    return render(request, "monitoring/versions.html", context)


# --- alerts ------------------------------------------------------------------------------------------
ALERT_STATES = (("open", "open"), ("acknowledged", "acknowledged"), ("resolved", "resolved"), ("", "all"))


@staff_member_required
def alerts_page(request: HttpRequest) -> HttpResponse:
    """Alerts with filters: state (open = not resolved and not acknowledged), severity, kind, training."""
    state = request.GET.get("state", "open")
    severity = request.GET.get("severity", "")
    kind = request.GET.get("kind", "")
    training_id = request.GET.get("training", "")
    alerts = Alert.objects.select_related("training").order_by("-created_at")
    if state == "open":
        alerts = alerts.filter(resolved_at__isnull=True, acknowledged_at__isnull=True)
    elif state == "acknowledged":
        alerts = alerts.filter(acknowledged_at__isnull=False)
    elif state == "resolved":
        alerts = alerts.filter(resolved_at__isnull=False)
    else:
        state = ""
    if severity in Alert.Severity.values:
        alerts = alerts.filter(severity=severity)
    else:
        severity = ""
    if kind in Alert.Kind.values:
        alerts = alerts.filter(kind=kind)
    else:
        kind = ""
    trainings = list(Training.objects.order_by("-created_at").values("pk", "name", "status")[:200])
    try:
        training_uuid = uuid.UUID(training_id) if training_id else None
    except ValueError:
        training_uuid = None
    if training_uuid is not None:
        alerts = alerts.filter(training_id=training_uuid)
        training_id = str(training_uuid)
    else:
        training_id = ""
    # Live arrival: the page subscribes to the trainings still running (alerts have training groups).
    live_trainings = [str(t["pk"]) for t in trainings if t["status"] == Training.Status.RUNNING]
    if training_id:
        live_trainings = [training_id]
    context = {
        "nav": "alerts",
        "alerts": list(alerts[:MAX_ALERTS_PAGE]),
        "filters": {"state": state, "severity": severity, "kind": kind, "training": training_id},
        "states": ALERT_STATES,
        "severities": Alert.Severity.choices,
        "kinds": Alert.Kind.choices,
        "trainings": trainings,
        "live_trainings": live_trainings,
        "limit": MAX_ALERTS_PAGE,
        "embedded": settings.EMBEDDED,
    }
    return render(request, "monitoring/alerts.html", context)


# --- system health -------------------------------------------------------------------------------------
@staff_member_required
def health_page(request: HttpRequest) -> HttpResponse:
    """Current figures (read by the page from /api/system/health) and history charts."""
    return render(
        request,
        "monitoring/health.html",
        {
            "nav": "health",
            "urls": {
                "health": reverse("seed-system-health"),
                "history": reverse("system-health-history"),
            },
            "sample_seconds": settings.FEDSITE_HEALTH_SAMPLE_SECONDS,
        },
    )


# --- compare trainings ---------------------------------------------------------------------------------
def _selected_trainings(request: HttpRequest) -> list[Training]:
    ids = []
    for text in request.GET.getlist("training")[:MAX_COMPARED]:
        try:
            ids.append(uuid.UUID(text))
        except ValueError:
            continue
    found = {t.pk: t for t in Training.objects.filter(pk__in=ids)}
    return [found[pk] for pk in dict.fromkeys(ids) if pk in found]


@staff_member_required
def compare_page(request: HttpRequest) -> HttpResponse:
    selected = _selected_trainings(request)
    series = {str(t.pk): {"name": t.name, "metrics": training_metrics_series(t)} for t in selected}
    names = sorted({name for entry in series.values() for name in entry["metrics"]})
    context = {
        "nav": "compare",
        "trainings": list(Training.objects.order_by("-created_at")[:200]),
        "selected": [str(t.pk) for t in selected],
        "series": series,
        "metric_names": names,
        "max_compared": MAX_COMPARED,
    }
    return render(request, "monitoring/compare.html", context)


@staff_member_required
def compare_csv(request: HttpRequest) -> HttpResponse:
    """One metric of the selected trainings as CSV: round, then one column per training."""
    selected = _selected_trainings(request)
    metric = request.GET.get("metric", "")
    if not selected or not metric:
        return HttpResponse(
            "Pass ?training=<id> (one or more) and ?metric=<name>.", status=400, content_type="text/plain"
        )
    columns = [{p["round"]: p["value"] for p in training_metrics_series(t).get(metric, [])} for t in selected]
    rounds = sorted({number for column in columns for number in column})
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    safe_metric = "".join(c if c.isalnum() or c in "_-" else "_" for c in metric)[:64]
    response["Content-Disposition"] = f'attachment; filename="{safe_metric}.csv"'
    writer = csv.writer(response)
    # A leading = + - @ would make a spreadsheet run the cell as a formula: quote it as text.
    writer.writerow(["round", *[_csv_text(f"{t.name} ({t.pk})") for t in selected]])
    for number in rounds:
        writer.writerow([number, *[column.get(number, "") for column in columns]])
    return response


def _csv_text(text: str) -> str:
    return f"'{text}" if text[:1] in ("=", "+", "-", "@") else text
