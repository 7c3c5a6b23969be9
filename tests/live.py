"""What the live-process tests share: ports, the child environment, a private redis-server, agent processes.

The tests in this folder start real processes (an ASGI server, Celery workers, ``python -m fedagent``
agents, a ``redis-server`` of their own) on the test database; this module holds the pieces each of
them used to carry a copy of.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.db import close_old_connections, connection

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(sys.executable).parent

Processes = list[tuple[subprocess.Popen[bytes], Any]]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database_url(*, application_name: str | None = None) -> str:
    """The test database as a URL a child process can open (Postgres only: the e2e tests need one)."""
    db = connection.settings_dict
    host = f"{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    url = f"postgres://{db['USER'] or 'postgres'}@{host}/{db['NAME']}"
    return f"{url}?application_name={application_name}" if application_name else url


def child_env() -> dict[str, str]:
    """The environment of a server, worker or agent process of an end-to-end test."""
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url()
    env["FEDSITE_MEDIA_ROOT"] = str(settings.MEDIA_ROOT)
    env["FEDSITE_DEADLINE_CHECK_SECONDS"] = "2"
    # split every all-updates aggregation into coordinate chunks so the chord path runs on real workers
    env["FEDSITE_CHUNKED_AGGREGATION_BYTES"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for(condition: Callable[[], Any], seconds: float, what: str, detail: Callable[[], str] = str) -> Any:
    """Poll `condition` every 0.1 s until it is truthy (returned) or fail the test with `detail()`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"not within {seconds} s: {what}\n{detail()}")


def wait_healthy(
    base: str, *, process: subprocess.Popen[bytes] | None, log: Path, seconds: float = 60
) -> None:
    """Wait until the server at `base` answers /api/health with 200; fail with its log if it exits first."""

    def healthy() -> bool:
        if process is not None and process.poll() is not None:
            pytest.fail("the server exited:\n" + (log.read_text() if log.exists() else ""))
        try:
            return httpx.get(f"{base}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, seconds, "the server to start", lambda: log.read_text() if log.exists() else "")


def stop(processes: Processes) -> None:
    """SIGTERM every process, wait up to 20 s in all, kill what is left, close the logs."""
    for process, _ in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for process, log in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


class PrivateRedis:
    """A non-persistent ``redis-server`` of one test alone, on its own port, that it stops and starts."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.tmp_path = tmp_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        args = ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [*args, "--bind", "127.0.0.1"],
            cwd=self.tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 10, "redis-server to start")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


def spawn_agents(
    stack: dict[str, Any],
    tokens: dict[str, str],
    training_id: Any,
    *extra: str,
    partition: tuple[str, ...] = ("--partition", "dirichlet", "--alpha", "0.5"),
    seed: str = "3",
    poll_wait: str = "10",
    per_agent: dict[str, tuple[str, ...]] | None = None,
) -> Processes:
    """One ``python -m fedagent run`` process per agent, each on its own shard of digits, over HTTP;
    ``per_agent`` adds arguments for some agents only (an attack, say)."""
    agents: Processes = []
    for index, (agent_id, token) in enumerate(tokens.items()):
        args = [PYTHON, "-m", "fedagent", "run", "--server", stack["base"], "--agent-id", agent_id]
        args += ["--token", token, "--dataset", "digits", "--num-clients", str(len(tokens))]
        args += ["--client-index", str(index), *partition, "--seed", seed, "--poll-wait", poll_wait]
        args += ["--exit-when-training-done", str(training_id), *extra, *(per_agent or {}).get(agent_id, ())]
        log = open(stack["tmp"] / f"{agent_id}.log", "wb")  # noqa: SIM115 - closed in stop()
        process = subprocess.Popen(args, cwd=ROOT, env=stack["env"], stdout=log, stderr=subprocess.STDOUT)
        agents.append((process, log))
    stack["processes"].extend(agents)
    return agents


def wait_until_finished(stack: dict[str, Any], training: Any, seconds: float) -> str:
    """Poll the database until the training ends (or `seconds` pass); return the tails of every log."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        close_old_connections()
        training.refresh_from_db()
        if training.is_terminal:
            break
        time.sleep(1)
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(stack["tmp"].glob("*.log")))
