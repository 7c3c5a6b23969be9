"""Shamir secret sharing of 32-byte secrets over the prime field GF(p), p = 2**256 + 297.

Shamir 1979, "How to Share a Secret" (CACM 22(11)): a secret ``s`` becomes the constant term of a random
polynomial ``f`` of degree ``t - 1``; party ``x`` receives ``f(x)``; any ``t`` shares give ``s = f(0)`` by
Lagrange interpolation at zero, and ``t - 1`` shares are uniformly distributed whatever ``s`` is.

Invariants: ``p`` is the smallest prime above ``2**256`` (so every 32-byte secret is a field element and a
share fits in :data:`SHARE_BYTES` bytes); coefficients come from :mod:`secrets` (the OS's CSPRNG); x
coordinates are distinct integers in ``[1, p)``; :func:`combine` refuses fewer than ``threshold`` shares
instead of returning a wrong value, and refuses a result that is not a 32-byte secret (a range check only:
a corrupted share almost always interpolates to another 32-byte value, which the server catches for masking
keys by comparing the rebuilt key with the advertised public key).

Cost: :func:`split` is ``n * t`` modular multiplications (Horner per party); :func:`combine` is ``O(t**2)``
for the Lagrange coefficients of one set of x coordinates (cached, so every secret reconstructed from the
same responders reuses them) plus ``t`` per secret.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable, Mapping

from flcore.secagg.errors import MessageError, NotEnoughShares

__all__ = ["PRIME", "SECRET_BYTES", "SHARE_BYTES", "combine", "lagrange_at_zero", "share_from_bytes", "split"]

PRIME = 2**256 + 297
"""The field modulus: the smallest prime above 2**256 (checked by a Miller-Rabin test in the suite)."""

SECRET_BYTES = 32
"""Length of a shared secret (an X25519 private key or a self-mask seed)."""

SHARE_BYTES = 33
"""Length of one encoded share value (big-endian, ``< PRIME < 2**264``)."""


def _check_threshold(threshold: int, available: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"Shamir threshold must be an integer >= 1. Found {threshold!r}.")
    if threshold > available:
        raise ValueError(
            f"Shamir threshold {threshold} exceeds the {available} parties to share among; "
            "lower the threshold or add parties."
        )


def _check_x(x: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < PRIME:
        raise MessageError(f"A Shamir x coordinate must be an integer in [1, p). Found {x!r}.")
    return x


def split(secret: bytes, *, threshold: int, x_coordinates: Iterable[int]) -> dict[int, bytes]:
    """Share ``secret`` so that any ``threshold`` of the returned shares rebuild it.

    Parameters
    ----------
    secret : bytes
        Exactly :data:`SECRET_BYTES` bytes.
    threshold : int
        ``t``: the number of shares needed; ``1 <= t <= len(x_coordinates)``.
    x_coordinates : iterable of int
        Distinct evaluation points (party ids), each in ``[1, p)``.

    Returns
    -------
    dict of int to bytes
        ``x -> f(x)`` encoded in :data:`SHARE_BYTES` big-endian bytes.
    """
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ValueError(f"A Shamir secret must be {SECRET_BYTES} bytes. Found {len(secret)} bytes.")
    xs = [_check_x(x) for x in x_coordinates]
    if len(set(xs)) != len(xs):
        raise ValueError(f"Shamir x coordinates must be distinct. Found {sorted(xs)}.")
    _check_threshold(threshold, len(xs))
    # f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}; Horner from the highest coefficient.
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    highest_first = coefficients[::-1]
    shares: dict[int, bytes] = {}
    for x in xs:
        value = 0
        for coefficient in highest_first:
            value = (value * x + coefficient) % PRIME
        shares[x] = value.to_bytes(SHARE_BYTES, "big")
    return shares


def share_from_bytes(data: bytes, *, party: object = "?") -> int:
    """Decode one share value, refusing a wrong length or a value outside the field."""
    if not isinstance(data, bytes) or len(data) != SHARE_BYTES:
        raise MessageError(f"A share from party {party} must be {SHARE_BYTES} bytes. Found {len(data)}.")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise MessageError(f"A share from party {party} is not a field element (>= p).")
    return value


@functools.lru_cache(maxsize=64)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange coefficients ``l_i = prod_{j != i} x_j / (x_j - x_i)`` mod p: ``f(0) = sum l_i f(x_i)``."""
    coefficients = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        coefficients.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(coefficients)


def combine(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """Rebuild the secret from at least ``threshold`` shares (the ``threshold`` lowest x are used).

    Raises
    ------
    NotEnoughShares
        With fewer than ``threshold`` shares: nothing is interpolated.
    MessageError
        If a share is malformed or the result is not a 32-byte secret.
    """
    if len(shares) < threshold:
        raise NotEnoughShares(
            f"{len(shares)} shares cannot rebuild a secret shared with threshold {threshold}; "
            f"at least {threshold} are needed."
        )
    xs = tuple(sorted(_check_x(x) for x in shares)[:threshold])
    values = [share_from_bytes(shares[x], party=x) for x in xs]
    secret = sum(c * v for c, v in zip(lagrange_at_zero(xs), values, strict=True)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise MessageError(
            f"The shares of parties {list(xs)} do not interpolate to a {SECRET_BYTES}-byte secret: "
            "at least one share is corrupted."
        )
    return secret.to_bytes(SECRET_BYTES, "big")
