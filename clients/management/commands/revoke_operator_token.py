"""``manage.py revoke_operator_token <prefix>`` or ``--user <username>``: revoke operator API tokens.

The prefix is the token's visible start (``fso_`` and what follows, as printed by create_operator_token
and shown in the admin's "Auth tokens" list as the token key). Revoked tokens stop working at once.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from clients.services import operator_token_revoke
from fedsite.errors import ServiceError


class Command(BaseCommand):
    help = "Revoke an operator API token by its prefix, or every token of a user with --user."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prefix", nargs="?", default=None, help="the token's visible prefix (fso_...)")
        parser.add_argument("--user", default=None, help="revoke all tokens of this user instead")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            revoked = operator_token_revoke(
                token_key=options["prefix"], username=options["user"], actor="manage.py revoke_operator_token"
            )
        except ServiceError as exc:
            raise CommandError(exc.message, returncode=2) from exc
        if revoked == 0:
            raise CommandError("No operator token matched; nothing was revoked.", returncode=1)
        self.stdout.write(self.style.SUCCESS(f"Revoked {revoked} operator token(s)."))
