"""Typed views of the JSON bodies of agent protocol v1 (see ``docs/agent-protocol.md``).

Invariants: a :class:`Task` is only ever built by :meth:`Task.from_json`, which checks every field the
agent relies on, so the rest of the SDK can trust its types. Unknown keys are ignored, so the server can
add fields without breaking older agents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fedagent.errors import ProtocolError

#: Path prefix of every agent endpoint, relative to the server's root.
API_PREFIX = "/api/v1/agent/"

#: What an ``agent_id`` may look like (1-64 characters from ``[A-Za-z0-9_.-]``).
AGENT_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")

#: Values of a training's ``status`` after which no more tasks will come.
TERMINAL_TRAINING_STATUSES = frozenset({"completed", "stopped", "failed", "budget_exhausted"})


def validate_agent_id(agent_id: str) -> str:
    """Return ``agent_id`` if the protocol allows it, else raise ``ValueError`` naming it."""
    if not isinstance(agent_id, str) or not AGENT_ID_PATTERN.fullmatch(agent_id):
        raise ValueError(f"agent_id must be 1-64 characters from [A-Za-z0-9_.-]. Found {agent_id!r}.")
    return agent_id


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ProtocolError(f"{where} has no {key!r}.")
    value = obj[key]
    # bool is an int subclass; a JSON true is never a valid number here.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ProtocolError(f"{where}.{key} must be {_type_names(kind)}. Found {value!r}.")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


@dataclass(frozen=True)
class ModelRef:
    """The global model a task asks the agent to train from.

    Attributes
    ----------
    version_id : str
        UUID of the model version.
    number : int
        The version's number within its training.
    sha256 : str
        Lower-case hex SHA-256 of the safetensors body served at ``url``.
    url : str
        Where to download it, relative to the server.
    spec : dict or None
        The zoo model's spec (``{"architecture", "input_dim", "num_classes", "hidden_sizes"}``), or None
        for a custom model that the agent's own :class:`~fedagent.trainer.Trainer` must handle.
    parameters : list of dict
        ``[{"name", "shape", "dtype"}, ...]``: what the safetensors body holds.
    """

    version_id: str
    number: int
    sha256: str
    url: str
    spec: dict[str, Any] | None
    parameters: list[dict[str, Any]]

    @classmethod
    def from_json(cls, obj: Any) -> ModelRef:
        """Build from the task's ``model`` object, raising :class:`ProtocolError` if malformed."""
        if not isinstance(obj, dict):
            raise ProtocolError(f"task.model must be an object. Found {obj!r}.")
        spec = obj.get("spec")
        if spec is not None and not isinstance(spec, dict):
            raise ProtocolError(f"task.model.spec must be an object or null. Found {spec!r}.")
        parameters = _require(obj, "parameters", list, "task.model")
        for entry in parameters:
            if not isinstance(entry, dict) or not {"name", "shape", "dtype"} <= entry.keys():
                raise ProtocolError(
                    f"task.model.parameters entries must have name, shape and dtype. Found {entry!r}."
                )
        sha256 = _require(obj, "sha256", str, "task.model").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ProtocolError(f"task.model.sha256 must be 64 hex digits. Found {sha256!r}.")
        return cls(
            version_id=_require(obj, "version_id", str, "task.model"),
            number=_require(obj, "number", int, "task.model"),
            sha256=sha256,
            url=_require(obj, "url", str, "task.model"),
            spec=spec,
            parameters=parameters,
        )


@dataclass(frozen=True)
class Task:
    """A unit of work handed to one agent by ``GET tasks/next``.

    Attributes
    ----------
    task_id, training_id : str
        UUIDs.
    kind : str
        ``"fit"``, or in a secure-aggregation training one of ``"secagg_advertise"``, ``"secagg_share"``,
        ``"secagg_masked_input"``, ``"secagg_unmask"`` (answered at ``upload_url``, see fedagent.secagg).
    round : int
        The round of the training this task belongs to.
    deadline : datetime
        When the server stops accepting the update (timezone-aware).
    model : ModelRef
        The global model to start from.
    config : dict
        Raw training configuration; see :class:`fedagent.trainer.FitConfig`.
    upload_url : str
        Where to ``POST`` the update, relative to the server.
    max_update_bytes : int
        Largest accepted safetensors body, in bytes.
    raw : dict
        The whole JSON object, for extensions the SDK does not know.
    """

    task_id: str
    kind: str
    training_id: str
    round: int
    deadline: datetime
    model: ModelRef
    config: dict[str, Any]
    upload_url: str
    max_update_bytes: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: Any) -> Task:
        """Build from the body of ``GET tasks/next``, raising :class:`ProtocolError` if malformed."""
        if not isinstance(obj, dict):
            raise ProtocolError(f"A task must be a JSON object. Found {type(obj).__name__}.")
        deadline_text = _require(obj, "deadline", str, "task")
        try:
            deadline = datetime.fromisoformat(deadline_text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ProtocolError(f"task.deadline must be ISO-8601. Found {deadline_text!r}.") from exc
        max_update_bytes = _require(obj, "max_update_bytes", int, "task")
        if max_update_bytes <= 0:
            raise ProtocolError(f"task.max_update_bytes must be positive. Found {max_update_bytes}.")
        return cls(
            task_id=_require(obj, "task_id", str, "task"),
            kind=_require(obj, "kind", str, "task"),
            training_id=_require(obj, "training_id", str, "task"),
            round=_require(obj, "round", int, "task"),
            deadline=deadline,
            model=ModelRef.from_json(obj.get("model")),
            config=_require(obj, "config", dict, "task"),
            upload_url=_require(obj, "upload_url", str, "task"),
            max_update_bytes=max_update_bytes,
            raw=obj,
        )
