"""``manage.py create_agent <agent_id>``: register an agent and print its token, once.

Only the token's sha256 is stored, so this output is the one chance to copy it.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from clients.services import agent_create
from fedsite.errors import ServiceError


class Command(BaseCommand):
    help = "Register an agent and print its bearer token (shown only once; the server keeps a hash)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("agent_id", help="the agent's public name: 1-64 of [A-Za-z0-9_.-]")
        parser.add_argument(
            "--capabilities", default=None, help="JSON object describing the agent, e.g. '{\"gpu\": false}'"
        )
        parser.add_argument("--json", action="store_true", help="print {agent_id, id, token} as JSON")
        parser.add_argument(
            "--token-only", action="store_true", help="print only the token, e.g. for TOKEN=$(manage.py ...)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        capabilities = None
        if options["capabilities"] is not None:
            try:
                capabilities = json.loads(options["capabilities"])
            except ValueError as exc:
                raise CommandError(f"--capabilities is not valid JSON: {exc}.", returncode=2) from exc
        try:
            agent, token = agent_create(
                agent_id=options["agent_id"], capabilities=capabilities, actor="manage.py create_agent"
            )
        except ServiceError as exc:
            raise CommandError(exc.message, returncode=2 if exc.status_code == 400 else 1) from exc
        if options["json"]:
            self.stdout.write(json.dumps({"agent_id": agent.agent_id, "id": str(agent.pk), "token": token}))
            return
        if options["token_only"]:
            self.stdout.write(token)
            return
        self.stdout.write(self.style.SUCCESS(f"Agent {agent.agent_id} created (id {agent.pk})."))
        self.stdout.write("Its token, shown only now (the server stores only a hash); keep it secret:")
        self.stdout.write(token)
        self.stdout.write(
            f"Run the agent with: python -m fedagent run --server URL --agent-id {agent.agent_id} "
            "--token-file PATH ...  (or FEDAGENT_TOKEN=<token>)"
        )
