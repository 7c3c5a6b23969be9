"""The protocol end to end: sums with dropouts at every phase, a swapped key, a greedy server, fail safe."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from flcore.secagg import (
    AdvertiseKeys,
    ClientPhase,
    InvalidSignature,
    KeyDirectory,
    MaskedInput,
    MessageError,
    NotEnoughSurvivors,
    ProtocolViolation,
    RoundSetup,
    SecAggClient,
    SecAggServer,
    SecureAggregationConfig,
    ServerPhase,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from flcore.secagg.quantisation import clip_by_l2_norm, quantisation_levels
from flcore.secagg.simulation import identity_keys, run_round

LENGTH = 3000
CLIP = 4.0


def _setup(protocol: str = "secagg", n: int = 10, **config: Any) -> RoundSetup:
    return RoundSetup(
        session_id="training-1/round-1",
        party_ids=tuple(range(1, n + 1)),
        round_seed=hashlib.sha256(b"public round seed").digest(),
        vector_length=LENGTH,
        config=SecureAggregationConfig(protocol=protocol, clip_norm=CLIP, **config),
    )


def _updates(setup: RoundSetup, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    updates = {p: rng.standard_normal(LENGTH) * 0.05 for p in setup.party_ids}
    updates[setup.party_ids[1]] *= 100  # one update longer than clip_norm
    return updates


def _clients(setup: RoundSetup) -> dict[int, SecAggClient]:
    private, registry = identity_keys(setup.party_ids)
    return {
        p: SecAggClient(setup=setup, party_id=p, identity_key=private[p], identity_public_keys=registry)
        for p in setup.party_ids
    }


def _assert_equals_plain_sum(run_result: Any, updates: dict[int, np.ndarray], survivors: set[int]) -> None:
    assert set(run_result.survivors) == survivors
    plain = np.sum([clip_by_l2_norm(updates[p], CLIP) for p in sorted(survivors)], axis=0)
    error = np.abs(run_result.total - plain).max()
    assert error < run_result.error_bound
    assert run_result.error_bound < 1e-5  # 32 bits leave a fine grid: the check is tight


@pytest.mark.parametrize(
    ("protocol", "config"), [("secagg", {}), ("secagg+", {"neighbours": 6, "threshold": 3})]
)
def test_ten_parties_one_drops_after_sharing_three_after_masked_input(
    protocol: str, config: dict[str, Any]
) -> None:
    setup = _setup(protocol, **config)
    if protocol == "secagg+":
        assert all(len(setup.neighbours(p)) == 6 for p in setup.party_ids)  # a sparse graph indeed
    updates = _updates(setup)
    run = run_round(
        setup,
        updates,
        rng=np.random.default_rng(1),
        drop_after_sharing={3},
        drop_after_masked_input={4, 7, 9},
    )
    # parties 4, 7 and 9 uploaded their masked inputs: they are in the sum, though they never unmasked
    _assert_equals_plain_sum(run.result, updates, set(setup.party_ids) - {3})
    assert run.result.dropped_after_sharing == (3,)
    assert run.result.responders == (1, 2, 5, 6, 8, 10)


def test_dropouts_at_every_phase_and_an_absent_party() -> None:
    setup = _setup("secagg", n=12)
    updates = _updates(setup, seed=5)
    run = run_round(
        setup,
        updates,
        rng=np.random.default_rng(2),
        absent={12},
        drop_after_advertising={2},
        drop_after_sharing={3, 11},
        drop_after_masked_input={4},
    )
    _assert_equals_plain_sum(run.result, updates, set(range(1, 12)) - {2, 3, 11})
    assert run.result.dropped_after_advertising == (2,) and run.result.dropped_after_sharing == (3, 11)


def test_the_server_never_holds_an_unmasked_individual_vector() -> None:
    setup = _setup("secagg+", neighbours=4)
    updates = _updates(setup, seed=9)
    clients = _clients(setup)
    levels = quantisation_levels(bits=32, num_parties=10)
    step = CLIP / levels
    snapshots: list[tuple[str, list[np.ndarray], list[bytes]]] = []
    client_secrets: set[bytes] = set()

    def walk(value: Any, arrays: list[np.ndarray], blobs: list[bytes], seen: set[int]) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, np.ndarray):
            arrays.append(value.copy())
        elif isinstance(value, bytes):
            blobs.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k, arrays, blobs, seen)
                walk(v, arrays, blobs, seen)
        elif isinstance(value, list | tuple | set | frozenset):
            for v in value:
                walk(v, arrays, blobs, seen)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), arrays, blobs, seen)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            walk(vars(value), arrays, blobs, seen)

    def on_phase(name: str, server: SecAggServer) -> None:
        if name == "share":  # the secrets exist by now; none may ever reach the server
            for client in clients.values():
                client_secrets.add(client._self_mask_seed)
                client_secrets.add(client._masking_key.private_bytes_raw())
                client_secrets.add(client._encryption_key.private_bytes_raw())
        arrays: list[np.ndarray] = []
        blobs: list[bytes] = []
        walk(server, arrays, blobs, set())
        snapshots.append((name, arrays, blobs))

    run = run_round(
        setup,
        updates,
        rng=np.random.default_rng(4),
        clients=clients,
        drop_after_sharing={6},
        drop_after_masked_input={2},
        on_phase=on_phase,
    )
    survivors = set(run.result.survivors)
    phases_with_arrays = 0
    for name, arrays, blobs in snapshots:
        assert not client_secrets & set(blobs), name
        if name == "unmask":
            continue  # the sum of the survivors, unmasked at last: an aggregate, not an individual input
        for array in arrays:
            phases_with_arrays += 1
            as_one_update = (array.astype(np.float64) - levels) * step  # what the array would mean alone
            for party in survivors:
                clipped = clip_by_l2_norm(updates[party], CLIP)
                assert np.abs(as_one_update - clipped).max() > 1000 * step, (name, party)
    assert phases_with_arrays >= 9  # the running masked sum was inspected after every upload
    _assert_equals_plain_sum(run.result, updates, set(setup.party_ids) - {6})


def _advertise(
    setup: RoundSetup, clients: dict[int, SecAggClient], server: SecAggServer
) -> dict[int, KeyDirectory]:
    for client in clients.values():
        server.receive_advertisement(client.advertise_keys())
    return server.close_advertising()


def _through_masked_input(
    setup: RoundSetup, clients: dict[int, SecAggClient], server: SecAggServer, drop_after_sharing: set[int]
) -> dict[int, UnmaskRequest]:
    directories = _advertise(setup, clients, server)
    for party, client in clients.items():
        server.receive_shares(client.share_keys(directories[party]))
    deliveries = server.close_sharing()
    rng = np.random.default_rng(0)
    updates = _updates(setup)
    for party, client in clients.items():
        if party not in drop_after_sharing:
            server.receive_masked_input(client.masked_input(deliveries[party], updates[party], rng=rng))
    return server.close_collecting()


def test_a_swapped_public_key_is_detected_by_its_signature() -> None:
    setup = _setup("secagg", n=5)
    clients = _clients(setup)
    directories = _advertise(setup, clients, SecAggServer(setup))
    # a malicious server puts its own key in place of party 2's, to read the shares sent to party 2
    attacker = AdvertiseKeys(
        party_id=2, encryption_key=bytes(range(32)), masking_key=bytes(32), signature=bytes(64)
    )
    for victim in (1, 3):
        honest = {a.party_id: a for a in directories[victim].advertisements}
        swapped = dataclasses.replace(honest[2], encryption_key=attacker.encryption_key)
        forged = KeyDirectory(tuple(swapped if a.party_id == 2 else a for a in honest.values()))
        with pytest.raises(InvalidSignature, match="party 2 are not signed"):
            clients[victim].share_keys(forged)
        assert clients[victim].phase == ClientPhase.ABORTED
        with pytest.raises(ProtocolViolation, match="phase 'aborted'"):
            clients[victim].share_keys(directories[victim])  # an aborted party answers nothing more
    # its own keys swapped: refused too
    own = {a.party_id: a for a in directories[4].advertisements}
    own[4] = dataclasses.replace(own[4], masking_key=bytes(range(32)))
    with pytest.raises(InvalidSignature, match="party 4"):
        clients[4].share_keys(KeyDirectory(tuple(own.values())))
    # a server holding the registry refuses a forged advertisement at once
    private, registry = identity_keys(setup.party_ids)
    server = SecAggServer(setup, identity_public_keys=registry)
    honest_client = SecAggClient(
        setup=setup, party_id=5, identity_key=private[5], identity_public_keys=registry
    )
    good = honest_client.advertise_keys()
    with pytest.raises(InvalidSignature):
        server.receive_advertisement(dataclasses.replace(good, encryption_key=bytes(range(32))))
    server.receive_advertisement(good)


def test_a_party_refuses_to_give_both_shares_of_one_neighbour() -> None:
    setup = _setup("secagg", n=6)
    clients = _clients(setup)
    server = SecAggServer(setup)
    requests = _through_masked_input(setup, clients, server, drop_after_sharing={6})
    honest = requests[1]
    assert set(honest.survivors) == {1, 2, 3, 4, 5} and honest.dropped == (6,)
    greedy = UnmaskRequest(survivors=honest.survivors, dropped=(*honest.dropped, 3))  # 3 in both lists
    with pytest.raises(
        ProtocolViolation, match=r"both the self-mask share and the mask-key share of parties \[3\]"
    ):
        clients[1].unmask(greedy)
    assert clients[1].phase == ClientPhase.ABORTED
    # one request per round: having answered, a party answers no second (contradicting) request
    response = clients[2].unmask(requests[2])
    assert set(response.self_mask_shares) == {1, 2, 3, 4, 5} and set(response.mask_key_shares) == {6}
    with pytest.raises(ProtocolViolation, match="phase 'done'"):
        clients[2].unmask(UnmaskRequest(survivors=(1, 2, 4, 5), dropped=(3, 6)))
    # a request that calls a survivor dropped while leaving it out of the survivors is also answered
    # only if it names every neighbour exactly once; one that invents or omits a neighbour is refused
    with pytest.raises(ProtocolViolation, match="exactly once"):
        clients[3].unmask(UnmaskRequest(survivors=(1, 2, 3, 4), dropped=(6,)))
    with pytest.raises(ProtocolViolation, match="not listed as a survivor"):
        clients[4].unmask(UnmaskRequest(survivors=(1, 2, 3, 5), dropped=(4, 6)))


def test_below_threshold_fails_safe_at_the_server_and_the_party() -> None:
    # complete graph of 5: t = 3. Three drop after sharing: only 2 masked inputs, below t
    setup = _setup("secagg", n=5)
    assert setup.threshold(1) == 3
    clients = _clients(setup)
    server = SecAggServer(setup)
    with pytest.raises(NotEnoughSurvivors, match="below its threshold of 3"):
        _through_masked_input(setup, clients, server, drop_after_sharing={3, 4, 5})
    assert server.phase == ServerPhase.FAILED and server.masked_sum is None and not server.requests
    # the party refuses too, whatever a server asks: fewer than t survivors in its neighbourhood
    with pytest.raises(NotEnoughSurvivors, match="Nothing is revealed"):
        clients[1].unmask(UnmaskRequest(survivors=(1, 2), dropped=(3, 4, 5)))
    assert clients[1].phase == ClientPhase.ABORTED


def test_too_few_unmask_responses_fail_safe() -> None:
    setup = _setup("secagg", n=5)
    clients = _clients(setup)
    server = SecAggServer(setup)
    requests = _through_masked_input(setup, clients, server, drop_after_sharing=set())
    for party in (1, 2):  # t = 3, only two answer
        server.receive_unmask(clients[party].unmask(requests[party]))
    with pytest.raises(NotEnoughSurvivors, match="After the unmask responses"):
        server.finish()
    assert server.phase == ServerPhase.FAILED and server.masked_sum is None
    assert not server.self_mask_shares and not server.mask_key_shares


def test_the_server_enforces_the_protocol() -> None:
    setup = _setup("secagg", n=4)
    clients = _clients(setup)
    server = SecAggServer(setup)
    ad = clients[1].advertise_keys()
    server.receive_advertisement(ad)
    with pytest.raises(ProtocolViolation, match="Party 1 may not advertise keys twice"):
        server.receive_advertisement(ad)
    with pytest.raises(MessageError, match="Party 9 is not a party"):
        server.receive_advertisement(dataclasses.replace(ad, party_id=9))
    with pytest.raises(ProtocolViolation, match="cannot accept shares in phase 'advertising'"):
        server.receive_shares(ShareKeys(party_id=1, ciphertexts={}))
    for party in (2, 3, 4):
        server.receive_advertisement(clients[party].advertise_keys())
    directories = server.close_advertising()
    shares = clients[1].share_keys(directories[1])
    partial = ShareKeys(party_id=1, ciphertexts={k: v for k, v in shares.ciphertexts.items() if k != 2})
    with pytest.raises(MessageError, match=r"each neighbour that advertised keys \[2, 3, 4\]"):
        server.receive_shares(partial)  # masks would not cancel if one pair masked one-sidedly
    server.receive_shares(shares)
    for party in (2, 3):
        server.receive_shares(clients[party].share_keys(directories[party]))
    deliveries = server.close_sharing()
    assert 4 not in deliveries and set(deliveries[1].ciphertexts) == {2, 3}
    rng = np.random.default_rng(0)
    with pytest.raises(ProtocolViolation, match="Party 4 may not upload"):
        server.receive_masked_input(MaskedInput(party_id=4, masked=np.zeros(LENGTH, np.uint32)))
    with pytest.raises(MessageError, match="uint32 of shape"):
        server.receive_masked_input(MaskedInput(party_id=1, masked=np.zeros(LENGTH, np.uint64)))
    server.receive_masked_input(clients[1].masked_input(deliveries[1], np.zeros(LENGTH), rng=rng))
    # a tampered ciphertext is caught by the recipient (AES-GCM), which then aborts
    tampered = dict(deliveries[2].ciphertexts)
    tampered[1] = tampered[1][:-1] + bytes([tampered[1][-1] ^ 1])
    with pytest.raises(ProtocolViolation, match="from party 1 fail authentication"):
        clients[2].masked_input(ShareDelivery(tampered), np.zeros(LENGTH), rng=rng)


def _messages(setup: RoundSetup) -> Iterator[Any]:
    clients = _clients(setup)
    server = SecAggServer(setup)
    ads = [c.advertise_keys() for c in clients.values()]
    yield ads[0]
    for ad in ads:
        server.receive_advertisement(ad)
    directories = server.close_advertising()
    yield directories[1]
    shares = [c.share_keys(directories[p]) for p, c in clients.items()]
    yield shares[0]
    for share in shares:
        server.receive_shares(share)
    deliveries = server.close_sharing()
    yield deliveries[2]
    rng = np.random.default_rng(0)
    for party, client in clients.items():
        server.receive_masked_input(client.masked_input(deliveries[party], np.ones(LENGTH) * 0.01, rng=rng))
    requests = server.close_collecting()
    yield requests[3]
    yield clients[3].unmask(requests[3])


def test_every_message_round_trips_through_json_and_bytes() -> None:
    setup = _setup("secagg+", n=8, neighbours=4, threshold=0.5)
    assert RoundSetup.from_bytes(setup.to_bytes()) == setup
    assert RoundSetup.from_bytes(setup.to_bytes()).context == setup.context
    count = 0
    for message in _messages(setup):
        kind = type(message)
        assert kind.from_bytes(message.to_bytes()) == message
        assert kind.from_json(message.to_json()) == message
        count += 1
    assert count == 6
    masked = MaskedInput(party_id=3, masked=np.arange(LENGTH, dtype=np.uint32))
    assert MaskedInput.from_bytes(masked.to_bytes(), length=LENGTH, bits=32) == masked


@pytest.mark.parametrize(
    ("kind", "payload", "match"),
    [
        (AdvertiseKeys, b'{"party_id": 1}', "missing the field 'encryption_key'"),
        (
            AdvertiseKeys,
            b'{"party_id": 0, "encryption_key": "", "masking_key": "", "signature": ""}',
            "'party_id'",
        ),
        (
            AdvertiseKeys,
            b'{"party_id": 1, "encryption_key": "AAAA", "masking_key": "", "signature": ""}',
            "'encryption_key' must be 32 bytes",
        ),
        (ShareKeys, b'{"party_id": 1, "ciphertexts": {"x": "AA=="}}', "not a party id"),
        (ShareKeys, b'{"party_id": 1, "ciphertexts": {"2": "not base64!"}}', "not valid base64"),
        (UnmaskRequest, b'{"survivors": [1, 1], "dropped": []}', "lists a party twice"),
        (
            UnmaskResponse,
            b'{"party_id": 1, "self_mask_shares": {"2": "AA=="}, "mask_key_shares": {}}',
            "33 bytes",
        ),
        (KeyDirectory, b"\xff\xfe", "not valid UTF-8 JSON"),
        (
            RoundSetup,
            b'{"session_id": "s", "party_ids": [1, 2], "round_seed": "", "vector_length": 3}',
            "'config'",
        ),
    ],
)
def test_malformed_messages_are_refused_naming_the_field(kind: Any, payload: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        kind.from_bytes(payload)


def test_malformed_masked_inputs_are_refused() -> None:
    with pytest.raises(MessageError, match="not a valid safetensors blob"):
        MaskedInput.from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}", length=4, bits=32)
    blob = MaskedInput(party_id=2, masked=np.full(4, 2**20, np.uint32)).to_bytes()
    with pytest.raises(MessageError, match="values >= 2\\*\\*16"):
        MaskedInput.from_bytes(blob, length=4, bits=16)
    with pytest.raises(MessageError, match="shape \\(5,\\)"):
        MaskedInput.from_bytes(blob, length=5, bits=32)


def test_round_setup_validates_the_configuration_for_its_parties() -> None:
    with pytest.raises(MessageError, match="'bits' = 8 is too few for 200 parties"):
        _setup("secagg", n=200, bits=8)
    with pytest.raises(MessageError, match="'threshold' = 9 asks for 9 shares"):
        _setup("secagg+", n=20, neighbours=4, threshold=9)
    with pytest.raises(MessageError, match="distinct and ascending"):
        RoundSetup(
            session_id="s",
            party_ids=(2, 1),
            round_seed=bytes(32),
            vector_length=3,
            config=SecureAggregationConfig(clip_norm=1.0),
        )


def test_a_forked_round_finishes_correctly_on_each_branch() -> None:
    from flcore.secagg.simulation import RoundDriver

    setup = _setup("secagg+", n=10, neighbours=6, threshold=3)
    updates = _updates(setup, seed=11)
    driver = RoundDriver(setup)
    driver.advertise()
    driver.share()
    twin = driver.fork()
    twin.masked_input(updates, rng=np.random.default_rng(0), drop_after_sharing={5})
    branch = twin.unmask()
    driver.masked_input(updates, rng=np.random.default_rng(1))
    trunk = driver.unmask(drop_after_masked_input={2})
    _assert_equals_plain_sum(branch.result, updates, set(setup.party_ids) - {5})
    _assert_equals_plain_sum(trunk.result, updates, set(setup.party_ids))
    assert driver.server is not twin.server and trunk.result.responders != branch.result.responders
