"""The federated-learning agent: poll for a task, train locally, upload the update, repeat.

One task, as agent protocol v1 describes it (``docs/agent-protocol.md``):

1. long-poll ``GET tasks/next?wait=``;
2. download the global model (cached by SHA-256, revalidated with ``If-None-Match``) and check that its
   SHA-256 is the one the task announced;
3. evaluate it on the held-out split (federated evaluation, reported with the update);
4. train locally with an RNG seeded from the task's seed and this agent's id;
5. upload the delta (trained minus global), with ``num_examples`` and metrics, as multipart.

Invariants: a task is either uploaded, given back with ``POST tasks/<id>/fail`` saying why, or left
alone because the server said it is closed or no longer ours; the uploaded delta is float32, finite and
has the global model's names and shapes; nothing but the stop request, a signal or a fatal server
answer (401, 403 on polling) ends :meth:`FederatedClient.run` early.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fedagent.dataset import LocalDataset
from fedagent.errors import (
    AgentApiError,
    AgentConnectionError,
    AgentError,
    AgentStopped,
    ModelIntegrityError,
    ProtocolError,
)
from fedagent.http import AgentHttpClient
from fedagent.logs import ContextLogger
from fedagent.protocol import TERMINAL_TRAINING_STATUSES, ModelRef, Task, validate_agent_id
from fedagent.stragglers import StragglerPolicy, straggler_rng
from fedagent.trainer import FitConfig, Trainer, ZooTrainer
from flcore.errors import FlcoreError
from flcore.parameters import Parameters, ParameterSpec, from_bytes, sha256_hex, subtract, to_bytes

if TYPE_CHECKING:
    from fedagent.secagg import SecAggParty

#: Environment variables read when the matching constructor argument is not given.
ENV_SERVER = "FEDAGENT_SERVER"
ENV_TOKEN = "FEDAGENT_TOKEN"  # noqa: S105 (a variable name, not a secret)
ENV_ENROLLMENT_KEY = "FEDAGENT_ENROLLMENT_KEY"

#: Heartbeat period used until the server says otherwise, in seconds.
DEFAULT_HEARTBEAT_INTERVAL = 30.0
#: Safetensors header allowance on top of the raw tensor bytes when downloading a model.
MODEL_HEADER_ALLOWANCE = 1024 * 1024
#: Longest pause between two tries of :meth:`FederatedClient.wait_for_server`, in seconds.
SERVER_WAIT_INTERVAL = 0.25
#: Downloaded models kept in memory (the current one and the previous, for overlapping trainings).
MODEL_CACHE_SIZE = 2

#: Task kinds of secure aggregation start with this; fedagent.secagg (cryptography and flcore.secagg, a few
#: hundred milliseconds of imports) is loaded only when such a task or a ``secagg`` party shows up.
SECAGG_KIND_PREFIX = "secagg_"
#: What an agent reports with a masked input: its evaluation of the round's model, never of its update.
EVALUATION_METRICS = ("eval_accuracy", "eval_loss", "eval_num_examples")

TrainerFactory = Callable[[ModelRef], Trainer]
"""Builds the :class:`Trainer` for a task's model from ``task.model`` (``spec`` is None for custom models)."""

UpdateTransform = Callable[[Parameters], Parameters]
"""Applied to the delta before upload (local DP, compression, ...); must keep names, shapes and float32."""


class _Interrupted(BaseException):
    """Raised by the signal handler to abort a blocking wait; ``except Exception`` does not catch it."""


def task_rng(seed: int, agent_id: str) -> np.random.Generator:
    """Return the generator for local training: seeded by the task's ``seed`` and this agent's id.

    Two agents given the same task seed draw different minibatches; the same agent re-running the same task
    draws the same ones. The agent id enters through its SHA-256, so the mapping is stable across
    processes (unlike ``hash()``).
    """
    agent_entropy = int.from_bytes(hashlib.sha256(agent_id.encode("utf-8")).digest()[:16], "big")
    return np.random.default_rng(np.random.SeedSequence([seed, agent_entropy]))


def _finite_or_none(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    return float(value) if math.isfinite(float(value)) else None


@dataclass(frozen=True)
class TaskOutcome:
    """What became of one task.

    Attributes
    ----------
    task_id, training_id : str
        Identifiers (``training_id`` is ``""`` when the task could not be parsed).
    round : int
        The task's round (-1 when unknown).
    status : str
        ``"uploaded"`` (accepted by the server), ``"closed"`` (the round closed first: 409 ``task_closed``),
        ``"failed"`` (given back with ``POST fail``), ``"rejected"`` (the server refused the update or the
        model and the task is no longer ours), or ``"abandoned"`` (the agent stopped mid-task).
    detail : str
        Why, for anything but ``"uploaded"``; for ``"uploaded"``, set when the server already held
        another update of this agent for the task (409 ``update_conflict``: it keeps the first).
    update_sha256 : str or None
        SHA-256 of the update the server holds for the task.
    num_examples : int
        Training examples used.
    metrics : dict
        The metrics sent in ``meta``.
    """

    task_id: str
    training_id: str
    round: int
    status: str
    detail: str = ""
    update_sha256: str | None = None
    num_examples: int = 0
    metrics: dict[str, float | int | None] = field(default_factory=dict)


@dataclass
class RunStats:
    """Counters of one :meth:`FederatedClient.run`.

    Attributes
    ----------
    tasks_received : int
        Tasks handed out by the server.
    tasks_uploaded, tasks_closed, tasks_failed, tasks_rejected, tasks_abandoned : int
        Tasks per :attr:`TaskOutcome.status`.
    empty_polls : int
        Polls answered 204.
    server_errors : int
        Polls that failed after all retries (server down or overloaded); the loop waited and went on.
    stop_reason : str
        ``"max_tasks"``, ``"idle"``, ``"training_done"``, ``"stopped"`` (``stop()``) or ``"signal"``.
    elapsed_seconds : float
        Wall time of the run.
    outcomes : list of TaskOutcome
        One per task, in order.
    """

    tasks_received: int = 0
    tasks_uploaded: int = 0
    tasks_closed: int = 0
    tasks_failed: int = 0
    tasks_rejected: int = 0
    tasks_abandoned: int = 0
    empty_polls: int = 0
    server_errors: int = 0
    stop_reason: str = ""
    elapsed_seconds: float = 0.0
    outcomes: list[TaskOutcome] = field(default_factory=list)

    def record(self, outcome: TaskOutcome) -> None:
        """Count one task's outcome."""
        self.tasks_received += 1
        counter = f"tasks_{outcome.status}"
        setattr(self, counter, getattr(self, counter) + 1)
        self.outcomes.append(outcome)


class FederatedClient:
    """A federated-learning agent speaking agent protocol v1.

    Parameters
    ----------
    agent_id : str
        This agent's id (1-64 characters from ``[A-Za-z0-9_.-]``).
    server : str, optional
        Server root URL; default ``$FEDAGENT_SERVER``.
    token : str, optional
        Bearer token; default ``$FEDAGENT_TOKEN``. Without one, :meth:`connect` enrolls with
        ``enrollment_key``.
    enrollment_key : str, optional
        Key to enroll with when there is no token; default ``$FEDAGENT_ENROLLMENT_KEY``.
    trainer_factory : callable, optional
        ``factory(task.model) -> Trainer``; by default a :class:`ZooTrainer` for ``task.model.spec``
        (tasks for a custom model, whose spec is null, are given back without a factory).
    eval_fraction : float
        Held-out fraction of the training data when no ``split="eval"`` dataset is added.
    poll_wait : float
        Long-poll ``wait``, in seconds (0-60).
    heartbeat_interval : float, optional
        Heartbeat period in seconds; by default the server's.
    logger : logging.Logger, optional
        Where to log; default ``logging.getLogger("fedagent.client")``.
    update_transform : callable, optional
        Applied to the delta before upload (e.g. local DP noise); default none.
    capabilities : dict, optional
        Reported at enrollment and in heartbeats, merged with the dataset sizes.
    seed : int, optional
        Seed of the hold-out split; default derived from ``agent_id``.
    timeout : float
        HTTP timeout, in seconds.
    max_attempts : int
        Attempts per HTTP request (see :class:`~fedagent.http.AgentHttpClient`).
    backoff_base, backoff_max : float
        Back-off of retries, in seconds.
    straggler : StragglerPolicy, optional
        Simulate a straggler (FedProx experiments): on each task, with the policy's probability, train only
        part of the local work, or give the task back when ``drop`` is set; default never
        (see :mod:`fedagent.stragglers`).
    secagg : SecAggParty, optional
        This agent's secure-aggregation side (its Ed25519 identity key, registered at :meth:`connect`);
        without it, secure-aggregation tasks are given back.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        server: str | None = None,
        token: str | None = None,
        enrollment_key: str | None = None,
        trainer_factory: TrainerFactory | None = None,
        eval_fraction: float = 0.2,
        poll_wait: float = 30,
        heartbeat_interval: float | None = None,
        logger: logging.Logger | None = None,
        update_transform: UpdateTransform | None = None,
        capabilities: dict[str, Any] | None = None,
        seed: int | None = None,
        timeout: float = 30.0,
        max_attempts: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        straggler: StragglerPolicy | None = None,
        secagg: SecAggParty | None = None,
    ) -> None:
        self.agent_id = validate_agent_id(agent_id)
        server = server or os.environ.get(ENV_SERVER)
        if not server:
            raise ValueError(f"No server URL: pass server=... or set ${ENV_SERVER}.")
        if not 0 <= poll_wait <= 60:
            raise ValueError(f"poll_wait must be between 0 and 60 seconds. Found {poll_wait!r}.")
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive. Found {heartbeat_interval!r}.")
        self.server = server
        self.enrollment_key = enrollment_key or os.environ.get(ENV_ENROLLMENT_KEY)
        self.trainer_factory = trainer_factory
        self.poll_wait = poll_wait
        self.update_transform = update_transform
        self.straggler = straggler
        self.secagg = secagg
        self.capabilities = dict(capabilities or {})
        self._heartbeat_override = heartbeat_interval
        self.heartbeat_interval = heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL
        if seed is None:
            seed = int.from_bytes(hashlib.sha256(agent_id.encode("utf-8")).digest()[:8], "big")
        self.data = LocalDataset(eval_fraction=eval_fraction, seed=seed)
        self._log = ContextLogger(logger or logging.getLogger("fedagent.client"), {"agent_id": agent_id})
        self._stop = threading.Event()
        self._http = AgentHttpClient(
            server,
            token or os.environ.get(ENV_TOKEN),
            timeout=timeout,
            max_attempts=max_attempts,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            stop_event=self._stop,
            log=self._log,
        )
        self._timeout = timeout
        self._connected = False
        self._state = "idle"
        self._interruptible = False
        self._finishing = False
        self._signals_received = 0
        self._model_cache: OrderedDict[str, Parameters] = OrderedDict()
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    # -- set-up ---------------------------------------------------------------------------------------

    @property
    def token(self) -> str | None:
        """The bearer token in use (set by :meth:`connect` after enrolling)."""
        return self._http.token

    def add_dataset(self, name: str, x: npt.ArrayLike, y: npt.ArrayLike, split: str = "train") -> None:
        """Add private examples; several datasets are concatenated per split.

        If no dataset is added with ``split="eval"``, a seeded ``eval_fraction`` of the training examples is
        held out for federated evaluation.
        """
        self.data.add(name, x, y, split)

    def _capabilities(self) -> dict[str, Any]:
        return {**self.capabilities, "data": self.data.summary(), "sdk": "fedagent"}

    def connect(self, *, wait_for_server: float = 0.0) -> None:
        """Enroll if there is no token, then send a first heartbeat (checks the token, learns the interval).

        Parameters
        ----------
        wait_for_server : float
            First wait up to this many seconds for the server to accept connections
            (:meth:`wait_for_server`); 0, the default, only retries as every request does.

        Raises
        ------
        AgentError
            No token and no enrollment key.
        AgentApiError
            The server refused (401 bad token, 403 disabled or bad enrollment key, 409 id taken).
        AgentConnectionError
            The server could not be reached (after ``wait_for_server`` seconds, then the retries).
        """
        if wait_for_server > 0:
            self.wait_for_server(wait_for_server)
        if not self._http.token:
            if not self.enrollment_key:
                raise AgentError(
                    f"Agent {self.agent_id!r} has no token: pass token=... (or set ${ENV_TOKEN}), or an "
                    f"enrollment key (enrollment_key=... or ${ENV_ENROLLMENT_KEY})."
                )
            reply = self._http.enroll(self.enrollment_key, self.agent_id, self._capabilities())
            self._http.token = str(reply["token"])
            self._learn_interval(reply.get("heartbeat_interval"))
            self._log.info("enrolled")
        reply = self._http.heartbeat("idle", self._capabilities())
        self._learn_interval(reply.get("heartbeat_interval"))
        if self.secagg is not None:
            from fedagent.secagg import identity_registration

            public_key, proof = identity_registration(self.agent_id, self.secagg.identity_key)
            self._http.register_identity_key(public_key, proof)
            self._log.info("identity key registered (%s...)", public_key[:12])
        self._connected = True
        self._log.info("connected to %s (heartbeat every %ss)", self.server, self.heartbeat_interval)

    def wait_for_server(self, timeout: float, *, interval: float = SERVER_WAIT_INTERVAL) -> None:
        """Return once the server answers HTTP: for an agent started together with its server.

        Sends one heartbeat at a time (a single attempt each, no retries of its own), pausing 0.05 s after
        the first refused connection and doubling up to ``interval``, so an agent that finished loading its
        data before the server is up starts within ``interval`` of the server, instead of after an
        exponential back-off meant for a server that went away. Any HTTP answer counts, a refusal too
        (:meth:`connect` then reports it), except 502, 503 and 504, which a proxy or a starting server
        sends while the application is not up yet.

        Raises
        ------
        AgentConnectionError
            The server did not answer within ``timeout`` seconds.
        AgentStopped
            :meth:`stop` was called (or a signal arrived) while waiting.
        """
        deadline = time.monotonic() + timeout
        pause = 0.05
        waited = False
        with AgentHttpClient(self.server, self._http.token, timeout=self._timeout, max_attempts=1) as probe:
            while True:
                try:
                    probe.heartbeat("idle")
                    break
                except AgentApiError as exc:
                    if exc.status not in {502, 503, 504}:
                        break
                    error: AgentError = exc
                except AgentConnectionError as exc:
                    error = exc
                if not waited:
                    self._log.info("waiting up to %.0fs for the server at %s", timeout, self.server)
                    waited = True
                if time.monotonic() + pause > deadline:
                    raise AgentConnectionError(
                        f"The server at {self.server} did not answer within {timeout:.0f}s: {error}"
                    )
                if self._stop.wait(pause):
                    raise AgentStopped("Stopped while waiting for the server.")
                pause = min(interval, pause * 2)

    def _learn_interval(self, value: Any) -> None:
        if self._heartbeat_override is None and isinstance(value, int | float) and value > 0:
            self.heartbeat_interval = float(value)

    async def initialize(self) -> None:
        """Async form of :meth:`connect` (runs it in a thread)."""
        import asyncio

        await asyncio.to_thread(self.connect)

    def close(self) -> None:
        """Stop the heartbeat and close HTTP connections."""
        self._stop_heartbeat()
        self._http.close()

    def __enter__(self) -> FederatedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- stopping -------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to return: at once if it is waiting, after the current task if it is training.

        From another thread, a long-poll in progress is not interrupted: ``run`` returns within
        ``poll_wait`` seconds. A signal (see :meth:`run`) interrupts it at once.
        """
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stop.is_set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals_received += 1
        self._stop.set()
        name = signal.Signals(signum).name
        if self._finishing:
            return  # run() is already returning; let it tidy up
        if self._interruptible or self._signals_received > 1:
            # Waiting for a task (nothing to lose), or asked twice: abort whatever blocks now.
            raise _Interrupted(name)
        self._log.warning(
            "%s received: finishing the current task, then exiting (send again to abandon it)", name
        )

    @contextmanager
    def _signal_handlers(self, enabled: bool) -> Iterator[None]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextmanager
    def _interruptible_wait(self) -> Iterator[None]:
        self._interruptible = True
        try:
            if self._signals_received:
                raise _Interrupted("signal")
            yield
        finally:
            self._interruptible = False

    # -- heartbeat ------------------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._heartbeat_thread is not None and self._heartbeat_thread.is_alive():
            return
        self._heartbeat_stop.clear()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name=f"fedagent-heartbeat-{self.agent_id}", daemon=True
        )
        self._heartbeat_thread.start()

    def _stop_heartbeat(self) -> None:
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=self._timeout)
            self._heartbeat_thread = None

    def _heartbeat_loop(self) -> None:
        # Its own connection pool and no retries: a missed beat is simply sent again next period.
        with AgentHttpClient(
            self.server, self._http.token, timeout=self._timeout, max_attempts=1, log=self._log
        ) as http:
            while not self._heartbeat_stop.wait(self.heartbeat_interval):
                try:
                    reply = http.heartbeat(self._state)
                    self._learn_interval(reply.get("heartbeat_interval"))
                except AgentError as exc:
                    self._log.warning("heartbeat failed: %s", exc)
                except Exception:  # a heartbeat must never kill the agent
                    self._log.exception("heartbeat failed unexpectedly")

    # -- the loop -------------------------------------------------------------------------------------

    def run(
        self,
        *,
        max_tasks: int | None = None,
        stop_when_idle_for: float | None = None,
        exit_when_training_done: str | None = None,
        handle_signals: bool = True,
    ) -> RunStats:
        """Work on tasks until told to stop.

        Parameters
        ----------
        max_tasks : int, optional
            Return after this many tasks (whatever their outcome).
        stop_when_idle_for : float, optional
            Return after this many seconds without a task.
        exit_when_training_done : str, optional
            A training id: when a poll finds no task, ask ``GET /api/training/<id>/status`` and return once
            its status is terminal (completed, stopped, failed, budget_exhausted).
        handle_signals : bool
            When called from the main thread, catch SIGTERM and SIGINT for a clean return: a signal while
            waiting for a task returns at once; while training, the task is finished and uploaded first
            (a second signal abandons it and gives it back to the server).

        Returns
        -------
        RunStats
            Counters and the reason for returning.

        Raises
        ------
        AgentApiError
            A fatal answer: 401 (bad token) or 403 (agent disabled) and other non-retryable 4xx on polling.
        """
        if max_tasks is not None and max_tasks < 0:
            raise ValueError(f"max_tasks must be at least 0. Found {max_tasks}.")
        stats = RunStats()
        started = time.monotonic()
        self._stop.clear()
        self._signals_received = 0
        self._finishing = False
        with self._signal_handlers(handle_signals):
            try:
                stats.stop_reason = self._loop(stats, max_tasks, stop_when_idle_for, exit_when_training_done)
            except _Interrupted:
                stats.stop_reason = "signal"
            finally:
                self._finishing = True
                self._stop_heartbeat()
                self._state = "idle"
                stats.elapsed_seconds = time.monotonic() - started
        self._log.info(
            "stopped (%s): %d task(s), %d uploaded, %d closed, %d failed, %d rejected, %d abandoned",
            stats.stop_reason,
            stats.tasks_received,
            stats.tasks_uploaded,
            stats.tasks_closed,
            stats.tasks_failed,
            stats.tasks_rejected,
            stats.tasks_abandoned,
        )
        return stats

    def _loop(
        self,
        stats: RunStats,
        max_tasks: int | None,
        stop_when_idle_for: float | None,
        exit_when_training_done: str | None,
    ) -> str:
        try:
            with self._interruptible_wait():
                if not self._connected:
                    self.connect()
        except AgentStopped:
            return "stopped"
        self._start_heartbeat()
        idle_since = time.monotonic()
        consecutive_errors = 0
        while True:
            if self._signals_received:
                return "signal"
            if self._stop.is_set():
                return "stopped"
            if max_tasks is not None and stats.tasks_received >= max_tasks:
                return "max_tasks"
            try:
                with self._interruptible_wait():
                    task_json = self._http.next_task(self.poll_wait)
            except AgentStopped:
                continue
            except (AgentConnectionError, AgentApiError, ProtocolError) as exc:
                if isinstance(exc, AgentApiError) and exc.status < 500 and exc.status != 429:
                    raise  # 401, 403, 404, 400: waiting will not fix it
                consecutive_errors += 1
                stats.server_errors += 1
                pause = random.uniform(0, min(60.0, 2.0**consecutive_errors))
                self._log.warning("polling failed (%s); trying again in %.1fs", exc, pause)
                with self._interruptible_wait():
                    self._stop.wait(pause)
                continue
            consecutive_errors = 0
            if task_json is not None:
                try:
                    stats.record(self.process_task(task_json))
                except _Interrupted:
                    round_number = task_json.get("round")
                    stats.record(
                        TaskOutcome(
                            str(task_json.get("task_id", "")),
                            str(task_json.get("training_id", "")),
                            round_number if isinstance(round_number, int) else -1,
                            "abandoned",
                            "The agent was signalled twice.",
                        )
                    )
                    raise
                idle_since = time.monotonic()
                continue
            stats.empty_polls += 1
            if stop_when_idle_for is not None and time.monotonic() - idle_since >= stop_when_idle_for:
                return "idle"
            if exit_when_training_done is not None and self._training_done(exit_when_training_done):
                return "training_done"

    def _training_done(self, training_id: str) -> bool:
        try:
            with self._interruptible_wait():
                status = self._http.training_status(training_id).get("status")
        except AgentError as exc:
            self._log.warning("could not read the status of training %s: %s", training_id, exc)
            return False
        self._log.debug("training %s is %s", training_id, status, extra={"training_id": training_id})
        return status in TERMINAL_TRAINING_STATUSES

    def run_one(self, wait: float | None = None) -> TaskOutcome | None:
        """Poll once (``wait`` seconds, default ``poll_wait``) and do the task if there is one.

        Returns
        -------
        TaskOutcome or None
            None when the server had no task.
        """
        if not self._connected:
            self.connect()
        task_json = self._http.next_task(self.poll_wait if wait is None else wait)
        return None if task_json is None else self.process_task(task_json)

    async def arun(
        self,
        *,
        max_tasks: int | None = None,
        stop_when_idle_for: float | None = None,
        exit_when_training_done: str | None = None,
    ) -> RunStats:
        """Async form of :meth:`run` (in a thread; cancelling it asks the loop to stop)."""
        import asyncio

        try:
            return await asyncio.to_thread(
                self.run,
                max_tasks=max_tasks,
                stop_when_idle_for=stop_when_idle_for,
                exit_when_training_done=exit_when_training_done,
                handle_signals=False,
            )
        except asyncio.CancelledError:
            self.stop()
            raise

    # -- one task -------------------------------------------------------------------------------------

    def process_task(self, task_json: dict[str, Any]) -> TaskOutcome:
        """Do one task given as the JSON of ``GET tasks/next``; never raises for task-level problems.

        Raises
        ------
        AgentApiError
            Only for 401 (the token stopped working).
        """
        try:
            task = Task.from_json(task_json)
        except ProtocolError as exc:
            task_id = task_json.get("task_id")
            self._log.error("malformed task: %s", exc, extra={"task_id": task_id})
            if isinstance(task_id, str):
                self._fail(task_id, f"The agent could not read the task: {exc}", self._log)
            return TaskOutcome(str(task_id), "", -1, "failed", str(exc))
        log = self._log.bind(training_id=task.training_id, round=task.round, task_id=task.task_id)
        self._state = "training"
        try:
            return self._do_task(task, log)
        except _Interrupted:
            log.warning("abandoning the task: the agent was signalled twice")
            self._fail(task.task_id, "The agent is shutting down.", log, timeout=5.0)
            raise
        except AgentStopped:
            log.warning("abandoning the task: the agent is stopping")
            self._fail(task.task_id, "The agent is shutting down.", log, timeout=5.0)
            return self._outcome(task, "abandoned", "The agent is shutting down.")
        finally:
            self._state = "idle"

    def _applies_local_dp(self) -> bool:
        """Whether the installed update transform honours a task's local-DP requirement."""
        from fedagent.local_dp import LocalDpTransform

        return isinstance(self.update_transform, LocalDpTransform)

    def _outcome(self, task: Task, status: str, detail: str = "") -> TaskOutcome:
        return TaskOutcome(task.task_id, task.training_id, task.round, status, detail)

    def _give_back(self, task: Task, reason: str, log: ContextLogger) -> TaskOutcome:
        log.error("giving the task back: %s", reason)
        self._fail(task.task_id, reason, log)
        return self._outcome(task, "failed", reason)

    def _fail(self, task_id: str, reason: str, log: ContextLogger, timeout: float | None = None) -> None:
        try:
            self._http.fail_task(task_id, reason, timeout=timeout)
        except AgentError as exc:
            log.warning("could not give task %s back: %s", task_id, exc)

    def _do_task(self, task: Task, log: ContextLogger) -> TaskOutcome:
        log.info(
            "task received (%s, model version %d, deadline %s)",
            task.kind,
            task.model.number,
            task.deadline.isoformat(),
        )
        if task.kind.startswith(SECAGG_KIND_PREFIX):
            from fedagent.secagg import SECAGG_KINDS

            if task.kind in SECAGG_KINDS:
                return self._do_secagg_task(task, log)
        if task.kind != "fit":
            return self._give_back(task, f"This agent only handles 'fit' tasks, not {task.kind!r}.", log)
        trained = self._train(task, log)
        if isinstance(trained, TaskOutcome):
            return trained
        delta, metrics, num_examples, train_seconds = trained
        blob = to_bytes(delta)
        if len(blob) > task.max_update_bytes:
            return self._give_back(
                task, f"The update is {len(blob)} bytes; the task allows {task.max_update_bytes}.", log
            )
        meta = {"num_examples": num_examples, "metrics": metrics}
        digest = sha256_hex(blob)
        return self._upload(task, blob, meta, digest, train_seconds, log)

    def _train(
        self, task: Task, log: ContextLogger
    ) -> TaskOutcome | tuple[Parameters, dict[str, float | int | None], int, float]:
        """Download the task's model, evaluate it, train, and return ``(delta, metrics, num_examples,
        train_seconds)``; or the outcome of a task given back or refused on the way."""
        try:
            config = FitConfig.from_json(task.config)
        except FlcoreError as exc:
            return self._give_back(task, f"Invalid task config: {exc}", log)
        if "local_dp" in config.extra and not self._applies_local_dp():
            return self._give_back(
                task,
                "The training requires local differential privacy and this agent has no local-DP "
                "transform installed (use fedagent.local_dp.local_dp_hooks, or the CLI); "
                "nothing was uploaded.",
                log,
            )
        x_train, y_train = self.data.train
        if len(y_train) == 0:
            return self._give_back(task, "The agent has no training data.", log)
        straggled: bool | None = None
        if self.straggler is not None:
            decision = self.straggler.decide(
                config, num_examples=len(y_train), rng=straggler_rng(config.seed, self.agent_id)
            )
            straggled = decision.straggles
            if decision.drop:
                log.warning("%s", decision.detail)
                self._fail(task.task_id, decision.detail, log)
                return self._outcome(task, "failed", decision.detail)
            if decision.straggles:
                log.warning("%s", decision.detail)
                config = decision.config
        try:
            trainer = self._make_trainer(task.model)
        except Exception as exc:
            return self._give_back(task, f"Could not build a trainer for the model: {exc}", log)

        try:
            global_params = self._fetch_model(task.model, log, deadline=task.deadline)
        except AgentStopped:
            raise
        except AgentApiError as exc:
            if exc.status == 401:
                raise
            # 403/404: the task is no longer ours or the version is gone; nothing to give back.
            log.error("model download refused: %s", exc)
            return self._outcome(task, "rejected", f"Model download refused: {exc}")
        except AgentConnectionError as exc:
            log.error("could not download the model: %s", exc)
            return self._outcome(task, "rejected", str(exc))
        except AgentError as exc:  # ModelIntegrityError, ProtocolError
            return self._give_back(task, str(exc), log)

        try:
            trainer.set_parameters({name: array.copy() for name, array in global_params.items()})
            x_eval, y_eval = self.data.evaluation
            evaluation = trainer.evaluate(x_eval, y_eval) if len(y_eval) else None
            started = time.perf_counter()
            fit = trainer.fit(x_train, y_train, config, task_rng(config.seed, self.agent_id))
            train_seconds = time.perf_counter() - started
            delta = subtract(trainer.get_parameters(), global_params)
            if self.update_transform is not None:
                delta = self.update_transform(delta)
            ParameterSpec.from_json(task.model.parameters).validate(delta)
            for name, array in delta.items():
                if array.dtype != np.float32:
                    delta[name] = array.astype(np.float32)
                if not np.isfinite(delta[name]).all():
                    return self._give_back(
                        task, f"Local training diverged: tensor {name!r} is not finite.", log
                    )
        except MemoryError:
            return self._give_back(task, "Out of memory during local training.", log)
        except Exception as exc:
            log.exception("local training failed")
            return self._give_back(task, f"Local training failed: {type(exc).__name__}: {exc}", log)

        if fit.num_examples <= 0:
            return self._give_back(task, f"The trainer reported num_examples={fit.num_examples}.", log)
        metrics: dict[str, float | int | None] = {k: _finite_or_none(v) for k, v in fit.metrics.items()}
        metrics.update(
            eval_loss=_finite_or_none(evaluation.loss) if evaluation else None,
            eval_accuracy=_finite_or_none(evaluation.accuracy) if evaluation else None,
            eval_num_examples=evaluation.num_examples if evaluation else 0,
            train_seconds=round(train_seconds, 6),
        )
        for key in ("train_loss", "train_accuracy", "local_steps", "epochs_completed"):
            metrics.setdefault(key, None)
        if straggled is not None:
            metrics["straggler"] = int(straggled)
        return delta, metrics, int(fit.num_examples), train_seconds

    def _upload(
        self,
        task: Task,
        blob: bytes,
        meta: dict[str, Any],
        digest: str,
        train_seconds: float,
        log: ContextLogger,
    ) -> TaskOutcome:
        """Upload a fit task's update and say what became of it."""
        metrics = meta["metrics"]
        num_examples = int(meta["num_examples"])
        try:
            # Retried until the task's deadline: the bytes are kept until a 2xx (or a 409 that settles it).
            receipt = self._http.upload_update(task.upload_url, blob, meta, deadline=task.deadline)
        except AgentApiError as exc:
            if exc.status == 401:
                raise
            if exc.code == "task_closed":
                log.info("the round closed before the update arrived; moving on")
                return self._outcome(task, "closed", exc.message)
            if exc.code == "update_conflict":
                # The server already stored an update for this task (an earlier upload of this agent's):
                # the protocol keeps the first one, so the task is done and this copy is not needed.
                accepted = str(exc.details.get("accepted_sha256", ""))
                log.warning("the server already holds another update for this task (sha256 %s)", accepted)
                return TaskOutcome(
                    task.task_id,
                    task.training_id,
                    task.round,
                    "uploaded",
                    "An update was already stored for this task; the server keeps the first.",
                    update_sha256=accepted,
                )
            if exc.status in {400, 413}:
                return self._give_back(
                    task, f"The server refused the update ({exc.code}): {exc.message}", log
                )
            log.error("update refused: %s", exc)
            return self._outcome(task, "rejected", str(exc))
        except AgentStopped:
            raise
        except AgentError as exc:  # unreachable after all retries, or a malformed answer
            log.error("could not upload the update: %s", exc)
            return self._outcome(task, "rejected", str(exc))
        if receipt.sha256 != digest:
            log.warning("the server stored sha256 %s; the agent sent %s", receipt.sha256, digest)
        log.info(
            "update uploaded (%d examples, eval_accuracy=%s, train_loss=%s, %.2fs)%s",
            num_examples,
            metrics["eval_accuracy"],
            metrics["train_loss"],
            train_seconds,
            " (already stored)" if receipt.replayed else "",
        )
        return TaskOutcome(
            task.task_id,
            task.training_id,
            task.round,
            "uploaded",
            update_sha256=digest,
            num_examples=num_examples,
            metrics=metrics,
        )

    def _do_secagg_task(self, task: Task, log: ContextLogger) -> TaskOutcome:
        """Answer one phase of secure aggregation (fedagent/secagg.py); refusals are given back."""
        from fedagent.secagg import (
            KIND_ADVERTISE,
            KIND_MASKED_INPUT,
            KIND_SHARE,
            KIND_UNMASK,
            SecAggTaskError,
        )
        from flcore.secagg import SecAggError

        # Errors of a phase that make the agent give the task back (it never answers then).
        refusals = (SecAggError, SecAggTaskError, AgentError, FlcoreError, LookupError, TypeError, ValueError)
        party = self.secagg
        if party is None:
            return self._give_back(
                task, "This agent has no secure-aggregation identity key (run it with --state-dir).", log
            )
        secagg = task.config.get("secagg")
        if not isinstance(secagg, dict):
            return self._give_back(task, "The task has no 'secagg' object in its config.", log)
        meta: dict[str, Any] | None = None
        binary = task.kind == KIND_MASKED_INPUT
        try:
            if task.kind == KIND_ADVERTISE:
                body = party.advertise(secagg)
            elif task.kind == KIND_SHARE:
                body = party.share(secagg)
            elif task.kind == KIND_UNMASK:
                body = party.unmask(secagg)
            else:
                trained = self._train(task, log)
                if isinstance(trained, TaskOutcome):
                    return trained
                delta, metrics, num_examples, _ = trained
                body = party.masked_input(
                    secagg,
                    delta,
                    ParameterSpec.from_json(task.model.parameters),
                    num_examples=num_examples,
                    rng=np.random.default_rng(),
                )
                meta = {"metrics": {k: metrics[k] for k in EVALUATION_METRICS if metrics.get(k) is not None}}
        except (AgentApiError, AgentStopped):
            raise
        except refusals as exc:
            return self._give_back(task, f"Secure aggregation refused: {type(exc).__name__}: {exc}", log)
        try:
            receipt = self._http.submit_secagg(
                task.upload_url, body, binary=binary, meta=meta, deadline=task.deadline
            )
        except AgentApiError as exc:
            if exc.status == 401:
                raise
            if exc.code == "task_closed":
                return self._outcome(task, "closed", exc.message)
            log.error("secure-aggregation answer refused: %s", exc)
            return self._outcome(task, "rejected", str(exc))
        except AgentStopped:
            raise
        except AgentError as exc:
            log.error("could not send the secure-aggregation answer: %s", exc)
            return self._outcome(task, "rejected", str(exc))
        log.info("%s answered (%d bytes)", task.kind, len(body))
        if party.dropped:  # tests only: behave like an agent that crashed right after this phase
            log.warning(
                "stopping: dropping out of secure aggregation (--secagg-drop-after %s)", party.drop_after
            )
            self.stop()
        return TaskOutcome(
            task.task_id, task.training_id, task.round, "uploaded", update_sha256=str(receipt.get("sha256"))
        )

    def _make_trainer(self, model: ModelRef) -> Trainer:
        if self.trainer_factory is not None:
            return self.trainer_factory(model)
        if model.spec is None:
            raise AgentError(
                "The task's model is custom (spec is null); pass trainer_factory=... to train it."
            )
        return ZooTrainer(model.spec)

    def _fetch_model(
        self, model: ModelRef, log: ContextLogger, *, deadline: datetime | None = None
    ) -> Parameters:
        """Download (or revalidate the cached copy of) the global model and check its SHA-256; the
        download is retried until ``deadline`` (the task's) while the server cannot be reached."""
        try:
            spec = ParameterSpec.from_json(model.parameters)
        except FlcoreError as exc:
            raise ModelIntegrityError(f"The task's parameter list is invalid: {exc}") from exc
        max_bytes = spec.nbytes + MODEL_HEADER_ALLOWANCE
        cached = self._model_cache.get(model.sha256)
        for attempt in (1, 2):
            body = self._http.download_model(
                model.url,
                etag=model.sha256 if cached is not None else None,
                max_bytes=max_bytes,
                retry_until=deadline,
            )
            if body is None and cached is not None:
                log.debug("model %s not modified; using the cached copy", model.sha256[:12])
                self._model_cache.move_to_end(model.sha256)
                return cached
            if body is None:
                raise ProtocolError("The server answered 304 Not Modified but the agent has no cached copy.")
            digest = sha256_hex(body)
            if digest == model.sha256:
                break
            log.warning(
                "downloaded model has sha256 %s, expected %s (attempt %d)", digest, model.sha256, attempt
            )
            cached = None
        else:
            raise ModelIntegrityError(
                f"The downloaded model's SHA-256 is {digest}, but the task announced {model.sha256}; "
                "refusing to train on it."
            )
        try:
            params = from_bytes(body, spec=spec, max_bytes=max_bytes)
        except FlcoreError as exc:
            raise ModelIntegrityError(f"The downloaded model is invalid: {exc}") from exc
        self._model_cache[model.sha256] = params
        while len(self._model_cache) > MODEL_CACHE_SIZE:
            self._model_cache.popitem(last=False)
        log.info("model version %d downloaded (%d bytes)", model.number, len(body))
        return params


def enroll(
    server: str,
    enrollment_key: str,
    agent_id: str,
    capabilities: dict[str, Any] | None = None,
    *,
    timeout: float = 30.0,
) -> tuple[str, str]:
    """Enroll a new agent with an enrollment key and return ``(agent_id, token)``.

    Raises
    ------
    AgentApiError
        403 for a bad key, 409 if ``agent_id`` is taken, 400 for an invalid id.
    """
    validate_agent_id(agent_id)
    with AgentHttpClient(server, timeout=timeout) as http:
        reply = http.enroll(enrollment_key, agent_id, capabilities)
    return str(reply.get("agent_id", agent_id)), str(reply["token"])
