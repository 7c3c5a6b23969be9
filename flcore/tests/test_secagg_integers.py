"""Integer inputs (distributed-DP shares) are masked as they are; the unmasked sum is their sum mod 2^bits."""

from __future__ import annotations

import numpy as np
import pytest

from flcore.secagg import (
    AdvertiseKeys,
    MaskedInput,
    RoundSetup,
    SecAggClient,
    SecAggServer,
    SecureAggregationConfig,
    ShareKeys,
    UnmaskResponse,
)
from flcore.secagg.simulation import identity_keys


def _round(bits: int, length: int) -> tuple[RoundSetup, dict[int, SecAggClient], SecAggServer]:
    setup = RoundSetup(
        session_id="integers",
        party_ids=(1, 2, 3, 4),
        round_seed=bytes(range(32)),
        vector_length=length,
        config=SecureAggregationConfig(protocol="secagg", clip_norm=1.0, bits=bits),
    )
    private, registry = identity_keys(setup.party_ids)
    clients = {
        p: SecAggClient(setup=setup, party_id=p, identity_key=private[p], identity_public_keys=registry)
        for p in setup.party_ids
    }
    return setup, clients, SecAggServer(setup, identity_public_keys=registry)


def test_integer_inputs_sum_exactly_modulo_the_modulus_with_a_dropout() -> None:
    bits, length = 20, 64
    setup, clients, server = _round(bits, length)
    rng = np.random.default_rng(3)
    inputs = {p: rng.integers(0, 2**bits, size=length, dtype=np.int64) for p in setup.party_ids}
    for client in clients.values():
        server.receive_advertisement(AdvertiseKeys.from_bytes(client.advertise_keys().to_bytes()))
    for p, directory in server.close_advertising().items():
        server.receive_shares(ShareKeys.from_bytes(clients[p].share_keys(directory).to_bytes()))
    deliveries = server.close_sharing()
    for p in (1, 2, 3):  # party 4 drops after sharing
        masked = clients[p].masked_integers(deliveries[p], inputs[p])
        assert not np.array_equal(masked.masked.astype(np.int64), inputs[p])  # masked, not in the clear
        server.receive_masked_input(MaskedInput.from_bytes(masked.to_bytes(), length=length, bits=bits))
    for p, request in server.close_collecting().items():
        server.receive_unmask(UnmaskResponse.from_bytes(clients[p].unmask(request).to_bytes()))
    result = server.finish_integers()
    expected = (inputs[1] + inputs[2] + inputs[3]) % 2**bits
    np.testing.assert_array_equal(result.total.astype(np.int64), expected)
    assert result.survivors == (1, 2, 3) and result.dropped_after_sharing == (4,)


def test_integer_inputs_out_of_range_are_refused() -> None:
    _, clients, server = _round(16, 8)
    for client in clients.values():
        server.receive_advertisement(client.advertise_keys())
    for p, directory in server.close_advertising().items():
        server.receive_shares(clients[p].share_keys(directory))
    deliveries = server.close_sharing()
    with pytest.raises(ValueError, match="2\\*\\*16"):
        clients[1].masked_integers(deliveries[1], np.full(8, 2**16, dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        clients[2].masked_integers(deliveries[2], np.zeros(8))
    with pytest.raises(ValueError, match="values"):
        clients[3].masked_integers(deliveries[3], np.zeros(7, dtype=np.int64))
