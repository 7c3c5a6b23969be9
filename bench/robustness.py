"""Robustness of the aggregation rules to simulated model poisoning, through the real coordinator.

For every rule (``fedavg``, ``krum``, ``multikrum``, ``median``, ``trimmed_mean``, ``norm_bounded``) and
every attack (``none``, ``sign_flip``, ``gaussian``, ``scaling``, ``alie``), one training of the digits
``mlp`` preset (64-64-10, 5 local epochs, batch 16, learning rate 0.2) runs ``--rounds`` rounds with
``--agents`` agents, all of them in every round (min = max clients), of which the first ``--attackers``
(by agent id) attack. The table gives the final central test accuracy (``evaluation_dataset`` digits),
the same rule's clean accuracy and the difference in points.

What is real: ``manage.py serve`` (uvicorn, Django views and services, the agent protocol over HTTP, the
aggregation task run eagerly by Celery in embedded mode) on an SQLite file in a temporary directory;
the training is created with ``TrainingConfiguration`` and ``training_create``/``training_start`` like
``manage.py simulate_agents``. What is in-process for speed: the agents, which are
``fedagent.FederatedClient`` threads of this script running the SDK's normal ``run`` loop, the attackers
with the hooks of ``fedagent.attacks.attack_hooks`` (what ``python -m fedagent run --attack`` uses).

ALIE's statistics: ``--alie-mode omniscient`` (default) gives each attacker the training data of the
benign agents (:class:`fedagent.attacks.ReferenceDataEstimator`), the paper's setting of attackers that
know the benign distribution; ``own-data`` uses only the attacker's own data (the command line's default,
:class:`fedagent.attacks.OwnDataEstimator`).

Usage::

    DJANGO_DEBUG=1 .venv/bin/python bench/robustness.py --rounds 30 --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RULES = ("fedavg", "krum", "multikrum", "median", "trimmed_mean", "norm_bounded")
ATTACKS = ("none", "sign_flip", "gaussian", "scaling", "alie")
ROBUST_TARGET_RULES = ("krum", "median", "trimmed_mean")
TARGET_POINTS = 3.0


def rule_hyperparameters(rule: str, *, attackers: int, clip_norm: float) -> dict[str, Any]:
    """The hyperparameters each rule runs with in this benchmark."""
    return {
        "fedavg": {},
        "krum": {"num_malicious": attackers},
        "multikrum": {"num_malicious": attackers},  # num_selected = n - f
        "median": {},
        "trimmed_mean": {"trim_fraction": 0.25},
        "norm_bounded": {"clip_norm": clip_norm},  # inner fedavg
    }[rule]


@dataclass(frozen=True)
class RunResult:
    rule: str
    attack: str
    status: str
    rounds: int
    final_accuracy: float | None
    best_accuracy: float | None
    last5_accuracy: float | None
    wall_seconds: float
    tasks_uploaded: int
    tasks_failed: int


def configure_environment(workdir: Path) -> dict[str, str | None]:
    """Embedded stack on a fresh SQLite file: set before ``django.setup()`` and for the server child."""
    env: dict[str, str | None] = {
        "DATABASE_URL": f"sqlite:///{(workdir / 'fedsite.sqlite3').resolve()}",
        "FEDSITE_VAR_DIR": str(workdir),
        "FEDSITE_MEDIA_ROOT": str(workdir / "media"),
        "DJANGO_SETTINGS_MODULE": "fedsite.settings",
        "DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY") or "bench-robustness",
        "REDIS_URL": None,  # embedded: eager Celery, in-memory channel layer
        "FEDSITE_CONFIG": None,
        "FEDSITE_MAX_CONCURRENT_TRAININGS": "8",
        "FEDSITE_DEADLINE_CHECK_SECONDS": "2",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return env


def run_one(
    *,
    rule: str,
    attack: str,
    args: argparse.Namespace,
    server_url: str,
    credentials: list[Any],
    shards: list[tuple[Any, Any, Any, Any]],
) -> RunResult:
    import numpy as np

    from fedagent.attacks import AttackConfig, ReferenceDataEstimator, attack_hooks
    from fedagent.client import FederatedClient
    from trainings.services import training_create, training_start, training_stop
    from trainings.simulation import dataset_configuration, training_outcome

    configuration = dataset_configuration(
        "digits",
        name=f"robustness {rule} {attack}",
        max_rounds=args.rounds,
        target_accuracy=None,
        min_clients=args.agents,
        max_clients=args.agents,
        seed=args.seed,
        round_timeout_seconds=120.0,
        overrides={
            "algorithm": rule,
            "hyperparameters": rule_hyperparameters(rule, attackers=args.attackers, clip_norm=args.clip_norm),
            "metadata": {"created_by": "bench/robustness.py", "attack": attack},
        },
    )
    training = training_create(configuration=configuration)
    training_id = str(training.pk)
    benign = [(x, y) for x, y, _, _ in shards[args.attackers :]]
    clients: list[FederatedClient] = []
    quiet = logging.getLogger("bench.agents")
    for index, credential in enumerate(credentials):
        x, y, x_eval, y_eval = shards[index]
        hooks = None
        if attack != "none" and index < args.attackers:
            config = AttackConfig(
                attack,  # type: ignore[arg-type]
                scale={"sign_flip": args.sign_flip_scale, "scaling": args.scaling_factor}.get(attack),
                sigma=args.gaussian_sigma,
                num_agents=args.agents,
                num_attackers=args.attackers,
            )
            seed = int.from_bytes(hashlib.sha256(f"{args.seed}:{credential.agent_id}".encode()).digest()[:8])
            hooks = attack_hooks(
                config,
                rng=np.random.default_rng(seed),
                estimator=ReferenceDataEstimator(benign) if args.alie_mode == "omniscient" else None,
                logger=quiet,
            )
        client = FederatedClient(
            agent_id=credential.agent_id,
            server=server_url,
            token=credential.token,
            poll_wait=5.0,
            heartbeat_interval=10.0,
            logger=quiet,
            update_transform=hooks.update_transform if hooks else None,
            trainer_factory=hooks.trainer_factory if hooks else None,
            timeout=60.0,
        )
        client.add_dataset("digits", x, y, split="train")
        client.add_dataset("digits", x_eval, y_eval, split="eval")
        clients.append(client)
    from django.utils import timezone

    since = timezone.now()
    stats: list[Any] = [None] * len(clients)

    def work(i: int) -> None:
        stats[i] = clients[i].run(exit_when_training_done=training_id, handle_signals=False)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    try:
        wait_online(credentials, since=since, timeout=60.0)
        started = time.monotonic()
        training_start(training_id=training_id, actor="bench")
        deadline = started + args.timeout
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            raise RuntimeError(f"training {training_id} ({rule}, {attack}) did not finish in {args.timeout}s")
    except BaseException:
        with contextlib.suppress(Exception):
            training_stop(training_id=training_id, actor="bench", reason="benchmark failed")
        for client in clients:
            client.stop()
        raise
    finally:
        for client in clients:
            client.close()
    outcome = training_outcome(training_id, wall_seconds=time.monotonic() - started)
    accuracies = [r.accuracy for r in outcome.rounds if r.accuracy is not None]
    return RunResult(
        rule=rule,
        attack=attack,
        status=outcome.status,
        rounds=outcome.rounds_completed,
        final_accuracy=outcome.final_accuracy,
        best_accuracy=outcome.best_accuracy,
        last5_accuracy=sum(accuracies[-5:]) / len(accuracies[-5:]) if accuracies else None,
        wall_seconds=outcome.wall_seconds,
        tasks_uploaded=sum(s.tasks_uploaded for s in stats if s is not None),
        tasks_failed=sum(s.tasks_failed + s.tasks_rejected for s in stats if s is not None),
    )


def wait_online(credentials: list[Any], *, since: Any, timeout: float) -> None:
    """Wait until the server has seen every agent since ``since`` (no progress bar: lanes run in parallel)."""
    from django.db import close_old_connections

    from clients.models import Agent

    ids = [c.agent_id for c in credentials]
    deadline = time.monotonic() + timeout
    while Agent.objects.filter(agent_id__in=ids, last_seen_at__gte=since).count() < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every agent connected within {timeout:.0f}s")
        time.sleep(0.3)
        close_old_connections()


def points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def print_table(results: list[RunResult], args: argparse.Namespace) -> str:
    clean = {r.rule: r.final_accuracy for r in results if r.attack == "none"}
    lines = [
        "| rule | attack | final acc. % | clean acc. % | diff. (points) | mean last 5 % | status | s |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        base = clean.get(r.rule)
        diff = "-" if r.final_accuracy is None or base is None else f"{100 * (r.final_accuracy - base):+.1f}"
        lines.append(
            f"| {r.rule} | {r.attack} | {points(r.final_accuracy)} | {points(base)} | {diff} | "
            f"{points(r.last5_accuracy)} | {r.status} | {r.wall_seconds:.0f} |"
        )
    lines += [
        "",
        "| rule | worst attack | worst diff. (points) | target | verdict |",
        "|---|---|---:|---|---|",
    ]
    for rule in dict.fromkeys(r.rule for r in results):
        base = clean.get(rule)
        attacked = [r for r in results if r.rule == rule and r.attack != "none"]
        if base is None or not attacked:
            continue
        worst = min(attacked, key=lambda r: -1.0 if r.final_accuracy is None else r.final_accuracy)
        drop = 100 * ((worst.final_accuracy or 0.0) - base)
        if rule in ROBUST_TARGET_RULES:
            target = f"within {TARGET_POINTS:g} points of clean under every attack"
            verdict = "PASS" if drop >= -TARGET_POINTS else "FAIL"
        elif rule == "fedavg":
            target = "collapses under attack (expected, not robust)"
            verdict = "collapses" if drop < -20 else "does not collapse"
        else:
            target = "(no target; reported)"
            verdict = "within 3 points" if drop >= -TARGET_POINTS else "misses 3 points"
        lines.append(f"| {rule} | {worst.attack} | {drop:+.1f} | {target} | {verdict} |")
    table = "\n".join(lines)
    print(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--attackers", type=int, default=5)
    parser.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--seed", type=int, default=0, help="partition, model initialisation and task seeds")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--sign-flip-scale", type=float, default=4.0, help="sign_flip sends -scale * delta")
    parser.add_argument("--gaussian-sigma", type=float, default=1.0, help="gaussian attack's noise std")
    parser.add_argument("--scaling-factor", type=float, default=10.0, help="scaling sends factor * delta")
    parser.add_argument("--alie-mode", default="omniscient", choices=["omniscient", "own-data"])
    parser.add_argument("--clip-norm", type=float, default=2.0, help="norm_bounded's clip_norm")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per training")
    parser.add_argument(
        "--merge",
        help="comma-separated --json files of earlier runs (e.g. one per rule subset): print their table",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    args = parser.parse_args()
    if args.merge:
        merged = [
            RunResult(**item) for path in args.merge.split(",") for item in json.loads(Path(path).read_text())
        ]
        print_table(merged, args)
        return
    rules = [r for r in args.rules.split(",") if r]
    attacks = [a for a in args.attacks.split(",") if a]
    if "none" not in attacks:
        attacks.insert(0, "none")

    workdir = Path(tempfile.mkdtemp(prefix="fedsite-robustness-"))
    env = configure_environment(workdir)
    import django

    django.setup()
    from django.core.management import call_command

    from flcore.data import client_split
    from trainings.simulation import ServerProcess, agents_create

    logging.getLogger("bench.agents").setLevel(logging.ERROR)
    logging.getLogger("bench.agents").propagate = False
    for name in ("trainings", "clients", "monitoring", "versioning", "fedsite"):
        logging.getLogger(name).setLevel(logging.WARNING)
    call_command("migrate", verbosity=0)
    shards = [
        client_split(
            "digits",
            num_clients=args.agents,
            client_index=i,
            scheme=args.partition,
            alpha=args.alpha,
            seed=args.seed,
            eval_fraction=0.2,
        )
        for i in range(args.agents)
    ]
    print(
        f"robustness: digits, {args.agents} agents ({args.partition}"
        f"{f', alpha {args.alpha}' if args.partition == 'dirichlet' else ''}), {args.attackers} attackers, "
        f"{args.rounds} rounds, seed {args.seed}, sign_flip scale {args.sign_flip_scale:g}, gaussian sigma "
        f"{args.gaussian_sigma:g}, scaling factor {args.scaling_factor:g}, alie {args.alie_mode}, "
        f"norm_bounded clip_norm {args.clip_norm:g}; "
        f"load average {os.getloadavg()[0]:.2f}; work dir {workdir}",
        flush=True,
    )
    jobs = [(rule, attack) for rule in rules for attack in attacks]
    results: dict[tuple[str, str], RunResult] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    with ServerProcess(log_dir=workdir, env=env) as server:
        # One lane: the server hands a round's tasks to ANY eligible agent, so two trainings running at
        # once would share (and mix up) their honest and attacking agents. Run rule subsets in separate
        # processes (each with its own server and database) to use more cores, then --merge.
        lanes = 1
        credentials = [
            agents_create(count=args.agents, prefix=f"rb{args.seed}l{lane}") for lane in range(lanes)
        ]

        def lane_worker(lane: int) -> None:
            from django.db import close_old_connections

            while True:
                with lock:
                    if not jobs or errors:
                        return
                    rule, attack = jobs.pop(0)
                try:
                    result = run_one(
                        rule=rule,
                        attack=attack,
                        args=args,
                        server_url=server.url,
                        credentials=credentials[lane],
                        shards=shards,
                    )
                except BaseException as exc:
                    with lock:
                        errors.append(exc)
                    raise
                finally:
                    close_old_connections()
                with lock:
                    results[(rule, attack)] = result
                print(
                    f"{rule:>13} {attack:>10}: final {points(result.final_accuracy)}%, best "
                    f"{points(result.best_accuracy)}%, {result.rounds} rounds, {result.status}, "
                    f"{result.wall_seconds:.0f}s",
                    flush=True,
                )

        workers = [threading.Thread(target=lane_worker, args=(lane,)) for lane in range(lanes)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    if errors:
        raise errors[0]
    ordered = [results[(rule, attack)] for rule in rules for attack in attacks if (rule, attack) in results]
    print()
    print_table(ordered, args)
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in ordered], indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
