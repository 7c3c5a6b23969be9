"""``manage.py demo``: a real federation end to end on this machine (what ``make demo`` runs).

Steps: start the server (and on the real stack a Celery worker with beat) without waiting for it;
meanwhile migrate, make sure a staff user ``demo`` exists, create a FedAvg training on digits or MNIST
and start one agent process per agent (each with its own non-IID shard), which connect as soon as the
server answers; once all have said hello, start the training, follow the rounds, then write
``summary.json`` and ``training.png`` under ``--out``. Exit code 0 only if the training completed.
The start-ups overlap because on this 2-core machine they were most of the command's time
(docs/benchmarks.md, "Time to accuracy against Flower's simulation").

Embedded stack (no ``REDIS_URL``): every run gets a fresh SQLite file under
``<out>/runs/<time>/fedsite.sqlite3`` (the child processes get it as ``DATABASE_URL``), so reruns never
collide. Real stack: the database ``DATABASE_URL`` names.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console

from fedsite.errors import ServiceError
from trainings.charts import training_chart_png
from trainings.simulation import (
    FederationPlan,
    FederationRun,
    SimulationError,
    TrainingOutcome,
    console_for_commands,
    database_use_sqlite_file,
    dataset_configuration,
    outcome_table,
    project_logs_at,
    run_directory,
    run_federation,
    sigterm_as_keyboard_interrupt,
)

DEMO_USERNAME = "demo"
#: The agents' long-poll seconds (``--poll-wait``) in the demo.
DEMO_POLL_WAIT = 1.0


def _preload_chart_library() -> None:
    """Import matplotlib in a daemon thread while the federation runs (this process mostly waits then).

    ``training.png`` is drawn after the last round, and the import alone is most of the drawing's cost
    (1-4 s here): paid in the meantime, it is off the command's critical path.
    """

    def preload() -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")  # as trainings.charts does, before pyplot is imported
            import matplotlib.pyplot
        except Exception:  # the chart reports its own failure later, in the main thread
            logging.getLogger("trainings.demo").debug("matplotlib preload failed", exc_info=True)

    threading.Thread(target=preload, name="demo-chart-preload", daemon=True).start()


class Command(BaseCommand):
    help = "Run a real federation end to end (server, agents over HTTP) and report accuracy per round."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
        parser.add_argument("--agents", type=int, default=10, help="agent processes (default 10)")
        parser.add_argument("--max-rounds", type=int, default=40, help="default 40")
        parser.add_argument("--target-accuracy", type=float, default=0.93, help="default 0.93")
        parser.add_argument("--partition", choices=["iid", "dirichlet", "shards"], default="dirichlet")
        parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
        parser.add_argument("--seed", type=int, default=0, help="model initialisation and partition seed")
        parser.add_argument("--out", type=Path, default=None, help="output directory (default var/demo)")
        parser.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
        parser.add_argument("--linger", type=float, default=0.0, help="keep the server up N s at the end")
        parser.add_argument("--timeout", type=float, default=1800.0, help="give up after N s (default 1800)")
        parser.add_argument("--worker-concurrency", type=int, default=None, help="real stack only")
        parser.add_argument("--mnist-path", default=None, help="MNIST .npz (default $MNIST_PATH or shared)")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["agents"] < 2:
            raise CommandError("--agents must be at least 2.", returncode=2)
        console = console_for_commands()
        out: Path = (options["out"] or Path(settings.VAR_DIR) / "demo").resolve()
        run_dir = run_directory(out)
        env: dict[str, str | None] = {}
        embedded = bool(settings.EMBEDDED)
        if embedded:
            env["DATABASE_URL"] = database_use_sqlite_file(run_dir / "fedsite.sqlite3")
        mnist_path = None
        if options["dataset"] == "mnist":
            mnist_path = self._mnist_path(options["mnist_path"])
            env["MNIST_PATH"] = mnist_path
            os.environ["MNIST_PATH"] = mnist_path  # central evaluation in this process, if eager

        stack = "embedded (SQLite, eager Celery)" if embedded else "real (Postgres/Redis, Celery worker)"
        console.print(f"[bold]fedsite demo[/bold]: {options['dataset']}, {options['agents']} agents, {stack}")
        console.print(f"run directory: {run_dir}")

        def prepare() -> None:  # runs while the server process boots
            call_command("migrate", interactive=False, verbosity=0)
            self._ensure_staff_user(out, console)

        agents = options["agents"]
        configuration = dataset_configuration(
            options["dataset"],
            name=f"demo {options['dataset']} ({agents} agents)",
            max_rounds=options["max_rounds"],
            target_accuracy=options["target_accuracy"],
            min_clients=max(2, (agents * 8) // 10),
            max_clients=agents,
            seed=options["seed"],
            round_timeout_seconds=120.0,
        )
        plan = FederationPlan(
            configuration=configuration,
            agents=agents,
            dataset=options["dataset"],
            log_dir=run_dir,
            partition=options["partition"],
            alpha=options["alpha"],
            seed=options["seed"],
            # Agents seed local training with their id: fixed ids make an embedded run (fresh database)
            # repeatable; a shared database needs ids no earlier run has taken.
            agent_prefix="demo" if embedded else f"demo-{uuid.uuid4().hex[:8]}",
            port=options["port"],
            worker_concurrency=options["worker_concurrency"],
            env=env,
            mnist_path=mnist_path,
            timeout=options["timeout"],
            linger_seconds=options["linger"],
            # Start-up in parallel: the server boots while this process migrates, and the agents load
            # their data meanwhile and connect as soon as it answers (--wait-for-server).
            overlap_startup=True,
            prepare=prepare,
            # Short long-polls: the first round is opened by this process, whose wake-ups cannot reach the
            # server's waiting polls on the embedded stack (in-memory channel layer), and an idle agent
            # notices the training's end at its next empty poll; 1 s bounds both.
            poll_wait=DEMO_POLL_WAIT,
        )

        def announce(run: FederationRun) -> None:
            _preload_chart_library()
            console.print(f"training {run.training_id} created")
            console.print(f"  live training page: [link={run.dashboard_url}]{run.dashboard_url}[/link]")
            console.print(f"  Swagger UI:         [link={run.api_docs_url}]{run.api_docs_url}[/link]")

        def report(run: FederationRun, outcome: TrainingOutcome) -> None:
            self._report(run, outcome, options=options, out=out, run_dir=run_dir, console=console)

        started = time.monotonic()
        try:
            quiet = logging.WARNING if options["verbosity"] < 2 else logging.INFO
            with sigterm_as_keyboard_interrupt(), project_logs_at(quiet):
                outcome = run_federation(
                    plan, console=console, on_training_created=announce, on_finished=report
                )
        except KeyboardInterrupt as exc:
            raise CommandError("Interrupted; everything started was stopped.", returncode=130) from exc
        except (SimulationError, ServiceError) as exc:
            raise CommandError(f"{exc}\nLogs: {run_dir}", returncode=1) from exc
        console.print(f"total time including start-up and teardown: {time.monotonic() - started:.1f} s")
        if not outcome.completed:
            raise CommandError(
                f"The training ended {outcome.status} ({outcome.stop_reason}); logs in {run_dir}.",
                returncode=1,
            )

    # ------------------------------------------------------------------------------------------
    def _mnist_path(self, given: str | None) -> str:
        from flcore.data import default_mnist_path

        path = Path(given) if given else default_mnist_path()
        if not path.is_file():
            raise CommandError(
                f"MNIST file not found at {path}. Pass --mnist-path or set MNIST_PATH to an .npz with "
                "x_train, y_train, x_test, y_test (nothing is downloaded).",
                returncode=2,
            )
        return str(path.resolve())

    def _ensure_staff_user(self, out: Path, console: Console) -> None:
        """Create the staff user ``demo`` with a random password, printed once and kept in a 0600 file."""
        users = get_user_model()
        path = out / "credentials.txt"
        database = str(settings.DATABASES["default"]["NAME"])
        if users.objects.filter(username=DEMO_USERNAME).exists():
            recorded = path.read_text(encoding="utf-8") if path.is_file() else ""
            where = (
                f"its password is in {path}"
                if f"database: {database}\n" in recorded
                else f"reset its password with: manage.py changepassword {DEMO_USERNAME}"
            )
            # soft_wrap: no line breaks inserted into the paths, so they can be copied in one piece
            console.print(
                f"staff user '{DEMO_USERNAME}' already exists in {database}; {where}", soft_wrap=True
            )
            return
        password = secrets.token_urlsafe(12)
        users.objects.create_user(DEMO_USERNAME, password=password, is_staff=True, is_superuser=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(f"username: {DEMO_USERNAME}\npassword: {password}\ndatabase: {database}\n")
        console.print(
            f"dashboard login: user [bold]{DEMO_USERNAME}[/bold], password [bold]{password}[/bold] "
            f"(shown once; also in {path})",
            soft_wrap=True,
        )

    def _report(
        self,
        run: FederationRun,
        outcome: TrainingOutcome,
        *,
        options: dict[str, Any],
        out: Path,
        run_dir: Path,
        console: Console,
    ) -> None:
        partition = options["partition"] + (
            f" alpha={options['alpha']:g}" if options["partition"] == "dirichlet" else ""
        )
        summary = {
            "training_id": outcome.training_id,
            "dataset": options["dataset"],
            "rounds": outcome.rounds_completed,
            "final_accuracy": outcome.final_accuracy,
            "best_accuracy": outcome.best_accuracy,
            "wall_seconds": round(outcome.wall_seconds, 2),
            "dashboard_url": run.dashboard_url,
            "status": outcome.status,
            "stop_reason": outcome.stop_reason,
            "agents": options["agents"],
            "embedded": run.embedded,
            "algorithm": outcome.algorithm,
            "partition": partition,
            "target_accuracy": options["target_accuracy"],
            "run_directory": str(run_dir),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        chart = training_chart_png(
            series=outcome.series,
            path=out / "training.png",
            title=f"{options['dataset']}: {outcome.algorithm}, {options['agents']} agents ({partition})",
            target_accuracy=options["target_accuracy"],
        )
        console.print(
            outcome_table(
                outcome,
                title=f"demo: {options['dataset']}, {options['agents']} agents",
                extra={
                    "stack": "embedded" if run.embedded else "real",
                    "dashboard": run.dashboard_url,
                    "summary": str(out / "summary.json"),
                    "chart": str(chart),
                    "logs": str(run_dir),
                },
            )
        )
