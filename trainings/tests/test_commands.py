"""Management commands and the pieces of ``trainings.simulation`` they stand on (no federation here:
the end-to-end test runs real agents)."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.management import ManagementUtility, call_command
from django.core.management.base import CommandError

from clients.models import Agent, EnrollmentKey
from clients.services import agent_authenticate, agent_enroll
from trainings.models import Training
from trainings.selectors import training_status

VALID_CONFIG = {
    "name": "from the command line",
    "model_type": "logreg",
    "input_dim": 4,
    "num_classes": 3,
    "min_clients_per_round": 1,
    "max_clients_per_round": 2,
    "max_rounds": 2,
}


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def run_as_shell(*args: str, capsys: Any, monkeypatch: Any) -> tuple[int, str, str]:
    """Run a command the way ``manage.py`` does (argv parsing, exit code), in this process."""
    from django.db import connections

    # run_from_argv closes every connection at the end, which would end the test's transaction.
    monkeypatch.setattr(connections, "close_all", lambda: None)
    utility = ManagementUtility(["manage.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        utility.fetch_command(args[0]).run_from_argv(["manage.py", *args])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


# ---------------------------------------------------------------------------------------------------
# create_agent, create_enrollment_key
# ---------------------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_create_agent_prints_a_token_that_authenticates_and_stores_only_its_hash() -> None:
    payload = json.loads(run("create_agent", "lab-node-1", "--json"))

    agent = Agent.objects.get(agent_id="lab-node-1")
    assert payload["agent_id"] == "lab-node-1"
    assert payload["id"] == str(agent.pk)
    assert agent_authenticate(authorization=f"Bearer {payload['token']}") == agent
    assert agent.token_hash == hashlib.sha256(payload["token"].encode()).hexdigest()
    stored = {field.attname: str(getattr(agent, field.attname)) for field in Agent._meta.concrete_fields}
    assert all(payload["token"] not in value for value in stored.values())


@pytest.mark.django_db
def test_create_agent_plain_output_shows_the_token_once_on_its_own_line() -> None:
    output = run("create_agent", "lab-node-2")

    agent = Agent.objects.get(agent_id="lab-node-2")
    tokens = [line for line in output.splitlines() if line.startswith("fsa_")]
    assert len(tokens) == 1
    assert agent_authenticate(authorization=f"Bearer {tokens[0]}") == agent


@pytest.mark.django_db
def test_create_agent_refuses_a_taken_or_invalid_id(make_agent: Any) -> None:
    make_agent("taken")

    with pytest.raises(CommandError, match="already exists"):
        run("create_agent", "taken")
    with pytest.raises(CommandError, match="1 to 64 characters") as invalid:
        run("create_agent", "no spaces allowed")
    assert invalid.value.returncode == 2
    assert Agent.objects.count() == 1


@pytest.mark.django_db
def test_create_enrollment_key_prints_a_key_that_enrolls_up_to_max_uses() -> None:
    payload = json.loads(run("create_enrollment_key", "--label", "lab", "--max-uses", "1", "--json"))

    key = EnrollmentKey.objects.get()
    assert key.label == "lab"
    assert key.key_hash == hashlib.sha256(payload["key"].encode()).hexdigest()
    agent, token = agent_enroll(enrollment_key=payload["key"], agent_id="enrolled-1")
    assert agent_authenticate(authorization=f"Bearer {token}") == agent
    with pytest.raises(Exception, match="used up"):
        agent_enroll(enrollment_key=payload["key"], agent_id="enrolled-2")


@pytest.mark.django_db
def test_create_enrollment_key_rejects_a_non_positive_max_uses() -> None:
    with pytest.raises(CommandError, match="--max-uses") as error:
        run("create_enrollment_key", "--label", "lab", "--max-uses", "0")
    assert error.value.returncode == 2
    assert not EnrollmentKey.objects.exists()


# ---------------------------------------------------------------------------------------------------
# start_training, training_status, stop_training
# ---------------------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_start_training_prints_the_id_of_a_running_training(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(VALID_CONFIG))

    training_id = run("start_training", str(config)).strip()

    training = Training.objects.get(pk=training_id)
    assert training.status == Training.Status.RUNNING
    assert training.name == VALID_CONFIG["name"]
    assert training.config["max_rounds"] == 2


@pytest.mark.django_db
def test_start_training_with_a_bad_config_exits_2_naming_every_bad_field(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**VALID_CONFIG, "max_rounds": 0, "learning_rate": "fast"}))

    code, out, err = run_as_shell("start_training", str(config), capsys=capsys, monkeypatch=monkeypatch)

    assert code == 2
    assert "max_rounds: Must be at least 1" in err
    assert "learning_rate: Must be a finite number" in err
    assert out == ""
    assert not Training.objects.exists()


@pytest.mark.django_db
def test_start_training_with_unreadable_or_invalid_json_exits_2(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")

    code_missing, _, err_missing = run_as_shell(
        "start_training", str(tmp_path / "nope.json"), capsys=capsys, monkeypatch=monkeypatch
    )
    code_broken, _, err_broken = run_as_shell(
        "start_training", str(broken), capsys=capsys, monkeypatch=monkeypatch
    )

    assert (code_missing, code_broken) == (2, 2)
    assert "Cannot read" in err_missing
    assert "not valid JSON" in err_broken


@pytest.mark.django_db
def test_training_status_json_is_the_selector_document(make_agent: Any, make_training: Any) -> None:
    make_agent(), make_agent()
    training = make_training()

    printed = json.loads(run("training_status", str(training.pk), "--json"))

    expected = json.loads(json.dumps(training_status(Training.objects.get(pk=training.pk))))
    assert printed == expected
    assert printed["status"] == "running"
    assert printed["round"]["tasks"]["pending"] == 2


@pytest.mark.django_db
def test_training_status_table_shows_the_status_and_rejects_unknown_ids(make_training: Any) -> None:
    training = make_training(name="table me")

    output = run("training_status", str(training.pk))

    assert "table me" in output
    assert "running" in output
    with pytest.raises(CommandError, match="No training"):
        run("training_status", "00000000-0000-0000-0000-000000000000")


@pytest.mark.django_db
def test_training_status_watch_returns_when_the_training_ends(make_training: Any, monkeypatch: Any) -> None:
    from trainings.management.commands import training_status as command
    from trainings.services import training_stop

    training = make_training()
    sleeps: list[float] = []

    def stop_during_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        training_stop(training_id=training.pk, reason="watched")

    monkeypatch.setattr(command.time, "sleep", stop_during_sleep)
    # Inside the test's transaction autocommit is off, which close_old_connections treats as unusable.
    monkeypatch.setattr(command, "close_old_connections", lambda: None)

    printed = json.loads(run("training_status", str(training.pk), "--watch", "--json", "--interval", "0.1"))

    assert printed["status"] == "stopped"
    assert printed["stop_reason"] == "watched"
    assert sleeps == [0.1]


@pytest.mark.django_db
def test_stop_training_stops_once(make_training: Any) -> None:
    training = make_training()

    output = run("stop_training", str(training.pk), "--reason", "maintenance")

    training.refresh_from_db()
    assert training.status == Training.Status.STOPPED
    assert training.stop_reason == "maintenance"
    assert "stopped" in output
    with pytest.raises(CommandError, match="already stopped"):
        run("stop_training", str(training.pk))


# ---------------------------------------------------------------------------------------------------
# serve: the embedded deadline loop
# ---------------------------------------------------------------------------------------------------
def test_deadline_loop_keeps_ticking_after_a_failure(monkeypatch: Any) -> None:
    from trainings import services
    from trainings.management.commands import serve

    stop = threading.Event()
    calls: list[int] = []
    closed: list[int] = []

    def check() -> dict[str, int]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database went away")
        if len(calls) == 3:
            stop.set()
        return {"opened": 0}

    monkeypatch.setattr(services, "rounds_check_deadlines", check)
    monkeypatch.setattr(serve, "close_old_connections", lambda: closed.append(1))

    thread = threading.Thread(target=serve.deadline_loop, args=(stop, 0.01))
    thread.start()
    thread.join(timeout=5)

    assert not thread.is_alive()
    assert len(calls) == 3
    assert len(closed) == 3


# ---------------------------------------------------------------------------------------------------
# simulation helpers and the chart
# ---------------------------------------------------------------------------------------------------
def test_child_environment_applies_overrides_and_removals(monkeypatch: Any) -> None:
    from trainings.simulation import child_environment

    monkeypatch.setenv("FEDSITE_TEST_KEEP", "kept")
    monkeypatch.setenv("FEDSITE_TEST_DROP", "dropped")

    env = child_environment({"FEDSITE_TEST_DROP": None, "DATABASE_URL": "sqlite:////tmp/x.sqlite3"})

    assert env["FEDSITE_TEST_KEEP"] == "kept"
    assert "FEDSITE_TEST_DROP" not in env
    assert env["DATABASE_URL"] == "sqlite:////tmp/x.sqlite3"


def test_managed_process_is_killed_when_it_ignores_sigterm(tmp_path: Path) -> None:
    from trainings.simulation import ManagedProcess

    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    process = ManagedProcess(
        name="stubborn", argv=[sys.executable, "-c", script], log_path=tmp_path / "p.log", grace_seconds=0.3
    )
    process.start()
    deadline = time.monotonic() + 10
    while "ready" not in (tmp_path / "p.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.02)

    started = time.monotonic()
    code = process.stop()

    assert code == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert not process.running
    assert not process.failed  # we killed it: not the process's own failure


def test_managed_process_that_exits_with_an_error_by_itself_has_failed(tmp_path: Path) -> None:
    from trainings.simulation import ManagedProcess

    process = ManagedProcess(
        name="broken", argv=[sys.executable, "-c", "raise SystemExit(3)"], log_path=tmp_path / "b.log"
    )
    process.start()
    process.process.wait(timeout=10)

    assert process.stop() == 3
    assert process.failed
    assert "exited with code 3" in process.describe_exit()


def test_rounds_are_read_from_the_metric_series() -> None:
    from trainings.simulation import _rounds_from_series

    series = {
        "accuracy": [{"round": 1, "value": 0.5}, {"round": 2, "value": 0.7}],
        "loss": [{"round": 1, "value": 1.5}, {"round": 2, "value": 0.9}],
        "num_agents_reporting": [{"round": 1, "value": 10.0}, {"round": 2, "value": 9.0}],
        "federated_accuracy": [{"round": 2, "value": 0.65}],
    }

    rounds = _rounds_from_series(series)

    assert [r.number for r in rounds] == [1, 2]
    assert (rounds[1].accuracy, rounds[1].loss, rounds[1].agents_reporting) == (0.7, 0.9, 9)
    assert rounds[0].federated_accuracy is None
    assert rounds[1].federated_accuracy == 0.65


def test_training_chart_is_a_png_with_both_panels(tmp_path: Path) -> None:
    from trainings.charts import training_chart_png

    series = {
        "accuracy": [{"round": r, "value": 0.5 + r / 20} for r in range(1, 6)],
        "loss": [{"round": r, "value": 1.0 / r} for r in range(1, 6)],
    }

    path = training_chart_png(
        series=series, path=tmp_path / "out" / "chart.png", title="t", target_accuracy=0.7
    )

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_dataset_configurations_are_valid_and_evaluate_on_their_test_split(dataset: str) -> None:
    from trainings.simulation import dataset_configuration

    configuration = dataset_configuration(
        dataset, name="x", max_rounds=40, target_accuracy=0.93, min_clients=8, max_clients=10
    )

    assert configuration.evaluation_dataset == dataset
    assert configuration.input_dim == {"digits": 64, "mnist": 784}[dataset]
    assert (configuration.min_clients, configuration.max_clients) == (8, 10)


@pytest.mark.django_db
def test_demo_creates_the_staff_user_once_with_a_private_credentials_file(tmp_path: Path) -> None:
    from django.contrib.auth import get_user_model
    from rich.console import Console

    from trainings.management.commands.demo import Command

    # a terminal narrower than the paths: they must still come out in one piece, to be copied
    console = Console(file=io.StringIO(), width=80)
    Command()._ensure_staff_user(tmp_path, console)
    Command()._ensure_staff_user(tmp_path, console)

    user = get_user_model().objects.get(username="demo")
    credentials = (tmp_path / "credentials.txt").read_text()
    password = credentials.split("password: ")[1].split("\n")[0]
    assert user.is_staff
    assert user.check_password(password)
    assert (tmp_path / "credentials.txt").stat().st_mode & 0o777 == 0o600
    printed = console.file.getvalue()
    assert printed.count(password) == 1
    assert f"its password is in {tmp_path / 'credentials.txt'}" in printed
