"""Create and read global model versions."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction

from flcore.parameters import Parameters, ParameterSpec, from_bytes, to_bytes
from flcore.strategies import ServerState, Strategy
from versioning.blobs import blob_read, blob_save
from versioning.models import ModelVersion


def version_create(
    *,
    training: Any,
    number: int,
    parameters: Parameters | None = None,
    data: bytes | None = None,
    origin: str = ModelVersion.Origin.AGGREGATION,
    parent: ModelVersion | None = None,
    metrics: dict[str, Any] | None = None,
    state: bytes | None = None,
) -> ModelVersion:
    """Write version ``number`` of a training; idempotent: an existing version of that number is returned."""
    existing = ModelVersion.objects.filter(training=training, number=number).first()
    if existing is not None:
        return existing
    if data is None:
        if parameters is None:
            raise ValueError("version_create needs parameters or data")
        data = to_bytes(parameters)
    spec = ParameterSpec.from_json(training.parameter_spec)
    name, sha256 = blob_save(data)
    state_name, state_sha256 = blob_save(state) if state is not None else ("", "")
    try:
        with transaction.atomic():
            return ModelVersion.objects.create(
                training=training,
                number=number,
                origin=origin,
                parent=parent,
                blob_name=name,
                blob_sha256=sha256,
                size_bytes=len(data),
                num_parameters=spec.num_parameters,
                metrics=metrics or {},
                state_blob_name=state_name,
                state_blob_sha256=state_sha256,
            )
    except IntegrityError:
        return ModelVersion.objects.get(training=training, number=number)


def version_read_bytes(version: ModelVersion) -> bytes:
    return blob_read(version.blob_name)


def version_read_parameters(version: ModelVersion) -> Parameters:
    spec = ParameterSpec.from_json(version.training.parameter_spec)
    return from_bytes(version_read_bytes(version), spec=spec, max_bytes=settings.FEDSITE_MAX_UPDATE_BYTES * 4)


def version_read_state(version: ModelVersion, strategy: Strategy) -> ServerState:
    """The server optimizer state stored with a version, or the strategy's initial state if none."""
    spec = ParameterSpec.from_json(version.training.parameter_spec)
    if not version.state_blob_name:
        return strategy.init_state(spec)
    return ServerState.from_bytes(blob_read(version.state_blob_name), spec)
