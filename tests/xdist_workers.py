"""One parallel test worker's own Redis database and var directory (pytest-xdist; ``-p tests.xdist_workers``).

pytest-django gives each xdist worker its own test database (``test_<name>_gw0``, ``_gw1``...). The rest
of what the suite shares is made per-worker here, at import, which pytest does while it parses the
command line: before pytest-django loads the Django settings, which read these variables once.

- ``REDIS_URL``: worker ``gwN`` takes the N-th number of ``FEDSITE_TEST_REDIS_DBS`` (``make test`` passes
  ``TEST_REDIS_DBS``), or, without that list, the database N below the configured one (15, 14, 13... for
  ``redis://127.0.0.1:6379/15``). The Celery broker and result backend, the cache (auth-failure counters,
  token cache), and the channel layer all live there, so a Celery worker that one test worker starts never
  takes another's tasks and no counter or group is seen by two workers. Child processes inherit it.
- ``FEDSITE_VAR_DIR`` (and ``FEDSITE_MEDIA_ROOT`` if it is set): a ``xdist-gwN`` folder under it, for the
  blob store, the embedded SQLite test database and the embedded secret key.

Without xdist (no ``PYTEST_XDIST_WORKER``) nothing changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
# what REDIS_URL was before this worker took its own database (None: not under xdist, or no Redis)
CONFIGURED_REDIS_URL: str | None = None


def _redis_dbs(configured: int, count: int) -> list[int]:
    listed = os.environ.get("FEDSITE_TEST_REDIS_DBS", "").replace(",", " ").split()
    if not listed:
        return [(configured - index) % 16 for index in range(count)]
    dbs = [int(db) for db in listed]
    if len(dbs) < count:
        raise RuntimeError(
            f"FEDSITE_TEST_REDIS_DBS lists {len(dbs)} Redis databases ({dbs}) for {count} test workers; "
            "list one per worker (make test TEST_REDIS_DBS=...) or run fewer (-n)."
        )
    return dbs


def worker_redis_url(url: str, index: int, count: int) -> str:
    """``url`` on the Redis database of worker number ``index`` of ``count``."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    configured = int(path) if path.isdigit() else 0
    db = _redis_dbs(configured, count)[index]
    return urlunsplit(parts._replace(path=f"/{db}"))


def isolate_worker() -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    index = int(worker.removeprefix("gw"))
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or index + 1)

    from fedsite.config import load_seed_config  # REDIS_URL, or the FEDSITE_CONFIG file's redis_url

    global CONFIGURED_REDIS_URL
    CONFIGURED_REDIS_URL = load_seed_config().redis_url
    if CONFIGURED_REDIS_URL:
        os.environ["REDIS_URL"] = worker_redis_url(CONFIGURED_REDIS_URL, index, count)
    var_dir = Path(os.environ.get("FEDSITE_VAR_DIR") or ROOT / "var")
    os.environ["FEDSITE_VAR_DIR"] = str(var_dir / f"xdist-{worker}")
    if os.environ.get("FEDSITE_MEDIA_ROOT"):
        os.environ["FEDSITE_MEDIA_ROOT"] = str(Path(os.environ["FEDSITE_MEDIA_ROOT"]) / f"xdist-{worker}")


isolate_worker()
