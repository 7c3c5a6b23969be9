"""``manage.py stop_training <id>``: stop a running training; its latest version stays the result."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fedsite.errors import ServiceError
from trainings.services import training_stop


class Command(BaseCommand):
    help = "Stop a training: cancel its open round and tasks; the latest model version stays its result."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("training_id")
        parser.add_argument("--reason", default="stopped by operator", help="recorded as the stop reason")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            training = training_stop(
                training_id=options["training_id"], actor="manage.py stop_training", reason=options["reason"]
            )
        except ServiceError as exc:
            raise CommandError(exc.message, returncode=1) from exc
        message = f"Training {training.pk} {training.status} after round {training.current_round}."
        self.stdout.write(self.style.SUCCESS(message))
