"""Prometheus gauges computed from the database at scrape time (served by django-prometheus at ``/metrics``).

``/metrics`` itself is :func:`metrics_view`: a staff session or the metrics bearer token, never anonymous
unless ``FEDSITE_METRICS_ALLOW_ANONYMOUS`` says so.

Invariants: nothing is counted in process memory, so every ASGI process and worker reports the same
values (the one exception is ``fedsite_open_long_polls``: the polls open in the process that answers the
scrape; the other processes' figures are in ``fedsite_process_open_long_polls`` from their samples).
System gauges come from the newest stored health sample (``monitoring.sample_system_health``), never
from a measurement at scrape time, so a scrape does not block on the CPU interval. A scrape runs a
handful of aggregate queries; a database error yields ``fedsite_collector_up 0``
instead of failing the whole scrape. ``register_collector`` is idempotent: ``MonitoringConfig.ready``
may run (and this module may be imported) more than once.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
from collections.abc import Iterator

from django.conf import settings
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger("monitoring.prometheus")

ACCURACY_METRICS = ("accuracy", "federated_accuracy")


def _families() -> dict[str, GaugeMetricFamily]:
    return {
        "up": GaugeMetricFamily(
            "fedsite_collector_up", "1 if the fedsite collector could read the database at this scrape."
        ),
        "trainings": GaugeMetricFamily("fedsite_trainings", "Trainings by status.", labels=["status"]),
        "rounds": GaugeMetricFamily("fedsite_rounds", "Rounds by status.", labels=["status"]),
        "agents_online": GaugeMetricFamily(
            "fedsite_agents_online", "Agents seen within FEDSITE_AGENT_TIMEOUT seconds."
        ),
        "agents_total": GaugeMetricFamily("fedsite_agents_total", "Registered agents."),
        "agents": GaugeMetricFamily("fedsite_agents", "Registered agents by status.", labels=["status"]),
        "alerts_open": GaugeMetricFamily(
            "fedsite_alerts_open", "Unacknowledged alerts by severity.", labels=["severity"]
        ),
        "accuracy": GaugeMetricFamily(
            "fedsite_training_last_round_accuracy",
            "Accuracy of the latest round that reported it, per running training "
            "(metric: 'accuracy' is central evaluation, 'federated_accuracy' the agents' held-out splits).",
            labels=["training_id", "training_name", "metric"],
        ),
        "current_round": GaugeMetricFamily(
            "fedsite_training_current_round",
            "Current round number per running training.",
            labels=["training_id", "training_name"],
        ),
        **_health_families(),
    }


def _health_families() -> dict[str, GaugeMetricFamily]:
    return {
        "health_age": GaugeMetricFamily(
            "fedsite_health_sample_age_seconds", "Seconds since the newest system-health sample."
        ),
        "cpu": GaugeMetricFamily(
            "fedsite_system_cpu_percent", "System CPU use over the sample's interval.", labels=["core"]
        ),
        "memory": GaugeMetricFamily("fedsite_system_memory_percent", "System memory in use."),
        "disk_free": GaugeMetricFamily(
            "fedsite_blob_store_free_bytes", "Free bytes of the blob store's disk."
        ),
        "network": GaugeMetricFamily(
            "fedsite_system_network_bytes", "Network bytes since boot.", labels=["direction"]
        ),
        "rss": GaugeMetricFamily(
            "fedsite_process_rss_bytes",
            "Resident memory per process (newest sample).",
            labels=["role", "process"],
        ),
        "process_polls": GaugeMetricFamily(
            "fedsite_process_open_long_polls",
            "Open agent long-polls per web process (newest sample).",
            labels=["process"],
        ),
        "open_polls": GaugeMetricFamily(
            "fedsite_open_long_polls", "Agent long-polls open now in the process answering this scrape."
        ),
        "latency": GaugeMetricFamily(
            "fedsite_component_latency_ms", "Round-trip of a trivial call.", labels=["component"]
        ),
        "workers": GaugeMetricFamily("fedsite_celery_workers_alive", "Celery workers that answered a ping."),
        "queues": GaugeMetricFamily(
            "fedsite_queue_depth", "Messages waiting per Celery queue.", labels=["queue"]
        ),
    }


def _fill_health(families: dict[str, GaugeMetricFamily]) -> None:
    from django.utils import timezone

    from monitoring.health import open_long_polls
    from monitoring.models import SystemHealthSample
    from monitoring.selectors import processes_latest

    families["open_polls"].add_metric([], open_long_polls.value)
    newest = SystemHealthSample.objects.order_by("-created_at", "-pk").first()
    if newest is None:
        return
    families["health_age"].add_metric([], (timezone.now() - newest.created_at).total_seconds())
    families["cpu"].add_metric(["total"], newest.cpu_percent)
    for core, value in enumerate(newest.cpu_per_core):
        families["cpu"].add_metric([str(core)], value)
    families["memory"].add_metric([], newest.memory_percent)
    families["disk_free"].add_metric([], newest.disk_free_bytes)
    families["network"].add_metric(["sent"], newest.network_bytes_sent)
    families["network"].add_metric(["received"], newest.network_bytes_received)
    for component, value in (("database", newest.database_latency_ms), ("redis", newest.redis_latency_ms)):
        if value is not None:
            families["latency"].add_metric([component], value)
    if newest.workers_alive is not None:
        families["workers"].add_metric([], newest.workers_alive)
    for queue, depth in sorted(newest.queue_depths.items()):
        families["queues"].add_metric([queue], depth)
    for sample in processes_latest():
        families["rss"].add_metric([sample.role, sample.process], sample.process_rss_bytes)
        if sample.open_long_polls is not None:
            families["process_polls"].add_metric([sample.process], sample.open_long_polls)


class FedsiteCollector(Collector):
    """Gauges about trainings, rounds, agents and alerts, read from the database on every scrape."""

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Without describe() the registry would call collect() at registration, i.e. query the database
        # inside AppConfig.ready().
        yield from _families().values()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = _families()
        try:
            self._fill(families)
        except Exception:  # a broken database must not make /metrics fail for the other collectors
            logger.exception("prometheus_collect_failed")
            families["up"].add_metric([], 0)
            yield families["up"]
            return
        families["up"].add_metric([], 1)
        yield from families.values()

    @staticmethod
    def _fill(families: dict[str, GaugeMetricFamily]) -> None:
        from clients.models import Agent
        from clients.selectors import agents_online
        from monitoring.models import Alert, Metric
        from trainings.models import Round, Training

        def by_status(model: type, field: str, choices: list[str], family: GaugeMetricFamily) -> int:
            counts = dict(model.objects.values_list(field).annotate(n=Count("pk")).order_by())
            for value in choices:
                family.add_metric([value], counts.get(value, 0))
            return sum(counts.values())

        by_status(Training, "status", Training.Status.values, families["trainings"])
        by_status(Round, "status", Round.Status.values, families["rounds"])
        total_agents = by_status(Agent, "status", Agent.Status.values, families["agents"])
        families["agents_total"].add_metric([], total_agents)
        families["agents_online"].add_metric([], agents_online().count())
        open_alerts = dict(
            Alert.objects.filter(acknowledged_at__isnull=True)
            .values_list("severity")
            .annotate(n=Count("pk"))
            .order_by()
        )
        for severity in Alert.Severity.values:
            families["alerts_open"].add_metric([severity], open_alerts.get(severity, 0))

        running: dict[object, str] = {}
        for training_id, name, current_round in Training.objects.filter(
            status=Training.Status.RUNNING
        ).values_list("pk", "name", "current_round"):
            running[training_id] = name
            families["current_round"].add_metric([str(training_id), name], current_round)
        latest: dict[tuple[object, str], float] = {}
        for training_id, metric_name, value in (
            Metric.objects.filter(training_id__in=running, name__in=ACCURACY_METRICS)
            .order_by("round_number")
            .values_list("training_id", "name", "value")
        ):
            latest[(training_id, metric_name)] = value  # ascending rounds: the last one wins
        for (training_id, metric_name), value in sorted(latest.items(), key=lambda item: str(item[0])):
            families["accuracy"].add_metric([str(training_id), running[training_id], metric_name], value)
        _fill_health(families)


_lock = threading.Lock()
_collector: FedsiteCollector | None = None


def register_collector(registry: CollectorRegistry = REGISTRY) -> FedsiteCollector:
    """Register the collector once per registry; calling again (or after a re-import) is a no-op."""
    global _collector
    with _lock:
        if _collector is None:
            _collector = FedsiteCollector()
        # ValueError: already registered (a second ready(), or this module re-imported): names are taken.
        with contextlib.suppress(ValueError):
            registry.register(_collector)
        return _collector


def metrics_view(request: HttpRequest) -> HttpResponse:
    """``GET /metrics``: django-prometheus' exposition, for a staff session or the metrics bearer token.

    ``Authorization: Bearer <FEDSITE_METRICS_TOKEN>`` is compared in constant time; wrong tokens are
    throttled per client IP like other credentials. With ``FEDSITE_METRICS_ALLOW_ANONYMOUS`` set, anyone
    may scrape (the gauges name trainings, so only do this on a private network).
    """
    from django_prometheus.exports import ExportToDjangoView

    from fedsite.api import error_response
    from fedsite.errors import AuthenticationFailed, ServiceError
    from fedsite.throttling import auth_failure_guard, auth_failure_record, client_ip

    configured = settings.FEDSITE_METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    try:
        if header.startswith("Bearer "):
            ip = client_ip(request)
            auth_failure_guard(scope="metrics_token", client_ip=ip)
            offered = header[len("Bearer ") :].strip()
            if configured and hmac.compare_digest(offered.encode(), configured.encode()):
                return ExportToDjangoView(request)
            auth_failure_record(scope="metrics_token", client_ip=ip)
            raise AuthenticationFailed("The metrics token is not valid.", code="invalid_token")
        user = getattr(request, "user", None)
        if settings.FEDSITE_METRICS_ALLOW_ANONYMOUS or (user is not None and user.is_staff):
            return ExportToDjangoView(request)
        raise AuthenticationFailed(
            "/metrics needs 'Authorization: Bearer <FEDSITE_METRICS_TOKEN>' or a staff login.",
            code="not_authenticated",
        )
    except ServiceError as exc:
        response = error_response(exc)
        if exc.status_code == 401:
            response["WWW-Authenticate"] = 'Bearer realm="fedsite-metrics"'
        return response
