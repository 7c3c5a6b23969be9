"""Reproduce Li et al. (2020), FedProx, Figure 1: Synthetic(1,1) with 90% stragglers, FedAvg vs FedProx.

"Federated Optimization in Heterogeneous Networks" (MLSys 2020), Section 5.2 and Figure 1 (with the test
accuracies of Appendix C.3): Synthetic(1,1) (``flcore.data_synthetic``, 30 devices, 80/20 train/test per
device), multinomial logistic regression, 10 devices per round, ``E = 20`` local epochs, ``B = 10``, learning
rate 0.01, 200 rounds. Systems heterogeneity: each round 90% of the selected devices are stragglers.

- FedAvg drops the stragglers: they give their task back (``POST tasks/<id>/fail``) and the round closes with
  the devices that finished (``min_clients_per_round = 1``), as in the authors' ``flearn/trainers/fedavg.py``.
- FedProx keeps their partial work: a straggler runs a uniformly random number of epochs in ``1 .. E``
  (Section 5.1; the authors' code draws ``randint(1, E)``, i.e. ``1 .. E-1``) and uploads it; the server
  (algorithm ``fedprox``, ``proximal_mu = 1``) sends ``proximal_mu`` in every task's config and the agents'
  ``sgd_fit`` adds ``mu/2 ||w - w^t||^2`` to the local loss.

Both trainings use the same seed, so the server selects the same devices each round, and the same stragglers
(``numpy.random.default_rng([straggler_seed, round])``, like the authors' ``np.random.seed(round)``).
Test accuracy is computed here, on the union of all devices' test splits (the paper's metric), from the
version the server stores after every round (``versioning.services.version_read_parameters``); the server's
own ``evaluation_dataset`` only knows digits and MNIST. Training loss on the union of the training splits
(Figure 1's y-axis) is reported too.

Usage::

    .venv/bin/python bench/reproduce_fedprox.py
    .venv/bin/python bench/reproduce_fedprox.py --variants fedavg,fedprox,fedprox_mu0 --rounds 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _inprocess  # first: sets BLAS threads and sys.path before numpy and Django load

NUM_DEVICES = 30
CLIENTS_PER_ROUND = 10
LOCAL_EPOCHS = 20
BATCH_SIZE = 10
LEARNING_RATE = 0.01

VARIANTS: dict[str, dict[str, Any]] = {
    # name: (algorithm, hyperparameters, what stragglers do)
    "fedavg": {"algorithm": "fedavg", "hyperparameters": {}, "stragglers": "drop"},
    "fedprox": {"algorithm": "fedprox", "hyperparameters": {"proximal_mu": 1.0}, "stragglers": "partial"},
    "fedprox_mu0": {"algorithm": "fedprox", "hyperparameters": {"proximal_mu": 0.0}, "stragglers": "partial"},
}


@dataclass
class VariantResult:
    variant: str
    algorithm: str
    hyperparameters: dict[str, Any]
    stragglers: str
    rounds: int = 0
    test_accuracy: list[float] = field(default_factory=list)  # index 0: the initial model
    train_loss: list[float] = field(default_factory=list)
    updates_per_round: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.test_accuracy[-1]

    def mean_last(self, count: int) -> float:
        tail = self.test_accuracy[-count:]
        return sum(tail) / len(tail)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants", default="fedavg,fedprox", help=f"comma-separated, from {list(VARIANTS)}"
    )
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--straggler-fraction", type=float, default=0.9)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of Synthetic(alpha, beta)")
    parser.add_argument("--seed", type=int, default=0, help="server seed: initial model, selection, tasks")
    parser.add_argument("--straggler-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the curves as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary database and blobs")
    return parser.parse_args(argv)


def straggler_plan(fraction: float, seed: int, drop: bool) -> _inprocess.RoundPlan:
    """Per round, ``round(fraction * selected)`` stragglers; dropped, or given ``U{1..E}`` local epochs."""
    import numpy as np

    def plan(round_number: int, selected: Sequence[str]) -> Mapping[str, int | None]:
        rng = np.random.default_rng([seed, round_number])
        count = round(fraction * len(selected))
        stragglers = rng.choice(len(selected), size=count, replace=False)
        epochs = rng.integers(1, LOCAL_EPOCHS + 1, size=count)  # drawn for both variants: same stream
        return {selected[int(i)]: 0 if drop else int(e) for i, e in zip(stragglers, epochs, strict=True)}

    return plan


def training_configuration(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = VARIANTS[variant]
    return {
        "name": f"Li et al. 2020 Figure 1, Synthetic({args.alpha:g},{args.beta:g}), {variant}",
        "algorithm": spec["algorithm"],
        "hyperparameters": spec["hyperparameters"],
        "model_type": "logreg",
        "input_dim": 60,
        "num_classes": 10,
        # Up to 10 devices per round; a round closes with whoever finished (FedAvg keeps only 1 in 10).
        "min_clients_per_round": 1,
        "max_clients_per_round": CLIENTS_PER_ROUND,
        "local_epochs": LOCAL_EPOCHS,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "max_rounds": args.rounds,
        "seed": args.seed,
        "metadata": {"paper": "Li et al. 2020, Figure 1", "stragglers": args.straggler_fraction},
    }


def run_variant(
    federation: _inprocess.InProcessFederation,
    variant: str,
    federation_data: Any,
    args: argparse.Namespace,
    progress: Any,
) -> VariantResult:
    from flcore.models import ModelSpec, build_model

    spec = VARIANTS[variant]
    result = VariantResult(variant, spec["algorithm"], spec["hyperparameters"], spec["stragglers"])
    model = build_model(ModelSpec("logreg", 60, 10))
    x_test, y_test = federation_data.test_union()
    x_train, y_train = federation_data.train_union()

    def evaluate(training_id: Any) -> None:
        parameters = federation.current_parameters(training_id)
        result.test_accuracy.append(model.evaluate(parameters, x_test, y_test)[1])
        result.train_loss.append(model.evaluate(parameters, x_train, y_train)[0])

    plan = straggler_plan(args.straggler_fraction, args.straggler_seed, drop=spec["stragglers"] == "drop")
    training_id = federation.start(training_configuration(variant, args))
    evaluate(training_id)
    task = progress.add_task(variant, total=args.rounds, info="")
    started = time.perf_counter()
    try:
        for record in federation.rounds(training_id, plan):
            evaluate(training_id)
            result.rounds = record.number
            result.updates_per_round.append(record.num_trained)
            info = (
                f"test acc {result.test_accuracy[-1]:.4f}  train loss {result.train_loss[-1]:.4f}  "
                f"{record.num_trained} updates, {record.num_dropped} dropped"
            )
            progress.update(task, completed=record.number, info=info)
            if not progress.console.is_terminal and record.number % 20 == 0:
                progress.console.print(f"{variant} round {record.number}: {info}")
    except BaseException:
        federation.stop(training_id, reason="reproduce_fedprox interrupted")
        raise
    finally:
        result.wall_seconds = time.perf_counter() - started
    return result


def summary_table(results: list[VariantResult]) -> Any:
    from rich.table import Table

    table = Table(title="Synthetic(1,1), 90% stragglers, E=20, B=10, lr=0.01, 10 of 30 devices per round")
    for column in (
        "variant",
        "stragglers",
        "rounds",
        "test acc (final)",
        "mean last 10",
        "best",
        "train loss (final)",
        "last 5 accuracies",
        "wall",
    ):
        table.add_column(column, justify="right")
    for result in results:
        table.add_row(
            result.variant
            + (f" mu={result.hyperparameters['proximal_mu']:g}" if result.hyperparameters else ""),
            result.stragglers,
            str(result.rounds),
            f"{result.final_accuracy:.4f}",
            f"{result.mean_last(10):.4f}",
            f"{max(result.test_accuracy):.4f}",
            f"{result.train_loss[-1]:.4f}",
            " ".join(f"{a:.3f}" for a in result.test_accuracy[-5:]),
            f"{result.wall_seconds / 60:.1f} min",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"Unknown variants {unknown}; choose from {list(VARIANTS)}.")
    _inprocess.configure_django()
    import numpy as np
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flcore.data_synthetic import synthetic_federation

    console = Console(width=None if sys.stdout.isatty() else 140)
    data = synthetic_federation(args.alpha, args.beta, np.random.default_rng(args.data_seed))
    sizes = [d.num_examples for d in data.devices]
    console.print(
        f"{data.name}: {len(sizes)} devices, {sum(sizes)} examples ({min(sizes)}-{max(sizes)} per device), "
        f"{sum(len(d.y_test) for d in data.devices)} test examples"
    )
    federation = _inprocess.InProcessFederation(
        [_inprocess.AgentData(d.x_train, d.y_train, d.x_test, d.y_test) for d in data.devices],
        prefix="synthetic-",
    )
    results: list[VariantResult] = []
    started = time.perf_counter()
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            for variant in variants:
                results.append(run_variant(federation, variant, data, args, progress))
                if args.out is not None:
                    args.out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    finally:
        federation.close()
        if args.keep:
            console.print(f"kept {_inprocess.configure_django()}")
        else:
            _inprocess.remove_work_dir()
    console.print(summary_table(results))
    console.print(f"total wall time {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
