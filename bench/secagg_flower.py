"""Flower 1.42's SecAgg+ primitives timed on the sizes of ``bench/secagg.py`` (the bench-only venv).

Flower's client (``flwr.client.mod.secure_aggregation.secaggplus_mod``) and server
(``flwr.server.workflow.secure_aggregation.secaggplus_workflow``) call these primitives; this script
calls the same ones, in the same order and number, for ONE party and for the server's unmasking, without
Flower's messaging (so it times the cryptography and the masks, not the transport):

- party: two ``generate_key_pairs`` (SECP384R1); per neighbour ``generate_shared_key`` (ECDH + HKDF) and
  ``encrypt`` (Fernet) of the share bundle; ``create_shares`` (PyCryptodome Shamir over GF(2^128), pickled)
  of the mask seed and of the secret key; then ``decrypt`` of every neighbour's bundle, ``quantize``,
  ``pseudo_rand_gen`` (numpy's ``RandomState`` seeded with 32 bits XORed from the key) for the self mask
  and, after one more ``generate_shared_key``, for each neighbour's pairwise mask, ``parameters_mod``;
- server: per survivor ``combine_shares`` of its seed and ``pseudo_rand_gen``; per dropped party
  ``combine_shares`` of its secret key and, per surviving neighbour, ``generate_shared_key`` and
  ``pseudo_rand_gen``; the survivors' and dropped parties' shares are real shares (of one seed and one key,
  reused: the cost does not depend on the secret).

Degree ``k`` and threshold ``t`` are those of ``bench/secagg.py`` (Flower's ``num_shares = k + 1``: the
party and its neighbours). The server's per-party work is the same for every survivor (one
``combine_shares`` and one mask) and for every dropped party (one ``combine_shares`` and one ECDH and mask
per surviving neighbour), and PyCryptodome's pure-Python GF(2^128) Shamir makes a reconstruction with
t = 251 take seconds, so at most ``--timed`` (default 10) parties of each kind are timed and the time is
scaled to all of them (the table's note says where). CPU seconds of the whole process
(``time.process_time``): Flower's ``create_shares`` and ``combine_shares`` run their chunks on a thread
pool, which the calling thread's CPU time would miss.

Usage::

    .venv-bench/bin/python bench/secagg_flower.py --sizes 100,500
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen, share_keys_plaintext_concat
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

MOD_RANGE = 2**32
TARGET_RANGE = 2**22
CLIPPING_RANGE = 8.0


def degree_and_threshold(n: int, graph: str) -> tuple[int, int]:
    """The k and t of bench/secagg.py (3 log2 n rounded up to even; strict majority or 0.34)."""
    if graph == "secagg":
        return n - 1, n // 2 + 1
    k = math.ceil(3 * math.log2(n))
    k = min(k + k % 2, n - 1)
    return k, max(2, math.ceil(0.34 * (k + 1) - 1e-12))


def time_party(k: int, t: int, length: int, rng: np.random.Generator) -> float:
    """CPU seconds of one Flower party's work in a round with k neighbours."""
    neighbours = [(generate_key_pairs(), generate_key_pairs()) for _ in range(k)]
    neighbour_pk = [(public_key_to_bytes(a[1]), public_key_to_bytes(b[1])) for a, b in neighbours]
    update = [rng.standard_normal(length).astype(np.float32)]
    start = time.process_time()
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    sk1_bytes, sk2_bytes = private_key_to_bytes(sk1), private_key_to_bytes(sk2)
    public_key_to_bytes(pk1), public_key_to_bytes(pk2)
    seed = os.urandom(32)
    b_shares = create_shares(seed, t, k + 1)
    sk1_shares = create_shares(sk1_bytes, t, k + 1)
    keys, bundles = [], []
    for i, (_, npk2) in enumerate(neighbour_pk):
        key = generate_shared_key(bytes_to_private_key(sk2_bytes), bytes_to_public_key(npk2))
        keys.append(key)
        bundles.append(
            encrypt(key, share_keys_plaintext_concat(1, i + 2, b_shares[i + 1], sk1_shares[i + 1]))
        )
    # the neighbours' bundles to this party (same size and key as its own, here)
    for key, bundle in zip(keys, bundles, strict=True):
        decrypt(key, bundle)
    quantised = quantize(update, CLIPPING_RANGE, TARGET_RANGE)
    shapes = [a.shape for a in quantised]
    masked = parameters_addition(quantised, pseudo_rand_gen(seed, MOD_RANGE, shapes))
    for i, (npk1, _) in enumerate(neighbour_pk):
        shared = generate_shared_key(bytes_to_private_key(sk1_bytes), bytes_to_public_key(npk1))
        mask = pseudo_rand_gen(shared, MOD_RANGE, shapes)
        masked = parameters_addition(masked, mask) if i % 2 else parameters_subtraction(masked, mask)
    parameters_mod(masked, MOD_RANGE)
    return time.process_time() - start


def time_server(
    n: int, k: int, t: int, dropout: float, length: int, rng: np.random.Generator, timed: int
) -> tuple[float, str]:
    """CPU seconds of Flower's unmasking of one round; and a note when part of it was scaled."""
    dropped = round(dropout * n)
    survivors = n - dropped
    surviving_neighbours = k if k < n - 1 else survivors  # complete graph: every survivor
    if k < n - 1:
        surviving_neighbours = round(k * (1 - dropout))
    seed = os.urandom(32)
    seed_shares = create_shares(seed, t, k + 1)[:t]
    sk, _ = generate_key_pairs()
    sk_shares = create_shares(private_key_to_bytes(sk), t, k + 1)[:t]
    peers = [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(surviving_neighbours)]
    masked = [rng.integers(0, MOD_RANGE, length, dtype=np.int64)]
    shapes = [a.shape for a in masked]
    timed_survivors, timed_dropped_parties = min(survivors, timed), min(dropped, timed)
    start = time.process_time()
    for _ in range(timed_survivors):
        masked = parameters_subtraction(
            masked, pseudo_rand_gen(combine_shares(seed_shares), MOD_RANGE, shapes)
        )
    survivors_time = (time.process_time() - start) * survivors / timed_survivors
    start = time.process_time()
    for _ in range(timed_dropped_parties):
        secret = combine_shares(sk_shares)
        for peer in peers:
            shared = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(peer))
            masked = parameters_subtraction(masked, pseudo_rand_gen(shared, MOD_RANGE, shapes))
    dropped_time = time.process_time() - start
    if timed_dropped_parties:
        dropped_time *= dropped / timed_dropped_parties
    parameters_mod(masked, MOD_RANGE)
    scaled = []
    if timed_survivors < survivors:
        scaled.append(f"{timed_survivors} of {survivors} survivors")
    if timed_dropped_parties < dropped:
        scaled.append(f"{timed_dropped_parties} of {dropped} dropped")
    note = f"timed {' and '.join(scaled)}, scaled" if scaled else ""
    return survivors_time + dropped_time, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,500")
    parser.add_argument("--length", type=int, default=100_000)
    parser.add_argument("--dropouts", default="0,0.1,0.3")
    parser.add_argument("--graphs", default="secagg,secagg+")
    parser.add_argument("--timed", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="N 20,50 x 10k values")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.length = "20,50", 10_000
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        for graph in args.graphs.split(","):
            k, t = degree_and_threshold(n, graph)
            party = time_party(k, t, args.length, rng)
            for dropout in (float(d) for d in args.dropouts.split(",")):
                server, note = time_server(n, k, t, dropout, args.length, rng, args.timed)
                rows.append(
                    {
                        "n": n,
                        "graph": graph,
                        "k": k,
                        "t": t,
                        "dropout": dropout,
                        "party": party,
                        "server": server,
                        "note": note,
                    }
                )
                print(
                    f"N={n} {graph} {dropout:.0%}: party {party:.3f} s, server {server:.3f} s {note}",
                    file=sys.stderr,
                    flush=True,
                )
    load = os.getloadavg()
    print(
        f"\nFlower 1.42 SecAgg+ primitives, {args.length:,} values, CPU seconds; load average {load[0]:.1f}\n"
    )
    print("| N | graph | k | t | dropout | party s | server unmask s | note |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['graph']} | {r['k']} | {r['t']} | {r['dropout']:.0%} | {r['party']:.3f} "
            f"| {r['server']:.3f} | {r['note']} |"
        )


if __name__ == "__main__":
    main()
