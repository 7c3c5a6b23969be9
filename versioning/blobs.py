"""Content-addressed tensor blobs behind Django's storage API.

A blob's name is ``blobs/<sha[:2]>/<sha>.safetensors``: writing the same bytes twice is a no-op, so a
retried aggregation or upload never duplicates or corrupts data. Blobs are written to a temporary
name and moved into place by the storage, so a reader never sees half a file.

Every write registers the blob (``versioning.models.Blob``) under that row's lock, and makes sure the file
exists while it holds the lock: a blob the garbage collector condemned is revived, and its file re-written
if it was already removed (``docs/versioning.md``, "Retention"). The caller writes the row that names the
blob soon after (within ``FEDSITE_BLOB_GRACE_HOURS``; in practice the same request or task).

Uploads are spooled (:func:`blob_spool`): copied chunk by chunk into a temporary file outside the blob
store while they are hashed and counted, and cut off at a byte limit, so memory stays at one chunk
whatever the size; the temporary file is always removed, whether or not it became a blob.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Protocol

from django.conf import settings
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

SPOOL_CHUNK_BYTES = 1024 * 1024


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class BlobTooLarge(Exception):
    """The spooled stream went past its byte limit (``received`` bytes were read when it stopped)."""

    def __init__(self, received: int, max_bytes: int) -> None:
        super().__init__(f"more than {max_bytes} bytes")
        self.received = received
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class SpooledBlob:
    """A stream copied to a temporary file: its path, SHA-256 and size, measured in the same pass."""

    path: str
    sha256: str
    size: int


class _SpooledFile(File):  # type: ignore[type-arg]
    """A File that names its path, so a file-system storage moves it into place instead of copying."""

    def temporary_file_path(self) -> str:
        return str(self.name)


class BlobSpoolWriter:
    """A temporary file fed chunk by chunk, hashed and counted as it grows, refused past ``max_bytes``.

    What :func:`blob_spool` runs for a readable stream, and what the ASGI layer runs on the chunks of a raw
    upload body as they arrive (``fedsite.asgi.AgentTransferApp``): one write and one hash of each byte.
    Call :meth:`finish` for the :class:`SpooledBlob`; the file is the caller's to remove, or
    :func:`blob_save_spooled`'s to move into the store. :meth:`discard` closes and removes it.
    """

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._digest = hashlib.sha256()
        self._descriptor, self.path = tempfile.mkstemp(
            prefix="fedsite-upload-", suffix=".part", dir=settings.FILE_UPLOAD_TEMP_DIR
        )

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; raise :class:`BlobTooLarge` (nothing written) once the total passes the limit."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise BlobTooLarge(self.size, self.max_bytes)
        self._digest.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._descriptor, view) :]

    def finish(self) -> SpooledBlob:
        """Close the file and return its path, SHA-256 and size."""
        self._close()
        return SpooledBlob(path=self.path, sha256=self._digest.hexdigest(), size=self.size)

    def discard(self) -> None:
        """Close and remove the file."""
        self._close()
        with suppress(FileNotFoundError):
            os.unlink(self.path)

    def _close(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1


@contextmanager
def blob_spool(source: Readable, *, max_bytes: int) -> Iterator[SpooledBlob]:
    """Copy ``source`` to a temporary file, hashing and counting as it goes; stop past ``max_bytes``.

    Raises :class:`BlobTooLarge` as soon as more than ``max_bytes`` bytes were read (the rest of the
    stream is not read). The temporary file is removed when the block ends, unless
    :func:`blob_save_spooled` moved it into the store.
    """
    writer = BlobSpoolWriter(max_bytes=max_bytes)
    try:
        while True:
            chunk = source.read(SPOOL_CHUNK_BYTES)
            if not chunk:
                break
            writer.write(chunk)
        yield writer.finish()
    finally:
        writer.discard()  # a no-op once moved into the store


def _store(name: str, content: File) -> None:  # type: ignore[type-arg]
    saved = default_storage.save(name, content)
    if saved != name:  # another writer stored the same content first
        default_storage.delete(saved)


@contextmanager
def blob_registered(name: str, *, sha256: str, size: int) -> Iterator[bool]:
    """Hold the registry row of ``name`` (created if missing), marked as just used and not condemned.

    Yields whether the file is missing, so the block writes it while the lock is held: the garbage
    collector removes a file only under the same lock, after re-checking that nobody revived the blob.
    """
    with blobs_registered([(name, sha256, size)]) as missing:
        yield name in missing


@contextmanager
def blobs_registered(blobs: Sequence[tuple[str, str, int]]) -> Iterator[set[str]]:
    """:func:`blob_registered` of several ``(name, sha256, size)`` at once: one upsert that creates the
    missing rows and marks every row just used and not condemned, taking the row locks in name order
    (two writers never wait for each other in a cycle). Yields the names whose file is missing.

    The upsert takes each existing row's lock, waiting for a collector that holds it; if the collector
    deleted the row meanwhile, the upsert inserts it again (INSERT ... ON CONFLICT DO UPDATE either
    inserts or updates, atomically).
    """
    from versioning.models import Blob

    now = timezone.now()
    rows = {name: (sha256, size) for name, sha256, size in blobs}
    with transaction.atomic():
        Blob.objects.bulk_create(
            [
                Blob(name=name, sha256=sha256, size_bytes=size, touched_at=now, condemned_at=None)
                for name, (sha256, size) in sorted(rows.items())
            ],
            update_conflicts=True,
            unique_fields=["name"],
            update_fields=["touched_at", "condemned_at", "size_bytes"],
        )
        yield {name for name in rows if not default_storage.exists(name)}


def blob_save_spooled(spooled: SpooledBlob) -> str:
    """Move (or copy, for a remote storage) a spooled upload into the store; return the blob's name."""
    (name,) = blobs_save_spooled([spooled])
    return name


def blobs_save_spooled(spooled: Sequence[SpooledBlob]) -> list[str]:
    """:func:`blob_save_spooled` of several spooled uploads, registered together
    (:func:`blobs_registered`); returns their names, in order. Of identical uploads one file is kept."""
    names = [blob_name_for(blob.sha256) for blob in spooled]
    with blobs_registered([(n, b.sha256, b.size) for n, b in zip(names, spooled, strict=True)]) as missing:
        for name, blob in zip(names, spooled, strict=True):
            if name in missing:
                with open(blob.path, "rb") as handle:
                    _store(name, _SpooledFile(handle, name=blob.path))
                missing.discard(name)
    return names


def blob_name_for(sha256: str) -> str:
    return f"blobs/{sha256[:2]}/{sha256}.safetensors"


def blob_save(data: bytes) -> tuple[str, str]:
    """Store ``data`` and return ``(name, sha256)``; an existing identical blob is reused."""
    sha256 = hashlib.sha256(data).hexdigest()
    name = blob_name_for(sha256)
    with blob_registered(name, sha256=sha256, size=len(data)) as missing:
        if missing:
            _store(name, ContentFile(data))
    return name, sha256


def blob_read(name: str) -> bytes:
    with default_storage.open(name, "rb") as handle:
        return handle.read()


def blob_local_path(name: str) -> str | None:
    """The file-system path of a blob when the storage is local (for memory-mapped streaming)."""
    try:
        return default_storage.path(name)
    except NotImplementedError:
        return None


class BlobHashMismatch(Exception):
    """A stored blob's bytes do not hash to the sha256 it is recorded under (``actual`` is what they do)."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(f"{name}: sha256 {actual}, expected {expected}")
        self.name, self.expected, self.actual = name, expected, actual


#: ``BlobHashMismatch.actual`` of a blob whose file is not there at all.
MISSING_BLOB = "absent (the file is missing)"

#: (path, sha256) -> (size, mtime_ns, inode) of the file when this process last hashed it and it matched.
_verified_files: dict[tuple[str, str], tuple[int, int, int]] = {}


def blob_verified_path(name: str, sha256: str) -> tuple[str, int] | None:
    """The local path and size of blob ``name``, checked to hash to ``sha256``; None if not on local disk.

    The file is hashed (one sequential read) the first time this process asks for it and whenever its
    size, mtime or inode changed since; in between a blob, immutable and content-addressed, costs one
    ``stat``. Raises :class:`BlobHashMismatch` when the bytes do not match (nothing is remembered then, so
    every later call hashes again and refuses again), and when the file is missing (``actual`` says so).
    """
    path = blob_local_path(name)
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        _verified_files.pop((path, sha256), None)
        raise BlobHashMismatch(name, sha256, MISSING_BLOB) from None
    signature = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if _verified_files.get((path, sha256)) != signature:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(SPOOL_CHUNK_BYTES):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            _verified_files.pop((path, sha256), None)
            raise BlobHashMismatch(name, sha256, digest.hexdigest())
        _verified_files[(path, sha256)] = signature
    return path, stat.st_size


def blob_exists(name: str) -> bool:
    return default_storage.exists(name)
