"""Two transactions on Postgres: the collector condemns a blob while a writer adds a reference to it.

The collector's transaction is held open (it has condemned the blob and holds its registry row); a second
connection stores the same content for a new training and blocks on that row. The test waits until
Postgres reports the writer waiting for a lock, then lets the collector commit: whichever of the removal
and the writer gets the row next, the blob must survive with the writer's row naming it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import pytest
from django.core.files.storage import default_storage
from django.db import connection, connections, transaction

from versioning.blobs import blob_read
from versioning.garbage import garbage_collect
from versioning.models import Blob
from versioning.tests.test_retention_gc import _age, _history

pytestmark = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="two concurrent transactions need the real Postgres"
)


def _writer_waiting_for_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        return bool(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_a_reference_added_while_the_blob_is_being_deleted_keeps_it(make_training: Any) -> None:
    first = _history(make_training, [0.5, 0.6], retention={"keep_last": 1, "keep_best": False}, seed=11)
    shared = first.versions.get(number=0)
    _age()
    condemned, release, errors = threading.Event(), threading.Event(), []
    result: dict[str, Any] = {}

    def collector() -> None:
        try:
            with transaction.atomic():
                result["report"] = garbage_collect(training_id=first.pk)
                condemned.set()
                assert release.wait(30)
            # committed: the removal (on_commit) has run by now
        except BaseException as exc:
            errors.append(exc)
            condemned.set()
        finally:
            connections.close_all()

    def writer() -> None:
        try:
            # the same seed: version 0 is byte for byte the blob being deleted
            result["second"] = make_training(start=False, seed=11)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    gc_thread = threading.Thread(target=collector)
    gc_thread.start()
    assert condemned.wait(30) and not errors, errors
    assert Blob.objects.get(name=shared.blob_name).condemned_at is None  # not committed yet: invisible
    write_thread = threading.Thread(target=writer)
    write_thread.start()
    deadline = time.monotonic() + 30
    while not _writer_waiting_for_a_lock():
        assert time.monotonic() < deadline, "the writer never waited for the registry row"
        time.sleep(0.05)
    release.set()
    gc_thread.join(30)
    write_thread.join(30)
    assert not errors, errors
    assert result["report"].versions.blobs >= 1  # the collector did condemn the shared blob
    second_v0 = result["second"].versions.get(number=0)
    assert second_v0.blob_name == shared.blob_name
    assert default_storage.exists(second_v0.blob_name)
    assert hashlib.sha256(blob_read(second_v0.blob_name)).hexdigest() == second_v0.blob_sha256
    assert Blob.objects.get(name=second_v0.blob_name).condemned_at is None  # registered and alive
    first.refresh_from_db()
    assert first.versions.get(number=0).blob_pruned_at is not None
