"""The dashboard in a real browser: Playwright for Python driving Debian's Chromium.

A live ``manage.py serve`` on this run's database (SQLite in the embedded run of ``make test``, Postgres
and Redis in the real-stack run), an operator who logs in through the login form, and every page of the
dashboard and the API docs at a desktop (1280x800) and a phone (390x844) size. No page may log a console
error or a JavaScript exception, fail a request, answer an error, load anything from another host, lack a
title or a favicon, or make the phone-sized page scroll sideways.

Chromium comes from Debian (``apt-get install chromium``; ``make test`` installs it when it is missing);
``playwright install`` is never used.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from django.conf import settings
from django.db import connection, connections

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
PASSWORD = "a-long-browser-password"
# The innermost elements that stick out past the right edge of the viewport, to say what to fix.
WIDEST_ELEMENTS = """() => {
  const width = document.documentElement.clientWidth;
  return [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > width + 1)
    .filter(e => ![...e.children].some(c => c.getBoundingClientRect().right > width + 1))
    .slice(0, 5)
    .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + (e.className ? '.' + e.className : ''));
}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    return (
        f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    )


@pytest.fixture
def dashboard_data(transactional_db: Any) -> dict[str, Any]:
    from django.contrib.auth import get_user_model

    from monitoring.models import Alert, Metric
    from monitoring.tests.factories import make_agent, make_alert, make_round, make_training
    from trainings.models import Round, Training

    get_user_model().objects.create_user("browser-operator", password=PASSWORD, is_staff=True)
    make_agent("hospital-1", seen_seconds_ago=5)
    make_agent("hospital-2", seen_seconds_ago=3600)
    training = make_training("browser demo", start=True, max_rounds=5)
    Round.objects.filter(training=training, number=1).update(status=Round.Status.COMPLETED)
    Metric.objects.create(training=training, round_number=1, name="accuracy", value=0.4)
    make_round(training, 2, Round.Status.COMPLETED, {"accuracy": 0.6, "loss": 0.9})
    Training.objects.filter(pk=training.pk).update(current_round=2)
    make_alert(training, severity=Alert.Severity.WARNING, message="round 2 lost an agent")
    other = make_training("browser other", max_rounds=5)
    Metric.objects.create(training=other, round_number=1, name="accuracy", value=0.5)
    return {"training_id": str(training.pk), "other_training_id": str(other.pk)}


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after 20 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def _serve(tmp_path: Path, *, worker: bool = False) -> Iterator[str]:
    """``manage.py serve`` on this run's database (and, on the real stack, a Celery worker if asked)."""
    port = _free_port()
    env = dict(os.environ)
    env["DATABASE_URL"] = _database_url()
    env["FEDSITE_MEDIA_ROOT"] = str(settings.MEDIA_ROOT)
    env["FEDSITE_DEADLINE_CHECK_SECONDS"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    if settings.EMBEDDED:
        env.pop("REDIS_URL", None)
    commands = {
        "server": [sys.executable, "manage.py", "serve", "--port", str(port), "--graceful-timeout", "1"]
    }
    if worker and not settings.EMBEDDED:
        commands["worker"] = [
            str(Path(sys.executable).parent / "celery"),
            "-A",
            "fedsite",
            "worker",
            "-B",
            "-Q",
            "aggregation,privacy,default",
            "--concurrency",
            "1",
            "-l",
            "warning",
            "--schedule",
            str(tmp_path / "beat-schedule"),
            "--without-gossip",
            "--without-mingle",
        ]
    processes = []
    for name, command in commands.items():
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        processes.append((process, log))
    server = processes[0][0]
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        else:
            pytest.fail("server did not start:\n" + (tmp_path / "server.log").read_text())
        yield base
    finally:
        for process, log in processes:
            _stop_process(process)
            log.close()


@pytest.fixture
def live_server_url(dashboard_data: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    with _serve(tmp_path) as base:
        yield base


def _browser_problems(page: Any, base: str) -> list[str]:
    """Collect what a visitor would see go wrong on ``page`` from now on."""
    problems: list[str] = []
    host = urlsplit(base).netloc
    page.on(
        "console",
        lambda message: (
            problems.append(f"console {message.type}: {message.text}") if message.type == "error" else None
        ),
    )
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "requestfailed",
        lambda request: (
            problems.append(f"request failed: {request.url} ({request.failure})")
            # ERR_ABORTED: the browser dropped the request because the test navigated on; not a failure
            if not request.url.startswith("ws") and "ERR_ABORTED" not in (request.failure or "")
            else None
        ),
    )

    def on_response(response: Any) -> None:
        if response.status >= 400:
            problems.append(f"HTTP {response.status}: {response.url}")

    def on_request(request: Any) -> None:
        if urlsplit(request.url).netloc not in (host, "") and not request.url.startswith("data:"):
            problems.append(f"request to another host: {request.url}")

    page.on("response", on_response)
    page.on("request", on_request)
    return problems


def test_every_dashboard_page_works_in_chromium_at_desktop_and_phone_sizes(live_server_url, dashboard_data):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test installs it)")
    from playwright.sync_api import sync_playwright

    base = live_server_url
    training = dashboard_data["training_id"]
    pages = [
        "/",
        "/dashboard/agents/",
        f"/dashboard/trainings/{training}/",
        "/dashboard/trainings/new/",
        f"/dashboard/trainings/new/?clone={training}",
        f"/dashboard/trainings/{training}/versions/",
        "/dashboard/alerts/",
        "/dashboard/alerts/?state=",
        "/dashboard/health/",
        f"/dashboard/compare/?training={training}&training={dashboard_data['other_training_id']}",
        "/dashboard/agents/?sort=reliability&order=desc",
        "/dashboard/agents/?sort=contribution&order=desc",
        "/dashboard/agents/hospital-1/",
        "/dashboard/enrolment/",
        "/api/docs/",
        "/api/redoc/",
        "/admin/",
    ]
    report: dict[str, list[str]] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for size, viewport in VIEWPORTS.items():
                context = browser.new_context(viewport=viewport)
                page = context.new_page()
                problems = _browser_problems(page, base)
                page.goto(f"{base}/admin/login/?next=/")
                page.fill("#id_username", "browser-operator")
                page.fill("#id_password", PASSWORD)
                page.click("input[type=submit]")
                page.wait_for_url(f"{base}/")
                for path in pages:
                    before = len(problems)
                    response = page.goto(f"{base}{path}", wait_until="networkidle")
                    found = problems[before:]
                    if response is None or response.status >= 400:
                        found.append(f"the page answered {response.status if response else 'nothing'}")
                    if not page.title().strip():
                        found.append("no title")
                    shown = page.inner_text("body")
                    for word in ("undefined", "NaN", "[object Object]"):
                        if word in shown:  # a script rendered a value it did not have
                            found.append(f"shows {word!r}")
                    if not page.evaluate("() => !!document.querySelector('link[rel~=icon]')"):
                        found.append("no favicon link")
                    overflow = page.evaluate(
                        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
                    )
                    if overflow > 1:
                        culprits = page.evaluate(WIDEST_ELEMENTS)
                        found.append(f"scrolls sideways by {overflow} px; too wide: {culprits}")
                    if found:
                        report[f"{size} {path}"] = found
                context.close()
        finally:
            browser.close()

    assert report == {}, "\n".join(f"{page}: {problems}" for page, problems in report.items())


def _login(page: Any, base: str, next_path: str = "/") -> None:
    page.goto(f"{base}/admin/login/?next={next_path}")
    page.fill("#id_username", "browser-operator")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{base}{next_path}")


def _spawn_agents(base: str, tokens: dict[str, str], training_id: str, tmp_path: Path) -> list[Any]:
    """Real agents: one ``python -m fedagent run`` process each, on its own shard of digits, over HTTP."""
    agents = []
    for index, (agent_id, token) in enumerate(tokens.items()):
        log = open(tmp_path / f"{agent_id}.log", "wb")  # noqa: SIM115 - closed by the caller
        command = [
            sys.executable, "-m", "fedagent", "run", "--server", base, "--agent-id", agent_id,
            "--token", token, "--dataset", "digits", "--num-clients", str(len(tokens)),
            "--client-index", str(index), "--seed", "3", "--poll-wait", "5",
            "--exit-when-training-done", training_id,
        ]  # fmt: skip
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        agents.append((process, log))
    return agents


def _summary_count(page: Any, chart_id: str, label: str) -> int:
    """How many values the chart's text summary reports for a series (0 when it has none)."""
    text = page.locator(f"#{chart_id} .fedchart-summary").inner_text()
    found = re.search(rf"{re.escape(label)}: (\d+) value", text)
    return int(found.group(1)) if found else 0


def _wait_for(predicate: Any, seconds: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def test_an_operator_runs_a_federation_from_the_browser(transactional_db, tmp_path, monkeypatch):
    """Log in, create and start a training with the form, watch the charts grow from live events, see an
    alert arrive and acknowledge it, compare two versions, roll back, and stop the training."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test installs it)")
    from django.contrib.auth import get_user_model
    from django.db import close_old_connections
    from playwright.sync_api import sync_playwright

    from clients.services import agent_create
    from monitoring.models import Alert
    from monitoring.services import alert_raise
    from trainings.models import Training
    from versioning.models import Rollback

    # Playwright's sync API runs an event loop in this thread; the test's own ORM reads block it on purpose.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    get_user_model().objects.create_user("browser-operator", password=PASSWORD, is_staff=True)
    tokens = {f"browser-agent-{i}": agent_create(agent_id=f"browser-agent-{i}")[1] for i in range(3)}

    def training() -> Training:
        close_old_connections()
        return Training.objects.get(name="browser federation")

    agents: list[Any] = []
    with _serve(tmp_path, worker=True) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport=VIEWPORTS["desktop"]).new_page()
            problems = _browser_problems(page, base)
            page.on("dialog", lambda dialog: dialog.accept())  # the Stop button's confirmation
            _login(page, base, "/dashboard/trainings/new/")

            # --- create and start with the form (an error first: shown next to its field) ---
            page.fill("#id_name", "browser federation")
            page.fill("#id_max_rounds", "0")
            page.click("button[name=start]")
            assert "at least 1" in page.locator('[data-field-name="max_rounds"] .field-errors').inner_text()
            page.fill("#id_max_rounds", "500")  # runs until the operator stops it
            page.fill("#id_hidden_sizes", "16")
            page.fill("#id_min_clients_per_round", "3")
            page.fill("#id_max_clients_per_round", "3")
            page.fill("#id_round_timeout_seconds", "60")
            page.select_option("#id_algorithm", "fedavgm")
            assert page.locator("#id_hp_fedavgm__server_momentum").is_visible()
            assert not page.locator("#id_hp_krum__num_malicious").is_visible()
            page.click("button[name=start]")
            page.wait_for_url(re.compile(r".*/dashboard/trainings/[0-9a-f-]{36}/$"))
            created = training()
            assert created.status == Training.Status.RUNNING
            assert created.config["hyperparameters"]["server_momentum"] == 0.9
            training_id = str(created.pk)
            page.wait_for_function("document.getElementById('live-state').textContent === 'live'")
            page.evaluate("window.__sameDocument = true")

            # --- real agents train; the charts grow without a reload ---
            agents = _spawn_agents(base, tokens, training_id, tmp_path)
            _wait_for(
                lambda: (
                    _summary_count(page, "chart-accuracy", "accuracy (central evaluation)") >= 3
                    and _summary_count(page, "chart-participation", "reported") >= 3
                ),
                240,
                "three rounds on the charts",
                tmp_path,
            )
            assert page.evaluate("window.__sameDocument") is True
            assert page.locator("#rounds tbody tr[data-round]").count() >= 3
            assert _summary_count(page, "chart-duration", "round (open to aggregated)") >= 3

            # --- an alert arrives on the alerts page and is acknowledged there ---
            page.goto(f"{base}/dashboard/alerts/?training={training_id}")
            page.wait_for_function("document.getElementById('live-state').textContent === 'live'")
            page.evaluate("window.__sameDocument = true")

            # raised by the real service, in a thread without an event loop (its broadcast uses async_to_sync)
            alert = _in_thread(
                lambda: alert_raise(
                    kind=Alert.Kind.AGENTS_DROPPING,
                    message="browser test: agents are dropping out",
                    training=created,
                    subject=f"training:{training_id}/browser-test",
                )
            )
            row = page.locator(f'#alerts tr[data-alert-id="{alert.pk}"]')
            row.wait_for(timeout=45_000)  # WebSocket on the real stack; the slow poll in embedded mode
            assert page.evaluate("window.__sameDocument") is True
            row.locator("button.acknowledge").click()
            page.wait_for_function(
                f"document.querySelector('#alerts tr[data-alert-id=\"{alert.pk}\"] [data-cell=state]')"
                ".textContent.startsWith('acknowledged')"
            )
            alert.refresh_from_db()
            assert alert.acknowledged_by == "browser-operator"

            # --- compare two versions, then roll back to version 1 ---
            page.goto(f"{base}/dashboard/trainings/{training_id}/versions/")
            page.select_option("#compare-a", "1")
            page.select_option("#compare-b", "2")
            page.click("#compare-form button[type=submit]")
            page.locator("#comparison-tensors tbody tr").first.wait_for()
            assert page.locator("#comparison-tensors tbody tr").count() >= 2  # weights and biases
            assert "Comparison of v1 and v2" in page.locator("#comparison-title").inner_text()
            page.click('button.rollback[data-version="1"]')
            page.fill("#rollback-dialog input[name=reason]", "browser test")
            page.click("#rollback-dialog button[value=confirm]")
            page.locator("#versions-message").wait_for()
            assert "v1" in page.locator("#versions-message").inner_text()
            _wait_for(
                lambda: Rollback.objects.filter(
                    training_id=training_id, status=Rollback.Status.APPLIED
                ).exists(),
                120,
                "the rollback to be applied",
                tmp_path,
            )
            page.goto(f"{base}/dashboard/trainings/{training_id}/versions/")
            assert "browser test" in page.locator("#rollbacks").inner_text()
            assert "rollback" in page.locator("#versions").inner_text()

            # --- stop it from the live page; the Stop button goes away ---
            page.goto(f"{base}/dashboard/trainings/{training_id}/")
            page.click("#stop-form button")
            page.wait_for_function(
                "document.querySelector('[data-field=status]').textContent.trim() === 'stopped'"
            )
            assert page.locator("#stop-form").is_hidden()
            assert training().status == Training.Status.STOPPED

            # --- the health page counts and names the Celery worker (none in the embedded mode) ---
            page.goto(f"{base}/dashboard/health/")
            page.wait_for_function("document.getElementById('health-status').textContent", timeout=30_000)
            if settings.EMBEDDED:
                assert page.inner_text('[data-figure="workers"]') == "\N{EN DASH}"
            else:
                assert page.inner_text('[data-figure="workers"]') == "1"
                assert "@" in page.inner_text('[data-figure="workers-detail"]')  # celery@<host>
            assert problems == []
        finally:
            # ORM reads made while Playwright's loop runs use their own connection (asgiref's context-local
            # storage): close it here, or the test database cannot be dropped at the end of the session.
            connections.close_all()
            browser.close()
            for process, log in agents:
                _stop_process(process)
                log.close()


def _in_thread(function: Any) -> Any:
    """Run a service call in a thread without an event loop (its broadcast uses async_to_sync; the test's
    thread runs Playwright's loop), closing the thread's connection so the test database can be dropped."""

    def run() -> Any:
        try:
            return function()
        finally:
            connections.close_all()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def test_an_operator_manages_agents_and_watches_them_live(
    transactional_db, tmp_path, monkeypatch, make_agent, make_training, eager_celery,
    django_capture_on_commit_callbacks,
):  # fmt: skip
    """The agents list sorts by contribution and updates a row live; an agent's page shows its tasks and
    the reliability chart and quarantines it; an enrolment key is shown once (a reload does not show it)
    and copied; the home page gets a training's start and a system alert without a reload."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test installs it)")
    from django.contrib.auth import get_user_model
    from django.db import close_old_connections
    from django.test import Client
    from playwright.sync_api import sync_playwright

    from clients.models import Agent, EnrollmentKey
    from clients.services import agent_record_outcome
    from monitoring.contributions import agents_leaderboard
    from monitoring.models import Alert
    from monitoring.services import alert_raise
    from monitoring.tests.federation import DIGITS_CONFIG, DigitsAgents, run_round
    from trainings.models import Task
    from trainings.services import training_start

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    get_user_model().objects.create_user("browser-operator", password=PASSWORD, is_staff=True)
    # two real rounds over the agent protocol: tasks, updates, statistics and contributions
    agents = [make_agent(f"ward-{i}") for i in range(3)]
    training = make_training(
        name="agents federation",
        **DIGITS_CONFIG,
        min_clients_per_round=3,
        max_clients_per_round=3,
        max_rounds=2,
    )
    play = DigitsAgents(3, noise_only=[2])
    for _ in range(2):
        run_round(Client(), training, agents, play, django_capture_on_commit_callbacks)
    pending = make_training(name="waiting to start", start=False, min_clients_per_round=1, max_rounds=1)
    by_contribution = [row["agent_id"] for row in agents_leaderboard(order="contribution")["agents"]]
    ward = Agent.objects.get(agent_id="ward-1")

    with _serve(tmp_path) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORTS["desktop"])
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
            page = context.new_page()
            problems = _browser_problems(page, base)
            page.on("dialog", lambda dialog: dialog.accept())  # the status buttons' confirmation
            _login(page, base, "/dashboard/agents/")

            # --- the contribution column sorts (in place), both ways ---
            page.wait_for_function("document.getElementById('live-state').textContent === 'live'")
            page.evaluate("window.__sameDocument = true")
            order = "() => [...document.querySelectorAll('#agents tr[data-agent]')].map(r => r.dataset.agent)"
            page.click("th a[data-sort-key=contribution]")
            assert page.evaluate(order) == by_contribution
            page.click("th a[data-sort-key=contribution]")
            assert page.evaluate(order) == list(reversed(by_contribution))
            assert "sort=contribution&order=desc" in page.url

            # --- a task outcome reaches its row without a reload ---
            _in_thread(lambda: agent_record_outcome(agent_id=ward.pk, outcome="failed"))
            page.wait_for_function(  # the WebSocket on the real stack, the slow check in embedded mode
                "document.querySelector('#agents tr[data-agent=\"ward-1\"] [data-cell=failed]')"
                ".textContent === '1'",
                timeout=45_000,
            )
            assert page.evaluate("window.__sameDocument") is True

            # --- the agent's page: tasks, the reliability chart, quarantine ---
            page.click('#agents a[href="/dashboard/agents/ward-1/"]')
            page.wait_for_url(f"{base}/dashboard/agents/ward-1/")
            assert (
                page.locator("#agent-tasks tbody tr[data-task]").count()
                == Task.objects.filter(agent=ward).count()
                == 2
            )
            assert page.locator("#agent-updates tbody tr[data-update]").count() == 2
            assert _summary_count(page, "chart-reliability", "reliability") == 2
            assert page.locator("#chart-reliability canvas[role=img]").get_attribute("aria-label")
            page.click("button.agent-action[data-action=quarantine]")
            page.wait_for_function(
                "document.querySelector('#agent-page [data-cell=status]').textContent.trim()"
                " === 'quarantined'"
            )
            assert page.locator("button.agent-action[data-action=activate]").is_visible()
            close_old_connections()
            assert Agent.objects.get(agent_id="ward-1").status == Agent.Status.QUARANTINED
            # another outcome: the cards and the chart follow without a reload (2 + 1 completed, 1 failed)
            page.evaluate("window.__sameDocument = true")
            _in_thread(lambda: agent_record_outcome(agent_id=ward.pk, outcome="completed"))
            page.wait_for_function(
                "document.getElementById('agent-counts').textContent.startsWith('3 completed, 1 failed')",
                timeout=45_000,
            )
            assert page.inner_text("#agent-reliability") == f"{4 / 6:.3f}"
            summary = page.locator("#chart-reliability .fedchart-summary").inner_text()
            assert "latest 0.6667 at task 4" in summary
            assert page.evaluate("window.__sameDocument") is True

            # --- an enrolment key: shown once, copied, not shown after a reload ---
            page.goto(f"{base}/dashboard/enrolment/")
            page.fill("#id_key-label", "browser ward")
            page.fill("#id_key-max_uses", "2")
            page.click("button[name=create][value=key]")
            page.locator("#secret-value").wait_for()
            secret = page.input_value("#secret-value")
            assert secret.startswith("fse_")
            page.click("#copy-secret")
            page.wait_for_function("document.getElementById('copy-state').textContent.startsWith('Copied')")
            assert page.evaluate("navigator.clipboard.readText()") == secret
            close_old_connections()
            key = EnrollmentKey.objects.get(label="browser ward")
            assert key.key_hash == hashlib.sha256(secret.encode()).hexdigest()
            page.reload()
            assert page.locator("#secret-value").count() == 0
            assert secret not in page.content()
            enrolled = httpx.post(
                f"{base}/api/v1/agent/enroll", json={"enrollment_key": secret, "agent_id": "ward-from-key"}
            )
            assert enrolled.status_code == 201, enrolled.text

            # --- the home page: a training starts and a system alert arrives without a reload ---
            page.goto(f"{base}/")
            page.wait_for_function("document.getElementById('live-state').textContent === 'live'")
            page.evaluate("window.__sameDocument = true")
            open_before = int(page.inner_text("#open-alerts"))
            _in_thread(lambda: training_start(training_id=pending.pk))
            alert = _in_thread(
                lambda: alert_raise(
                    kind=Alert.Kind.RESOURCE_EXHAUSTED, message="browser test: the disk is filling up",
                    severity=Alert.Severity.CRITICAL, subject="browser-test:disk",
                )
            )  # fmt: skip
            page.wait_for_function(
                f"document.querySelector('#trainings tr[data-training=\"{pending.pk}\"] [data-cell=status]')"
                ".textContent.trim() === 'running'",
                timeout=45_000,
            )
            page.locator(f'#alerts-list li[data-alert-id="{alert.pk}"]').wait_for(timeout=45_000)
            page.wait_for_function(
                f"Number(document.getElementById('open-alerts').textContent) === {open_before + 1}"
            )
            assert page.evaluate("window.__sameDocument") is True

            # --- the new pages with their data at a phone's width: nothing scrolls sideways ---
            phone = browser.new_context(viewport=VIEWPORTS["phone"]).new_page()
            problems += _browser_problems(phone, base)
            _login(phone, base, "/dashboard/enrolment/")
            phone.fill("#id_agent-agent_id", "ward-from-phone")
            phone.click("button[name=create][value=agent]")
            phone.locator("#secret-value").wait_for()
            sideways = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
            widths = {"enrolment with a token": phone.evaluate(sideways)}
            for path in ("/dashboard/agents/ward-1/", "/dashboard/agents/?sort=contribution&order=desc"):
                phone.goto(f"{base}{path}", wait_until="networkidle")
                widths[path] = phone.evaluate(sideways)
            assert all(overflow <= 1 for overflow in widths.values()), widths
            assert problems == []
        finally:
            connections.close_all()
            browser.close()


# A changelist's table wider than its box scrolls inside it; at 1280 px every list must fit without that.
CHANGELIST_OVERFLOW = """() => {
  const table = document.getElementById('result_list');
  if (!table) return null;
  const box = table.closest('.results') || table.parentElement;
  return {overflow: table.scrollWidth - box.clientWidth, rows: table.tBodies[0].rows.length,
          columns: [...table.tHead.rows[0].cells].map(c => c.textContent.trim())};
}"""


def test_every_admin_list_fits_1280_px_with_names_not_ids(
    transactional_db, tmp_path, monkeypatch, make_agent, make_training, eager_celery,
    django_capture_on_commit_callbacks,
):  # fmt: skip
    """Each admin changelist, with rows from two real rounds, a rollback, alerts, health samples and a
    private training, fits 1280 px without scrolling sideways and shows no bare UUID in its rows."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test installs it)")
    from django.contrib import admin
    from django.contrib.auth import get_user_model
    from django.test import Client
    from playwright.sync_api import sync_playwright

    from clients.services import enrollment_key_create
    from monitoring.health import health_read
    from monitoring.models import Alert
    from monitoring.services import alert_raise, health_sample_record
    from monitoring.tests.federation import DIGITS_CONFIG, DigitsAgents, run_round
    from versioning.services import training_rollback

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    user = get_user_model().objects.create_user(
        "browser-operator", password=PASSWORD, is_staff=True, is_superuser=True
    )
    agents = [make_agent(f"hospital-north-{i}") for i in range(3)]
    training = make_training(
        name="admin lists federation", **DIGITS_CONFIG, min_clients_per_round=3, max_clients_per_round=3,
        max_rounds=2,
    )  # fmt: skip
    play = DigitsAgents(3)
    for _ in range(2):
        run_round(Client(), training, agents, play, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        training_rollback(training_id=training.pk, version=1, actor=user, reason="admin list check")
    make_training(name="a private training", privacy_level="low", min_clients_per_round=1)
    enrollment_key_create(label="north wing", max_uses=5, created_by=user)
    alert_raise(
        kind=Alert.Kind.AGENTS_DROPPING, message="2 of 3 agents missed the deadline", training=training
    )
    health_sample_record(reading=health_read(role="worker", cpu_interval=0.1))
    uuid_pattern = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    lists = sorted(
        f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        for model in admin.site._registry
        if model._meta.app_label in ("trainings", "clients", "privacy", "versioning", "monitoring")
    )

    report: dict[str, Any] = {}
    with _serve(tmp_path) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport=VIEWPORTS["desktop"]).new_page()
            problems = _browser_problems(page, base)
            _login(page, base, "/admin/")
            for path in lists:
                page.goto(f"{base}{path}", wait_until="networkidle")
                measured = page.evaluate(CHANGELIST_OVERFLOW)
                if measured is None:  # an empty list (the ledger: no private round ran) has no table
                    continue
                rows = page.locator("#result_list tbody").inner_text()
                found = []
                if measured["overflow"] > 1:
                    found.append(f"{measured['overflow']} px too wide: {measured['columns']}")
                if uuid_pattern.search(rows):
                    found.append(f"a UUID in the rows: {uuid_pattern.search(rows).group(0)}")
                if found:
                    report[path] = found
            assert problems == []
        finally:
            connections.close_all()
            browser.close()
    assert report == {}, "\n".join(f"{path}: {found}" for path, found in report.items())
