"""The seed's Python API, ``ModelVersionManager``, as a thin layer over ``versioning.services``.

It keeps the seed's shape (awaitable calls, ``setup_rollback_config`` a plain call)::

    from versioning.manager import ModelVersionManager, RollbackConfig

    version_manager = ModelVersionManager()
    await version_manager.initialize()
    rollback_config = RollbackConfig(
        enabled=True, performance_threshold=0.05, consecutive_degradations=3, rollback_to_best=True
    )
    version_manager.setup_rollback_config(training_id, rollback_config)
    diff = await version_manager.compare_versions(training_id, 1, 3)
    rollback = await version_manager.rollback_to_version(training_id, 1)

Invariants: no logic here; every write goes through the services (row locks, audit log, events) and the
ORM never runs on the event loop's thread (the same helpers as ``trainings.coordinator``).
"""

from __future__ import annotations

from typing import Any

from fedsite.errors import NotFound
from trainings.coordinator import _call_sync, _run_in_thread
from versioning.policy import RollbackConfig

__all__ = ["ModelVersionManager", "RollbackConfig"]


class ModelVersionManager:
    """Create, read, compare and roll back model versions (the seed's ``federated_learning.versioning``)."""

    def __init__(self) -> None:
        self.initialized = False

    async def initialize(self) -> None:
        """Check that the database answers (and is migrated). Safe to call more than once."""
        await _run_in_thread(self._check_database)
        self.initialized = True

    @staticmethod
    def _check_database() -> None:
        from versioning.models import ModelVersion

        ModelVersion.objects.exists()

    async def create_model_version(
        self, training_id: str, aggregation_result: Any, metrics: dict[str, Any] | None = None
    ) -> str:
        """Store weights (a mapping of tensor name to array, or an object/dict with ``parameters``) as
        the next version of a training that is not running; return the version's id."""
        from versioning.services import version_create_from_parameters

        parameters = aggregation_result
        if isinstance(aggregation_result, dict) and "parameters" in aggregation_result:
            metrics = metrics or aggregation_result.get("metrics")
            parameters = aggregation_result["parameters"]
        elif hasattr(aggregation_result, "parameters"):
            metrics = metrics or getattr(aggregation_result, "metrics", None)
            parameters = aggregation_result.parameters
        version = await _run_in_thread(
            version_create_from_parameters,
            training_id=training_id,
            parameters=parameters,
            metrics=metrics,
            actor="version-manager",
        )
        return str(version.pk)

    async def get_model_version(self, version_id: str, training_id: str) -> dict[str, Any]:
        """A version's description and its weights (``parameters``), checked against its sha256."""
        return await _run_in_thread(self._get, version_id=version_id, training_id=training_id)

    @staticmethod
    def _get(version_id: str, training_id: str) -> dict[str, Any]:
        from django.conf import settings
        from django.core.exceptions import ValidationError

        from flcore.parameters import ParameterSpec, from_bytes
        from versioning.models import ModelVersion
        from versioning.services import version_open_verified

        try:
            version = ModelVersion.objects.select_related("training", "parent").get(
                pk=version_id, training_id=training_id
            )
        except (ModelVersion.DoesNotExist, ValueError, ValidationError) as exc:
            raise NotFound(
                f"No version {version_id!r} in training {training_id!r}.", code="version_not_found"
            ) from exc
        with version_open_verified(version=version, actor="version-manager") as handle:
            data = handle.read()
        spec = ParameterSpec.from_json(version.training.parameter_spec)
        return {
            "id": str(version.pk),
            "training_id": str(version.training_id),
            "number": version.number,
            "origin": version.origin,
            "parent_number": version.parent.number if version.parent_id else None,
            "sha256": version.blob_sha256,
            "metrics": version.metrics,
            "created_at": version.created_at.isoformat(),
            "parameters": from_bytes(data, spec=spec, max_bytes=settings.FEDSITE_MAX_UPDATE_BYTES * 4),
        }

    async def rollback_to_version(self, training_id: str, target_version: int) -> dict[str, Any]:
        """Roll back (now if finished, at the next round if running); the REST endpoint's answer."""
        return await _run_in_thread(self._rollback, training_id=training_id, target_version=target_version)

    @staticmethod
    def _rollback(training_id: str, target_version: int) -> dict[str, Any]:
        from versioning.services import training_rollback

        rollback = training_rollback(training_id=training_id, version=target_version, actor="version-manager")
        return {
            "training_id": str(rollback.training_id),
            "target_version": rollback.target.number,
            "status": rollback.status,
            "version": rollback.version.number if rollback.version_id else None,
        }

    async def compare_versions(self, training_id: str, version1: int, version2: int) -> dict[str, Any]:
        """Per-tensor and whole-model differences and metric deltas (``GET .../versions/compare``)."""
        from versioning.services import version_compare

        return await _run_in_thread(
            version_compare, training_id=training_id, a=version1, b=version2, actor="version-manager"
        )

    def setup_rollback_config(
        self, training_id: str, config: RollbackConfig | dict[str, Any]
    ) -> dict[str, Any]:
        """Set a training's automatic rollback policy (validated like the ``rollback`` field)."""
        from versioning.services import training_rollback_configure

        return _call_sync(
            lambda: training_rollback_configure(
                training_id=training_id, rollback=config, actor="version-manager"
            )
        )
