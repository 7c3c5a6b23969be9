"""``manage.py start_training config.json``: create and start a training from a TrainingConfiguration.

The file holds the JSON of ``TrainingConfiguration`` (the seed's keys: ``name``, ``algorithm``,
``model_type``, ``target_accuracy``, ``max_rounds``, ``min_clients_per_round``...). An invalid file
exits with code 2 and names every bad field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fedsite.errors import ServiceError, ValidationFailed
from trainings.configuration import TrainingConfiguration
from trainings.services import training_create_and_start


class Command(BaseCommand):
    help = "Create and start a training from a TrainingConfiguration JSON file ('-' reads standard input)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("config", help="path of the JSON configuration, or '-' for standard input")
        parser.add_argument("--json", action="store_true", help="print {training_id, status} as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        source = options["config"]
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"Cannot read {source}: {exc.strerror or exc}.", returncode=2) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CommandError(f"{source} is not valid JSON: {exc}.", returncode=2) from exc
        try:
            configuration = TrainingConfiguration.from_dict(data)
        except ValidationFailed as exc:
            lines = [f"{source}: the training configuration is invalid:"]
            details = [f"  {field}: {message}" for field, message in exc.details.items()]
            lines += details or [f"  {exc.message}"]
            raise CommandError("\n".join(lines), returncode=2) from exc
        try:
            training = training_create_and_start(configuration=configuration, created_by="manage.py")
        except ServiceError as exc:
            raise CommandError(exc.message, returncode=1) from exc
        if options["json"]:
            self.stdout.write(json.dumps({"training_id": str(training.pk), "status": training.status}))
        else:
            self.stdout.write(str(training.pk))
