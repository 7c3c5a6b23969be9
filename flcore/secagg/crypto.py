"""Key agreement, key derivation, authenticated encryption and signatures for secure aggregation.

Every primitive is the ``cryptography`` package's (OpenSSL): X25519 (RFC 7748) key agreement, HKDF-SHA256
(RFC 5869) key derivation, AES-256-GCM authenticated encryption, Ed25519 (RFC 8032) signatures.

Invariants: every derived key is bound to a purpose label and to the round's context (a SHA-256 of the
round setup), so a key of one round, phase or party pair is never the key of another; a failed agreement
(a low-order X25519 point), a failed decryption and a bad signature each raise a typed error instead of
returning data; nonces are 12 random bytes from the OS (a key encrypts one share bundle, so they never
repeat under one key).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature as _CryptographyInvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flcore.secagg.errors import InvalidSignature, MessageError, ProtocolViolation

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "agree",
    "decrypt",
    "derive_key",
    "encrypt",
    "generate_x25519",
    "public_bytes",
    "sign",
    "verify",
]

PUBLIC_KEY_BYTES = 32
"""Length of a raw X25519 or Ed25519 public key."""

SIGNATURE_BYTES = 64
"""Length of an Ed25519 signature."""

KEY_BYTES = 32
"""Length of a derived symmetric key (AES-256)."""

NONCE_BYTES = 12
"""AES-GCM nonce length."""

_LABEL = b"fedsite/secagg/v1/"


def generate_x25519() -> X25519PrivateKey:
    """A fresh X25519 private key from the OS's CSPRNG."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes_raw()


def agree(private_key: X25519PrivateKey, peer_public: bytes, *, peer: object = "?") -> bytes:
    """The 32-byte X25519 shared secret of ``private_key`` and the raw public key ``peer_public``.

    Raises
    ------
    MessageError
        If ``peer_public`` is not 32 bytes.
    ProtocolViolation
        If the agreement fails (a low-order point that would give an all-zero secret).
    """
    if not isinstance(peer_public, bytes) or len(peer_public) != PUBLIC_KEY_BYTES:
        raise MessageError(f"The public key of party {peer} must be {PUBLIC_KEY_BYTES} bytes.")
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:
        raise ProtocolViolation(f"Key agreement with party {peer} failed: {error}") from None


def derive_key(secret: bytes, *, purpose: bytes, context: bytes) -> bytes:
    """HKDF-SHA256 of the FULL ``secret`` into a 32-byte key for ``purpose`` in this round's ``context``."""
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_LABEL + purpose + b"/" + context
    ).derive(secret)


def encrypt(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """AES-256-GCM: ``nonce || ciphertext || tag``, authenticating ``associated_data`` too."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, sealed: bytes, *, associated_data: bytes, sender: object = "?") -> bytes:
    """Open :func:`encrypt`'s output, or raise :class:`ProtocolViolation` if altered or misaddressed."""
    if not isinstance(sealed, bytes) or len(sealed) < NONCE_BYTES + 16:
        raise MessageError(f"The ciphertext from party {sender} is too short to be AES-GCM output.")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise ProtocolViolation(
            f"The encrypted shares from party {sender} fail authentication (altered, or not for this "
            "party and round)."
        ) from None


def sign(identity_key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Ed25519 signature of ``message``."""
    return identity_key.sign(message)


def verify(identity_public: bytes, signature: bytes, message: bytes, *, party: object = "?") -> None:
    """Check an Ed25519 signature, raising :class:`InvalidSignature` naming ``party`` if it is not valid."""
    if len(identity_public) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        raise InvalidSignature(f"The keys of party {party} carry a malformed identity key or signature.")
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, message)
    except _CryptographyInvalidSignature:
        raise InvalidSignature(
            f"The advertised keys of party {party} are not signed by its identity key: the server (or "
            "someone between) swapped or altered them. Refusing to continue this round."
        ) from None
