"""``manage.py create_operator_token <username> [--expires-in DAYS]``: print a new operator API token, once.

Only a SHA-512 digest of the token is stored (django-rest-knox), so this output is the one chance to copy
it. Send it as ``Authorization: Token <token>``; revoke it with ``manage.py revoke_operator_token``.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from clients.services import operator_token_create
from fedsite.errors import ServiceError


class Command(BaseCommand):
    help = "Make an operator API token for a staff user and print it (shown only once; a hash is stored)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username", help="an active staff user")
        parser.add_argument(
            "--expires-in",
            type=float,
            default=None,
            metavar="DAYS",
            help="days until the token expires (0: never). Default FEDSITE_OPERATOR_TOKEN_TTL_DAYS (30).",
        )
        parser.add_argument("--json", action="store_true", help="print {username, token, prefix, expiry}")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            instance, token = operator_token_create(
                username=options["username"],
                expires_in_days=options["expires_in"],
                actor="manage.py create_operator_token",
            )
        except ServiceError as exc:
            raise CommandError(exc.message, returncode=2) from exc
        expiry = instance.expiry.isoformat() if instance.expiry else None
        if options["json"]:
            payload = {"username": options["username"], "token": token, "prefix": instance.token_key}
            self.stdout.write(json.dumps({**payload, "expiry": expiry}))
            return
        self.stdout.write(
            self.style.SUCCESS(
                f"Operator token {instance.token_key}... for {options['username']} "
                f"({'expires ' + expiry if expiry else 'never expires'})."
            )
        )
        self.stdout.write("The token, shown only now (the server stores only a hash); keep it secret:")
        self.stdout.write(token)
        self.stdout.write(
            "Use it as 'Authorization: Token <token>'; revoke it with "
            f"`manage.py revoke_operator_token {instance.token_key}`."
        )
