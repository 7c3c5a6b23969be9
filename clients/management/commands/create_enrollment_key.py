"""``manage.py create_enrollment_key --label L``: an enrolment key for agents to register themselves.

The key is printed once; only its sha256 is stored.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from clients.services import enrollment_key_create


class Command(BaseCommand):
    help = "Create an enrolment key (shown only once) that agents trade for a token with 'fedagent enroll'."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--label", required=True, help="what the key is for, e.g. 'lab cluster'")
        parser.add_argument("--max-uses", type=int, default=None, help="how many agents may use it")
        parser.add_argument("--expires-in-hours", type=float, default=None, help="validity (default: none)")
        parser.add_argument("--json", action="store_true", help="print {label, key, max_uses, expires_at}")

    def handle(self, *args: Any, **options: Any) -> None:
        label = options["label"].strip()
        if not 1 <= len(label) <= 100:
            raise CommandError("--label must be 1 to 100 characters.", returncode=2)
        max_uses = options["max_uses"]
        if max_uses is not None and max_uses < 1:
            raise CommandError(f"--max-uses must be at least 1. Found {max_uses}.", returncode=2)
        hours = options["expires_in_hours"]
        if hours is not None and hours <= 0:
            raise CommandError(f"--expires-in-hours must be positive. Found {hours}.", returncode=2)
        expires_at = timezone.now() + timedelta(hours=hours) if hours is not None else None
        key, secret = enrollment_key_create(label=label, max_uses=max_uses, expires_at=expires_at)
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "label": key.label,
                        "key": secret,
                        "max_uses": key.max_uses,
                        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
                    }
                )
            )
            return
        limits = f"up to {max_uses} uses" if max_uses is not None else "unlimited uses"
        if expires_at is not None:
            limits += f", expires {expires_at:%Y-%m-%d %H:%M} UTC"
        self.stdout.write(self.style.SUCCESS(f"Enrolment key '{key.label}' created ({limits})."))
        self.stdout.write("The key, shown only now (the server stores only a hash):")
        self.stdout.write(secret)
        self.stdout.write(
            "Agents enrol with: python -m fedagent enroll --server URL --agent-id ID --enrollment-key <key>"
        )
