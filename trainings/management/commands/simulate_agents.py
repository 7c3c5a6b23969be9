"""``manage.py simulate_agents``: load-test the coordinator with many real agent processes over HTTP.

Creates one training (evaluated centrally on the data set's test split), registers ``--agents`` agents,
starts one ``python -m fedagent run`` process each, and follows the rounds. It starts its own server
(and, on the real stack, a Celery worker with beat) unless ``--server`` names one that is already
running; that server must use the same database as this command.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from fedsite.errors import ServiceError
from trainings.simulation import (
    FederationPlan,
    FederationRun,
    SimulationError,
    console_for_commands,
    dataset_configuration,
    outcome_table,
    project_logs_at,
    run_directory,
    run_federation,
    sigterm_as_keyboard_interrupt,
)


class Command(BaseCommand):
    help = "Run N real agent processes against the coordinator for one training and print a summary."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--agents", type=int, default=50, help="agent processes (default 50)")
        parser.add_argument("--rounds", type=int, default=20, help="max_rounds of the training (default 20)")
        parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
        parser.add_argument("--partition", choices=["iid", "dirichlet", "shards"], default="iid")
        parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
        parser.add_argument("--min-clients", type=int, default=None, help="default: settings")
        parser.add_argument("--max-clients", type=int, default=None, help="default: settings")
        parser.add_argument("--target-accuracy", type=float, default=None, help="stop early at this accuracy")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--round-timeout", type=float, default=120.0, help="round deadline (default 120 s)"
        )
        parser.add_argument(
            "--server", default=None, help="use this running server, e.g. http://127.0.0.1:8080"
        )
        parser.add_argument("--port", type=int, default=None, help="port of the server started here")
        parser.add_argument("--worker-concurrency", type=int, default=None, help="real stack only")
        parser.add_argument("--out", type=Path, default=None, help="log directory (default var/simulate)")
        parser.add_argument("--timeout", type=float, default=3600.0, help="give up after N s (default 3600)")
        parser.add_argument("--mnist-path", default=None, help="MNIST .npz (default $MNIST_PATH or shared)")

    def handle(self, *args: Any, **options: Any) -> None:
        agents = options["agents"]
        if agents < 1:
            raise CommandError("--agents must be at least 1.", returncode=2)
        min_clients = options["min_clients"] or min(settings.FEDSITE_MIN_CLIENTS_PER_ROUND, agents)
        max_clients = options["max_clients"] or min(settings.FEDSITE_MAX_CLIENTS_PER_ROUND, agents)
        if min_clients > agents:
            raise CommandError(
                f"--min-clients ({min_clients}) is more than --agents ({agents}): no round could close.",
                returncode=2,
            )
        console = console_for_commands()
        out: Path = (options["out"] or Path(settings.VAR_DIR) / "simulate").resolve()
        run_dir = run_directory(out)
        try:
            configuration = dataset_configuration(
                options["dataset"],
                name=f"simulation {options['dataset']} ({agents} agents, {options['partition']})",
                max_rounds=options["rounds"],
                target_accuracy=options["target_accuracy"],
                min_clients=min_clients,
                max_clients=max(max_clients, min_clients),
                seed=options["seed"],
                round_timeout_seconds=options["round_timeout"],
            )
        except ServiceError as exc:
            raise CommandError(exc.message, returncode=2) from exc
        env: dict[str, str | None] = {}
        if options["mnist_path"]:
            env["MNIST_PATH"] = str(Path(options["mnist_path"]).resolve())
        plan = FederationPlan(
            configuration=configuration,
            agents=agents,
            dataset=options["dataset"],
            log_dir=run_dir,
            partition=options["partition"],
            alpha=options["alpha"],
            seed=options["seed"],
            server_url=options["server"],
            port=options["port"],
            worker_concurrency=options["worker_concurrency"],
            env=env,
            mnist_path=env.get("MNIST_PATH"),
            timeout=options["timeout"],
        )

        def announce(run: FederationRun) -> None:
            console.print(f"training {run.training_id}: {run.dashboard_url}")

        console.print(
            f"[bold]simulate_agents[/bold]: {agents} agents, {options['dataset']} {options['partition']}, "
            f"{min_clients}-{max_clients} per round, up to {options['rounds']} rounds; logs in {run_dir}"
        )
        started = time.monotonic()
        quiet = logging.WARNING if options["verbosity"] < 2 else logging.INFO
        try:
            with sigterm_as_keyboard_interrupt(), project_logs_at(quiet):
                outcome = run_federation(plan, console=console, on_training_created=announce)
        except KeyboardInterrupt as exc:
            raise CommandError("Interrupted; everything started was stopped.", returncode=130) from exc
        except (SimulationError, ServiceError) as exc:
            raise CommandError(f"{exc}\nLogs: {run_dir}", returncode=1) from exc
        rounds = [r for r in outcome.rounds if r.round_seconds is not None]
        mean_round = sum(r.round_seconds or 0.0 for r in rounds) / len(rounds) if rounds else None
        console.print(
            outcome_table(
                outcome,
                title=f"simulate_agents: {agents} agents",
                extra={
                    "dataset": f"{options['dataset']} ({options['partition']})",
                    "clients per round": f"{min_clients}-{max_clients}",
                    "mean round time": f"{mean_round:.2f} s" if mean_round is not None else "-",
                    "total time": f"{time.monotonic() - started:.1f} s (with start-up and teardown)",
                    "stack": "embedded" if settings.EMBEDDED else "real",
                    "logs": str(run_dir),
                },
            )
        )
        if not outcome.completed:
            raise CommandError(f"The training ended {outcome.status} ({outcome.stop_reason}).", returncode=1)
