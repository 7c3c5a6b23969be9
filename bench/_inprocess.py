"""In-process federation: the real fedsite coordinator and real fedagent agents in one Python process.

The paper reproductions (``bench/reproduce_fedavg.py``, ``bench/reproduce_fedprox.py``) need hundreds of
rounds with 10 to 100 agents on a 2-core machine, so they cannot afford one process per agent and a
network stack. This module keeps everything that decides the results real and removes only the transport:

- The server is the project's Django application, configured as the embedded stack (no ``DATABASE_URL``
  or ``REDIS_URL``: SQLite and eager Celery) in a temporary directory, migrated from scratch. Trainings are
  started with :func:`trainings.services.training_create_and_start`; selection, round settling,
  aggregation (``trainings.aggregate_round``, run eagerly inside the request that closes the round) and
  central evaluation are the server's own code.
- Every agent is a :class:`fedagent.client.FederatedClient` (the same code as ``python -m fedagent run``)
  whose HTTP client talks to ``django.core.wsgi.get_wsgi_application()`` through
  :class:`httpx.WSGITransport`, so every request goes through URL routing, middleware, token
  authentication, the agent views and their validation: ``GET tasks/next?wait=0``, ``GET models/<id>``
  (conditional on the sha256 ``ETag``), multipart ``POST tasks/<id>/update`` or ``POST tasks/<id>/fail``.
  Agents train with :class:`fedagent.trainer.ZooTrainer`, i.e. :func:`flcore.training.sgd_fit`.

What is not real, and why it does not change results:

- The long-poll wake-up. Instead of 100 agents long-polling, the driver reads which agents hold a pending
  task of the current round (one read-only query, the stand-in for the channel-layer wake-up) and has just
  those agents poll with ``wait=0``. Agents that were not selected still send a heartbeat every
  ``heartbeat_seconds`` (less than ``FEDSITE_AGENT_TIMEOUT``), so they stay eligible exactly as polling
  agents would.
- Downloads. Agents share one model cache keyed by sha256: the first agent of a round downloads the new
  version, the others send ``If-None-Match`` and get ``304`` (the server still checks each agent's right
  to the version).
- Time. Rounds run back to back; deadlines (default 300 s) are never reached.
- Concurrency. The agents of a round run in ``workers`` threads (2 by default) of this process rather
  than on their own machines; the server sums updates in agent-id order, so results do not depend on it.
- Connections and query logging. As under ``django.test.Client``, the database connection of a thread is
  kept across requests, and ``settings.DEBUG`` is turned off again after set-up (``DJANGO_DEBUG=1`` only
  supplies the development secret key), as Django's test runner does.

Invariants: :func:`configure_django` runs once per process, before any model is imported, and points the
database and the blob storage at a fresh directory (removed by :func:`remove_work_dir`); nothing here
writes outside it. All randomness of the harness (which agents straggle, how many epochs a straggler runs)
comes from explicit seeds; the agents' own randomness is fedagent's (``task_rng(task seed, agent_id)``),
so a run is reproducible from its seeds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Tiny matmuls (batch 10) gain nothing from BLAS threads and the machine is shared: one thread, set before
# numpy is first imported (the scripts import this module first).
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402 - after the thread settings above

SERVER_URL = "http://testserver"
"""Origin the agents believe they talk to; ``testserver`` is in the default ``ALLOWED_HOSTS``."""

_CONFIGURED: Path | None = None


def remove_work_dir() -> None:
    """Delete the directory :func:`configure_django` created (database and blobs); call at exit."""
    if _CONFIGURED is not None:
        shutil.rmtree(_CONFIGURED, ignore_errors=True)


def configure_django(work_dir: Path | None = None, *, log_level: str = "WARNING") -> Path:
    """Configure and set up the embedded fedsite stack in ``work_dir`` (a new temp dir by default).

    Sets the environment before ``django.setup()``: no ``DATABASE_URL``/``REDIS_URL``/``FEDSITE_CONFIG``
    (SQLite and eager Celery), ``FEDSITE_VAR_DIR`` and ``FEDSITE_MEDIA_ROOT`` inside ``work_dir``,
    ``DJANGO_DEBUG=1`` (built-in development key), ``FEDSITE_LOG_LEVEL``; then runs ``migrate``.

    Returns
    -------
    Path
        The directory holding the SQLite database and the blobs.
    """
    global _CONFIGURED
    if _CONFIGURED is not None:
        return _CONFIGURED
    work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="fedsite-repro-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    for name in ("DATABASE_URL", "REDIS_URL", "FEDSITE_CONFIG"):
        os.environ.pop(name, None)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "fedsite.settings",
            "DJANGO_DEBUG": "1",
            "FEDSITE_VAR_DIR": str(work_dir / "var"),
            "FEDSITE_MEDIA_ROOT": str(work_dir / "media"),
            "FEDSITE_LOG_LEVEL": log_level,
        }
    )
    (work_dir / "var").mkdir(exist_ok=True)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    if not settings.EMBEDDED or settings.DATABASES["default"]["ENGINE"] != "django.db.backends.sqlite3":
        raise RuntimeError("The in-process harness needs the embedded stack (SQLite, eager Celery).")
    call_command("migrate", verbosity=0, interactive=False)
    # DJANGO_DEBUG=1 only provides the built-in development key. Turn DEBUG off again, as Django's test
    # runner does: with it on, the ORM records every SQL statement (about 20% of the harness's CPU time).
    settings.DEBUG = False
    # Eager Celery builds a broker connection object it never uses and warns about the missing hostname.
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    _CONFIGURED = work_dir
    return work_dir


# ---------------------------------------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------------------------------------
@dataclass
class AgentData:
    """One agent's private data: its training split and, optionally, a held-out evaluation split."""

    x_train: np.ndarray[Any, Any]
    y_train: np.ndarray[Any, Any]
    x_eval: np.ndarray[Any, Any] | None = None
    y_eval: np.ndarray[Any, Any] | None = None


class InProcessAgent:
    """A :class:`~fedagent.client.FederatedClient` whose HTTP goes through a WSGI transport to the server.

    Parameters
    ----------
    agent_id, token : str
        The agent's id and bearer token (from :func:`clients.services.agent_create`).
    transport : httpx.BaseTransport
        WSGI transport into the Django application.
    data : AgentData
        Private data; with no evaluation split the agent holds nothing out (``eval_fraction=0``).
    model_cache : OrderedDict
        Shared sha256 -> parameters cache (see the module docstring).
    """

    def __init__(
        self,
        *,
        agent_id: str,
        token: str,
        transport: Any,
        data: AgentData,
        model_cache: OrderedDict[str, Any],
    ) -> None:
        from fedagent.client import FederatedClient
        from fedagent.http import AgentHttpClient
        from fedagent.trainer import FitConfig, FitResult, ZooTrainer

        self.agent_id = agent_id
        self.num_train_examples = len(data.y_train)
        self.local_epochs: int | None = None  # set by the driver: a straggler's reduced local work
        agent = self

        class PlannedTrainer(ZooTrainer):
            """ZooTrainer that runs ``agent.local_epochs`` epochs when the driver set one (stragglers)."""

            def fit(self, x: Any, y: Any, config: FitConfig, rng: np.random.Generator) -> FitResult:
                if agent.local_epochs is not None:
                    config = dataclasses.replace(config, local_epochs=agent.local_epochs)
                return super().fit(x, y, config, rng)

        trainers: dict[str, PlannedTrainer] = {}

        def trainer_factory(model: Any) -> PlannedTrainer:
            # One trainer per model for the agent's lifetime: ZooTrainer.__init__ draws a fresh random
            # model (2 ms for the 2NN) that set_parameters overwrites at once.
            key = json.dumps(model.spec, sort_keys=True)
            if key not in trainers:
                trainers[key] = PlannedTrainer(model.spec)
            return trainers[key]

        self.client = FederatedClient(
            agent_id=agent_id,
            server=SERVER_URL,
            token=token,
            trainer_factory=trainer_factory,
            eval_fraction=0.0,
            poll_wait=0,
            max_attempts=1,
        )
        # FederatedClient has no transport= parameter; swap its HTTP client for one on the WSGI transport.
        self.client._http.close()
        self.client._http = AgentHttpClient(
            SERVER_URL,
            token,
            max_attempts=1,
            transport=transport,
            stop_event=self.client._stop,
            log=self.client._log,
        )
        self.client._model_cache = model_cache
        self.client.add_dataset("private", data.x_train, data.y_train, split="train")
        if data.x_eval is not None and data.y_eval is not None and len(data.y_eval):
            self.client.add_dataset("private", data.x_eval, data.y_eval, split="eval")

    def heartbeat(self) -> None:
        """``POST /api/v1/agent/heartbeat``: marks the agent online."""
        self.client._http.heartbeat("idle")

    def train(self, *, local_epochs: int | None = None) -> Any:
        """Poll once (``wait=0``) and do the task: download, train, upload. Returns the TaskOutcome."""
        self.local_epochs = local_epochs
        try:
            return self.client.run_one(wait=0)
        finally:
            self.local_epochs = None

    def drop(self, reason: str) -> str | None:
        """Poll once and give the task back unworked (``POST tasks/<id>/fail``). Returns the task id."""
        task = self.client._http.next_task(0)
        if task is None:
            return None
        task_id = str(task["task_id"])
        self.client._http.fail_task(task_id, reason)
        return task_id

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundRecord:
    """What the driver saw of one completed round."""

    number: int
    status: str
    metrics: dict[str, float]
    num_trained: int
    num_dropped: int
    wall_seconds: float
    agent_seconds: float
    extra: dict[str, float] = field(default_factory=dict)


RoundPlan = Callable[[int, Sequence[str]], Mapping[str, int | None]]
"""``plan(round_number, selected agent ids)`` -> per agent: ``None`` (full work), an epoch count (partial
work), or ``0`` (drop: give the task back unworked)."""


class InProcessFederation:
    """Agents plus a driver that runs a training round by round through the real coordinator.

    Parameters
    ----------
    agent_data : sequence of AgentData
        One entry per agent; agent ``i`` is named ``f"{prefix}{i:03d}"``.
    prefix : str
        Agent id prefix (unique per federation in a process).
    heartbeat_seconds : float
        How often every agent sends a heartbeat (must stay below ``FEDSITE_AGENT_TIMEOUT``).
    workers : int
        Agents of a round that work at the same time (threads); 1 runs them one after the other.
    """

    def __init__(
        self,
        agent_data: Sequence[AgentData],
        *,
        prefix: str,
        heartbeat_seconds: float = 45.0,
        workers: int = 2,
    ) -> None:
        import httpx
        from django.conf import settings
        from django.core import signals
        from django.core.wsgi import get_wsgi_application
        from django.db import close_old_connections

        from clients.services import agent_create

        self.work_dir = configure_django()
        if heartbeat_seconds >= settings.FEDSITE_AGENT_TIMEOUT:
            raise ValueError(
                f"heartbeat_seconds ({heartbeat_seconds}) must be below FEDSITE_AGENT_TIMEOUT "
                f"({settings.FEDSITE_AGENT_TIMEOUT}), or idle agents drop out of selection."
            )
        self.heartbeat_seconds = heartbeat_seconds
        # Agents of a round work concurrently, as real agents on their own machines do. The 2NN's matmuls
        # release the GIL, so 2 threads use both cores; each thread keeps its own database connection.
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent") if workers > 1 else None
        )
        application = get_wsgi_application()
        # Like django.test.Client: keep the thread's database connection across requests. The WSGI handler
        # otherwise closes it after every request (CONN_MAX_AGE=0), and closing the last SQLite connection
        # checkpoints the WAL: 7 ms per request, more than the whole round's bookkeeping.
        signals.request_started.disconnect(close_old_connections)
        signals.request_finished.disconnect(close_old_connections)
        self.transport = httpx.WSGITransport(app=application)
        self.model_cache: OrderedDict[str, Any] = OrderedDict()
        self.agents: dict[str, InProcessAgent] = {}
        self._agent_pk_to_id: dict[Any, str] = {}
        for index, data in enumerate(agent_data):
            agent, token = agent_create(agent_id=f"{prefix}{index:03d}", actor="bench")
            self.agents[agent.agent_id] = InProcessAgent(
                agent_id=agent.agent_id,
                token=token,
                transport=self.transport,
                data=data,
                model_cache=self.model_cache,
            )
            self._agent_pk_to_id[agent.pk] = agent.agent_id
        self._last_heartbeat = -float("inf")
        self.heartbeat_all()

    # -- agents ------------------------------------------------------------------------------------------
    def heartbeat_all(self) -> None:
        """Every agent sends a heartbeat (what idle real agents do every ``FEDSITE_HEARTBEAT_INTERVAL``)."""
        for agent in self.agents.values():
            agent.heartbeat()
        self._last_heartbeat = time.monotonic()

    def _heartbeat_if_due(self) -> None:
        if time.monotonic() - self._last_heartbeat >= self.heartbeat_seconds:
            self.heartbeat_all()

    def agent_ids_with_pending_task(self, training_id: Any) -> list[str]:
        """Agents holding a pending task in the training's open round (stand-in for the wake-up)."""
        from trainings.models import Task

        pks = Task.objects.filter(round__training_id=training_id, status=Task.Status.PENDING).values_list(
            "agent_id", flat=True
        )
        return sorted(self._agent_pk_to_id[pk] for pk in pks)

    # -- trainings ---------------------------------------------------------------------------------------
    def start(self, configuration: Mapping[str, Any]) -> Any:
        """Validate a training configuration and start it with ``training_create_and_start``."""
        from trainings.configuration import TrainingConfiguration
        from trainings.services import training_create_and_start

        self.heartbeat_all()
        training = training_create_and_start(
            configuration=TrainingConfiguration.from_dict(dict(configuration))
        )
        return training.pk

    def stop(self, training_id: Any, reason: str) -> None:
        """Stop a training that is still running (on errors and interrupts)."""
        from trainings.models import Training
        from trainings.services import training_stop

        if Training.objects.filter(pk=training_id, status=Training.Status.RUNNING).exists():
            training_stop(training_id=training_id, reason=reason)

    def run_round(self, training_id: Any, plan: RoundPlan | None = None) -> RoundRecord | None:
        """Drive the training's current round to its end; None once the training has finished.

        The selected agents (those with a pending task) poll and do their task, ``workers`` at a time; the
        last upload or give-back closes the round, and the eager Celery task aggregates it within that
        request. The server sums updates in agent-id order, so the result does not depend on which finished
        first.
        """
        from trainings.models import Round, Training

        training = Training.objects.get(pk=training_id)
        if training.status != Training.Status.RUNNING:
            return None
        number = training.current_round
        started = time.perf_counter()
        self._heartbeat_if_due()
        selected = self.agent_ids_with_pending_task(training_id)
        if not selected:
            raise RuntimeError(
                f"Round {number} of training {training_id} has no pending task (status "
                f"{Round.objects.get(training_id=training_id, number=number).status}); "
                "are enough agents eligible?"
            )
        decisions = dict(plan(number, selected)) if plan is not None else {}

        def work(agent_id: str) -> tuple[bool, float]:
            """One agent's turn: (trained, seconds in fit); runs in a worker thread."""
            decision = decisions.get(agent_id)
            if decision == 0:
                self.agents[agent_id].drop("straggler: dropped by the FedAvg baseline")
                return False, 0.0
            outcome = self.agents[agent_id].train(local_epochs=decision)
            if outcome is None or outcome.status != "uploaded":
                raise RuntimeError(f"Agent {agent_id} in round {number}: {outcome!r}")
            return True, float((outcome.metrics or {}).get("train_seconds") or 0.0)

        results = (
            list(self._pool.map(work, selected)) if self._pool is not None else list(map(work, selected))
        )
        trained = sum(1 for done, _ in results if done)
        dropped = len(results) - trained
        agent_seconds = sum(seconds for _, seconds in results)
        round_ = Round.objects.get(training_id=training_id, number=number)
        if round_.status != Round.Status.COMPLETED:
            raise RuntimeError(
                f"Round {number} is {round_.status} after every selected agent answered: {round_.error!r}"
            )
        return RoundRecord(
            number=number,
            status=round_.status,
            metrics={k: float(v) for k, v in round_.metrics.items()},
            num_trained=trained,
            num_dropped=dropped,
            wall_seconds=time.perf_counter() - started,
            agent_seconds=agent_seconds,
        )

    def rounds(self, training_id: Any, plan: RoundPlan | None = None) -> Iterator[RoundRecord]:
        """Yield every round until the training finishes (target accuracy, ``max_rounds``, or a stop)."""
        while True:
            record = self.run_round(training_id, plan)
            if record is None:
                return
            yield record

    def current_parameters(self, training_id: Any) -> dict[str, np.ndarray[Any, Any]]:
        """The training's current global model, read from the server's store (operator side)."""
        from trainings.models import Training
        from versioning.services import version_read_parameters

        training = Training.objects.select_related("current_version").get(pk=training_id)
        return version_read_parameters(training.current_version)

    def training_summary(self, training_id: Any) -> dict[str, Any]:
        from trainings.models import Training

        training = Training.objects.get(pk=training_id)
        return {
            "status": training.status,
            "rounds": training.current_round,
            "stop_reason": training.stop_reason,
            "best_accuracy": training.best_accuracy,
        }

    def close(self) -> None:
        """Disable this federation's agents (no later training selects them) and close their clients."""
        from clients.models import Agent
        from clients.services import agent_set_status

        for agent in Agent.objects.filter(agent_id__in=list(self.agents)):
            agent_set_status(agent=agent, status=Agent.Status.DISABLED, actor="bench")
        for client in self.agents.values():
            client.close()
        self.agents.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
