"""Runtime faults on the real stack: Redis going away, Postgres killing connections, a server restart.

The in-process tests drive one layer each (the wake-up fallback, the pool's checkout check, the replay
of a dead first statement). The ``e2e`` ones run ``manage.py serve`` as a subprocess on the test
database, with a private ``redis-server`` where the test needs to stop Redis, and count every answer
the agents get: none may be a 5xx.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import OperationalError, close_old_connections, connection, transaction

from tests.live import PYTHON, ROOT, PrivateRedis, database_url, free_port, wait_for, wait_healthy

LIVE_APPLICATION_NAME = "fedsite-live-test"
# The embedded run of `make test` is on SQLite: the pool and the replay belong to the Postgres backend.
POSTGRES = settings.DATABASES["default"]["ENGINE"] != "django.db.backends.sqlite3"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path)
    try:
        yield redis.start()
    finally:
        redis.stop()


class LiveServer:
    """``manage.py serve`` on the test database, as a subprocess that can be stopped and started again."""

    def __init__(self, tmp_path: Path, *, redis_url: str | None = None, graceful_timeout: float = 10) -> None:
        self.port = free_port()
        self.log_path = tmp_path / "server.log"
        self.graceful_timeout = graceful_timeout
        self.env = dict(os.environ)
        self.env["DATABASE_URL"] = database_url(application_name=LIVE_APPLICATION_NAME)
        if redis_url is not None:
            self.env["REDIS_URL"] = redis_url
        self.env["FEDSITE_MEDIA_ROOT"] = str(settings.MEDIA_ROOT)
        self.env["FEDSITE_LOG_LEVEL"] = "INFO"
        self.env["PYTHONUNBUFFERED"] = "1"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                PYTHON,
                "manage.py",
                "serve",
                "--port",
                str(self.port),
                "--graceful-timeout",
                str(self.graceful_timeout),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_healthy(self.base, process=self.process, log=self.log_path)
        return self

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@pytest.fixture
def live_server_factory(transactional_db: Any, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    servers: list[LiveServer] = []

    def start(**kwargs: Any) -> LiveServer:
        server = LiveServer(tmp_path, **kwargs).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            if server.process is not None and server.process.poll() is None:
                server.stop()


@dataclass
class Answers:
    """Every answer (or transport failure) the test's HTTP clients got, by request kind."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: list[tuple[str, int]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def add(self, kind: str, status: int) -> None:
        with self.lock:
            self.statuses.append((kind, status))

    def fail(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.failures.append((kind, repr(exc)))

    def of(self, kind: str) -> list[int]:
        with self.lock:
            return [status for k, status in self.statuses if k == kind]

    def server_errors(self) -> list[tuple[str, int]]:
        with self.lock:
            return [(k, s) for k, s in self.statuses if s >= 500]


def _agents(count: int, prefix: str) -> dict[str, str]:
    from clients.services import agent_create, agent_touch

    tokens = {}
    for index in range(count):
        agent, token = agent_create(agent_id=f"{prefix}-{index}")
        agent_touch(agent=agent)
        tokens[agent.agent_id] = token
    return tokens


def _small_update(task: dict[str, Any]) -> bytes:
    from flcore.parameters import ParameterSpec, to_bytes

    spec = ParameterSpec.from_json(task["model"]["parameters"])
    return to_bytes({t.name: np.full(t.shape, 0.01, dtype=np.float32) for t in spec.tensors})


def _poll_and_upload(
    base: str, token: str, answers: Answers, stop: threading.Event, *, wait: int, uploads: list[str]
) -> None:
    """An agent: long-poll; upload a small update for every task; until ``stop``."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=wait + 30) as http:
        while not stop.is_set():
            try:
                reply = http.get("/api/v1/agent/tasks/next", params={"wait": wait})
            except httpx.HTTPError as exc:
                answers.fail("poll", exc)
                time.sleep(0.2)
                continue
            answers.add("poll", reply.status_code)
            if reply.status_code != 200:
                continue
            task = reply.json()
            upload = http.post(
                task["upload_url"],
                content=_small_update(task),
                headers={"Content-Type": "application/octet-stream", "X-Update-Meta": '{"num_examples": 10}'},
            )
            answers.add("upload", upload.status_code)
            if upload.status_code in (200, 201):
                uploads.append(task["task_id"])


def _start_threads(targets: list[Callable[[], None]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    return threads


@pytest.fixture
def outage_record() -> Iterator[Any]:
    from monitoring.events import channel_layer_outage

    channel_layer_outage.recovered()
    yield channel_layer_outage
    channel_layer_outage.recovered()


# ---------------------------------------------------------------------------------------------------
# Redis away: the wake-up wait degrades to database polling (in process)
# ---------------------------------------------------------------------------------------------------
def _redis_layer(url: str) -> dict[str, Any]:
    return {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [url], "prefix": "fedsite-faults-test"},
        }
    }


@pytest.mark.django_db(transaction=True)
def test_wakeup_wait_falls_back_to_sleeping_when_redis_is_away_and_logs_once(
    settings: Any, private_redis: PrivateRedis, outage_record: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from monitoring.events import event_send
    from trainings.wakeup import wait_for_wakeup, wake_agents

    settings.CHANNEL_LAYERS = _redis_layer(private_redis.url)
    private_redis.stop()
    with caplog.at_level(logging.WARNING):
        results = [async_to_sync(wait_for_wakeup)("agent-a", 0.3) for _ in range(3)]
        wake_agents(["agent-a", "agent-b"])
        event_send(training_id="t", event="metric_update", payload={"round": 1})
        time.sleep(outage_record.probe_interval)
        results.append(async_to_sync(wait_for_wakeup)("agent-a", 0.3))  # probes Redis again: still away
    assert results == [False] * 4
    assert outage_record.is_down
    unreachable = [r for r in caplog.records if "channel_layer_unreachable" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]

    # Redis is back on the same port: the next probe finds it and wake-ups work again.
    private_redis.start()
    time.sleep(outage_record.probe_interval)

    async def wait_and_wake() -> bool:
        import asyncio

        from asgiref.sync import sync_to_async

        waiting = asyncio.ensure_future(wait_for_wakeup("agent-a", 10))
        await asyncio.sleep(0.5)
        await sync_to_async(wake_agents)(["agent-a"])
        return await waiting

    with caplog.at_level(logging.WARNING):
        assert async_to_sync(wait_and_wake)() is True
    assert not outage_record.is_down
    assert any("channel_layer_reachable_again" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db(transaction=True)
def test_long_poll_with_redis_away_is_204_then_delivers_a_task(
    settings: Any,
    client: Any,
    make_agent: Any,
    make_training: Any,
    private_redis: PrivateRedis,
    outage_record: Any,
) -> None:
    settings.CHANNEL_LAYERS = _redis_layer(private_redis.url)
    (_, token), _ = make_agent(), make_agent()
    private_redis.stop()
    response = client.get("/api/v1/agent/tasks/next?wait=1", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 204

    make_training(min_clients_per_round=2, max_clients_per_round=2)  # wake-up lost: Redis is away
    response = client.get("/api/v1/agent/tasks/next?wait=5", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    assert response.json()["round"] == 1


# ---------------------------------------------------------------------------------------------------
# Shutdown (in process): the long-poll races its wait against the process-wide shutdown signal
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def shutdown_signal() -> Iterator[Any]:
    from trainings.wakeup import shutdown

    shutdown.clear()
    yield shutdown
    shutdown.clear()


@pytest.mark.django_db(transaction=True)
def test_a_waiting_poll_is_answered_503_when_shutdown_starts(
    client: Any, make_agent: Any, make_training: Any, shutdown_signal: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown at 1 s, a task for the agent at 2.5 s: a poll that stops waiting when the shutdown starts
    answers 503; one that noticed only at its next wake-up or re-check would find the task (200)."""
    from trainings.api import agent_views

    monkeypatch.setattr(agent_views, "RECHECK_SECONDS", 60.0)  # no database re-check inside the test
    (_, token), _ = make_agent(), make_agent()

    def start_training() -> None:
        try:
            make_training(min_clients_per_round=2, max_clients_per_round=2)
        finally:
            connection.close()

    timers = [threading.Timer(1.0, shutdown_signal.set), threading.Timer(2.5, start_training)]
    for timer in timers:
        timer.start()
    try:
        response = client.get("/api/v1/agent/tasks/next?wait=20", HTTP_AUTHORIZATION=f"Bearer {token}")
    finally:
        for timer in timers:
            timer.join()
    assert response.status_code == 503, response.content
    assert response["Retry-After"] == "2"
    assert response.json()["error"]["code"] == "shutting_down"


@pytest.mark.django_db(transaction=True)
def test_a_poll_that_arrives_during_shutdown_is_503(
    client: Any, make_agent: Any, shutdown_signal: Any
) -> None:
    _, token = make_agent()
    shutdown_signal.set()
    response = client.get("/api/v1/agent/tasks/next?wait=30", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 503
    assert response["Retry-After"] == "2"


# ---------------------------------------------------------------------------------------------------
# Stale database connections (in process): the pool's checkout check, and the replay of a first statement
# ---------------------------------------------------------------------------------------------------
def _control_connection() -> psycopg.Connection[Any]:
    db = connection.settings_dict
    return psycopg.connect(
        host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"] or "postgres",
        dbname="postgres", autocommit=True,
    )  # fmt: skip


def _terminate(pids: list[int]) -> None:
    with _control_connection() as control:
        for pid in pids:
            control.execute("SELECT pg_terminate_backend(%s)", [pid])

        def gone() -> bool:
            row = control.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]
            ).fetchone()
            return row is not None and row[0] == 0

        wait_for(gone, 10, f"backends {pids} to exit")


@pytest.mark.skipif(not POSTGRES, reason="the psycopg pool and its replay are the Postgres backend's")
@pytest.mark.django_db(transaction=True)
def test_pool_discards_connections_that_died_while_pooled() -> None:
    pool = connection.pool
    assert pool is not None
    connection.close()
    # Start from an empty pool: earlier tests may have left a dozen idle connections, and psycopg_pool
    # backs off 1, 2, 4, ... s between failed checks, so drawing through that many dead ones outlasts its
    # 30 s timeout. Closed connections handed back are dropped (min_size 0), so three remain below.
    idle = []
    while pool.get_stats().get("pool_available", 0) > 0:
        idle.append(pool.getconn())
    for conn in idle:
        conn.close()
        pool.putconn(conn)
    held = [pool.getconn() for _ in range(3)]
    while pool.get_stats().get("pool_available", 0) > 0:  # one another thread just handed back
        held.append(pool.getconn())
    pids = [conn.info.backend_pid for conn in held]
    for conn in held:
        pool.putconn(conn)
    _terminate(pids)

    # Drawn as a request draws them (fedsite.db's get_new_connection): each dead one's socket is readable
    # (the backend said FATAL and closed it), so it is checked, found dead and dropped.
    params = connection.get_connection_params()
    fresh = [connection.get_new_connection(params) for _ in held]
    try:
        for conn in fresh:  # every checkout is a live connection, not one of the three dead ones
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.info.backend_pid not in pids
    finally:
        for conn in fresh:
            pool.putconn(conn)


@pytest.mark.skipif(not POSTGRES, reason="the psycopg pool and its replay are the Postgres backend's")
@pytest.mark.django_db(transaction=True)
def test_first_statement_on_a_dead_connection_is_replayed_once() -> None:
    connection.close()
    connection.ensure_connection()  # checked out (and checked), then killed before its first statement
    dead = connection.connection.info.backend_pid
    _terminate([dead])

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    assert pid != dead


@pytest.mark.skipif(not POSTGRES, reason="the psycopg pool and its replay are the Postgres backend's")
@pytest.mark.django_db(transaction=True)
def test_a_dead_connection_after_the_first_statement_is_not_replayed() -> None:
    connection.close()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (dead,) = cursor.fetchone()
    _terminate([dead])
    with pytest.raises(OperationalError), connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    connection.close()


@pytest.mark.skipif(not POSTGRES, reason="the psycopg pool and its replay are the Postgres backend's")
@pytest.mark.django_db(transaction=True)
def test_a_dead_connection_inside_a_transaction_is_not_replayed() -> None:
    connection.close()
    with pytest.raises(OperationalError), transaction.atomic():
        _terminate([connection.connection.info.backend_pid])
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    connection.close()


# ---------------------------------------------------------------------------------------------------
# Live server (e2e)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_redis_outage_while_agents_long_poll_costs_no_5xx(
    live_server_factory: Callable[..., LiveServer], private_redis: PrivateRedis
) -> None:
    from django.contrib.auth import get_user_model

    from clients.services import operator_token_create
    from trainings.models import ClientUpdate

    server = live_server_factory(redis_url=private_redis.url)
    tokens = _agents(2, "redis-outage")
    get_user_model().objects.create_user("operator", password="operator-password", is_staff=True)
    _, operator_token = operator_token_create(username="operator", expires_in_days=1, actor="test")
    answers, stop, uploads = Answers(), threading.Event(), []
    threads = _start_threads(
        [
            (lambda t=token: _poll_and_upload(server.base, t, answers, stop, wait=4, uploads=uploads))
            for token in tokens.values()
        ]
    )
    try:
        time.sleep(1.5)  # both polls wait on the channel layer
        private_redis.stop()
        time.sleep(1.0)
        # The operator starts a training: events and wake-ups go to a Redis that is not there.
        started = httpx.post(
            f"{server.base}/api/training/start",
            headers={"Authorization": f"Token {operator_token}"},
            json={
                "name": "through a redis outage",
                "model_type": "logreg",
                "input_dim": 4,
                "num_classes": 3,
                "min_clients_per_round": 2,
                "max_clients_per_round": 2,
                "max_rounds": 2,
            },
            timeout=30,
        )
        answers.add("start", started.status_code)
        assert started.status_code == 201, started.text
        # Tasks still reach the polls (database re-checks) and the uploads close the round.
        wait_for(
            lambda: len(uploads) >= 2,
            30,
            "both agents to upload during the outage",
            lambda: f"{answers}\n{server.log()}",
        )
        close_old_connections()
        assert ClientUpdate.objects.filter(round__training_id=started.json()["training_id"]).count() == 2
        polls_during_outage = len(answers.of("poll"))

        private_redis.start()
        wait_for(lambda: len(answers.of("poll")) >= polls_during_outage + 4, 30, "polls after Redis is back")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    log = server.log()
    assert answers.server_errors() == [], log
    assert answers.failures == [], log
    assert set(answers.of("poll")) <= {200, 204}
    assert answers.of("upload") == [201, 201]
    assert log.count("channel_layer_unreachable") == 1, log  # once per outage, not per request
    assert "channel_layer_reachable_again" in log, log


@pytest.mark.e2e
def test_terminated_database_connections_cost_no_5xx(live_server_factory: Callable[..., LiveServer]) -> None:
    server = live_server_factory()
    tokens = list(_agents(4, "pg-terminate").values())
    answers, stop, uploads = Answers(), threading.Event(), []
    pollers = _start_threads(
        [
            (lambda t=token: _poll_and_upload(server.base, t, answers, stop, wait=2, uploads=uploads))
            for token in tokens[:2]
        ]
    )

    def heartbeat(token: str) -> None:
        try:
            reply = httpx.post(
                f"{server.base}/api/v1/agent/heartbeat",
                headers={"Authorization": f"Bearer {token}"},
                json={"state": "idle"},
                timeout=30,
            )
            answers.add("heartbeat", reply.status_code)
        except httpx.HTTPError as exc:
            answers.fail("heartbeat", exc)

    def burst() -> None:  # enough concurrent requests to fill the server's pool with connections
        with ThreadPoolExecutor(max_workers=12) as executor:
            list(executor.map(heartbeat, tokens * 6))

    killed = 0
    try:
        with _control_connection() as control:
            for _ in range(4):
                burst()
                time.sleep(0.5)
                # The server's idle pooled connections (not one in the middle of a request).
                rows = control.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                    "AND state = 'idle' AND state_change < now() - interval '200 milliseconds'",
                    [LIVE_APPLICATION_NAME],
                ).fetchall()
                killed += sum(1 for (ok,) in rows if ok)
                time.sleep(0.3)
                burst()
    finally:
        stop.set()
        for thread in pollers:
            thread.join(timeout=30)
    log = server.log()
    assert killed >= 4, "the test terminated no pooled connections"
    assert answers.server_errors() == [], log
    assert answers.failures == [], log
    assert set(answers.of("heartbeat")) == {200}
    assert answers.of("poll") and set(answers.of("poll")) <= {200, 204}


@pytest.mark.e2e
def test_sigterm_answers_waiting_polls_at_once_and_exits_0(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    from clients.models import Agent

    graceful = 20.0
    server = live_server_factory(graceful_timeout=graceful)
    tokens = _agents(3, "sigterm")
    replies: list[httpx.Response | BaseException] = []
    lock = threading.Lock()
    since = time.time()

    def poll(token: str) -> None:
        try:
            reply = httpx.get(
                f"{server.base}/api/v1/agent/tasks/next",
                params={"wait": 60},
                headers={"Authorization": f"Bearer {token}"},
                timeout=90,
            )
        except httpx.HTTPError as exc:
            reply = exc  # type: ignore[assignment]
        with lock:
            replies.append(reply)

    threads = _start_threads([(lambda t=token: poll(t)) for token in tokens.values()])

    def all_waiting() -> bool:  # every poll authenticated (touched its agent) and is now waiting
        close_old_connections()
        touched = Agent.objects.filter(agent_id__in=list(tokens), last_seen_at__gt=_aware(since)).count()
        return touched == len(tokens)

    wait_for(all_waiting, 30, "the polls to start waiting")
    time.sleep(0.5)
    # The polls would wait 60 s and the grace period is 20 s: the server must answer them itself, at
    # once, and exit long before the grace period would have run out.
    code = server.stop(timeout=graceful / 2)
    for thread in threads:
        thread.join(timeout=10)
    assert code == 0, server.log()
    assert len(replies) == len(tokens)
    for reply in replies:
        assert isinstance(reply, httpx.Response), f"{reply!r}\n{server.log()}"
        assert reply.status_code in (204, 503), reply.text
        if reply.status_code == 503:
            assert reply.headers["Retry-After"] == "2"
            assert reply.json()["error"]["code"] == "shutting_down"


def _aware(timestamp: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC)


@pytest.mark.e2e
def test_fedagent_upload_survives_a_server_restart(
    live_server_factory: Callable[..., LiveServer], caplog: pytest.LogCaptureFixture
) -> None:
    """The server goes away between training and upload, for longer than the agent's 6 attempts last."""
    from fedagent import FederatedClient
    from flcore.data import load_digits
    from trainings.configuration import TrainingConfiguration
    from trainings.models import ClientUpdate
    from trainings.services import training_create_and_start

    server = live_server_factory()
    (agent_id, token), *_ = _agents(1, "restart").items()
    training = training_create_and_start(
        configuration=TrainingConfiguration.from_dict(
            {
                "name": "through a restart",
                "model_type": "logreg",
                "input_dim": 64,
                "num_classes": 10,
                "min_clients_per_round": 1,
                "max_clients_per_round": 1,
                "max_rounds": 1,
                "round_timeout_seconds": 180,
            }
        )
    )
    about_to_upload, server_down = threading.Event(), threading.Event()

    def hold_until_the_server_is_down(delta: Any) -> Any:
        about_to_upload.set()
        server_down.wait(60)
        return delta

    agent = FederatedClient(
        agent_id=agent_id,
        server=server.base,
        token=token,
        poll_wait=10,
        update_transform=hold_until_the_server_is_down,
        backoff_max=2.0,  # keeps the test short once the server is back; 6 attempts then last < 10 s
        timeout=10.0,
    )
    x, y = load_digits()
    agent.add_dataset("digits", x[:200], y[:200], split="train")
    agent.add_dataset("digits", x[200:260], y[200:260], split="eval")
    outcomes: list[Any] = []
    runner = threading.Thread(target=lambda: outcomes.append(agent.run_one()), daemon=True)
    with caplog.at_level(logging.INFO, logger="fedagent"):
        runner.start()
        assert about_to_upload.wait(60), server.log()
        assert server.stop() == 0
        server_down.set()
        time.sleep(12)  # longer than 6 attempts with back-off capped at 2 s can last
        server.start()
        runner.join(timeout=120)
    assert outcomes and outcomes[0] is not None, server.log()
    outcome = outcomes[0]
    assert outcome.status == "uploaded", outcome
    close_old_connections()
    stored = ClientUpdate.objects.get(task_id=outcome.task_id)
    assert stored.round.training_id == training.pk
    assert stored.blob_sha256 == outcome.update_sha256  # the bytes trained before the outage
    records = [r for r in caplog.records if r.name.startswith("fedagent")]
    assert any("retrying" in r.getMessage() for r in records)  # the outage was seen and retried through
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []
