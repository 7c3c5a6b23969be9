"""Detection rate and false-positive rate of the update anomaly detector, by attack, through the real server.

For every attack (``none``, ``sign_flip``, ``scaling``, ``gaussian``, ``alie``) one FedAvg training of the
digits ``mlp`` preset runs ``--rounds`` rounds with ``--agents`` agents, all of them in every round, of which
the first ``--attackers`` (by agent id) attack from round 1 on; it is ``bench/robustness.py``'s setting and
code path (``run_one``: ``manage.py serve`` on a fresh SQLite file, the agents are ``fedagent`` clients with
the attack hooks of ``fedagent.attacks``). The detector runs with the service's defaults
(``FEDSITE_ANOMALY_THRESHOLD`` 3.5 on every statistic, ``FEDSITE_ANOMALY_MIN_SPREAD`` 0.1) and
``FEDSITE_ANOMALY_ACTION`` = ``--action`` (``flag``: the aggregate keeps every update; ``exclude``: flagged
updates are dropped before the strategy).

Per attack, from the stored ``UpdateStatistics`` rows: the detection rate (flagged attacker updates / attacker
updates), the false-positive rate (flagged honest updates / honest updates), the same two from round 2 on
(round 1 has no reference direction, so no cosine), which statistics caught the attackers, and the final
central test accuracy; "honest flagged by" names the statistics behind the false positives.

Usage::

    DJANGO_DEBUG=1 .venv/bin/python bench/anomaly_detection.py --rounds 15 --action flag
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ATTACKS = ("none", "sign_flip", "scaling", "gaussian", "alie")


@dataclass(frozen=True)
class DetectionResult:
    attack: str
    action: str
    rounds: int
    attacker_updates: int
    attacker_flagged: int
    honest_updates: int
    honest_flagged: int
    attacker_updates_from_2: int
    attacker_flagged_from_2: int
    honest_updates_from_2: int
    honest_flagged_from_2: int
    caught_by: dict[str, int]
    false_positives_by: dict[str, int]
    final_accuracy: float | None

    @staticmethod
    def rate(part: int, whole: int) -> str:
        return "-" if whole == 0 else f"{100 * part / whole:.1f}% ({part}/{whole})"


def measure(
    training_id: str, attacker_ids: set[str], attack: str, action: str, accuracy: float | None
) -> DetectionResult:
    from monitoring.models import UpdateStatistics

    rows = list(UpdateStatistics.objects.filter(training_id=training_id).select_related("agent"))
    attackers = [r for r in rows if attack != "none" and r.agent.agent_id in attacker_ids]
    honest = [r for r in rows if not (attack != "none" and r.agent.agent_id in attacker_ids)]
    late_attackers = [r for r in attackers if r.round_number >= 2]
    late_honest = [r for r in honest if r.round_number >= 2]
    caught = Counter(reason for r in attackers if r.flagged for reason in r.reasons)
    mistaken = Counter(reason for r in honest if r.flagged for reason in r.reasons)
    return DetectionResult(
        attack=attack,
        action=action,
        rounds=len({r.round_number for r in rows}),
        attacker_updates=len(attackers),
        attacker_flagged=sum(r.flagged for r in attackers),
        honest_updates=len(honest),
        honest_flagged=sum(r.flagged for r in honest),
        attacker_updates_from_2=len(late_attackers),
        attacker_flagged_from_2=sum(r.flagged for r in late_attackers),
        honest_updates_from_2=len(late_honest),
        honest_flagged_from_2=sum(r.flagged for r in late_honest),
        caught_by=dict(caught),
        false_positives_by=dict(mistaken),
        final_accuracy=accuracy,
    )


def print_table(results: list[DetectionResult]) -> str:
    rate = DetectionResult.rate
    lines = [
        "| attack | action | detection rate | false-positive rate | detection, rounds >= 2 "
        "| false positives, rounds >= 2 | attackers caught by | honest flagged by | final acc. % |",
        "|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        caught = ", ".join(f"{k} {v}" for k, v in sorted(r.caught_by.items())) or "-"
        mistaken = ", ".join(f"{k} {v}" for k, v in sorted(r.false_positives_by.items())) or "-"
        accuracy = "-" if r.final_accuracy is None else f"{100 * r.final_accuracy:.1f}"
        lines.append(
            f"| {r.attack} | {r.action} | {rate(r.attacker_flagged, r.attacker_updates)} | "
            f"{rate(r.honest_flagged, r.honest_updates)} | "
            f"{rate(r.attacker_flagged_from_2, r.attacker_updates_from_2)} | "
            f"{rate(r.honest_flagged_from_2, r.honest_updates_from_2)} | {caught} | {mistaken} | {accuracy} |"
        )
    table = "\n".join(lines)
    print(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--attackers", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--action", default="flag", choices=["flag", "exclude"])
    parser.add_argument("--sign-flip-scale", type=float, default=1.0, help="sign_flip sends -scale * delta")
    parser.add_argument("--gaussian-sigma", type=float, default=1.0, help="gaussian attack's noise std")
    parser.add_argument("--scaling-factor", type=float, default=10.0, help="scaling sends factor * delta")
    parser.add_argument("--alie-mode", default="omniscient", choices=["omniscient", "own-data"])
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per training")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument("--merge", help="comma-separated --json files of earlier runs: print their table")
    args = parser.parse_args()
    if args.merge:
        print_table(
            [DetectionResult(**i) for p in args.merge.split(",") for i in json.loads(Path(p).read_text())]
        )
        return
    # what bench/robustness.py's run_one reads from its arguments
    args.partition, args.alpha, args.clip_norm = "iid", 0.5, 2.0

    workdir = Path(tempfile.mkdtemp(prefix="fedsite-anomaly-"))
    os.environ["FEDSITE_ANOMALY_ACTION"] = args.action
    from bench.robustness import configure_environment, run_one

    env = configure_environment(workdir)
    env["FEDSITE_ANOMALY_ACTION"] = args.action
    import django

    django.setup()
    from django.core.management import call_command

    from flcore.data import client_split
    from trainings.models import Training
    from trainings.simulation import ServerProcess, agents_create

    logging.getLogger("bench.agents").setLevel(logging.ERROR)
    logging.getLogger("bench.agents").propagate = False
    for name in ("trainings", "clients", "monitoring", "versioning", "fedsite"):
        logging.getLogger(name).setLevel(logging.ERROR)
    call_command("migrate", verbosity=0)
    shards = [
        client_split(
            "digits", num_clients=args.agents, client_index=i, scheme="iid", seed=args.seed, eval_fraction=0.2
        )
        for i in range(args.agents)
    ]
    print(
        f"anomaly detection: digits mlp, fedavg, {args.agents} agents (iid), {args.attackers} attackers, "
        f"{args.rounds} rounds, seed {args.seed}, action {args.action}; "
        f"sign_flip scale {args.sign_flip_scale:g}, scaling {args.scaling_factor:g}, "
        f"gaussian sigma {args.gaussian_sigma:g}, alie {args.alie_mode}; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = []
    with ServerProcess(log_dir=workdir, env=env) as server:
        credentials = agents_create(count=args.agents, prefix=f"ad{args.seed}")
        attacker_ids = {c.agent_id for c in credentials[: args.attackers]}
        for attack in [a for a in args.attacks.split(",") if a]:
            run = run_one(
                rule="fedavg",
                attack=attack,
                args=args,
                server_url=server.url,
                credentials=credentials,
                shards=shards,
            )
            training = Training.objects.filter(name=f"robustness fedavg {attack}").latest("created_at")
            result = measure(str(training.pk), attacker_ids, attack, args.action, run.final_accuracy)
            results.append(result)
            detected = DetectionResult.rate(result.attacker_flagged, result.attacker_updates)
            false_positives = DetectionResult.rate(result.honest_flagged, result.honest_updates)
            print(
                f"{attack:>10}: detection {detected}, false positives {false_positives}, "
                f"{run.rounds} rounds, {run.status}, {run.wall_seconds:.0f}s",
                flush=True,
            )
    print()
    print_table(results)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
