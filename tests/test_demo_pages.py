"""What a ``make demo`` user gets: the embedded default (SQLite, eager Celery, in-memory channels, no
secret key, DEBUG off), a real federation, and a dashboard whose every linked page opens.

The demo runs as a user would run it (``manage.py demo`` with none of the stack's variables set); the
test logs in with the credentials the demo wrote, then follows every same-origin link and asset from the
front page, two levels deep, and asks that none answers an error.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.live import ROOT, free_port

pytestmark = pytest.mark.e2e


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.pages: list[str] = []
        self.assets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a" and values.get("href"):
            self.pages.append(values["href"] or "")
        elif tag in ("script", "img") and values.get("src"):
            self.assets.append(values["src"] or "")
        elif tag == "link" and values.get("href"):
            self.assets.append(values["href"] or "")


def _user_environment(tmp_path: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "FEDSITE_")) and key not in {"DATABASE_URL", "REDIS_URL"}
    }
    env["FEDSITE_VAR_DIR"] = str(tmp_path / "var")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _log_in(client: httpx.Client, base: str, username: str, password: str) -> None:
    login = client.get(f"{base}/admin/login/?next=/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text)
    assert token, login.text[:500]
    response = client.post(
        f"{base}/admin/login/?next=/",
        data={"csrfmiddlewaretoken": token.group(1), "username": username, "password": password, "next": "/"},
        headers={"Referer": f"{base}/admin/login/"},
    )
    assert response.status_code == 302, response.text[:500]


def _crawl(client: httpx.Client, base: str) -> dict[str, int]:
    """Every same-origin page linked from the front page, two levels deep, and every asset they load."""
    seen: dict[str, int] = {}
    frontier = [f"{base}/"]
    for _depth in range(3):
        found: list[str] = []
        for url in frontier:
            if url in seen:
                continue
            response = client.get(url)
            seen[url] = response.status_code
            if "text/html" not in response.headers.get("content-type", ""):
                continue
            links = _Links()
            links.feed(response.text)
            for asset in links.assets:
                asset_url = urljoin(url, asset)
                if urlsplit(asset_url).netloc == urlsplit(base).netloc and asset_url not in seen:
                    seen[asset_url] = client.get(asset_url).status_code
            for href in links.pages:
                target = urljoin(url, href).split("#")[0]
                parts = urlsplit(target)
                if parts.netloc != urlsplit(base).netloc or "logout" in parts.path:
                    continue
                # the admin's own pages are Django's; follow its index, not every changelist filter
                if parts.path.startswith("/admin/") and parts.path.count("/") > 3:
                    continue
                found.append(target)
        frontier = found
    return seen


def test_make_demo_runs_embedded_and_every_dashboard_page_it_links_opens(tmp_path):
    port = free_port()
    out = tmp_path / "demo"
    log = open(tmp_path / "demo.log", "wb")  # noqa: SIM115 - closed below
    demo = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "demo",
            "--agents",
            "2",
            "--max-rounds",
            "2",
            "--target-accuracy",
            "0.999",
            "--port",
            str(port),
            "--out",
            str(out),
            "--linger",
            "120",
        ],
        cwd=ROOT,
        env=_user_environment(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not (out / "summary.json").exists():
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "demo.log").read_text()[-3000:]
            time.sleep(1)
        credentials = dict(
            line.split(": ", 1) for line in (out / "credentials.txt").read_text().splitlines() if ": " in line
        )
        with httpx.Client(timeout=30, follow_redirects=False) as client:
            _log_in(client, base, credentials["username"], credentials["password"])
            statuses = _crawl(client, base)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGTERM)
            try:
                demo.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()
        log.close()

    training_pages = [url for url in statuses if "/dashboard/trainings/" in url]
    assert training_pages, f"the front page links no training: {sorted(statuses)}"
    assert any("/dashboard/agents/" in url for url in statuses)
    assert any("/static/" in url for url in statuses)
    broken = {url: code for url, code in statuses.items() if code >= 400}
    assert broken == {}, (tmp_path / "demo.log").read_text()[-3000:]
