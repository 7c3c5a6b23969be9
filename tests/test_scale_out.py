"""Scale out: two ASGI processes and two Celery workers, each started as if on a host of its own.

Every process gets its own port, its own blob-store path (``FEDSITE_MEDIA_ROOT``: a symbolic link to one
shared directory, as each host would mount the same network share at its own path) and its own worker
name; they share only Postgres, Redis and the blob store. Half of the agents talk to one web process and
half to the other, every round needs all of them, and only one worker runs beat. The training must
complete with every round holding updates that arrived through both web processes, aggregated by both
workers (each worker's log names the aggregation tasks it ran; if the broker gave the first rounds to one
worker only, that worker is drained mid-training, so the rest must go to the other), one version per round.
docs/operations.md "Scale out" says how to deploy it so.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from tests.live import (
    BIN,
    ROOT,
    PrivateRedis,
    child_env,
    free_port,
    spawn_agents,
    stop,
    wait_for,
    wait_healthy,
    wait_until_finished,
)

pytestmark = pytest.mark.e2e

ROUNDS = 6
AGENTS_PER_HOST = 2
AGGREGATION_TASK = re.compile(r"Task (trainings\.\w*aggregat\w*)\[[0-9a-f-]+\] succeeded")


def _host_env(stack: dict[str, Any], host: str) -> dict[str, str]:
    """The environment of a process on `host`: its own view of the shared blob store."""
    mount = stack["tmp"] / host / "blobs"
    if not mount.exists():
        mount.parent.mkdir(parents=True, exist_ok=True)
        mount.symlink_to(stack["shared_blobs"], target_is_directory=True)
    env = dict(stack["env"])
    env["FEDSITE_MEDIA_ROOT"] = str(mount)
    return env


def _spawn(stack: dict[str, Any], name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(stack["tmp"] / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    stack["processes"].append((process, log))
    return process


@pytest.fixture
def two_hosts(transactional_db: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A private Redis; on each of two "hosts" one ASGI server and one Celery worker (beat on host A)."""
    redis = PrivateRedis(tmp_path).start()
    # the test process writes the initial version where its settings say: that directory is the share
    shared = Path(settings.MEDIA_ROOT)
    shared.mkdir(parents=True, exist_ok=True)
    env = child_env()
    env.update(
        {
            "REDIS_URL": redis.url,
            "FEDSITE_CHANNEL_PREFIX": f"scaleout{redis.port}",
            "FEDSITE_DEADLINE_CHECK_SECONDS": "1",
        }
    )
    stack: dict[str, Any] = {
        "env": env,
        "tmp": tmp_path,
        "processes": [],
        "shared_blobs": shared,
        "web": {},
        "workers": {},
    }
    try:
        for host in ("host-a", "host-b"):
            host_env = _host_env(stack, host)
            port = free_port()
            uvicorn = [str(BIN / "uvicorn"), "fedsite.asgi:application", "--host", "127.0.0.1"]
            uvicorn += ["--port", str(port), "--lifespan", "off", "--log-level", "warning"]
            server = _spawn(stack, f"{host}-web", uvicorn, host_env)
            worker = [str(BIN / "celery"), "-A", "fedsite", "worker", "-Q", "aggregation,privacy,default"]
            worker += ["--concurrency", "1", "-l", "info", "-n", f"{host}@%h"]
            if host == "host-a":
                worker += ["-B", "--schedule", str(tmp_path / "beat-schedule")]
            stack["workers"][host] = _spawn(stack, f"{host}-worker", worker, host_env)
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, process=server, log=tmp_path / f"{host}-web.log")
            stack["web"][host] = base
        yield stack
    finally:
        stop(stack["processes"])
        redis.stop()


def test_a_training_runs_across_two_web_processes_and_two_workers(two_hosts: dict[str, Any]) -> None:
    from clients.services import agent_create
    from trainings.configuration import TrainingConfiguration
    from trainings.models import ClientUpdate, Round, Training
    from trainings.services import training_create_and_start

    hosts = {
        host: {
            f"{host}-agent-{i}": agent_create(agent_id=f"{host}-agent-{i}")[1] for i in range(AGENTS_PER_HOST)
        }
        for host in two_hosts["web"]
    }
    training = training_create_and_start(
        configuration=TrainingConfiguration.from_dict(
            {
                "name": "scale-out",
                "model_type": "mlp",
                "input_dim": 64,
                "num_classes": 10,
                "hidden_sizes": [32],
                "min_clients_per_round": 2 * AGENTS_PER_HOST,
                "max_clients_per_round": 2 * AGENTS_PER_HOST,
                "max_rounds": ROUNDS,
                "local_epochs": 2,
                "batch_size": 16,
                "learning_rate": 0.1,
                "round_timeout_seconds": 120,
                "evaluation_dataset": "digits",
                "seed": 4,
            }
        )
    )
    # each host's agents shard digits among themselves; every agent sees only its own web process
    for host, tokens in hosts.items():
        agents_stack = {**two_hosts, "base": two_hosts["web"][host]}
        spawn_agents(
            agents_stack,
            tokens,
            training.pk,
            partition=("--partition", "iid"),
            seed=str(21 + list(hosts).index(host)),
        )

    def aggregations(host: str) -> list[str]:
        return AGGREGATION_TASK.findall((two_hosts["tmp"] / f"{host}-worker.log").read_text())

    # The broker hands each task to whichever worker asks first, so one worker may take every round. Once
    # one has aggregated a round, drain it (SIGTERM: a warm shutdown, as an operator drains a host) unless
    # the other has aggregated too: the rounds left must then be aggregated by the other worker.
    first = wait_for(
        lambda: next((host for host in two_hosts["workers"] if aggregations(host)), None),
        240,
        "a first aggregation",
    )
    if not all(aggregations(host) for host in two_hosts["workers"]):
        drained = two_hosts["workers"][first]
        drained.terminate()
        drained.wait(timeout=60)
    logs = wait_until_finished(two_hosts, training, 300)
    assert training.status == Training.Status.COMPLETED, f"{training.status} {training.stop_reason}\n{logs}"

    completed = list(
        Round.objects.filter(training=training, status=Round.Status.COMPLETED).order_by("number")
    )
    assert [r.number for r in completed] == list(range(1, ROUNDS + 1)), logs
    for round_ in completed:
        senders = set(ClientUpdate.objects.filter(round=round_).values_list("agent__agent_id", flat=True))
        for host, tokens in hosts.items():
            assert senders & tokens.keys(), f"round {round_.number} has no update through {host}\n{logs}"
    assert training.versions.count() == ROUNDS + 1
    assert training.best_accuracy is not None and training.best_accuracy > 0.5

    # both workers aggregated: each one's log names aggregation tasks it ran to success
    ran = {host: aggregations(host) for host in two_hosts["workers"]}
    assert all(ran.values()), f"aggregation tasks per worker: {ran}\n{logs}"
    # and they wrote through their own paths into the one store: every version's blob is in it
    for version in training.versions.all():
        assert (Path(two_hosts["shared_blobs"]) / version.blob_name).is_file(), version.blob_name
