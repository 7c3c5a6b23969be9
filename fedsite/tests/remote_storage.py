"""A blob store with no local paths, as an object store behind django-storages would be (for tests)."""

from __future__ import annotations

import threading
from typing import Any

from django.core.files.base import ContentFile
from django.core.files.storage import Storage

_files: dict[str, bytes] = {}
_lock = threading.Lock()


class NoLocalPathStorage(Storage):
    """Files kept in this process's memory, reachable only by opening them: ``path()`` is not
    implemented, as for S3 or GCS."""

    def _open(self, name: str, mode: str = "rb") -> ContentFile:
        with _lock:
            return ContentFile(_files[name], name=name)

    def _save(self, name: str, content: Any) -> str:
        content.seek(0)
        data = content.read()
        with _lock:
            _files[name] = data if isinstance(data, bytes) else data.encode()
        return name

    def exists(self, name: str) -> bool:
        with _lock:
            return name in _files

    def delete(self, name: str) -> None:
        with _lock:
            _files.pop(name, None)

    def size(self, name: str) -> int:
        with _lock:
            return len(_files[name])

    def listdir(self, path: str) -> tuple[list[str], list[str]]:
        prefix = path.rstrip("/") + "/" if path else ""
        with _lock:
            names = [n[len(prefix) :] for n in _files if n.startswith(prefix)]
        return sorted({n.split("/")[0] for n in names if "/" in n}), sorted(n for n in names if "/" not in n)
