"""``manage.py training_status <id>``: the status document of a training, as a table or JSON.

``--json`` prints exactly what ``GET /api/training/{id}/status`` returns (``trainings.selectors
.training_status``). ``--watch`` follows the training with a progress bar until it ends, then prints
the table.
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from trainings.models import Round, Training
from trainings.selectors import training_get, training_metrics_series, training_status

ACCURACY_NAMES = ("accuracy", "federated_accuracy")
LOSS_NAMES = ("loss", "federated_loss", "train_loss")


def _number(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _first(metrics: dict[str, Any], names: tuple[str, ...]) -> float | None:
    for name in names:
        if metrics.get(name) is not None:
            return float(metrics[name])
    return None


def status_table(status: dict[str, Any]) -> Table:
    """Render the status document as a two-column table."""
    table = Table(title=f"training {status['training_id']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    colour = {"completed": "green", "running": "cyan", "failed": "red", "stopped": "yellow"}.get(
        status["status"], "white"
    )
    max_rounds = status.get("max_rounds")
    rows: list[tuple[str, str]] = [
        ("name", status["name"]),
        ("status", f"[{colour}]{status['status']}[/{colour}]"),
        ("algorithm", status["algorithm"]),
        ("round", f"{status['current_round']} of {max_rounds if max_rounds is not None else '?'}"),
        ("completed rounds", str(status["completed_rounds"])),
        ("target accuracy", _number(status.get("target_accuracy"))),
        ("best accuracy", _number(status.get("best_accuracy"))),
    ]
    for name, value in sorted(status.get("latest_metrics", {}).items()):
        rows.append((f"  {name}", _number(value, ".4g")))
    round_info = status.get("round")
    if round_info:
        tasks = ", ".join(f"{count} {name}" for name, count in round_info["tasks"].items() if count)
        rows += [
            (
                "current round",
                f"{round_info['number']} ({round_info['status']}, attempt {round_info['attempt']})",
            ),
            ("  deadline", round_info["deadline"] or "-"),
            ("  tasks", tasks or "none"),
        ]
    version = status.get("current_version")
    if version:
        rows.append(("model version", f"{version['number']} (sha256 {version['sha256'][:12]}…)"))
    rows += [
        ("stop reason", status.get("stop_reason") or "-"),
        ("created", status["created_at"]),
        ("started", status.get("started_at") or "-"),
        ("finished", status.get("finished_at") or "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


class Command(BaseCommand):
    help = "Show a training's status (rounds, metrics, tasks, version); --watch follows it until it ends."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("training_id")
        parser.add_argument("--json", action="store_true", help="print the status document as JSON")
        parser.add_argument("--watch", action="store_true", help="show a live progress bar until it ends")
        parser.add_argument("--interval", type=float, default=1.0, help="seconds between reads (--watch)")

    def handle(self, *args: Any, **options: Any) -> None:
        training = self._get(options["training_id"])
        if options["watch"] and not training.is_terminal:
            training = self._watch(training, interval=max(0.1, options["interval"]))
        status = training_status(training)
        if options["json"]:
            self.stdout.write(json.dumps(status, indent=2))
        else:
            console = Console(force_terminal=self.stdout.isatty(), width=120)
            with console.capture() as captured:
                console.print(status_table(status))
            self.stdout.write(captured.get(), ending="")

    def _get(self, training_id: str) -> Training:
        training = training_get(training_id)
        if training is None:
            raise CommandError(f"No training with id {training_id!r}.", returncode=1)
        return training

    def _watch(self, training: Training, *, interval: float) -> Training:
        max_rounds = training.config.get("max_rounds")
        progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} rounds"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        with progress:
            task = progress.add_task(training.name, total=max_rounds, info="")
            while True:
                close_old_connections()
                training = self._get(str(training.pk))
                metrics = {
                    name: points[-1]["value"] for name, points in training_metrics_series(training).items()
                }
                completed = training.rounds.filter(status=Round.Status.COMPLETED).count()
                info = (
                    f"{training.status}  round {training.current_round}  "
                    f"accuracy {_number(_first(metrics, ACCURACY_NAMES))}  "
                    f"loss {_number(_first(metrics, LOSS_NAMES))}  "
                    f"agents {_number(metrics.get('num_agents_reporting'), '.0f')}"
                )
                progress.update(task, completed=completed, info=info)
                if training.is_terminal:
                    return training
                time.sleep(interval)
