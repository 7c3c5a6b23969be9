"""Celery tasks of the versioning app: thin wrappers that call one service. Names are a deployed API."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from versioning.garbage import garbage_collect


@shared_task(name="versioning.collect_garbage", acks_late=True, ignore_result=True)
def collect_garbage() -> dict[str, Any]:
    """The beat's garbage collection (the same code as ``manage.py prune_blobs``)."""
    return garbage_collect().as_dict()
