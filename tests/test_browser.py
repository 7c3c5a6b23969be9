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

import os
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
from django.db import connection

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
    return {"training_id": str(training.pk)}


@pytest.fixture
def live_server_url(dashboard_data: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    env = dict(os.environ)
    env["DATABASE_URL"] = _database_url()
    env["FEDSITE_MEDIA_ROOT"] = str(settings.MEDIA_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    if settings.EMBEDDED:
        env.pop("REDIS_URL", None)
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port), "--graceful-timeout", "1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
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
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


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
    pages = [
        "/",
        "/dashboard/agents/",
        f"/dashboard/trainings/{dashboard_data['training_id']}/",
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
