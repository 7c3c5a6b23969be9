"""Secure-aggregation primitives: Shamir any-t-of-n, the field prime, AES-GCM, signatures, masks, graphs."""

from __future__ import annotations

import hashlib
import random
import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from flcore.secagg import crypto, shamir
from flcore.secagg.errors import InvalidSignature, MessageError, NotEnoughShares, ProtocolViolation
from flcore.secagg.graph import check_graph, complete_graph, default_neighbours, harary_graph, party_order
from flcore.secagg.masks import PAIRWISE_PURPOSE, SELF_PURPOSE, MaskExpander, pairwise_sign, reduce_inplace


def _miller_rabin(n: int, rounds: int, rng: random.Random) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


# ------------------------------------------------------------------------------------------------ Shamir
def test_the_field_prime_is_the_smallest_prime_above_2_to_the_256() -> None:
    rng = random.Random(7)
    assert _miller_rabin(shamir.PRIME, 64, rng)  # error probability below 4**-64
    assert not any(_miller_rabin(c, 8, rng) for c in range(2**256 + 1, shamir.PRIME, 2))
    assert shamir.PRIME.bit_length() == 257 and shamir.PRIME < 1 << (8 * shamir.SHARE_BYTES)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 14), data=st.data())
def test_any_t_of_n_shares_rebuild_the_secret_and_fewer_fail(n: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(1, n), label="threshold")
    xs = data.draw(st.lists(st.integers(1, 2**63 - 1), min_size=n, max_size=n, unique=True), label="xs")
    secret = data.draw(st.binary(min_size=32, max_size=32), label="secret")
    shares = shamir.split(secret, threshold=threshold, x_coordinates=xs)
    assert sorted(shares) == sorted(xs) and all(len(v) == shamir.SHARE_BYTES for v in shares.values())

    subset = data.draw(
        st.lists(st.sampled_from(xs), min_size=threshold, max_size=n, unique=True), label="subset"
    )
    assert shamir.combine({x: shares[x] for x in subset}, threshold=threshold) == secret

    if threshold >= 2:
        fewer = subset[: threshold - 1]
        with pytest.raises(NotEnoughShares, match=f"threshold {threshold}"):
            shamir.combine({x: shares[x] for x in fewer}, threshold=threshold)
        # and interpolating them as if the threshold were t - 1 gives a wrong value, not the secret
        try:
            wrong = shamir.combine({x: shares[x] for x in fewer}, threshold=threshold - 1)
        except MessageError:
            wrong = None  # the interpolated value fell outside 32 bytes: also not the secret
        assert wrong != secret


def test_threshold_minus_one_shares_fit_every_secret_equally() -> None:
    """t - 1 shares say nothing: for each candidate secret there is exactly one polynomial through them."""
    xs, threshold = [3, 5, 9, 11], 3
    shares = shamir.split(secrets.token_bytes(32), threshold=threshold, x_coordinates=xs)
    seen = {x: shamir.share_from_bytes(shares[x]) for x in xs[:2]}
    for candidate in (0, 1, 2**255, 2**256 - 1):
        # the polynomial through (0, candidate) and the two shares: its value at a third point
        points = {0: candidate, **seen}
        total = 0
        for xi, yi in points.items():
            term = yi
            for xj in points:
                if xj != xi:
                    term = term * (xs[2] - xj) * pow(xi - xj, -1, shamir.PRIME) % shamir.PRIME
            total = (total + term) % shamir.PRIME
        rebuilt = {xs[0]: shares[xs[0]], xs[1]: shares[xs[1]], xs[2]: total.to_bytes(33, "big")}
        assert shamir.combine(rebuilt, threshold=threshold) == candidate.to_bytes(32, "big")


def test_shamir_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        shamir.split(b"short", threshold=2, x_coordinates=[1, 2])
    with pytest.raises(ValueError, match="exceeds"):
        shamir.split(bytes(32), threshold=3, x_coordinates=[1, 2])
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(bytes(32), threshold=2, x_coordinates=[1, 1])
    with pytest.raises(MessageError, match=r"\[1, p\)"):
        shamir.split(bytes(32), threshold=1, x_coordinates=[0])
    with pytest.raises(MessageError, match="not a field element"):
        shamir.combine({1: (shamir.PRIME).to_bytes(33, "big")}, threshold=1)


# ------------------------------------------------------------------------------------------------ crypto
def test_x25519_agreement_is_symmetric_and_aes_gcm_authenticates() -> None:
    a, b = crypto.generate_x25519(), crypto.generate_x25519()
    shared = crypto.agree(a, crypto.public_bytes(b))
    assert shared == crypto.agree(b, crypto.public_bytes(a)) and len(shared) == 32
    key = crypto.derive_key(shared, purpose=b"test", context=b"round-1")
    assert key != crypto.derive_key(shared, purpose=b"test", context=b"round-2")
    assert key != crypto.derive_key(shared, purpose=b"other", context=b"round-1")

    sealed = crypto.encrypt(key, b"share bundle", associated_data=b"1->2")
    assert crypto.decrypt(key, sealed, associated_data=b"1->2") == b"share bundle"
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(ProtocolViolation, match="fail authentication"):
        crypto.decrypt(key, tampered, associated_data=b"1->2")
    with pytest.raises(ProtocolViolation, match="fail authentication"):
        crypto.decrypt(key, sealed, associated_data=b"1->3")  # misaddressed
    with pytest.raises(ProtocolViolation, match="Key agreement"):
        crypto.agree(a, bytes(32))  # a low-order point


def test_ed25519_signature_detects_an_altered_message() -> None:
    identity = Ed25519PrivateKey.generate()
    public = identity.public_key().public_bytes_raw()
    signature = crypto.sign(identity, b"keys of party 4")
    crypto.verify(public, signature, b"keys of party 4", party=4)
    with pytest.raises(InvalidSignature, match="party 4"):
        crypto.verify(public, signature, b"keys of party 5", party=4)
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(InvalidSignature):
        crypto.verify(other, signature, b"keys of party 4", party=4)


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("bits", [8, 20, 32, 33, 48])
def test_pairwise_masks_cancel_exactly(bits: int) -> None:
    parties = [2, 5, 6, 9, 13]
    pair_secrets = {(u, v): secrets.token_bytes(32) for u in parties for v in parties if u < v}
    expander = MaskExpander(length=5000, bits=bits, context=b"ctx")
    total = expander.zeros()
    individual = []
    for u in parties:
        masked = expander.zeros()
        for v in parties:
            if v != u:
                secret = pair_secrets[(min(u, v), max(u, v))]
                expander.add_inplace(masked, secret, purpose=PAIRWISE_PURPOSE, sign=pairwise_sign(u, v))
        reduce_inplace(masked, bits)
        individual.append(masked.copy())
        np.add(total, masked, out=total)
    reduce_inplace(total, bits)
    assert not total.any()  # the sum of all pairwise masks is exactly zero mod 2**bits
    assert all(int(m.max()) < 2**bits for m in individual)
    assert all(np.count_nonzero(m) > 4900 for m in individual)  # each alone is far from zero


def test_mask_is_aes256_ctr_keyed_by_hkdf_of_the_full_secret() -> None:
    secret = secrets.token_bytes(32)
    expander = MaskExpander(length=8, bits=32, context=b"ctx")
    mask = expander.expand(secret, purpose=SELF_PURPOSE).copy()
    key = crypto.derive_key(secret, purpose=SELF_PURPOSE, context=b"ctx")
    # counter mode from zero: block i of the keystream is AES-ECB(key, i)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # a reference to check against, not a use
    blocks = ecb.update(bytes(16) + (1).to_bytes(16, "big")) + ecb.finalize()
    np.testing.assert_array_equal(mask, np.frombuffer(blocks, dtype="<u4"))
    # every bit of the secret matters (no truncated seed)
    flipped = bytes([secret[0]]) + secret[1:31] + bytes([secret[31] ^ 0x80])
    assert not np.array_equal(mask, expander.expand(flipped, purpose=SELF_PURPOSE))
    assert not np.array_equal(mask, expander.expand(secret, purpose=PAIRWISE_PURPOSE))


def test_masks_are_uniform_mod_2_to_the_bits() -> None:
    expander = MaskExpander(length=200_000, bits=12, context=b"ctx")
    mask = expander.expand(secrets.token_bytes(32), purpose=SELF_PURPOSE).copy()
    reduce_inplace(mask, 12)
    counts = np.bincount((mask >> 8).astype(np.int64), minlength=16)  # top 4 of 12 bits: 16 cells
    expected = mask.size / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50.0  # 15 degrees of freedom: p < 1e-5 beyond 50


# ------------------------------------------------------------------------------------------------ graphs
def test_complete_graph_pairs_everyone() -> None:
    graph = complete_graph([1, 2, 3, 7])
    check_graph(graph)
    assert graph[7] == {1, 2, 3} and all(len(v) == 3 for v in graph.values())


@pytest.mark.parametrize(("n", "k"), [(10, 4), (37, 6), (100, 20), (500, 28)])
def test_harary_graph_is_k_regular_symmetric_and_fixed_by_the_seed(n: int, k: int) -> None:
    parties = list(range(1, n + 1))
    seed = hashlib.sha256(b"round 3").digest()
    graph = harary_graph(parties, seed=seed, neighbours=k)
    check_graph(graph)
    assert all(len(others) == k for others in graph.values())
    assert graph == harary_graph(list(reversed(parties)), seed=seed, neighbours=k)  # any order of input
    assert graph != harary_graph(parties, seed=bytes(32), neighbours=k)  # another seed, another graph
    # the documented rule, by brute force: ring order by SHA-256(seed || id), k/2 on either side
    ring = sorted(parties, key=lambda p: hashlib.sha256(seed + p.to_bytes(8, "big")).digest())
    assert party_order(seed, parties) == ring
    i = ring.index(1)
    assert graph[1] == {ring[(i + d) % n] for d in range(-k // 2, k // 2 + 1) if d}


def test_harary_graph_with_degree_n_minus_one_or_more_is_complete() -> None:
    assert harary_graph([1, 2, 3, 4, 5], seed=bytes(32), neighbours=4) == complete_graph([1, 2, 3, 4, 5])
    assert harary_graph([1, 2, 3, 4], seed=bytes(32), neighbours=6) == complete_graph([1, 2, 3, 4])
    with pytest.raises(ValueError, match="even"):
        harary_graph([1, 2, 3, 4], seed=bytes(32), neighbours=3)


def test_default_degree_grows_like_log_n() -> None:
    assert default_neighbours(100) == 20 and default_neighbours(500) == 28
    assert default_neighbours(10**6) == 60
    assert all(default_neighbours(n) % 2 == 0 for n in range(2, 2000))
