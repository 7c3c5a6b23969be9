"""Take the screenshots of docs/dashboard.md: a real federation on the embedded default, in Chromium.

    .venv/bin/python docs/screenshots.py            # writes docs/img/dashboard-*.png and admin-*.png

It makes a throw-away embedded site (SQLite, eager Celery) in a temporary directory, an operator and three
agents, starts ``manage.py serve``, and drives Debian's Chromium (``/usr/bin/chromium``, never
``playwright install``) like an operator: creates two trainings with the form, runs real ``fedagent``
processes until both finish, raises one alert, compares two versions, and saves every page at 1280x800
(and the live page at 390x844), makes an enrolment key on the enrolment page (its one showing), and saves
an admin list. PNGs are reduced to a 256-colour palette when Pillow is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, _spawn_agents  # noqa: E402 - shared with the tests

PASSWORD = secrets.token_urlsafe(16)  # a throw-away site; the password lives as long as the script
SETUP = """
import json
from django.contrib.auth import get_user_model
from clients.services import agent_create
get_user_model().objects.create_user("operator", password=%r, is_staff=True, is_superuser=True)
print(json.dumps({f"hospital-{i}": agent_create(agent_id=f"hospital-{i}")[1] for i in range(1, 4)}))
"""
ALERT = """
from monitoring.models import Alert
from monitoring.services import alert_raise
from trainings.models import Training
training = Training.objects.get(name=%r)
alert_raise(kind=Alert.Kind.AGENTS_DROPPING, message="2 of 3 agents missed the deadline of round 4",
            training=training, round_number=4, subject=f"training:{training.pk}/round:4")
alert_raise(kind=Alert.Kind.RESOURCE_EXHAUSTED, severity=Alert.Severity.CRITICAL, subject="disk",
            message="The blob store has 4%% free space (threshold 5%%).")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _manage(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout


def _save(page: Any, path: Path) -> None:
    page.screenshot(path=str(path))
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _create_training(page: Any, base: str, name: str, algorithm: str, rounds: int) -> str:
    page.goto(f"{base}/dashboard/trainings/new/")
    page.fill("#id_name", name)
    page.fill("#id_max_rounds", str(rounds))
    page.fill("#id_hidden_sizes", "32")
    page.fill("#id_min_clients_per_round", "3")
    page.fill("#id_max_clients_per_round", "3")
    page.fill("#id_local_epochs", "2")
    page.fill("#id_learning_rate", "0.1")
    page.select_option("#id_algorithm", algorithm)
    page.click("button[name=start]")
    page.wait_for_url(re.compile(r".*/dashboard/trainings/[0-9a-f-]{36}/$"))
    return page.url.rstrip("/").rsplit("/", 1)[1]


def _run_agents(base: str, tokens: dict[str, str], training_id: str, logs: Path) -> None:
    """Real ``fedagent`` processes (the browser test's), until the training is done."""
    agents = _spawn_agents(base, tokens, training_id, logs)
    for process, log in agents:
        process.wait(timeout=600)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    var = Path(tempfile.mkdtemp(prefix="fedsite-screenshots-"))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY")}
    env.update({"FEDSITE_VAR_DIR": str(var), "PYTHONUNBUFFERED": "1"})
    _manage(env, "migrate", "-v", "0")
    tokens = json.loads(_manage(env, "shell", "-c", SETUP % PASSWORD).strip().splitlines()[-1])
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port), "--graceful-timeout", "1"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            page.goto(f"{base}/admin/login/?next=/")
            page.fill("#id_username", "operator")
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            page.wait_for_url(f"{base}/")

            page.goto(f"{base}/dashboard/health/", wait_until="networkidle")  # a first health sample
            page.goto(f"{base}/dashboard/trainings/new/")
            page.select_option("#id_algorithm", "fedadam")
            page.check("#id_privacy_choice_1")
            page.check("#id_rollback_enabled")
            page.evaluate("window.scrollTo(0, 0)")
            _save(page, args.out / "dashboard-training-form.png")

            first = _create_training(page, base, "digits, FedAvg", "fedavg", 12)
            _run_agents(base, tokens, first, var)
            page.goto(f"{base}/dashboard/health/", wait_until="networkidle")  # another sample, minutes later
            second = _create_training(page, base, "digits, FedAdam", "fedadam", 12)
            _run_agents(base, tokens, second, var)
            _manage(env, "shell", "-c", ALERT % "digits, FedAdam")

            page.goto(f"{base}/dashboard/trainings/{first}/", wait_until="networkidle")
            page.evaluate("document.querySelector('.charts').scrollIntoView()")
            _save(page, args.out / "dashboard-training.png")
            phone = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
            phone.goto(f"{base}/admin/login/?next=/dashboard/trainings/{first}/")
            phone.fill("#id_username", "operator")
            phone.fill("#id_password", PASSWORD)
            phone.click("input[type=submit]")
            phone.wait_for_load_state("networkidle")
            phone.evaluate("document.querySelector('.charts').scrollIntoView()")
            _save(phone, args.out / "dashboard-training-phone.png")

            page.goto(f"{base}/dashboard/trainings/{first}/versions/")
            page.select_option("#compare-a", "4")
            page.select_option("#compare-b", "12")
            page.click("#compare-form button[type=submit]")
            page.locator("#comparison-tensors tbody tr").first.wait_for()
            _save(page, args.out / "dashboard-versions.png")

            for name, path in [
                ("index", "/"),
                ("alerts", "/dashboard/alerts/"),
                ("health", "/dashboard/health/"),
                ("compare", f"/dashboard/compare/?training={first}&training={second}"),
                ("agents", "/dashboard/agents/?sort=contribution&order=desc"),
                ("agent", "/dashboard/agents/hospital-1/"),
            ]:
                page.goto(f"{base}{path}", wait_until="networkidle")
                _save(page, args.out / f"dashboard-{name}.png")
            # the enrolment page right after making a key: the one time its secret is shown
            page.goto(f"{base}/dashboard/enrolment/")
            page.fill("#id_key-label", "north wing")
            page.fill("#id_key-max_uses", "10")
            page.click("button[name=create][value=key]")
            page.locator("#secret-value").wait_for()
            _save(page, args.out / "dashboard-enrolment.png")
            page.goto(f"{base}/admin/trainings/round/", wait_until="networkidle")
            _save(page, args.out / "admin-rounds.png")
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    for png in sorted([*args.out.glob("dashboard-*.png"), *args.out.glob("admin-*.png")]):
        print(f"{png.relative_to(ROOT)}  {png.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
