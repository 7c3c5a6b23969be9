"""Reproduce McMahan et al. (2017), Table 1, 2NN on MNIST: rounds of FedAvg to reach 97% test accuracy.

"Communication-Efficient Learning of Deep Networks from Decentralized Data" (AISTATS 2017), Table 1, 2NN,
``E = 1``, ``B = 10``, ``C = 0.1``: 87 rounds IID and 664 rounds pathological non-IID. Setting: 100 clients,
IID (600 random examples each) or non-IID (sorted by label, 200 shards of 300, 2 shards per client); the 2NN
784-200-200-10 with ReLU (199,210 parameters); each round the server picks ``C * K = 10`` clients, each runs
one epoch of minibatch SGD (``B = 10``, 60 steps), and the server averages weighted by ``n_k``. The paper
tuned the client learning rate per setting over a grid and reports the best; this script does the same over
``--iid-lrs`` / ``--noniid-lrs`` and reports every value.

Everything runs through the real coordinator (see ``bench/_inprocess.py``): the training is started with
``training_create_and_start`` (``min = max = 10`` clients per round, ``evaluation_dataset = "mnist"``,
``target_accuracy = 0.97``), 100 fedagent agents poll, download, train with ``flcore.training.sgd_fit`` and
upload through the agent REST views; the server selects, aggregates, evaluates on the 10,000 MNIST test
images and stops the training at the first round whose accuracy reaches the target.

Grid with successive caps: learning rates run in the given order and each later run is capped at the best
round count found so far (it cannot win beyond it), so a grid costs little more than its best run when the
best rate comes first (the defaults put first the rate that won on this machine, 0.2 for both partitions).

Usage::

    .venv/bin/python bench/reproduce_fedavg.py                      # both grids (about 20 minutes)
    .venv/bin/python bench/reproduce_fedavg.py --partition iid --iid-lrs 0.2
    .venv/bin/python bench/reproduce_fedavg.py --partition noniid --noniid-lrs 0.2 --max-rounds-noniid 1000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _inprocess  # first: sets BLAS threads and sys.path before numpy and Django load

PAPER_ROUNDS = {"iid": 87, "noniid": 664}
"""McMahan et al. (2017), Table 1, 2NN, C = 0.1, B = 10, E = 1: rounds to 97% test accuracy."""
TOLERANCE = 0.25
NUM_CLIENTS = 100
CLIENTS_PER_ROUND = 10
SHARDS_PER_CLIENT = 2


@dataclass
class RunResult:
    partition: str
    learning_rate: float
    max_rounds: int
    rounds_run: int = 0
    rounds_to_target: int | None = None
    final_accuracy: float | None = None
    best_accuracy: float | None = None
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    stop_reason: str = ""
    accuracy: list[float] = field(default_factory=list)

    @property
    def seconds_per_round(self) -> float:
        return self.wall_seconds / max(self.rounds_run, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partition", choices=("iid", "noniid", "both"), default="both")
    parser.add_argument(
        "--iid-lrs", default="0.2,0.1,0.3,0.05,0.5", help="comma-separated client learning rates, in order"
    )
    parser.add_argument("--noniid-lrs", default="0.2,0.1,0.3,0.05", help="comma-separated, in order")
    parser.add_argument("--max-rounds-iid", type=int, default=300)
    parser.add_argument("--max-rounds-noniid", type=int, default=1000)
    parser.add_argument("--target", type=float, default=0.97, help="test accuracy to reach")
    parser.add_argument("--seed", type=int, default=0, help="server seed: initial model, selection, tasks")
    parser.add_argument("--partition-seed", type=int, default=0, help="seed of the client partition")
    parser.add_argument("--mnist-path", type=Path, default=None, help="default: ../shared/data/mnist.npz")
    parser.add_argument("--out", type=Path, default=None, help="write every run's results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary database and blobs")
    return parser.parse_args(argv)


def client_partitions(partition: str, y_train: Any, seed: int) -> list[Any]:
    """McMahan et al. (2017), Section 3: IID (600 random examples each) or 2 label-sorted shards of 300."""
    import numpy as np

    from flcore.data import partition_iid, partition_shards

    rng = np.random.default_rng(seed)
    if partition == "iid":
        return partition_iid(len(y_train), NUM_CLIENTS, rng)
    return partition_shards(y_train, NUM_CLIENTS, SHARDS_PER_CLIENT, rng)


def training_configuration(
    partition: str, learning_rate: float, max_rounds: int, args: argparse.Namespace
) -> dict[str, Any]:
    return {
        "name": f"McMahan 2017 Table 1, 2NN, {partition}, lr={learning_rate}",
        "algorithm": "fedavg",
        "model_type": "mlp",
        "input_dim": 784,
        "hidden_sizes": [200, 200],
        "num_classes": 10,
        "min_clients_per_round": CLIENTS_PER_ROUND,
        "max_clients_per_round": CLIENTS_PER_ROUND,
        "local_epochs": 1,
        "batch_size": 10,
        "learning_rate": learning_rate,
        "evaluation_dataset": "mnist",
        "target_accuracy": args.target,
        "max_rounds": max_rounds,
        "seed": args.seed,
        "metadata": {"paper": "McMahan et al. 2017, Table 1", "partition": partition},
    }


def run_one(
    federation: _inprocess.InProcessFederation,
    partition: str,
    learning_rate: float,
    max_rounds: int,
    args: argparse.Namespace,
    progress: Any,
) -> RunResult:
    result = RunResult(partition=partition, learning_rate=learning_rate, max_rounds=max_rounds)
    training_id = federation.start(training_configuration(partition, learning_rate, max_rounds, args))
    task = progress.add_task(f"{partition} lr={learning_rate:g}", total=max_rounds, info="")
    started = time.perf_counter()
    try:
        for record in federation.rounds(training_id):
            accuracy = record.metrics["accuracy"]
            result.accuracy.append(accuracy)
            result.rounds_run = record.number
            result.train_seconds += record.agent_seconds
            if result.rounds_to_target is None and accuracy >= args.target:
                result.rounds_to_target = record.number
            elapsed = time.perf_counter() - started
            if not progress.console.is_terminal and (record.number % 10 == 0 or accuracy >= args.target):
                progress.console.print(
                    f"{partition} lr={learning_rate:g} round {record.number}: accuracy {accuracy:.4f} "
                    f"({elapsed / record.number:.2f} s/round)"
                )
            progress.update(
                task,
                completed=record.number,
                info=(
                    f"acc {accuracy:.4f}  best {max(result.accuracy):.4f}  "
                    f"{elapsed / record.number:.2f} s/round "
                    f"(train {result.train_seconds / record.number:.2f})"
                ),
            )
    except BaseException:
        federation.stop(training_id, reason="reproduce_fedavg interrupted")
        raise
    finally:
        result.wall_seconds = time.perf_counter() - started
    summary = federation.training_summary(training_id)
    result.stop_reason = summary["stop_reason"]
    result.final_accuracy = result.accuracy[-1] if result.accuracy else None
    result.best_accuracy = max(result.accuracy) if result.accuracy else None
    progress.update(task, completed=max_rounds if result.rounds_to_target else result.rounds_run)
    return result


def run_partition(
    partition: str, learning_rates: list[float], max_rounds: int, args: argparse.Namespace, console: Any
) -> list[RunResult]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flcore.data import load_dataset

    dataset = load_dataset("mnist", mnist_path=args.mnist_path)
    parts = client_partitions(partition, dataset.y_train, args.partition_seed)
    labels_per_client = [len(set(dataset.y_train[p].tolist())) for p in parts]
    console.print(
        f"[bold]{partition}[/]: {len(parts)} clients, {min(map(len, parts))}-{max(map(len, parts))} examples "
        f"each, {min(labels_per_client)}-{max(labels_per_client)} labels per client"
    )
    federation = _inprocess.InProcessFederation(
        [_inprocess.AgentData(dataset.x_train[p], dataset.y_train[p]) for p in parts], prefix=f"{partition}-"
    )
    results: list[RunResult] = []
    cap = max_rounds
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            for learning_rate in learning_rates:
                result = run_one(federation, partition, learning_rate, cap, args, progress)
                results.append(result)
                if result.rounds_to_target is not None:
                    cap = min(cap, result.rounds_to_target)  # a later rate must beat this to matter
    finally:
        federation.close()
    return results


def summary_table(results: list[RunResult], target: float) -> Any:
    from rich.table import Table

    table = Table(title=f"FedAvg 2NN on MNIST: rounds to {target:.0%} test accuracy (C=0.1, E=1, B=10)")
    columns = (
        "partition",
        "lr",
        "rounds to target",
        "paper",
        "within 25%",
        "best acc",
        "rounds run",
        "s/round",
        "wall",
    )
    for column in columns:
        table.add_column(column, justify="right")
    best = best_per_partition(results)
    for result in results:
        paper = PAPER_ROUNDS[result.partition]
        reached = result.rounds_to_target
        is_best = best.get(result.partition) is result
        table.add_row(
            result.partition + (" *" if is_best else ""),
            f"{result.learning_rate:g}",
            str(reached) if reached is not None else f"> {result.rounds_run}",
            str(paper),
            ("yes" if reached <= paper * (1 + TOLERANCE) else "no") if reached is not None else "-",
            f"{result.best_accuracy:.4f}" if result.best_accuracy is not None else "-",
            str(result.rounds_run),
            f"{result.seconds_per_round:.2f}",
            f"{result.wall_seconds / 60:.1f} min",
        )
    table.caption = (
        "* best learning rate of the grid (fewest rounds); later rates were capped at the best count so far"
    )
    return table


def best_per_partition(results: list[RunResult]) -> dict[str, RunResult]:
    best: dict[str, RunResult] = {}
    for result in results:
        key = (result.rounds_to_target or math.inf, -(result.best_accuracy or 0.0))
        current = best.get(result.partition)
        if current is None or key < (current.rounds_to_target or math.inf, -(current.best_accuracy or 0.0)):
            best[result.partition] = result
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _inprocess.configure_django()
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 140)
    partitions = ["iid", "noniid"] if args.partition == "both" else [args.partition]
    results: list[RunResult] = []
    started = time.perf_counter()
    try:
        for partition in partitions:
            rates = [float(v) for v in (args.iid_lrs if partition == "iid" else args.noniid_lrs).split(",")]
            cap = args.max_rounds_iid if partition == "iid" else args.max_rounds_noniid
            results.extend(run_partition(partition, rates, cap, args, console))
            if args.out is not None:
                args.out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    finally:
        if not args.keep:
            _inprocess.remove_work_dir()
        else:
            console.print(f"kept {_inprocess.configure_django()}")
    console.print(summary_table(results, args.target))
    console.print(f"total wall time {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
