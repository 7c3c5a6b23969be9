"""Time to accuracy: fedsite's HTTP federation (the ``make demo`` path) against Flower's simulation engine.

The same task on both sides, in one run:

- data: digits, 10 clients, the same Dirichlet(alpha) partition (``flcore.data.client_split`` with the same
  seed: each client trains on its shard minus the 20% it holds out, as ``python -m fedagent run`` does);
- model: the same MLP 64-64-10, initialised by ``ModelSpec.init(default_rng(seed))`` as the server does;
- local training: the same code, ``fedagent.trainer.ZooTrainer.fit`` (minibatch SGD of ``flcore.training``)
  with the demo preset's local epochs, batch size and learning rate, seeded per client and round;
- aggregation: FedAvg weighted by examples; accuracy: the central evaluation on digits' test split after
  every round (fedsite's ``evaluation_dataset``; Flower's ``evaluate_fn`` with the same function).

``fedsite``: ``manage.py demo --dataset digits --agents 10`` as a subprocess, exactly what ``make demo`` runs
(embedded stack unless ``--stack real``): a server process and ten ``python -m fedagent run`` processes
talking HTTP (long-polling, safetensors uploads). The figures come from the run's database: the time from
the training's start to the completion of the first round whose version reaches the target, and the median
round (opened to completed). The command's whole wall time, process start-up included, is printed too,
split into start-up (launch to the training's start) and teardown (the last round's end to the exit).

``Flower``: ``flwr.simulation.run_simulation`` (Flower 1.42, Ray backend, one CPU per virtual client) with a
``ServerApp`` running the current ``flwr.serverapp.strategy.FedAvg`` (``fraction_train=1``, no federated
evaluation) and a ``ClientApp`` whose ``train`` handler runs the same trainer. Time to accuracy is from the
``ServerApp``'s start to the ``evaluate_fn`` call that reaches the target; Ray's start-up is in the wall time,
which, as for fedsite, runs from launching the process to its exit (interpreter and imports included).
Flower runs in the bench-only venv (see bench/requirements-flower.txt); this script starts it there.

Usage::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -r requirements/agent.txt -r bench/requirements-flower.txt
    .venv/bin/python bench/time_to_accuracy.py --runs 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the demo preset for digits (trainings/simulation.py DATASET_PRESETS), repeated here for the Flower side,
# which must not import Django; --check-preset compares the two
PRESET = {"hidden_sizes": [64], "local_epochs": 5, "batch_size": 16, "learning_rate": 0.2}


# --------------------------------------------------------------------------------------------------
# Flower side (runs in the bench venv)
# --------------------------------------------------------------------------------------------------
def flower_worker(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedagent.trainer import FitConfig, ZooTrainer
    from flcore.data import client_split, load_dataset
    from flcore.models import ModelSpec, build_model

    spec = ModelSpec("mlp", 64, 10, tuple(PRESET["hidden_sizes"]))
    names = list(spec.parameter_spec().names)
    test = load_dataset("digits")
    model = build_model(spec)
    initial = model.init(np.random.default_rng(args.seed))
    fit = {key: PRESET[key] for key in ("local_epochs", "batch_size", "learning_rate")}

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        index = int(context.node_config["partition-id"])
        x, y, _, _ = client_split(
            "digits",
            num_clients=args.agents,
            client_index=index,
            scheme="dirichlet",
            alpha=args.alpha,
            seed=args.seed,
        )
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        trainer = ZooTrainer(spec)
        trainer.set_parameters(dict(zip(names, arrays, strict=True)))
        server_round = int(msg.content["config"]["server-round"])
        config = FitConfig(**fit, seed=server_round)
        result = trainer.fit(x, y, config, np.random.default_rng([args.seed, index, server_round]))
        params = trainer.get_parameters()
        content = RecordDict(
            {
                "arrays": ArrayRecord([params[name] for name in names]),
                "metrics": MetricRecord({"num-examples": result.num_examples}),
            }
        )
        return Message(content=content, reply_to=msg)

    timeline: list[tuple[int, float, float]] = []
    started: list[float] = []
    started_epoch: list[float] = []
    evaluated_epoch: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        params = dict(zip(names, arrays.to_numpy_ndarrays(), strict=True))
        loss, accuracy = model.evaluate(params, test.x_test, test.y_test)
        timeline.append((server_round, time.perf_counter() - started[0], float(accuracy)))
        evaluated_epoch.append(time.time())
        return MetricRecord({"accuracy": float(accuracy), "loss": float(loss)})

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        started.append(time.perf_counter())
        started_epoch.append(time.time())
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=args.agents)
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord([initial[name] for name in names]),
            num_rounds=args.flower_rounds,
            train_config=ConfigRecord({}),
            evaluate_fn=evaluate,
        )

    wall = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.agents,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - wall
    return {
        "timeline": timeline,
        "wall": wall,
        "started_epoch": started_epoch[0],
        "last_round_epoch": evaluated_epoch[-1],
    }


def run_flower(args: argparse.Namespace, rounds: int) -> dict[str, Any]:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    command = [args.flower_python, str(Path(__file__).resolve()), "--flower-worker", "--out", str(out)]
    command += ["--agents", str(args.agents), "--seed", str(args.seed), "--alpha", str(args.alpha)]
    command += ["--flower-rounds", str(rounds)]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "FEDSITE_"))}
    env["PYTHONPATH"] = str(ROOT)
    launched = time.time()
    subprocess.run(
        command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    exited = time.time()
    result = json.loads(out.read_text())
    out.unlink()
    rounds_seen = [(r, t, a) for r, t, a in result["timeline"] if r > 0]
    reached = next(((r, t) for r, t, a in rounds_seen if a >= args.target), None)
    per_round = [b[1] - a[1] for a, b in itertools.pairwise(rounds_seen)]
    first = rounds_seen[0][1] if rounds_seen else None
    return {
        "rounds_to_target": reached[0] if reached else None,
        "seconds_to_target": reached[1] if reached else None,
        "after_round_one": reached[1] - first if reached and first is not None else None,
        "round_seconds": statistics.median(per_round) if per_round else None,
        "wall": exited - launched,
        "startup": result["started_epoch"] - launched,
        "teardown": exited - result["last_round_epoch"],
        "final_accuracy": rounds_seen[-1][2] if rounds_seen else None,
    }


# --------------------------------------------------------------------------------------------------
# fedsite side (runs in the project's venv)
# --------------------------------------------------------------------------------------------------
def _when(value: str) -> float:
    """Epoch seconds of a datetime as SQLite holds it (Django writes UTC, without an offset)."""
    moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def run_fedsite(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        env = dict(os.environ)
        if args.stack == "embedded":
            for key in ("DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY"):
                env.pop(key, None)
            env["FEDSITE_VAR_DIR"] = str(Path(tmp) / "var")
        command = [sys.executable, "manage.py", "demo", "--dataset", "digits", "--agents", str(args.agents)]
        command += ["--partition", "dirichlet", "--alpha", str(args.alpha), "--seed", str(args.seed)]
        command += ["--target-accuracy", str(args.target), "--max-rounds", str(args.max_rounds)]
        command += ["--out", str(Path(tmp) / "out")]
        launched = time.time()
        subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        exited = time.time()
        summary = json.loads((Path(tmp) / "out" / "summary.json").read_text())
        if args.stack != "embedded":
            raise SystemExit("--stack real: read the figures from the dashboard; this script reads SQLite")
        database = Path(summary["run_directory"]) / "fedsite.sqlite3"
        with sqlite3.connect(database) as db:
            (started,) = db.execute("select started_at from trainings_training").fetchone()
            rounds = db.execute(
                "select number, opened_at, completed_at from trainings_round where completed_at is not null "
                "order by number"
            ).fetchall()
            accuracy = {
                number: json.loads(metrics).get("accuracy")
                for number, metrics in db.execute("select number, metrics from versioning_modelversion")
            }
    reached = next(((n, c) for n, _, c in rounds if (accuracy.get(n) or 0) >= args.target), None)
    return {
        "rounds_to_target": reached[0] if reached else None,
        "seconds_to_target": _when(reached[1]) - _when(started) if reached else None,
        "after_round_one": _when(reached[1]) - _when(rounds[0][2]) if reached else None,
        "round_seconds": statistics.median(_when(c) - _when(o) for _, o, c in rounds),
        "wall": exited - launched,
        "startup": _when(started) - launched,
        "teardown": exited - _when(rounds[-1][2]),
        "final_accuracy": summary["final_accuracy"],
        "rounds": len(rounds),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "not reached" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.93)
    parser.add_argument("--max-rounds", type=int, default=40)
    parser.add_argument("--runs", type=int, default=1, help="alternating fedsite / Flower runs")
    parser.add_argument("--stack", choices=["embedded"], default="embedded")
    parser.add_argument("--flower-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--flower-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--flower-rounds", type=int, default=40, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flower_worker:
        args.out.write_text(json.dumps(flower_worker(args)))
        return

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedsite.settings")
    import django

    django.setup()
    from trainings.simulation import DATASET_PRESETS

    preset = {key: DATASET_PRESETS["digits"][key] for key in PRESET}
    if preset != PRESET:
        raise SystemExit(f"the demo preset changed: {preset}; update PRESET in this script")
    if not Path(args.flower_python).exists():
        raise SystemExit(
            f"{args.flower_python} not found: create the bench venv (see this script's docstring)"
        )

    rows: list[tuple[str, dict[str, Any]]] = []
    for run in range(args.runs):
        fedsite = run_fedsite(args)
        rows.append(("fedsite (make demo: HTTP, 11 processes)", fedsite))
        flower_rounds = min(args.max_rounds, (fedsite["rounds_to_target"] or args.max_rounds) + 5)
        rows.append(("Flower 1.42 simulation (Ray, in-process)", run_flower(args, flower_rounds)))
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)

    task = f"digits, {args.agents} clients, Dirichlet alpha={args.alpha}, seed {args.seed}"
    print(f"\n{task}, target accuracy {args.target}")
    print(
        f"{'side':<44} {'rounds':>6} {'s to target':>11} {'after round 1':>13} {'s/round':>7} "
        f"{'start-up':>8} {'teardown':>8} {'wall s':>6} {'final acc':>9}"
    )
    for name, row in rows:
        print(
            f"{name:<44} {row['rounds_to_target'] or '-':>6} {_fmt(row['seconds_to_target']):>11} "
            f"{_fmt(row['after_round_one']):>13} {_fmt(row['round_seconds'], 2):>7} "
            f"{row['startup']:>8.1f} {row['teardown']:>8.1f} {row['wall']:>6.1f} "
            f"{_fmt(row['final_accuracy'], 4):>9}"
        )
    print(
        "s to target: from the training's start (fedsite: agents already online) or the ServerApp's start "
        "(Flower: Ray's virtual clients start inside round 1); after round 1: from the end of round 1; "
        "s/round: median round; start-up: from launching the command to the training's start; teardown: "
        "from the last round's end to the command's exit; wall: the whole command, launched to exited "
        "(both sides: the Flower process's interpreter and imports included)"
    )


if __name__ == "__main__":
    main()
