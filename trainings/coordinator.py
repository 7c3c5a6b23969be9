"""The seed's Python API, ``FederatedCoordinator``, as a thin layer over the services.

It keeps the seed's shape: ``initialize``, ``start_training`` and ``stop_training`` are awaitable;
``get_training_status`` and ``get_coordinator_stats`` are plain calls::

    from trainings.coordinator import AggregationAlgorithm, FederatedCoordinator, TrainingConfiguration

    coordinator = FederatedCoordinator()
    await coordinator.initialize()
    training_id = await coordinator.start_training(
        TrainingConfiguration(name="mnist_classification", algorithm=AggregationAlgorithm.FEDAVG)
    )
    status = coordinator.get_training_status(training_id)
    await coordinator.stop_training(training_id)
    stats = coordinator.get_coordinator_stats()

Invariants: no logic lives here; every write goes through ``trainings.services`` (so state machines,
audit log and events behave exactly as for the REST API) and every read through selectors. The ORM is
never touched on an event loop's thread: awaitables use ``sync_to_async``, and the plain calls run
their queries on a worker thread when called from async code, so they work in both worlds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import Count

from fedsite.errors import NotFound
from flcore.strategies import AggregationAlgorithm
from privacy.types import PrivacyBudget, PrivacyLevel
from trainings.configuration import TrainingConfiguration

__all__ = [
    "AggregationAlgorithm",
    "FederatedCoordinator",
    "PrivacyBudget",
    "PrivacyLevel",
    "TrainingConfiguration",
]

T = TypeVar("T")


def _in_worker_thread(function: Callable[[], T]) -> T:
    try:
        return function()
    finally:
        connection.close()  # this thread's own connection; the thread ends with the call


def _call_sync(function: Callable[[], T]) -> T:
    """Run a database-touching function; on a thread with a running event loop, run it on another one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return function()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordinator") as pool:
        return pool.submit(_in_worker_thread, function).result()


def _database_call(function: Callable[..., T], /, **kwargs: Any) -> T:
    """Call ``function`` then release an obsolete connection, as Django does after each request.

    Inside a caller's transaction (``async_to_sync`` from a view, a test case) nothing is closed.
    """
    try:
        return function(**kwargs)
    finally:
        if not connection.in_atomic_block:
            close_old_connections()


async def _run_in_thread(function: Callable[..., T], /, **kwargs: Any) -> T:
    return await sync_to_async(_database_call)(function, **kwargs)


def _validated(config: TrainingConfiguration | dict[str, Any]) -> TrainingConfiguration:
    """Validate either form the same way (a directly built dataclass skips ``from_dict`` otherwise)."""
    data = config.to_dict() if isinstance(config, TrainingConfiguration) else config
    return TrainingConfiguration.from_dict(data)


class FederatedCoordinator:
    """Start, follow and stop trainings from Python (the seed's ``federated_learning.coordinator``)."""

    def __init__(self) -> None:
        self.initialized = False

    async def initialize(self) -> None:
        """Check that the database answers (and is migrated). Safe to call more than once."""
        await _run_in_thread(self._check_database)
        self.initialized = True

    @staticmethod
    def _check_database() -> None:
        from trainings.models import Training

        Training.objects.exists()

    async def start_training(self, config: TrainingConfiguration | dict[str, Any]) -> str:
        """Create and start a training; return its id.

        Raises ``fedsite.errors.ValidationFailed`` for a bad configuration (naming every bad field) and
        ``fedsite.errors.Conflict`` when ``max_concurrent_trainings`` are already running.
        """
        from trainings.services import training_create_and_start

        configuration = _validated(config)
        training = await _run_in_thread(
            training_create_and_start, configuration=configuration, created_by="coordinator"
        )
        return str(training.pk)

    def get_training_status(self, training_id: str) -> dict[str, Any]:
        """The status document of ``GET /api/training/{id}/status``. Raises ``NotFound``."""
        return _call_sync(lambda: self._status(training_id))

    @staticmethod
    def _status(training_id: str) -> dict[str, Any]:
        from trainings.selectors import training_get, training_status

        training = training_get(training_id)
        if training is None:
            raise NotFound(f"No training with id {training_id!r}.", code="training_not_found")
        return training_status(training)

    async def stop_training(self, training_id: str, *, reason: str = "stopped by operator") -> dict[str, Any]:
        """Stop a training (its latest version stays the result); return its status document."""
        from trainings.services import training_stop

        await _run_in_thread(training_stop, training_id=training_id, actor="coordinator", reason=reason)
        return await _run_in_thread(self._status, training_id=training_id)

    def get_coordinator_stats(self) -> dict[str, Any]:
        """Counts for a system overview: trainings, agents online, rounds completed, capacity."""
        return _call_sync(self._stats)

    @staticmethod
    def _stats() -> dict[str, Any]:
        from clients.selectors import agents_eligible
        from trainings.models import Round, Training

        by_status = dict.fromkeys(Training.Status.values, 0)
        for status, count in Training.objects.order_by().values_list("status").annotate(n=Count("pk")):
            by_status[status] = count
        return {
            "running_trainings": by_status[Training.Status.RUNNING],
            "total_trainings": sum(by_status.values()),
            "trainings_by_status": by_status,
            "agents_online": agents_eligible().count(),
            "rounds_completed": Round.objects.filter(status=Round.Status.COMPLETED).count(),
            "max_concurrent_trainings": settings.FEDSITE_MAX_CONCURRENT_TRAININGS,
            "cpu_cores": settings.FEDSITE_CPU_CORES,
        }
