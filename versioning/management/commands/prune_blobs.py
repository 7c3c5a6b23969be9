"""``manage.py prune_blobs [--dry-run] [--training ID]``: run the garbage collection now and report it.

The same code as the beat task ``versioning.collect_garbage`` (``versioning.garbage.garbage_collect``);
``--dry-run`` runs it in a transaction that is rolled back, so it reports what a real run would free and
deletes nothing. A progress bar follows the trainings and the orphan scan; a table sums up what was (or
would be) freed per kind.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from trainings.models import Training
from versioning.garbage import CollectionReport, garbage_collect


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover (the loop returns)


def report_table(report: CollectionReport) -> Table:
    verb = "would free" if report.dry_run else "freed"
    table = Table(title=f"garbage collection ({'dry run' if report.dry_run else 'done'}): {verb}")
    table.add_column("kind")
    table.add_column("rows", justify="right")
    table.add_column("blobs", justify="right")
    table.add_column("bytes", justify="right")
    for label, kind in (
        ("version blobs", report.versions),
        ("client-update blobs", report.updates),
        ("orphan blobs", report.orphans),
    ):
        table.add_row(label, str(kind.rows), str(kind.blobs), f"{kind.bytes} ({_size(kind.bytes)})")
    table.add_row("expired sessions", str(report.sessions), "-", "-")
    table.add_row("dead enrolment keys", str(report.enrollment_keys), "-", "-")
    table.add_row("old unfinished tasks", str(report.tasks), "-", "-")
    table.add_row("expired operator tokens", str(report.operator_tokens), "-", "-")
    table.add_row("old aggregation intents", str(report.outbox), "-", "-")
    table.add_row("total", "", "", f"{report.bytes_freed} ({_size(report.bytes_freed)})", style="bold")
    return table


class Command(BaseCommand):
    help = "Delete blobs and records the retention rules allow (docs/versioning.md, Retention)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="only report what would be freed")
        parser.add_argument("--training", help="only this training's versions and update blobs")
        parser.add_argument("--json", action="store_true", help="print the report as JSON (no bar, no table)")

    def handle(self, *args: Any, **options: Any) -> None:
        training = options["training"]
        if training is not None:
            try:
                exists = Training.objects.filter(pk=training).exists()
            except (ValueError, DjangoValidationError):
                exists = False
            if not exists:
                raise CommandError(f"--training: no training with id {training!r}.")
        if options["json"]:
            report = garbage_collect(dry_run=options["dry_run"], training_id=training)
            self.stdout.write(json.dumps(report.as_dict(), indent=2))
            return
        console = Console(file=self.stdout, force_terminal=False)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            bars: dict[str, Any] = {}

            def tick(stage: str, done: int, total: int) -> None:
                if stage not in bars:
                    bars[stage] = progress.add_task(stage, total=total)
                progress.update(bars[stage], completed=done, total=total)

            report = garbage_collect(dry_run=options["dry_run"], training_id=training, progress=tick)
        console.print(report_table(report))
