"""Content-addressed tensor blobs behind Django's storage API.

A blob's name is ``blobs/<sha[:2]>/<sha>.safetensors``: writing the same bytes twice is a no-op, so a
retried aggregation or upload never duplicates or corrupts data. Blobs are written to a temporary
name and moved into place by the storage, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage


def blob_name_for(sha256: str) -> str:
    return f"blobs/{sha256[:2]}/{sha256}.safetensors"


def blob_save(data: bytes) -> tuple[str, str]:
    """Store ``data`` and return ``(name, sha256)``; an existing identical blob is reused."""
    sha256 = hashlib.sha256(data).hexdigest()
    name = blob_name_for(sha256)
    if not default_storage.exists(name):
        saved = default_storage.save(name, ContentFile(data))
        if saved != name:  # a concurrent writer stored the same content first
            default_storage.delete(saved)
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


def blob_exists(name: str) -> bool:
    return default_storage.exists(name)
