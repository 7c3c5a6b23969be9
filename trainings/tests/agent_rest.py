"""An agent's side of the REST protocol as the round tests drive it through Django's test client."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from django.core.files.uploadedfile import SimpleUploadedFile

from flcore.parameters import ParameterSpec, to_bytes
from trainings.models import Training


def next_task(client: Any, token: str) -> Any:
    """Ask for the next task without waiting (200 with a task, 204 with none)."""
    return client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}")


def constant_delta(training: Training, value: float) -> dict[str, np.ndarray]:
    """An update of the training's shape with every entry equal to `value` (float32)."""
    spec = ParameterSpec.from_json(training.parameter_spec)
    return {t.name: np.full(t.shape, value, dtype=np.float32) for t in spec.tensors}


def post_update(
    client: Any,
    token: str,
    task: Any,
    update: dict[str, np.ndarray] | bytes,
    *,
    num_examples: int,
    metrics: dict[str, float] | None = None,
) -> Any:
    """Upload `update` (a delta, or safetensors bytes as they are) for `task`: a task document with an
    ``upload_url``, or a task id."""
    url = task["upload_url"] if isinstance(task, dict) else f"/api/v1/agent/tasks/{task}/update"
    data = update if isinstance(update, bytes) else to_bytes(update)
    meta: dict[str, Any] = {"num_examples": num_examples}
    if metrics is not None:
        meta["metrics"] = metrics
    return client.post(
        url,
        {
            "update": SimpleUploadedFile("update.safetensors", data, "application/octet-stream"),
            "meta": json.dumps(meta),
        },
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
