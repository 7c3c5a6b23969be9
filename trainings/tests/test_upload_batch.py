"""Uploads in batches (trainings.upload_batch, trainings.services.updates.updates_accept_spooled): each
upload gets what it would get alone, and a batch costs the same statements for three uploads as for
eight."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
from typing import Any, ClassVar

import numpy as np
import pytest
from django.core.files.storage import FileSystemStorage
from django.db import connection
from django.test.utils import CaptureQueriesContext

from clients.models import Agent
from fedsite.errors import Conflict, Forbidden, NotFound, PayloadTooLarge, ValidationFailed
from flcore.parameters import ParameterSpec, to_bytes
from trainings import services
from trainings.models import ClientUpdate, Round, Task
from trainings.services.updates import updates_accept_spooled, updates_admit
from trainings.upload_batch import ACCEPT, ADMIT, process_uploads
from versioning.blobs import BlobSpoolWriter, blob_name_for, blob_read

KS = Task.Status
META = json.dumps({"num_examples": 7, "metrics": {"loss": 0.5}})
SAVEPOINTS = ("SAVEPOINT", "RELEASE SAVEPOINT")  # (the test's transaction makes the service's savepoints)


@pytest.fixture(autouse=True)
def _own_stores(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "spool")
    (tmp_path / "spool").mkdir()


def _round_of(make_agent: Any, make_training: Any, uploads: int) -> tuple[Any, list[tuple[Agent, str, Task]]]:
    """A training whose round waits for one agent more than ``uploads``, and its agents with their tasks
    (the agents of earlier trainings are disabled: they take no part)."""
    Agent.objects.update(status=Agent.Status.DISABLED)
    agents = [make_agent() for _ in range(uploads + 1)]
    training = make_training(min_clients_per_round=uploads + 1, max_clients_per_round=uploads + 1)
    return training, [(agent, token, services.task_next_for_agent(agent=agent)) for agent, token in agents]


def _body(training: Any, value: float) -> bytes:
    spec = ParameterSpec.from_json(training.parameter_spec)
    return to_bytes({t.name: np.full(t.shape, value, dtype=np.float32) for t in spec.tensors})


class _Spools:
    """Bodies spooled as the ASGI app spools them; every file removed at the end."""

    def __init__(self) -> None:
        self.writers: list[BlobSpoolWriter] = []

    def __call__(self, body: bytes) -> Any:
        writer = BlobSpoolWriter(max_bytes=len(body) + 1)
        writer.write(body)
        self.writers.append(writer)
        return writer.finish()

    def close(self) -> None:
        for writer in self.writers:
            writer.discard()


@pytest.fixture
def spool() -> Any:
    spools = _Spools()
    yield spools
    spools.close()


def _admit(agent: Agent, task: Task) -> Any:
    (admission,) = updates_admit([(agent, task.pk, META, None)])
    assert not isinstance(admission, Exception), admission
    return admission


@pytest.mark.django_db
def test_a_batch_of_eight_uploads_costs_the_statements_of_a_batch_of_three(
    make_agent: Any, make_training: Any, spool: Any
) -> None:
    counts = []
    for size in (3, 8):
        training, agents = _round_of(make_agent, make_training, size)
        items = [
            (_admit(agent, task), spool(_body(training, 0.01 * n)))
            for n, (agent, _, task) in enumerate(agents[:size])
        ]
        with CaptureQueriesContext(connection) as context:
            outcomes = updates_accept_spooled(items)
        counts.append(sum(not q["sql"].startswith(SAVEPOINTS) for q in context.captured_queries))
        assert [created for _, created in outcomes] == [True] * size, outcomes
        for (agent, _, task), (update, _) in zip(agents, outcomes, strict=False):
            task.refresh_from_db()
            assert task.status == KS.COMPLETED and update.task_id == task.pk and update.num_examples == 7
            assert update.metrics == {"loss": 0.5} and update.agent_id == agent.pk
            assert Agent.objects.get(pk=agent.pk).tasks_completed == 1
        assert ClientUpdate.objects.filter(round__training=training).count() == size
        assert Round.objects.get(training=training, number=1).status == Round.Status.COLLECTING  # one to come
    # the stored updates, the blobs' upsert, the round's and the tasks' locks, the update rows, the tasks'
    # transition, the agents' counters, their last tasks, the round's settlement: one statement each
    assert counts[0] == counts[1] == 9, counts


@pytest.mark.django_db
def test_every_upload_of_a_batch_gets_its_own_answer(make_agent: Any, make_training: Any, spool: Any) -> None:
    training, agents = _round_of(make_agent, make_training, 7)
    (a, _, task_a), (b, _, task_b), (c, _, task_c), (d, _, task_d) = agents[:4]
    (e, _, task_e), (f, _, task_f), (g, _, task_g) = agents[4:7]
    admit = {agent.pk: _admit(agent, task) for agent, _, task in agents[:7]}
    # after their admissions: d's update stored by another request, g's task given back (its admission
    # still shows it open: only the check under the row locks sees it closed)
    stored, _ = services.update_submit(
        agent=d, task_id=task_d.pk, spooled=spool(_body(training, 0.4)), meta=META
    )
    services.task_fail(agent=g, task_id=task_g.pk, reason="out of memory")
    garbage = bytearray(_body(training, 0.6))
    garbage[:8] = (10**9).to_bytes(8, "little")  # a header length past the end of the file
    items = [
        (admit[a.pk], spool(_body(training, 0.1))),  # accepted
        (admit[b.pk], spool(_body(training, 0.2))),  # accepted ...
        (admit[b.pk], spool(_body(training, 0.2))),  # ... and the same body again in the batch: 200
        (admit[c.pk], spool(_body(training, 0.3))),  # accepted ...
        (admit[c.pk], spool(_body(training, 0.31))),  # ... then another body for the same task: 409
        (admit[d.pk], spool(_body(training, 0.4))),  # stored before the batch, the same body: 200
        (admit[e.pk], spool(bytes(garbage))),  # not safetensors: 400
        (dataclasses.replace(admit[f.pk], max_bytes=100), spool(_body(training, 0.7))),  # over the limit: 413
        (admit[g.pk], spool(_body(training, 0.8))),  # its task was given back meanwhile: 409
    ]

    outcomes = updates_accept_spooled(items)

    (ua, new_a), (ub, new_b), (ub2, new_b2), (uc, new_c) = outcomes[:4]
    assert (new_a, new_b, new_b2, new_c) == (True, True, False, True)
    assert ub2.pk == ub.pk and ub.task_id == task_b.pk and ua.task_id == task_a.pk and uc.task_id == task_c.pk
    assert isinstance(outcomes[4], Conflict) and outcomes[4].code == "update_conflict"
    assert outcomes[5] == (stored, False)
    assert isinstance(outcomes[6], ValidationFailed) and outcomes[6].code.startswith("bad_update_")
    assert isinstance(outcomes[7], PayloadTooLarge)
    assert isinstance(outcomes[8], Conflict) and outcomes[8].code == "task_closed"
    # exactly the accepted ones are stored, and each agent's counter counts its task once
    assert set(ClientUpdate.objects.values_list("task_id", flat=True)) == {
        task_a.pk,
        task_b.pk,
        task_c.pk,
        task_d.pk,
    }
    assert ClientUpdate.objects.get(task=task_c).blob_sha256 == uc.blob_sha256
    assert {
        agent.agent_id: agent.tasks_completed
        for agent in Agent.objects.filter(pk__in=[a.pk, b.pk, c.pk, e.pk])
    } == {a.agent_id: 1, b.agent_id: 1, c.agent_id: 1, e.agent_id: 0}
    assert Task.objects.get(pk=task_e.pk).status == KS.DELIVERED  # a refused body leaves its task open
    assert Task.objects.get(pk=task_f.pk).status == KS.DELIVERED


@pytest.mark.django_db
def test_the_admissions_of_a_batch_read_their_tasks_in_one_query(make_agent: Any, make_training: Any) -> None:
    training, agents = _round_of(make_agent, make_training, 3)
    (a, token_a, task_a), (b, token_b, task_b) = agents[:2]
    items = [
        (ADMIT, (f"Bearer {token_a}", "10.0.0.1", str(task_a.pk), {"X-Update-Meta": META})),
        (ADMIT, (f"Bearer {token_a}", "10.0.0.1", str(task_b.pk), {"X-Update-Meta": META})),  # b's task
        (ADMIT, (f"Bearer {token_b}", "10.0.0.2", "not-a-task", {"X-Update-Meta": META})),
        (ADMIT, (f"Bearer {token_b}", "10.0.0.2", str(task_b.pk), {})),  # no meta
        (ADMIT, ("Bearer fsa_wrong", "10.0.0.3", str(task_b.pk), {"X-Update-Meta": META})),
        (
            ADMIT,
            (
                f"Bearer {token_b}",
                "10.0.0.2",
                str(task_b.pk),
                {"X-Update-Meta": META, "Content-Length": "9" * 12},
            ),
        ),
        (
            ADMIT,
            (
                f"Bearer {token_b}",
                "10.0.0.2",
                str(task_b.pk),
                {"X-Update-Meta": META, "Content-Length": "64"},
            ),
        ),
    ]
    with CaptureQueriesContext(connection) as context:
        outcomes = process_uploads(items)
    admitted, forbidden, unknown, no_meta, stranger, too_large, fine = outcomes
    assert admitted.task.pk == task_a.pk and admitted.agent.pk == a.pk and admitted.num_examples == 7
    assert admitted.max_bytes == services.update_max_bytes(training)
    assert isinstance(forbidden, Forbidden) and forbidden.code == "not_your_task"
    assert isinstance(unknown, NotFound) and unknown.code == "task_not_found"
    assert isinstance(no_meta, ValidationFailed) and no_meta.details == {"meta": "Required."}
    assert stranger.status_code == 401
    assert isinstance(too_large, PayloadTooLarge)
    assert fine.task.pk == task_b.pk and fine.agent.pk == b.pk
    task_reads = [q for q in context.captured_queries if 'FROM "trainings_task"' in q["sql"]]
    assert len(task_reads) == 1, task_reads


@pytest.mark.django_db
def test_an_accepted_upload_stores_its_body_its_meta_and_its_norm(
    make_agent: Any, make_training: Any, spool: Any
) -> None:
    training, agents = _round_of(make_agent, make_training, 1)
    agent, _, task = agents[0]
    body = _body(training, 0.25)
    ((update, created),) = process_uploads([(ACCEPT, (_admit(agent, task), spool(body)))])
    assert created
    stored = ClientUpdate.objects.get(pk=update.pk)
    assert stored.blob_sha256 == hashlib.sha256(body).hexdigest() and stored.size_bytes == len(body)
    assert blob_read(stored.blob_name) == body
    assert (stored.num_examples, stored.metrics, stored.round_id) == (7, {"loss": 0.5}, task.round_id)
    parameters = ParameterSpec.from_json(training.parameter_spec).num_parameters
    assert stored.update_norm == pytest.approx(0.25 * parameters**0.5, rel=1e-6)  # brute force: a constant


class FullDiskStorage(FileSystemStorage):
    """The file-system store with a disk that is full for the names in :attr:`refused` (a fake of the
    storage backend, which is Django's)."""

    refused: ClassVar[set[str]] = set()

    def _save(self, name: str, content: Any) -> str:
        if name in self.refused:
            raise OSError(errno.ENOSPC, "No space left on device", name)
        return super()._save(name, content)


@pytest.mark.django_db
def test_an_upload_whose_body_cannot_be_stored_fails_alone(
    make_agent: Any, make_training: Any, spool: Any, settings: Any
) -> None:
    """The blobs of a batch are stored together; when that fails, they are stored one by one, and only the
    upload whose own file cannot be written gets the error."""
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "trainings.tests.test_upload_batch.FullDiskStorage",
            "OPTIONS": {"location": settings.MEDIA_ROOT},
        },
    }
    training, agents = _round_of(make_agent, make_training, 2)
    (a, _, task_a), (b, _, task_b) = agents[:2]
    good, refused = _body(training, 0.1), _body(training, 0.2)
    FullDiskStorage.refused = {blob_name_for(hashlib.sha256(refused).hexdigest())}
    items = [(_admit(a, task_a), spool(good)), (_admit(b, task_b), spool(refused))]
    try:
        outcomes = updates_accept_spooled(items)
    finally:
        FullDiskStorage.refused = set()

    assert outcomes[0][1] is True and blob_read(outcomes[0][0].blob_name) == good
    assert isinstance(outcomes[1], OSError) and outcomes[1].errno == errno.ENOSPC
    assert list(ClientUpdate.objects.values_list("task_id", flat=True)) == [task_a.pk]
    assert Task.objects.get(pk=task_b.pk).status == KS.DELIVERED
