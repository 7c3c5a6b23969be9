"""``python -m fedagent`` as a subprocess against the fake server: signals, exit codes, a real round."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedagent.tests.conftest import DIGITS_SPEC
from fedagent.tests.fake_server import FakeAgentServer
from flcore.parameters import Parameters

REPO = Path(__file__).resolve().parents[2]


def agent_command(
    server: FakeAgentServer | str, *extra: str, token: str = "good-token", agent_id: str = "agent_001"
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedagent",
        "run",
        "--server",
        server if isinstance(server, str) else server.url,
        "--agent-id",
        agent_id,
        "--token",
        token,
        "--dataset",
        "digits",
        "--num-clients",
        "4",
        "--client-index",
        "1",
        "--partition",
        "iid",
        "--seed",
        "0",
        *extra,
    ]


def start(command: list[str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDAGENT_")}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_long_poll_exits_0_promptly(fake_server: FakeAgentServer, sig: signal.Signals) -> None:
    process = start(agent_command(fake_server, "--poll-wait", "30"))
    try:
        fake_server.wait_for_request("GET", "/api/v1/agent/tasks/next", timeout=30)
        time.sleep(0.2)  # inside the long-poll now
        sent = time.monotonic()
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=10)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, stderr
    assert took < 10, f"took {took:.1f}s to exit"  # the long-poll alone would take 30 s
    assert "stopped (signal)" in stderr


def test_run_one_task_through_the_command_line(
    fake_server: FakeAgentServer, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model, training_id="training-9", round_number=4)

    process = start(agent_command(fake_server, "--max-tasks", "1", "--poll-wait", "5"))
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr
    upload = fake_server.uploads[task["task_id"]]
    assert upload.meta["num_examples"] > 0
    # Structured logs: lines about the task carry its training and round.
    task_lines = [line for line in stderr.splitlines() if "update uploaded" in line]
    assert task_lines and "agent_id=agent_001 training_id=training-9 round=4" in task_lines[0]


def test_bad_token_exits_3(fake_server: FakeAgentServer) -> None:
    process = start(agent_command(fake_server, token="wrong"))
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 3, stderr
    assert "Authorization: Bearer" in stderr  # the server's message, saying what to do


def test_unreachable_server_exits_5(tmp_path: Path) -> None:
    server = FakeAgentServer()
    url = server.url
    server.httpd.server_close()  # nothing listens on that port any more
    command = [
        sys.executable,
        "-m",
        "fedagent",
        "enroll",
        "--server",
        url,
        "--agent-id",
        "a",
        "--enrollment-key",
        "k",
        "--max-attempts",
        "2",
    ]
    process = start(command)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 5, stderr


def test_agent_started_before_its_server_waits_for_it(global_params: Parameters) -> None:
    with socket.socket() as probe:  # a port nothing listens on (yet)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    extra = ("--max-tasks", "1", "--poll-wait", "1", "--max-attempts", "1", "--wait-for-server", "60")
    process = start(agent_command(url, *extra))
    try:
        time.sleep(2.0)  # the agent loads its data and finds nothing listening
        assert process.poll() is None, process.communicate()[1]
        server = FakeAgentServer(port=port).start()
        try:
            task = server.add_task(
                server.add_model(global_params, DIGITS_SPEC), training_id="t", round_number=1
            )
            _, stderr = process.communicate(timeout=60)
        finally:
            server.stop()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, stderr
    assert "waiting up to 60s for the server" in stderr
    assert server.uploads[task["task_id"]].meta["num_examples"] > 0


def test_wait_for_server_gives_up_with_exit_5() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = start(agent_command(url, "--max-attempts", "1", "--wait-for-server", "1"))
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 5, stderr
    assert "did not answer within 1s" in stderr


def test_enroll_prints_the_token(fake_server: FakeAgentServer) -> None:
    command = [
        sys.executable,
        "-m",
        "fedagent",
        "enroll",
        "--server",
        fake_server.url,
        "--agent-id",
        "agent_042",
        "--enrollment-key",
        "enroll-me",
    ]
    process = start(command)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr
    reply = json.loads(stdout)
    assert fake_server.tokens[reply["token"]] == "agent_042"

    again = start(command)
    _, stderr = again.communicate(timeout=60)
    assert again.returncode == 4, stderr


def test_enroll_with_token_file_then_reuse(fake_server: FakeAgentServer, tmp_path: Path) -> None:
    token_file = tmp_path / "agent.token"
    command = agent_command(fake_server, "--stop-when-idle-for", "0", "--poll-wait", "0", agent_id="agent_tf")
    token_at = command.index("--token")
    del command[token_at : token_at + 2]
    command += ["--token-file", str(token_file), "--enrollment-key", "enroll-me"]

    first = start(command)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    token = token_file.read_text().strip()
    assert fake_server.tokens[token] == "agent_tf"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"

    second = start(command)  # reads the token; enrolling again would be a 409 (exit 4)
    _, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr
    assert len(fake_server.requests_to("POST", "/api/v1/agent/enroll")) == 1


def _training_task(server: FakeAgentServer, params: Parameters, local_epochs: int) -> dict[str, object]:
    model = server.add_model(params, DIGITS_SPEC)
    config = {"local_epochs": local_epochs, "batch_size": 16, "learning_rate": 0.05, "seed": 1}
    return server.add_task(model, config=config)


def test_sigterm_while_training_finishes_the_task_then_exits_0(
    fake_server: FakeAgentServer, global_params: Parameters
) -> None:
    task = _training_task(fake_server, global_params, local_epochs=1500)  # about 2 s of training
    process = start(agent_command(fake_server, "--poll-wait", "30"))
    try:
        fake_server.wait_for_request("GET", "/api/v1/agent/models/", timeout=30)
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, stderr
    assert task["task_id"] in fake_server.uploads
    assert fake_server.failures == []


def test_second_sigterm_abandons_the_task_and_gives_it_back(
    fake_server: FakeAgentServer, global_params: Parameters
) -> None:
    task = _training_task(fake_server, global_params, local_epochs=200_000)  # minutes of training
    process = start(agent_command(fake_server, "--poll-wait", "30"))
    try:
        fake_server.wait_for_request("GET", "/api/v1/agent/models/", timeout=30)
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, stderr
    assert took < 10  # the training alone would take minutes
    assert task["task_id"] not in fake_server.uploads
    assert [task_id for task_id, _ in fake_server.failures] == [task["task_id"]]
    assert "stopped (signal): 1 task(s), 0 uploaded" in stderr and "1 abandoned" in stderr


def test_the_command_line_imports_only_what_run_needs() -> None:
    from fedagent.cli import SECAGG_DROP_PHASES
    from fedagent.secagg import DROP_PHASES

    assert SECAGG_DROP_PHASES == DROP_PHASES
    # every agent process of a demo pays its imports: the heavy optional ones wait until they are used
    probe = (
        "import sys; import fedagent.cli; from flcore.data import load_digits; load_digits(); "
        "print(sorted(m for m in ('scipy.special', 'sklearn', 'fedagent.secagg', 'flcore.dp', "
        "'cryptography', 'asyncio') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]", result.stdout
