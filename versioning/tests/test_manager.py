"""The seed's ``ModelVersionManager`` against the real database (its usage example runs as written).

The awaitable calls run the ORM on ``sync_to_async``'s worker thread, which has its own connection, so
these tests commit for real (``transaction=True``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from fedsite.errors import Conflict, ValidationFailed
from flcore.parameters import ParameterSpec
from trainings.coordinator import FederatedCoordinator, TrainingConfiguration
from trainings.models import Training
from versioning.manager import ModelVersionManager, RollbackConfig
from versioning.models import ModelVersion

CONFIG = TrainingConfiguration(
    name="seed example", model_type="logreg", input_dim=4, num_classes=3, hidden_sizes=(), max_rounds=5
)


@pytest.mark.django_db(transaction=True)
def test_the_seed_usage_example_runs(make_agent: Any) -> None:
    make_agent(), make_agent()

    async def seed_example() -> str:
        coordinator = FederatedCoordinator()
        await coordinator.initialize()
        training_id = await coordinator.start_training(CONFIG)

        # --- the seed README's "Model Versioning" example, as written ---
        rollback_config = RollbackConfig(
            enabled=True,
            performance_threshold=0.05,  # 5% degradation triggers rollback
            consecutive_degradations=3,
            rollback_to_best=True,
        )

        version_manager = ModelVersionManager()
        await version_manager.initialize()
        version_manager.setup_rollback_config(training_id, rollback_config)
        return training_id

    training_id = asyncio.run(seed_example())
    stored = Training.objects.get(pk=training_id).config["rollback"]
    assert stored["enabled"] is True and stored["performance_threshold"] == 0.05
    assert stored["consecutive_degradations"] == 3 and stored["rollback_to_best"] is True


@pytest.mark.django_db(transaction=True)
def test_the_version_manager_api(make_training: Any) -> None:
    training = make_training(start=False)
    spec = ParameterSpec.from_json(training.parameter_spec)
    weights = {t.name: np.full(t.shape, 0.25, dtype=np.float32) for t in spec.tensors}
    training_id = str(training.pk)

    async def scenario() -> tuple[Any, ...]:
        version_manager = ModelVersionManager()
        await version_manager.initialize()
        # the seed's "Version Manager API", in its order
        version_id = await version_manager.create_model_version(
            training_id, {"parameters": weights, "metrics": {"accuracy": 0.5}}
        )
        model_data = await version_manager.get_model_version(version_id, training_id)
        rollback_version = await version_manager.rollback_to_version(training_id, 0)
        diff = await version_manager.compare_versions(training_id, 0, 1)
        return version_id, model_data, rollback_version, diff

    version_id, model_data, rollback_version, diff = asyncio.run(scenario())
    version = ModelVersion.objects.get(pk=version_id)
    assert version.number == 1 and version.origin == ModelVersion.Origin.UPLOAD
    assert model_data["number"] == 1 and model_data["metrics"] == {"accuracy": 0.5}
    assert all(np.array_equal(model_data["parameters"][k], weights[k]) for k in weights)
    assert rollback_version == {
        "training_id": training_id,
        "target_version": 0,
        "status": "applied",
        "version": 2,
    }
    training.refresh_from_db()
    assert training.current_version.number == 2 and training.current_version.parent.number == 0
    assert diff["a"]["number"] == 0 and diff["b"]["number"] == 1 and diff["overall"]["l2_distance"] > 0
    # a pending training starts its first round after the versions it already has
    assert training.current_round == 2


@pytest.mark.django_db(transaction=True)
def test_bad_calls_raise_the_service_errors(make_training: Any, make_agent: Any) -> None:
    make_agent(), make_agent()
    running = make_training()
    pending = make_training(start=False)

    async def scenario() -> None:
        manager = ModelVersionManager()
        await manager.initialize()
        with pytest.raises(Conflict):
            await manager.create_model_version(str(running.pk), {"w": np.zeros(3, dtype=np.float32)})
        with pytest.raises(ValidationFailed, match="parameters"):
            await manager.create_model_version(str(pending.pk), {"w": np.zeros(3, dtype=np.float32)})
        with pytest.raises(ValidationFailed, match=r"rollback\.performance_threshold"):
            manager.setup_rollback_config(str(pending.pk), {"enabled": True, "performance_threshold": 2})

    asyncio.run(scenario())
    assert pending.versions.count() == 1
