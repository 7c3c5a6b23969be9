"""Secure aggregation (``flcore.secagg``): client time, server unmasking time and bytes per agent.

One in-process round per configuration (``flcore.secagg.simulation.RoundDriver``: every message crosses
as its wire bytes, JSON or safetensors, and is parsed back), for every N in ``--sizes`` x graph (``secagg``:
the complete graph; ``secagg+``: the k-regular graph of ``3 log2 N`` neighbours) x dropout fraction in
``--dropouts``, each party's update ``--length`` float64 values (100k by default), 32-bit quantisation.

Dropouts happen after the share-keys phase: the parties have shared their secrets and the survivors
have masked with them, so the server must rebuild each dropped party's masking key and regenerate its
pairwise mask with every surviving neighbour. This is the costly case the Bonawitz et al. 2017 figures
(Section 7, 500 clients x 100k values) measure. The dropped parties are drawn with ``--seed``. The first
two phases, which do not depend on the dropouts, run once per N and graph, and the round is forked
(``RoundDriver.fork``) for each dropout fraction; each row's client and server times include them.

Columns:

Times are CPU seconds of the thread doing the work (``time.thread_time``): the machine's two cores are
shared with other jobs, whose load inflates wall time but not this; the unmasking wall time is shown
beside it, and the JSON output (``--json``) has the wall times of everything.

- client s: one party's own work over the four phases (key generation and signing; verifying the
  neighbours' signatures, Shamir sharing and encrypting; decrypting, quantising and masking; answering
  the unmask request), serialisation included; mean and max over the parties that completed the round;
- unmask s: the server's last phase (collect the unmask responses, rebuild the secrets, remove the masks,
  dequantise); server s: all the server's phases;
- KiB/agent: bytes a surviving party sends plus the bytes it receives, mean over survivors (the masked
  input, 4 bytes per value, dominates);
- err/bound: max |sum - plain sum of the survivors' clipped updates| over the documented bound (< 1).

The threshold is the default strict majority for ``secagg`` and ``0.34`` of the neighbourhood for
``secagg+`` (a strict majority of a 29-party neighbourhood fails about once per 50 parties at 30%
dropout; see docs/secure-aggregation.md). The load average is printed with the table.

Usage::

    .venv/bin/python bench/secagg.py                 # N 100, 500 x 100k values x 0/10/30% x both graphs
    .venv/bin/python bench/secagg.py --quick         # N 20, 50 x 10k values: a minute
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from flcore.secagg import RoundSetup, SecureAggregationConfig
from flcore.secagg.quantisation import clip_by_l2_norm
from flcore.secagg.simulation import RoundDriver, RoundRun

CLIP_NORM = 10.0
SECAGG_PLUS_THRESHOLD = 0.34


def rounds(n: int, protocol: str, dropouts: list[float], length: int, seed: int) -> list[dict[str, Any]]:
    """Run the first two phases once, then the last two once per dropout fraction; one row each."""
    config = SecureAggregationConfig(
        protocol=protocol,
        clip_norm=CLIP_NORM,
        threshold=None if protocol == "secagg" else SECAGG_PLUS_THRESHOLD,
    )
    setup = RoundSetup(
        session_id=f"bench/{protocol}/{n}",
        party_ids=tuple(range(1, n + 1)),
        round_seed=hashlib.sha256(f"bench {seed}".encode()).digest(),
        vector_length=length,
        config=config,
    )
    rng = np.random.default_rng(seed)
    updates = {p: rng.standard_normal(length) * 0.01 for p in setup.party_ids}
    started = time.perf_counter()
    driver = RoundDriver(setup)
    driver.advertise()
    driver.share()
    shared_wall = time.perf_counter() - started
    rows = []
    for dropout in dropouts:
        dropped = set(rng.choice(np.array(setup.party_ids), size=round(dropout * n), replace=False).tolist())
        started = time.perf_counter()
        branch = driver.fork()
        branch.masked_input(updates, rng=rng, drop_after_sharing=dropped)
        run = branch.unmask()
        wall = shared_wall + time.perf_counter() - started
        rows.append(row(setup, run, updates, dropout, len(dropped), wall))
        print(
            f"N={n} {protocol} dropout={dropout:.0%}: client {rows[-1]['client_mean_s']:.3f} s, "
            f"unmask {rows[-1]['unmask_s']:.3f} s (CPU), wall {wall:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return rows


def row(
    setup: RoundSetup, run: RoundRun, updates: dict[int, Any], dropout: float, dropped: int, wall: float
) -> dict[str, Any]:
    """The measured figures of one round."""
    result = run.result
    plain = np.sum([clip_by_l2_norm(updates[p], CLIP_NORM) for p in result.survivors], axis=0)
    error = float(np.abs(result.total - plain).max())
    survivors = result.survivors
    client = [run.client_cpu_seconds[p] for p in survivors]
    client_wall = [run.client_seconds[p] for p in survivors]
    traffic = [run.client_bytes_sent[p] + run.client_bytes_received[p] for p in survivors]
    sent = [run.client_bytes_sent[p] for p in survivors]
    return {
        "n": setup.num_parties,
        "graph": setup.config.protocol,
        "neighbours": len(setup.neighbours(1)),
        "threshold": setup.threshold(1),
        "dropout": dropout,
        "dropped": dropped,
        "client_mean_s": statistics.fmean(client),
        "client_max_s": max(client),
        "client_wall_mean_s": statistics.fmean(client_wall),
        "unmask_s": run.server_cpu_seconds["unmask"],
        "unmask_wall_s": run.server_seconds["unmask"],
        "server_s": sum(run.server_cpu_seconds.values()),
        "server_wall_s": sum(run.server_seconds.values()),
        "kib_per_agent": statistics.fmean(traffic) / 1024,
        "kib_sent_per_agent": statistics.fmean(sent) / 1024,
        "error_over_bound": error / result.error_bound,
        "wall_s": wall,
    }


def print_table(rows: list[dict[str, Any]], length: int) -> None:
    load = os.getloadavg()
    print(
        f"\nflcore.secagg, {length:,} values per party, 32 bits, drop after sharing keys; "
        f"{platform.processor() or platform.machine()}, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n"
    )
    print(
        "| N | graph | k | t | dropout | client s (mean / max) | unmask s (wall) | server s "
        "| KiB/agent (sent) | err/bound |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']} | {r['graph']} | {r['neighbours']} | {r['threshold']} | {r['dropout']:.0%} "
            f"| {r['client_mean_s']:.3f} / {r['client_max_s']:.3f} "
            f"| {r['unmask_s']:.3f} ({r['unmask_wall_s']:.2f}) "
            f"| {r['server_s']:.3f} "
            f"| {r['kib_per_agent']:,.0f} ({r['kib_sent_per_agent']:,.0f}) | {r['error_over_bound']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,500", help="comma-separated N (default 100,500)")
    parser.add_argument("--length", type=int, default=100_000, help="values per update (default 100000)")
    parser.add_argument("--dropouts", default="0,0.1,0.3", help="dropout fractions (default 0,0.1,0.3)")
    parser.add_argument("--graphs", default="secagg,secagg+", help="graphs to run (default both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="N 20,50 x 10k values (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.length = "20,50", 10_000
    rows = []
    dropouts = [float(d) for d in args.dropouts.split(",")]
    for n in (int(size) for size in args.sizes.split(",")):
        for graph in args.graphs.split(","):
            rows += rounds(n, graph, dropouts, args.length, args.seed)
    print_table(rows, args.length)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
