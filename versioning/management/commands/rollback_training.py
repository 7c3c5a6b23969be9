"""``manage.py rollback_training <id> <version>``: make an earlier version of a training current again.

A finished training: at once. A running (synchronous) training: when the round in flight commits, so
the next round starts from that version's weights and server-optimizer state.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fedsite.errors import ServiceError
from versioning.models import Rollback
from versioning.services import training_rollback


class Command(BaseCommand):
    help = "Roll a training back to one of its versions (now if finished, at the next round if running)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("training_id")
        parser.add_argument("version", help="the version number to roll back to")
        parser.add_argument("--reason", default="", help="recorded with the rollback")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            rollback = training_rollback(
                training_id=options["training_id"],
                version=options["version"],
                actor="manage.py rollback_training",
                reason=options["reason"],
            )
        except ServiceError as exc:
            raise CommandError(exc.message, returncode=1) from exc
        if rollback.status == Rollback.Status.APPLIED:
            assert rollback.version is not None
            message = (
                f"Training {rollback.training_id}: version {rollback.version.number} (a copy of version "
                f"{rollback.target.number}) is now current."
            )
        else:
            message = (
                f"Training {rollback.training_id} is running: the round after the one in flight starts "
                f"from version {rollback.target.number}."
            )
        self.stdout.write(self.style.SUCCESS(message))
