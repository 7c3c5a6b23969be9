"""Hostile input over HTTP: bad strings, deep nesting, look-alike ids and oversized bodies get a 4xx that
names the field, store nothing and leave no file behind (issue 7, items 1-3 and 12)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from clients.models import Agent
from clients.services import enrollment_key_create
from fedsite.errors import PayloadTooLarge
from flcore.parameters import ParameterSpec, to_bytes
from trainings import services
from trainings.models import ClientUpdate, Task, Training

# JSON text fragments (inside a string literal) that decode to what Postgres or UTF-8 cannot hold.
BAD_STRINGS = {
    "nul": "a\\u0000b",
    "lone high surrogate": "a\\ud800b",
    "lone low surrogate": "\\udfff",
}
DEEP = 5000  # far past Python's recursion limit: a RecursionError before the fix
MODERATELY_DEEP = 40  # parses fine, but deeper than FEDSITE_MAX_JSON_DEPTH


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def _delta(training: Training, value: float = 0.1) -> bytes:
    spec = ParameterSpec.from_json(training.parameter_spec)
    return to_bytes({t.name: np.full(t.shape, value, dtype=np.float32) for t in spec.tensors})


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


@pytest.fixture(autouse=True)
def storage_dirs(settings: Any, tmp_path: Path) -> dict[str, Path]:
    media, spool = tmp_path / "media", tmp_path / "spool"
    spool.mkdir()
    settings.MEDIA_ROOT = str(media)
    settings.FILE_UPLOAD_TEMP_DIR = str(spool)
    return {"media": media, "spool": spool}


@pytest.fixture
def key(db: Any) -> str:
    return enrollment_key_create(label="hostile")[1]


@pytest.fixture
def running(make_agent: Any, make_training: Any) -> dict[str, Any]:
    agents = [make_agent() for _ in range(3)]
    training = make_training(min_clients_per_round=3, max_clients_per_round=3)
    return {"training": training, "agents": agents}


def _post_json(client: Any, url: str, text: str, **extra: Any) -> Any:
    return client.post(url, text, content_type="application/json", **extra)


def _assert_refused(response: Any, field: str, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert field in error["message"], error
    assert any(field in key for key in error["details"]), error
    return error


# --- item 2: NUL, lone surrogates and nesting, endpoint by endpoint ------------------------------------
@pytest.mark.django_db
@pytest.mark.parametrize("bad", list(BAD_STRINGS.values()), ids=list(BAD_STRINGS))
@pytest.mark.parametrize(
    ("template", "field"),
    [
        (
            '{{"enrollment_key": "K", "agent_id": "a1", "capabilities": {{"gpu": "{bad}"}}}}',
            "capabilities.gpu",
        ),
        ('{{"enrollment_key": "K", "agent_id": "a1", "capabilities": {{"{bad}": 1}}}}', "capabilities"),
        (
            '{{"enrollment_key": "K", "agent_id": "a1", "capabilities": {{"l": [1, "{bad}"]}}}}',
            "capabilities.l[1]",
        ),
        ('{{"enrollment_key": "{bad}", "agent_id": "a1"}}', "enrollment_key"),
        ('{{"enrollment_key": "K", "agent_id": "{bad}"}}', "agent_id"),
    ],
)
def test_enroll_refuses_bad_strings(client: Any, key: str, template: str, field: str, bad: str) -> None:
    response = _post_json(client, "/api/v1/agent/enroll", template.format(bad=bad).replace('"K"', f'"{key}"'))
    _assert_refused(response, field)
    assert Agent.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("depth", [DEEP, MODERATELY_DEEP])
def test_enroll_refuses_deep_nesting(client: Any, key: str, depth: int) -> None:
    body = f'{{"enrollment_key": "{key}", "agent_id": "a1", "capabilities": {{"x": {_nested(depth)}}}}}'
    error = _assert_refused(_post_json(client, "/api/v1/agent/enroll", body), "capabilities.x[0]")
    assert error["code"] == "too_deep" and "nested more than 32 levels" in error["message"]
    assert Agent.objects.count() == 0
    # the same request, shallow, is accepted: the refusal was the nesting, not the key
    shallow = f'{{"enrollment_key": "{key}", "agent_id": "a1", "capabilities": {{"x": {_nested(3)}}}}}'
    assert _post_json(client, "/api/v1/agent/enroll", shallow).status_code == 201


@pytest.mark.django_db
@pytest.mark.parametrize("bad", list(BAD_STRINGS.values()), ids=list(BAD_STRINGS))
def test_heartbeat_refuses_bad_strings(client: Any, make_agent: Any, bad: str) -> None:
    agent, token = make_agent()
    body = f'{{"state": "idle", "capabilities": {{"os": {{"name": "{bad}"}}}}}}'
    _assert_refused(
        _post_json(client, "/api/v1/agent/heartbeat", body, **_bearer(token)), "capabilities.os.name"
    )
    agent.refresh_from_db()
    assert agent.capabilities == {}
    deep = f'{{"capabilities": {{"x": {_nested(DEEP)}}}}}'
    _assert_refused(_post_json(client, "/api/v1/agent/heartbeat", deep, **_bearer(token)), "capabilities.x")
    agent.refresh_from_db()
    assert agent.capabilities == {}


@pytest.mark.django_db
@pytest.mark.parametrize("bad", list(BAD_STRINGS.values()), ids=list(BAD_STRINGS))
def test_fail_refuses_bad_reason(client: Any, running: dict[str, Any], bad: str) -> None:
    _, token = running["agents"][0]
    task = client.get("/api/v1/agent/tasks/next?wait=0", **_bearer(token)).json()
    url = f"/api/v1/agent/tasks/{task['task_id']}/fail"
    _assert_refused(_post_json(client, url, f'{{"reason": "{bad}"}}', **_bearer(token)), "reason")
    _assert_refused(_post_json(client, url, f'{{"reason": {_nested(DEEP)}}}', **_bearer(token)), "reason[0]")
    stored = Task.objects.get(pk=task["task_id"])
    assert stored.status == Task.Status.DELIVERED and stored.failure_reason == ""


@pytest.mark.django_db
@pytest.mark.parametrize("bad", list(BAD_STRINGS.values()), ids=list(BAD_STRINGS))
@pytest.mark.parametrize("url", ["/api/v1/trainings/", "/api/training/start"])
@pytest.mark.parametrize(
    ("template", "field"),
    [
        ('{{"name": "{bad}", "model_type": "logreg"}}', "name"),
        ('{{"name": "ok", "metadata": {{"owner": "{bad}"}}}}', "metadata.owner"),
        ('{{"name": "ok", "metadata": {{"{bad}": "x"}}}}', "metadata"),
        ('{{"name": "ok", "hyperparameters": {{"a": ["{bad}"]}}}}', "hyperparameters.a[0]"),
    ],
)
def test_training_creation_refuses_bad_strings(
    staff_client: Any, url: str, template: str, field: str, bad: str
) -> None:
    _assert_refused(_post_json(staff_client, url, template.format(bad=bad)), field)
    assert Training.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/api/v1/trainings/", "/api/training/start"])
def test_training_creation_refuses_deep_nesting(staff_client: Any, url: str) -> None:
    body = f'{{"name": "deep", "metadata": {{"x": {_nested(DEEP)}}}}}'
    _assert_refused(_post_json(staff_client, url, body), "metadata.x[0]")
    body = f'{{"name": "deep", "metadata": {{"x": {_nested(MODERATELY_DEEP)}}}}}'
    _assert_refused(_post_json(staff_client, url, body), "metadata.x")
    assert Training.objects.count() == 0


def test_service_level_checks_without_http(db: Any) -> None:
    """Strings that reach services by other paths (admin, commands, Python) are checked there too."""
    from clients.services import agent_create
    from fedsite.errors import ValidationFailed
    from trainings.configuration import TrainingConfiguration

    with pytest.raises(ValidationFailed, match=r"capabilities\.x"):
        agent_create(agent_id="svc", capabilities={"x": "a\x00b"})
    with pytest.raises(ValidationFailed, match="name"):
        TrainingConfiguration.from_dict({"name": "bad\ud800"})
    assert Agent.objects.count() == 0


# --- item 2 (uploads): X-Update-Meta and the multipart meta part --------------------------------------
@pytest.mark.django_db
def test_update_meta_bad_strings_and_nesting_store_nothing(
    client: Any, running: dict[str, Any], storage_dirs: dict[str, Path]
) -> None:
    training = running["training"]
    _, token = running["agents"][0]
    task = client.get("/api/v1/agent/tasks/next?wait=0", **_bearer(token)).json()
    url = f"/api/v1/agent/tasks/{task['task_id']}/update"
    good = _delta(training)
    before = _files_under(storage_dirs["media"])  # the training's version 0
    metas = {
        **{
            f"metric name {k}": (f'{{"num_examples": 3, "metrics": {{"{v}": 0.5}}}}', "meta.metrics")
            for k, v in BAD_STRINGS.items()
        },
        **{
            f"extra {k}": (f'{{"num_examples": 3, "note": "{v}"}}', "meta.note")
            for k, v in BAD_STRINGS.items()
        },
        "deep": (f'{{"num_examples": 3, "metrics": {_nested(DEEP)}}}', "meta.metrics[0]"),
        "moderately deep": (f'{{"num_examples": 3, "x": {_nested(MODERATELY_DEEP)}}}', "meta.x"),
    }
    for label, (meta, field) in metas.items():
        raw = client.post(
            url, good, content_type="application/octet-stream", HTTP_X_UPDATE_META=meta, **_bearer(token)
        )
        assert raw.status_code == 400, (label, raw.content)
        assert field in raw.json()["error"]["message"], (label, raw.json())
        multipart = client.post(
            url, {"update": SimpleUploadedFile("u", good), "meta": meta}, **_bearer(token)
        )
        assert multipart.status_code == 400, (label, multipart.content)
        assert field in multipart.json()["error"]["message"], (label, multipart.json())
    assert not ClientUpdate.objects.exists()
    assert Task.objects.get(pk=task["task_id"]).status == Task.Status.DELIVERED
    assert _files_under(storage_dirs["media"]) == before
    assert _files_under(storage_dirs["spool"]) == set()


# --- item 1 at the Django level: per-endpoint sizes, the task's limit before reading ---------------------
@pytest.mark.django_db
def test_json_body_over_the_endpoint_limit_is_413(client: Any, key: str, settings: Any) -> None:
    settings.FEDSITE_MAX_JSON_BODY_BYTES = 1024
    body = json.dumps({"enrollment_key": key, "agent_id": "big", "capabilities": {"x": "y" * 2000}})
    response = _post_json(client, "/api/v1/agent/enroll", body)
    assert response.status_code == 413, response.content
    assert response.json()["error"]["details"] == {"max_bytes": 1024}
    assert Agent.objects.count() == 0


@pytest.mark.django_db
def test_upload_declared_over_task_limit_is_refused_before_reading(
    client: Any, running: dict[str, Any], storage_dirs: dict[str, Path]
) -> None:
    training = running["training"]
    _, token = running["agents"][0]
    task = client.get("/api/v1/agent/tasks/next?wait=0", **_bearer(token)).json()
    url = f"/api/v1/agent/tasks/{task['task_id']}/update"
    good = _delta(training)
    limit = services.update_max_bytes(training)
    meta = json.dumps({"num_examples": 3})
    before = _files_under(storage_dirs["media"])
    # a good body whose Content-Length claims more than the task's limit: refused by the header alone
    response = client.post(
        url,
        good,
        content_type="application/octet-stream",
        HTTP_X_UPDATE_META=meta,
        CONTENT_LENGTH=str(limit + 1),
        **_bearer(token),
    )
    assert response.status_code == 413, response.content
    assert response.json()["error"]["details"] == {"max_update_bytes": limit}
    oversize = client.post(
        url, {"update": SimpleUploadedFile("u", good + b" " * limit), "meta": meta}, **_bearer(token)
    )
    assert oversize.status_code == 413, oversize.content
    assert not ClientUpdate.objects.exists()
    assert _files_under(storage_dirs["media"]) == before
    assert _files_under(storage_dirs["spool"]) == set()


class _CountingStream:
    """An endless stream that counts what is read from it (a body with no Content-Length)."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        size = 1 << 20 if size < 0 else size
        self.read_bytes += size
        return b"\x01" * size


@pytest.mark.django_db
def test_undeclared_upload_stops_at_the_task_limit(
    running: dict[str, Any], make_agent: Any, storage_dirs: dict[str, Path]
) -> None:
    training = running["training"]
    agent = running["agents"][0][0]
    task = services.task_next_for_agent(agent=agent)
    limit = services.update_max_bytes(training)
    before = _files_under(storage_dirs["media"])
    stream = _CountingStream()
    with pytest.raises(PayloadTooLarge) as caught:
        services.update_submit(agent=agent, task_id=task.pk, body=stream, meta={"num_examples": 3})
    assert caught.value.details == {"max_update_bytes": limit}
    # it stopped within one chunk past the limit instead of reading the endless body
    assert limit < stream.read_bytes <= limit + (1 << 20)
    assert not ClientUpdate.objects.exists()
    assert _files_under(storage_dirs["media"]) == before
    assert _files_under(storage_dirs["spool"]) == set()


@pytest.mark.django_db
def test_accepted_upload_becomes_the_blob_and_leaves_no_spool(
    client: Any, running: dict[str, Any], storage_dirs: dict[str, Path]
) -> None:
    training = running["training"]
    _, token = running["agents"][0]
    task = client.get("/api/v1/agent/tasks/next?wait=0", **_bearer(token)).json()
    good = _delta(training, 0.2)
    response = client.post(
        f"/api/v1/agent/tasks/{task['task_id']}/update",
        good,
        content_type="application/octet-stream",
        HTTP_X_UPDATE_META=json.dumps({"num_examples": 3}),
        **_bearer(token),
    )
    assert response.status_code == 201, response.content
    stored = ClientUpdate.objects.get()
    blob = storage_dirs["media"] / stored.blob_name
    assert blob.read_bytes() == good and stored.size_bytes == len(good)
    assert _files_under(storage_dirs["spool"]) == set()


# --- item 3: look-alike identities -----------------------------------------------------------------------
LOOK_ALIKES = ["abc\n", "abc\r\n", "\nabc", "abc\x00", "abc ", "ab\nc"]


@pytest.mark.django_db
@pytest.mark.parametrize("agent_id", LOOK_ALIKES)
def test_look_alike_agent_ids_are_refused_everywhere(
    client: Any, staff_client: Any, key: str, agent_id: str
) -> None:
    from django.core.exceptions import ValidationError

    from clients.models import agent_id_validator
    from clients.services import agent_create
    from fedsite.errors import ValidationFailed

    enrolled = _post_json(
        client, "/api/v1/agent/enroll", json.dumps({"enrollment_key": key, "agent_id": agent_id})
    )
    _assert_refused(enrolled, "agent_id")
    created = staff_client.post("/api/v1/agents/", {"agent_id": agent_id}, content_type="application/json")
    assert created.status_code == 400 and "agent_id" in created.json()["error"]["details"], created.content
    with pytest.raises(ValidationFailed):
        agent_create(agent_id=agent_id)
    with pytest.raises(ValidationError):
        agent_id_validator(agent_id)
    assert Agent.objects.count() == 0


@pytest.mark.django_db
def test_enrolled_abc_is_not_shadowed_by_abc_newline(client: Any, staff_client: Any, key: str) -> None:
    assert (
        _post_json(
            client, "/api/v1/agent/enroll", json.dumps({"enrollment_key": key, "agent_id": "abc"})
        ).status_code
        == 201
    )
    again = _post_json(
        client, "/api/v1/agent/enroll", json.dumps({"enrollment_key": key, "agent_id": "abc\n"})
    )
    assert again.status_code == 400
    assert list(Agent.objects.values_list("agent_id", flat=True)) == ["abc"]
    assert staff_client.get("/api/v1/agents/abc/").status_code == 200
    assert staff_client.get("/api/v1/agents/abc%0A/").status_code == 404


def test_no_validation_regex_uses_a_dollar_anchor() -> None:
    """Every identifier pattern in the project matches the whole string (``\\A...\\Z`` or fullmatch)."""
    import re

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in root.rglob("*.py"):
        if any(part.startswith(".venv") for part in path.parts) or {"migrations", "tests"} & set(path.parts):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""r["']\^[^"']*\$["']""", line):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []


# --- item 12: wait= and the fail reason limit ------------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.parametrize(
    ("query", "word"), [("wait=", "empty"), ("wait=1&wait=2", "once"), ("wait=%20", "empty")]
)
def test_wait_empty_or_repeated_is_400(client: Any, make_agent: Any, query: str, word: str) -> None:
    _, token = make_agent()
    response = client.get(f"/api/v1/agent/tasks/next?{query}", **_bearer(token))
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert "wait" in error["message"] and word in error["message"]
    assert client.get("/api/v1/agent/tasks/next", **_bearer(token)).status_code == 204


@pytest.mark.django_db
def test_fail_reason_over_1000_characters_is_refused_not_cut(client: Any, running: dict[str, Any]) -> None:
    _, token = running["agents"][0]
    task = client.get("/api/v1/agent/tasks/next?wait=0", **_bearer(token)).json()
    url = f"/api/v1/agent/tasks/{task['task_id']}/fail"
    too_long = _post_json(client, url, json.dumps({"reason": "x" * 1001}), **_bearer(token))
    _assert_refused(too_long, "reason")
    assert "1000" in too_long.json()["error"]["message"]
    assert Task.objects.get(pk=task["task_id"]).status == Task.Status.DELIVERED
    ok = _post_json(client, url, json.dumps({"reason": "y" * 1000}), **_bearer(token))
    assert ok.status_code == 200, ok.content
    assert Task.objects.get(pk=task["task_id"]).failure_reason == "y" * 1000
