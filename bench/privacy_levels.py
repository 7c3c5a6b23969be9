"""The accuracy cost of each privacy level (none, low, medium, high) on digits with 20 agents.

Every training runs through the real coordinator in process (``bench/_inprocess.py``: the Django
application on SQLite with eager Celery, agents are ``fedagent.FederatedClient`` objects talking to it
through a WSGI transport): ``training_create_and_start`` builds the privacy budget and calibrates the noise
multiplier with dp-accounting, ``_round_open_private`` Poisson-samples the agents and runs the budget
guard, ``_central_dp_step`` clips, sums, noises and divides by the expected count, ``ledger_record``
accounts the round, and the server's central evaluation on the digits test split gives the accuracy.

Settings, the same for every level: FedAvg, the digits ``mlp`` preset (64-64-10, 4,810 parameters) or
``--model logreg`` (650 parameters), 5 local epochs, batch 16, learning rate 0.2, ``--rounds`` rounds
(default 10), all 20 agents expected every round (``max_clients_per_round`` 20, so q = 20 / 20 = 1), an
IID partition of the digits train split (seed 0), training seed 0. A private level is
``{"mode": "central", "level": ...}`` with the preset's epsilon, delta and clip norm (1.0); the level's
noise multiplier is calibrated for exactly ``--rounds`` rounds. The noise comes from the server's OS-seeded
generator (never a stored seed), so private runs differ between repetitions: ``--repeats`` runs each
private level that many times and the table gives the mean and the spread (``none`` is deterministic and
runs once).

Why these choices: the signal of a round is the clipped mean, of norm at most ``C``, and the noise on it
has norm about ``z C sqrt(d) / m``; their ratio ``z sqrt(d) / m`` does not depend on ``C`` once updates
are clipped, so the preset's ``C = 1`` (below the honest deltas' norm, about 2 in round 1) only sets the
step length. ``z`` grows with the number of rounds (about as ``sqrt(T)`` at q = 1), so few rounds with much
local work each (5 epochs) is the best use of a small budget.

Usage::

    .venv/bin/python bench/privacy_levels.py --rounds 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _inprocess  # first: sets BLAS threads and sys.path before numpy and Django load

LEVEL_NAMES = ("none", "low", "medium", "high")
AGENTS = 20
POPULATIONS = (20, 100, 1_000, 10_000, 100_000)


@dataclass
class LevelResult:
    level: str
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    rounds: list[int] = field(default_factory=list)
    stop_reasons: list[str] = field(default_factory=list)
    spent_epsilon: list[float] = field(default_factory=list)
    final_accuracy: list[float] = field(default_factory=list)
    num_parameters: int = 0
    seconds: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="max_rounds of every training (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="trainings per level (default 3)")
    parser.add_argument("--model", choices=("mlp", "logreg"), default="mlp", help="digits model")
    parser.add_argument("--levels", default=",".join(LEVEL_NAMES), help="comma-separated levels")
    parser.add_argument("--seed", type=int, default=0, help="training and partition seed (default 0)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    return parser.parse_args(argv)


def configuration(level: str, args: argparse.Namespace, repeat: int) -> dict[str, Any]:
    from trainings.simulation import dataset_configuration

    overrides: dict[str, Any] = {}
    if args.model == "logreg":
        overrides = {"model_type": "logreg", "hidden_sizes": []}
    overrides["privacy_level" if level == "none" else "privacy"] = (
        "none" if level == "none" else {"mode": "central", "level": level}
    )
    config = dataset_configuration(
        "digits",
        name=f"privacy level {level} ({args.model}, repeat {repeat})",
        max_rounds=args.rounds,
        target_accuracy=None,
        min_clients=AGENTS,
        max_clients=AGENTS,
        seed=args.seed,
        overrides=overrides,
    )
    return config.to_dict()


def run_level(federation: Any, level: str, args: argparse.Namespace, console: Any) -> LevelResult:
    from flcore.parameters import ParameterSpec
    from privacy.models import PrivacyBudget
    from trainings.models import Training

    result = LevelResult(level)
    started = time.perf_counter()
    # Without DP every draw comes from the seeds (training, partition, agents' task seeds): one run suffices.
    for repeat in range(1 if level == "none" else args.repeats):
        training_id = federation.start(configuration(level, args, repeat))
        accuracy = math.nan
        try:
            for record in federation.rounds(training_id):
                accuracy = float(record.metrics.get("accuracy", math.nan))
        except BaseException:
            federation.stop(training_id, reason="privacy_levels interrupted")
            raise
        training = Training.objects.get(pk=training_id)
        result.num_parameters = ParameterSpec.from_json(training.parameter_spec).num_parameters
        budget = PrivacyBudget.objects.filter(training=training).first()
        if budget is not None:
            result.epsilon, result.delta = budget.epsilon, budget.delta
            result.noise_multiplier, result.clip_norm = budget.noise_multiplier, budget.clip_norm
            result.spent_epsilon.append(budget.spent_epsilon)
        completed = training.rounds.filter(status="completed").count()
        result.rounds.append(completed)
        result.stop_reasons.append(training.stop_reason or training.status)
        result.final_accuracy.append(accuracy)
        console.print(
            f"{level} repeat {repeat}: {completed} rounds, {training.status} "
            f"({training.stop_reason or '-'}), accuracy {accuracy:.4f}"
            + (f", epsilon spent {budget.spent_epsilon:.3f} of {budget.epsilon}" if budget else "")
        )
    result.seconds = time.perf_counter() - started
    return result


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def results_table(results: list[LevelResult], args: argparse.Namespace) -> Any:
    from rich import box
    from rich.table import Table

    baseline = next((r for r in results if r.level == "none"), None)
    table = Table(
        title=(
            f"digits {args.model}, {AGENTS} agents (q = 1), FedAvg, {args.rounds} rounds, 5 local epochs, "
            f"{args.repeats} repeats per private level (mean ± sd)"
        ),
        box=box.MARKDOWN,
    )
    for column in (
        "level",
        "epsilon budget",
        "delta",
        "noise multiplier z (calibrated)",
        "noise sd on the mean (z C / m)",
        "rounds run",
        "stop reason",
        "epsilon spent",
        "final accuracy %",
        "cost vs none (points)",
    ):
        table.add_column(column, justify="left" if column in ("level", "stop reason") else "right")
    for result in results:
        cost = "-"
        if baseline is not None and result is not baseline:
            difference = statistics.mean(baseline.final_accuracy) - statistics.mean(result.final_accuracy)
            cost = f"{100 * difference:.1f}"
        sd = (
            f"{result.noise_multiplier * (result.clip_norm or 0) / AGENTS:.3f}"
            if result.noise_multiplier
            else "-"
        )
        table.add_row(
            result.level,
            "-" if result.epsilon is None else f"{result.epsilon:g}",
            "-" if result.delta is None else f"{result.delta:g}",
            "-" if result.noise_multiplier is None else f"{result.noise_multiplier:.3f}",
            sd,
            "/".join(str(r) for r in sorted(set(result.rounds))),
            "; ".join(sorted(set(result.stop_reasons))),
            "-" if not result.spent_epsilon else f"{max(result.spent_epsilon):.3f}",
            _mean_spread(result.final_accuracy),
            cost,
        )
    return table


def population_table(results: list[LevelResult], dimension: int) -> Any:
    """How the noise on the mean shrinks with the number of agents, every agent in every round (q = 1)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=(
            f"noise on the released mean vs population (q = 1, same rounds and z; d = {dimension}): "
            "noise norm / signal bound = z sqrt(d) / N"
        ),
        box=box.MARKDOWN,
    )
    table.add_column("level (z)")
    for population in POPULATIONS:
        table.add_column(f"N = {population:,}", justify="right")
    table.add_column("N for ratio <= 1", justify="right")
    table.add_column("N for ratio <= 0.1", justify="right")
    for result in results:
        if not result.noise_multiplier:
            continue
        z = result.noise_multiplier
        ratio = z * math.sqrt(dimension)
        table.add_row(
            f"{result.level} ({z:.2f})",
            *(f"sd {z * (result.clip_norm or 1.0) / n:.2g}, ratio {ratio / n:.2g}" for n in POPULATIONS),
            f"{math.ceil(ratio):,}",
            f"{math.ceil(10 * ratio):,}",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [level.strip() for level in args.levels.split(",") if level.strip()]
    unknown = [level for level in levels if level not in LEVEL_NAMES]
    if unknown:
        raise SystemExit(f"Unknown levels {unknown}; choose from {list(LEVEL_NAMES)}.")
    _inprocess.configure_django()
    from rich.console import Console

    from flcore.data import client_split

    console = Console(width=None if sys.stdout.isatty() else 200)
    data = []
    for index in range(AGENTS):
        x_train, y_train, x_eval, y_eval = client_split(
            "digits", num_clients=AGENTS, client_index=index, scheme="iid", seed=args.seed
        )
        data.append(_inprocess.AgentData(x_train, y_train, x_eval, y_eval))
    federation = _inprocess.InProcessFederation(data, prefix="privacy-")
    results: list[LevelResult] = []
    started = time.perf_counter()
    try:
        for level in levels:
            results.append(run_level(federation, level, args, console))
            if args.json is not None:
                args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    finally:
        federation.close()
        _inprocess.remove_work_dir()
    console.print(results_table(results, args))
    console.print()
    console.print(population_table(results, results[0].num_parameters))
    console.print(f"\ntotal wall time {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
