"""An in-process run of one secure-aggregation round: every message goes through its wire form.

Used by the tests and by ``bench/secagg.py``; the REST layer replaces the function calls by HTTP and the
database, but the parties and the server are the same objects.

Invariants: every message crosses between a party and the server as ``to_bytes()`` and is parsed back by
``from_bytes()`` (so the run tests the serialisation too, and counts the bytes each party sends and
receives); a party listed in a dropout set stops after the named phase and answers nothing more; the time
of each party's and the server's work is measured separately, serialisation
included, so a party's figure is what one agent would spend; both wall time (``time.perf_counter``) and
the CPU time of the running thread (``time.thread_time``, which other processes on a busy machine do not
inflate) are kept.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flcore.secagg.client import SecAggClient
from flcore.secagg.messages import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    RoundSetup,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from flcore.secagg.server import SecAggResult, SecAggServer

__all__ = ["RoundRun", "identity_keys", "run_round"]

K = TypeVar("K")


@dataclass
class RoundRun:
    """What :func:`run_round` measured besides the result."""

    result: SecAggResult
    client_seconds: dict[int, float] = field(default_factory=dict)
    client_bytes_sent: dict[int, int] = field(default_factory=dict)
    client_bytes_received: dict[int, int] = field(default_factory=dict)
    server_seconds: dict[str, float] = field(default_factory=dict)
    client_cpu_seconds: dict[int, float] = field(default_factory=dict)
    server_cpu_seconds: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _timer(wall: dict[K, float], cpu: dict[K, float], key: K) -> Iterator[None]:
    start, start_cpu = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        wall[key] = wall.get(key, 0.0) + time.perf_counter() - start
        cpu[key] = cpu.get(key, 0.0) + time.thread_time() - start_cpu


def identity_keys(party_ids: Collection[int]) -> tuple[dict[int, Ed25519PrivateKey], dict[int, bytes]]:
    """Fresh Ed25519 identity keys for ``party_ids`` and the public registry of them."""
    private = {p: Ed25519PrivateKey.generate() for p in party_ids}
    return private, {p: k.public_key().public_bytes_raw() for p, k in private.items()}


def run_round(
    setup: RoundSetup,
    updates: Mapping[int, npt.ArrayLike],
    *,
    rng: np.random.Generator,
    drop_after_advertising: Collection[int] = (),
    drop_after_sharing: Collection[int] = (),
    drop_after_masked_input: Collection[int] = (),
    absent: Collection[int] = (),
    server: SecAggServer | None = None,
    clients: Mapping[int, SecAggClient] | None = None,
    on_phase: Callable[[str, SecAggServer], None] | None = None,
) -> RoundRun:
    """Run one round with every party of ``setup`` (except ``absent``), dropping parties as asked.

    ``on_phase(name, server)`` is called after each phase's messages reach the server (the tests inspect
    the server's state there). ``clients``/``server`` may be given to run tampered objects.
    """
    if clients is None:
        private, registry = identity_keys(setup.party_ids)
        clients = {
            p: SecAggClient(setup=setup, party_id=p, identity_key=private[p], identity_public_keys=registry)
            for p in setup.party_ids
        }
    server = server if server is not None else SecAggServer(setup)
    client_seconds: dict[int, float] = dict.fromkeys(clients, 0.0)
    sent: dict[int, int] = dict.fromkeys(clients, 0)
    received: dict[int, int] = dict.fromkeys(clients, 0)
    server_seconds: dict[str, float] = {}
    client_cpu: dict[int, float] = dict.fromkeys(clients, 0.0)
    server_cpu: dict[str, float] = {}
    length, bits = setup.vector_length, setup.config.bits

    active = [p for p in setup.party_ids if p not in set(absent)]
    # phase 1: advertise keys
    for party in active:
        with _timer(client_seconds, client_cpu, party):
            wire = clients[party].advertise_keys().to_bytes()
        sent[party] += len(wire)
        with _timer(server_seconds, server_cpu, "advertise"):
            server.receive_advertisement(AdvertiseKeys.from_bytes(wire))
    with _timer(server_seconds, server_cpu, "advertise"):
        directories = {p: d.to_bytes() for p, d in server.close_advertising().items()}
    if on_phase:
        on_phase("advertise", server)
    # phase 2: share keys
    active = [p for p in active if p not in set(drop_after_advertising)]
    for party in active:
        received[party] += len(directories[party])
        with _timer(client_seconds, client_cpu, party):
            wire = clients[party].share_keys(KeyDirectory.from_bytes(directories[party])).to_bytes()
        sent[party] += len(wire)
        with _timer(server_seconds, server_cpu, "share"):
            server.receive_shares(ShareKeys.from_bytes(wire))
    with _timer(server_seconds, server_cpu, "share"):
        deliveries = {p: d.to_bytes() for p, d in server.close_sharing().items()}
    if on_phase:
        on_phase("share", server)
    # phase 3: masked input
    active = [p for p in active if p not in set(drop_after_sharing)]
    for party in active:
        received[party] += len(deliveries[party])
        with _timer(client_seconds, client_cpu, party):
            delivery = ShareDelivery.from_bytes(deliveries[party])
            wire = clients[party].masked_input(delivery, updates[party], rng=rng).to_bytes()
        sent[party] += len(wire)
        with _timer(server_seconds, server_cpu, "masked_input"):
            server.receive_masked_input(MaskedInput.from_bytes(wire, length=length, bits=bits))
        if on_phase:
            on_phase("masked_input_received", server)
    with _timer(server_seconds, server_cpu, "masked_input"):
        requests = {p: r.to_bytes() for p, r in server.close_collecting().items()}
    if on_phase:
        on_phase("masked_input", server)
    # phase 4: unmask
    active = [p for p in active if p not in set(drop_after_masked_input)]
    for party in active:
        received[party] += len(requests[party])
        with _timer(client_seconds, client_cpu, party):
            wire = clients[party].unmask(UnmaskRequest.from_bytes(requests[party])).to_bytes()
        sent[party] += len(wire)
        with _timer(server_seconds, server_cpu, "unmask"):
            server.receive_unmask(UnmaskResponse.from_bytes(wire))
    with _timer(server_seconds, server_cpu, "unmask"):
        result = server.finish()
    if on_phase:
        on_phase("unmask", server)
    return RoundRun(
        result=result,
        client_seconds=client_seconds,
        client_bytes_sent=sent,
        client_bytes_received=received,
        server_seconds=server_seconds,
        client_cpu_seconds=client_cpu,
        server_cpu_seconds=server_cpu,
    )
