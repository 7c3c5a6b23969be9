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
import copy
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flcore.secagg.client import ClientPhase, SecAggClient
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

__all__ = ["RoundDriver", "RoundRun", "identity_keys", "run_round"]

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


class RoundDriver:
    """Drives the parties and the server of one round phase by phase, through the messages' wire bytes.

    Parameters
    ----------
    setup : RoundSetup
        The round.
    clients : mapping of int to SecAggClient, optional
        The parties (default: honest parties with fresh identity keys).
    server : SecAggServer, optional
        The server (default: an honest one).
    on_phase : callable, optional
        ``on_phase(name, server)`` after each phase's messages reached the server.
    """

    def __init__(
        self,
        setup: RoundSetup,
        *,
        clients: Mapping[int, SecAggClient] | None = None,
        server: SecAggServer | None = None,
        on_phase: Callable[[str, SecAggServer], None] | None = None,
    ) -> None:
        if clients is None:
            private, registry = identity_keys(setup.party_ids)
            clients = {
                p: SecAggClient(
                    setup=setup, party_id=p, identity_key=private[p], identity_public_keys=registry
                )
                for p in setup.party_ids
            }
        self.setup = setup
        self.clients = dict(clients)
        self.server = server if server is not None else SecAggServer(setup)
        self.on_phase = on_phase
        self.client_seconds: dict[int, float] = dict.fromkeys(self.clients, 0.0)
        self.client_cpu: dict[int, float] = dict.fromkeys(self.clients, 0.0)
        self.sent: dict[int, int] = dict.fromkeys(self.clients, 0)
        self.received: dict[int, int] = dict.fromkeys(self.clients, 0)
        self.server_seconds: dict[str, float] = {}
        self.server_cpu: dict[str, float] = {}
        self.active: list[int] = list(setup.party_ids)
        self._outbox: dict[int, bytes] = {}  # what the server sends each party for its next phase

    def _client(self, party: int) -> contextlib.AbstractContextManager[None]:
        return _timer(self.client_seconds, self.client_cpu, party)

    def _server(self, phase: str) -> contextlib.AbstractContextManager[None]:
        return _timer(self.server_seconds, self.server_cpu, phase)

    def _drop(self, parties: Collection[int]) -> None:
        gone = set(parties)
        self.active = [p for p in self.active if p not in gone]

    def _deliver(self, party: int) -> bytes:
        wire = self._outbox[party]
        self.received[party] += len(wire)
        return wire

    def _phase_done(self, name: str) -> None:
        if self.on_phase:
            self.on_phase(name, self.server)

    def advertise(self, *, absent: Collection[int] = ()) -> None:
        """Phase 1: every party not ``absent`` advertises its keys; the server sends the directories."""
        self._drop(absent)
        for party in self.active:
            with self._client(party):
                wire = self.clients[party].advertise_keys().to_bytes()
            self.sent[party] += len(wire)
            with self._server("advertise"):
                self.server.receive_advertisement(AdvertiseKeys.from_bytes(wire))
        with self._server("advertise"):
            self._outbox = {p: d.to_bytes() for p, d in self.server.close_advertising().items()}
        self._phase_done("advertise")

    def share(self, *, drop_after_advertising: Collection[int] = ()) -> None:
        """Phase 2: the remaining parties share their secrets; the server routes the ciphertexts."""
        self._drop(drop_after_advertising)
        for party in self.active:
            wire = self._deliver(party)
            with self._client(party):
                wire = self.clients[party].share_keys(KeyDirectory.from_bytes(wire)).to_bytes()
            self.sent[party] += len(wire)
            with self._server("share"):
                self.server.receive_shares(ShareKeys.from_bytes(wire))
        with self._server("share"):
            self._outbox = {p: d.to_bytes() for p, d in self.server.close_sharing().items()}
        self._phase_done("share")

    def masked_input(
        self,
        updates: Mapping[int, npt.ArrayLike],
        *,
        rng: np.random.Generator,
        drop_after_sharing: Collection[int] = (),
    ) -> None:
        """Phase 3: the remaining parties upload masked inputs; the server announces the survivors."""
        self._drop(drop_after_sharing)
        length, bits = self.setup.vector_length, self.setup.config.bits
        for party in self.active:
            wire = self._deliver(party)
            with self._client(party):
                delivery = ShareDelivery.from_bytes(wire)
                wire = self.clients[party].masked_input(delivery, updates[party], rng=rng).to_bytes()
            self.sent[party] += len(wire)
            with self._server("masked_input"):
                self.server.receive_masked_input(MaskedInput.from_bytes(wire, length=length, bits=bits))
            self._phase_done("masked_input_received")
        with self._server("masked_input"):
            self._outbox = {p: r.to_bytes() for p, r in self.server.close_collecting().items()}
        self._phase_done("masked_input")

    def unmask(self, *, drop_after_masked_input: Collection[int] = ()) -> RoundRun:
        """Phase 4: the remaining survivors answer; the server unmasks the sum."""
        self._drop(drop_after_masked_input)
        for party in self.active:
            wire = self._deliver(party)
            with self._client(party):
                wire = self.clients[party].unmask(UnmaskRequest.from_bytes(wire)).to_bytes()
            self.sent[party] += len(wire)
            with self._server("unmask"):
                self.server.receive_unmask(UnmaskResponse.from_bytes(wire))
        with self._server("unmask"):
            result = self.server.finish()
        self._phase_done("unmask")
        return RoundRun(
            result=result,
            client_seconds=dict(self.client_seconds),
            client_bytes_sent=dict(self.sent),
            client_bytes_received=dict(self.received),
            server_seconds=dict(self.server_seconds),
            client_cpu_seconds=dict(self.client_cpu),
            server_cpu_seconds=dict(self.server_cpu),
        )

    def fork(self) -> RoundDriver:
        """A copy of the round after the share phase, to run the last two phases more than once.

        For benchmarks only: a forked party reuses its self mask and pairwise masks, which in a real round
        would reveal the difference of the two inputs it masked with them.
        """
        if any(client.phase != ClientPhase.SHARED for p, client in self.clients.items() if p in self.active):
            raise ValueError("A round can be forked only right after the share phase.")
        twin = copy.copy(self)
        twin.server = copy.deepcopy(self.server)
        twin.clients = {}
        for party, client in self.clients.items():
            twin_client = copy.copy(client)
            twin_client._received_shares = dict(client._received_shares)  # filled by masked_input
            twin.clients[party] = twin_client
        for name in ("client_seconds", "client_cpu", "sent", "received", "server_seconds", "server_cpu"):
            setattr(twin, name, dict(getattr(self, name)))
        twin.active = list(self.active)
        twin._outbox = dict(self._outbox)
        return twin


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
    driver = RoundDriver(setup, clients=clients, server=server, on_phase=on_phase)
    driver.advertise(absent=absent)
    driver.share(drop_after_advertising=drop_after_advertising)
    driver.masked_input(updates, rng=rng, drop_after_sharing=drop_after_sharing)
    return driver.unmask(drop_after_masked_input=drop_after_masked_input)
