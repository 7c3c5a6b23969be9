"""The raw uploads' database work, batched: the uploads of a round arrive together, and share trips to a
worker thread and a handful of statements (fedsite.batching).

One at a time, an upload cost two trips to a worker thread and twelve ORM statements, compiled and sent
one by one, eight of them while holding the round's row lock that every other upload of the round waits
for: its task with its round and training, its stored update (twice), the blob's registry row (two
statements), the round's and the task's locks, the update row, the task's transition, the agent's
counters, its last tasks for the failure alert, and the round's settlement; sixteen (twelve under the
lock) once the agent had enough finished tasks for the alert (its name, and the alert's lookup in a
savepoint). :class:`UploadBatcher` queues the two steps of each upload on the event loop:

- ``ADMIT``, before the body is read: the tokens (``clients.services.agents_authenticate``: one cache
  round trip, one query for the tokens not cached), the headers, the tasks with their rounds and
  trainings in one query (``trainings.services.updates.updates_admit``);
- ``ACCEPT``, once the body is spooled: the stored updates in one query, each body validated, the blobs
  registered in one upsert, and per round one transaction of a fixed number of statements whatever the
  number of uploads (``trainings.services.updates.updates_accept_spooled``).

Each request gets what it would get alone, in the same order of checks; an error of one request is that
request's own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from clients.services import agents_authenticate
from fedsite.batching import ThreadBatcher
from fedsite.errors import ServiceError
from trainings.api.agent_views import raw_upload_headers
from trainings.poll_batch import release_connection
from trainings.services.updates import updates_accept_spooled, updates_admit

logger = logging.getLogger("trainings.upload_batch")

#: An upload before its body is read: ``(ADMIT, (authorization, client IP, task id, request headers))``.
ADMIT = "admit"
#: An upload whose body is spooled: ``(ACCEPT, (admission, spooled body))``.
ACCEPT = "accept"
#: The most uploads one batch takes (each ACCEPT validates a model-sized body on the batch's thread).
MAX_BATCH = 64


def process_uploads(items: list[tuple[str, Any]]) -> list[Any]:
    """The database work of a batch of uploads, in order (synchronous: a worker thread runs it): an
    ``UpdateAdmission`` for each ADMIT, ``(update, created)`` for each ACCEPT, or the exception."""
    outcomes: list[Any] = [None] * len(items)
    try:
        admits = [index for index, (kind, _) in enumerate(items) if kind == ADMIT]
        if admits:
            _admit(items, admits, outcomes)
        accepts = [index for index, (kind, _) in enumerate(items) if kind == ACCEPT]
        if accepts:
            try:
                accepted: list[Any] = updates_accept_spooled([items[index][1] for index in accepts])
            except Exception as exc:  # a statement shared by the batch failed: every upload gets its error
                accepted = [exc] * len(accepts)
            for index, outcome in zip(accepts, accepted, strict=True):
                outcomes[index] = outcome
    finally:
        release_connection()
    return outcomes


def _admit(items: list[tuple[str, Any]], admits: list[int], outcomes: list[Any]) -> None:
    try:
        authenticated: list[Any] = agents_authenticate([items[index][1][:2] for index in admits])
    except Exception as exc:
        authenticated = [exc] * len(admits)
    requests: list[tuple[Any, Any, Any, int | None]] = []
    placed: list[int] = []
    for index, agent in zip(admits, authenticated, strict=True):
        if isinstance(agent, Exception):
            outcomes[index] = agent
            continue
        _, _, task_id, headers = items[index][1]
        try:
            meta, declared = raw_upload_headers(headers)
        except ServiceError as exc:
            outcomes[index] = exc
            continue
        requests.append((agent, task_id, meta, declared))
        placed.append(index)
    if not requests:
        return
    try:
        admitted: list[Any] = updates_admit(requests)
    except Exception as exc:
        admitted = [exc] * len(requests)
    for index, outcome in zip(placed, admitted, strict=True):
        outcomes[index] = outcome


class UploadBatcher(ThreadBatcher):
    """Raw uploads per event loop, processed by :func:`process_uploads` in batches; admissions and
    acceptances queue apart (an upload about to send its body never waits behind validations)."""

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        super().__init__(
            process_uploads, name="upload_batch", kinds=(ADMIT, ACCEPT), max_batch=max_batch, log=logger
        )

    async def admit(
        self, authorization: str | None, client_ip: str | None, task_id: str, headers: Mapping[str, str]
    ) -> Any:
        """``trainings.services.updates.update_admit`` of the upload, with its token checked first."""
        return await self.submit(ADMIT, (authorization, client_ip, task_id, headers))

    async def accept(self, admission: Any, spooled: Any) -> tuple[Any, bool]:
        """``trainings.services.updates.update_accept_spooled`` of the upload: ``(update, created)``."""
        return await self.submit(ACCEPT, (admission, spooled))  # type: ignore[no-any-return]


upload_batcher = UploadBatcher()
