"""Who masks with whom: the complete graph (SecAgg) or a k-regular graph of degree O(log n) (SecAgg+).

Bonawitz et al. 2017 pair every two parties (the complete graph: each party's cost is linear in ``n``).
Bell, Bonawitz, Gascon, Lepoint and Raykova 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead" (CCS), replace it with a k-regular graph of logarithmic degree: a party shares its secrets and
masks only with its ``k`` neighbours. Here the graph is the Harary graph ``H(k, n)`` (each party joined to
the ``k / 2`` parties on either side of it on a ring) laid over a pseudorandom order of the parties, so the
neighbourhoods are random and the degree is exactly ``k``.

Invariants: the graph depends only on the public round seed and the party ids, through SHA-256 (every
party computes the same graph in any language: sort the ids by ``SHA-256(seed || id as 8 big-endian
bytes)``); it is symmetric and has no self loops; ``k >= n - 1`` gives the complete graph.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

__all__ = ["complete_graph", "default_neighbours", "harary_graph", "party_order"]


def party_order(seed: bytes, party_ids: Sequence[int]) -> list[int]:
    """The parties sorted by ``SHA-256(seed || id)``: a pseudorandom order that only the public seed fixes."""
    return sorted(party_ids, key=lambda p: (hashlib.sha256(seed + p.to_bytes(8, "big")).digest(), p))


def complete_graph(party_ids: Sequence[int]) -> dict[int, frozenset[int]]:
    """Every party is a neighbour of every other (Bonawitz et al. 2017)."""
    everyone = frozenset(party_ids)
    return {p: everyone - {p} for p in party_ids}


def harary_graph(party_ids: Sequence[int], *, seed: bytes, neighbours: int) -> dict[int, frozenset[int]]:
    """The k-regular Harary graph over :func:`party_order` (``k = neighbours``, even, >= 2)."""
    if neighbours % 2 or neighbours < 2:
        raise ValueError(f"neighbours must be an even integer >= 2. Found {neighbours}.")
    n = len(party_ids)
    if neighbours >= n - 1:
        return complete_graph(party_ids)
    ring = party_order(seed, party_ids)
    half = neighbours // 2
    graph: dict[int, frozenset[int]] = {}
    for position, party in enumerate(ring):
        graph[party] = frozenset(
            ring[(position + offset) % n] for offset in range(-half, half + 1) if offset != 0
        )
    return graph


def default_neighbours(num_parties: int) -> int:
    """The default SecAgg+ degree: the even number at or above ``3 log2(n)`` (complete graph if >= n - 1).

    ``3 log2 n`` gives 20 neighbours for 100 parties and 28 for 500 (Bell et al. 2020 take the degree
    ``O(log n)``, its constant set by the tolerated dropout and corruption rates).
    """
    if num_parties <= 2:
        return 2
    k = math.ceil(3 * math.log2(num_parties))
    return k + k % 2


def check_graph(graph: Mapping[int, frozenset[int]]) -> None:
    """Raise ``ValueError`` unless ``graph`` is symmetric and has no self loops (used by the tests)."""
    for party, others in graph.items():
        if party in others:
            raise ValueError(f"Party {party} is its own neighbour.")
        for other in others:
            if party not in graph[other]:
                raise ValueError(f"Party {party} lists {other} as a neighbour, but not the other way round.")
