"""Agents of a secure-aggregation round as the REST tests drive them (Django's test client), and the scan
of the database and blob store for unmasked updates that the tests and the end-to-end test share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db import connection

from fedagent.secagg import (
    KIND_ADVERTISE,
    KIND_MASKED_INPUT,
    KIND_SHARE,
    KIND_UNMASK,
    SecAggParty,
    identity_registration,
)
from flcore.parameters import ParameterSpec
from flcore.secagg.simulation import identity_keys
from trainings.models import Training


def bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def register(client: Any, agent: Any, token: str, party: SecAggParty) -> Any:
    public_key, proof = identity_registration(agent.agent_id, party.identity_key)
    return client.post(
        "/api/v1/agent/identity-key",
        {"public_key": public_key, "proof": proof},
        content_type="application/json",
        **bearer(token),
    )


def make_parties(client: Any, make_agent: Any, count: int, prefix: str) -> dict[str, dict[str, Any]]:
    """``count`` agents, each with a registered identity key and its SecAggParty."""
    private, _ = identity_keys(range(1, count + 1))
    agents: dict[str, dict[str, Any]] = {}
    for index in range(count):
        agent, token = make_agent(f"{prefix}-{index}")
        party = SecAggParty(identity_key=private[index + 1])
        assert register(client, agent, token, party).status_code == 201
        agents[agent.agent_id] = {"agent": agent, "token": token, "party": party, "index": index}
    return agents


def sdk_over_wsgi(agent_id: str, info: dict[str, Any], transport: Any, **options: Any) -> Any:
    """fedagent's FederatedClient for one of :func:`make_parties`' agents, its HTTP through ``transport``
    (the Django application as an httpx WSGI transport), answering at once and trying each request once."""
    from fedagent.client import FederatedClient
    from fedagent.http import AgentHttpClient

    sdk = FederatedClient(
        agent_id=agent_id,
        server="http://testserver",
        token=info["token"],
        eval_fraction=0.0,
        poll_wait=0,
        max_attempts=1,
        secagg=info["party"],
        **options,
    )
    sdk._http.close()
    sdk._http = AgentHttpClient(
        "http://testserver", info["token"], max_attempts=1, transport=transport, log=sdk._log
    )
    return sdk


def poll(client: Any, token: str) -> dict[str, Any] | None:
    response = client.get("/api/v1/agent/tasks/next?wait=0", **bearer(token))
    assert response.status_code in (200, 204), response.content
    return response.json() if response.status_code == 200 else None


def agent_delta(training: Training, index: int) -> dict[str, np.ndarray]:
    """A distinct, deterministic delta per agent (float32), with norm well under the clip norm."""
    spec = ParameterSpec.from_json(training.parameter_spec)
    rng = np.random.default_rng(1000 + index)
    return {t.name: (0.05 * rng.standard_normal(t.shape)).astype(np.float32) for t in spec.tensors}


def answer(
    client: Any, training: Training, info: dict[str, Any], task: dict[str, Any], num_examples: int = 50
) -> Any:
    """What fedagent would send for ``task`` (the same SecAggParty code), posted over the test client."""
    party: SecAggParty = info["party"]
    secagg = task["config"]["secagg"]
    headers = bearer(info["token"])
    if task["kind"] == KIND_ADVERTISE:
        body, content_type = party.advertise(secagg), "application/json"
    elif task["kind"] == KIND_SHARE:
        body, content_type = party.share(secagg), "application/json"
    elif task["kind"] == KIND_UNMASK:
        body, content_type = party.unmask(secagg), "application/json"
    else:
        assert task["kind"] == KIND_MASKED_INPUT
        spec = ParameterSpec.from_json(training.parameter_spec)
        delta = agent_delta(training, info["index"])
        info["delta"] = delta
        body = party.masked_input(
            secagg, delta, spec, num_examples=num_examples, rng=np.random.default_rng(info["index"])
        )
        content_type = "application/octet-stream"
        evaluation = {"eval_accuracy": 0.5, "eval_num_examples": 10}
        headers["HTTP_X_SECAGG_META"] = json.dumps({"metrics": evaluation})
    return client.post(task["upload_url"], body, content_type=content_type, **headers)


def needles(vector: np.ndarray) -> list[bytes]:
    """Byte patterns of an update that must appear nowhere in storage: runs of eight values as float32 and
    float64 (and in the vector's own dtype, for a quantised one), from its start and its middle. A run
    holds no zero (a run of zeros is in every blob), so a match cannot be an accident."""
    flat = np.asarray(vector).ravel()
    starts = [i for i in range(flat.size - 7) if np.all(flat[i : i + 8] != 0)]
    if not starts:
        raise ValueError("the vector has no run of eight non-zero values to search for")
    picks = sorted({starts[0], starts[len(starts) // 2]})
    dtypes = [np.float32, np.float64] + ([flat.dtype] if flat.dtype.kind in "ui" else [])
    return [flat[i : i + 8].astype(dtype).tobytes() for dtype in dtypes for i in picks]


def storage_haystack() -> list[tuple[str, bytes]]:
    """Every text, JSON and bytes column of every table, and every file of the blob store."""
    found: list[tuple[str, bytes]] = []
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":  # every table, Django's or not
            cursor.execute(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = "
                "'public' AND data_type IN ('text', 'character varying', 'jsonb', 'json', 'bytea')"
            )
            columns = cursor.fetchall()
        else:  # the embedded SQLite: every column of every table
            columns = [
                (table, column.name)
                for table in connection.introspection.table_names(cursor)
                for column in connection.introspection.get_table_description(cursor, table)
            ]
        for table, column in columns:
            cursor.execute(f'SELECT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL')
            for (value,) in cursor.fetchall():
                data = bytes(value) if isinstance(value, memoryview | bytes) else str(value).encode()
                found.append((f"{table}.{column}", data))
    for path in Path(settings.MEDIA_ROOT).rglob("*"):
        if path.is_file():
            found.append((str(path), path.read_bytes()))
    return found


def scan_for(vectors: dict[str, np.ndarray]) -> list[str]:
    """Where any of ``vectors`` (float32/float64 bytes, or their decimal text) shows up in storage."""
    haystack = storage_haystack()
    hits = []
    for name, vector in vectors.items():
        flat = np.asarray(vector).ravel()
        texts = [repr(float(np.float32(flat[i]))).encode() for i in range(min(3, flat.size)) if flat[i]]
        if flat.dtype.kind in "ui":
            texts = []  # small integers as text are everywhere; their binary runs are what would leak
        for where, data in haystack:
            if any(pattern in data for pattern in needles(flat)):
                hits.append(f"{name} as binary in {where}")
            if texts and all(text in data for text in texts):
                hits.append(f"{name} as text in {where}")
    return hits
