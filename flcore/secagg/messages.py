"""The round setup and the messages of the protocol, with their JSON and binary forms (never pickle).

Every message is a frozen dataclass with ``to_json()``/``from_json()`` (a JSON object: bytes as base64,
party ids as integers, maps keyed by the party id in decimal) and ``to_bytes()``/``from_bytes()`` (that
object as UTF-8 JSON; the masked input is a safetensors blob instead, with its party id in the metadata).

Invariants: ``from_json``/``from_bytes`` check every field's type and length and raise a
:class:`~flcore.secagg.errors.MessageError` naming the message and the field, so a hostile message is
refused before any crypto touches it; ``M.from_bytes(m.to_bytes()) == m`` for every message ``m``.
"""

from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from flcore.errors import ConfigError
from flcore.secagg.config import SECAGG, SecureAggregationConfig
from flcore.secagg.crypto import PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from flcore.secagg.errors import MessageError
from flcore.secagg.graph import complete_graph, default_neighbours, harary_graph
from flcore.secagg.masks import mask_dtype
from flcore.secagg.shamir import SHARE_BYTES

__all__ = [
    "AdvertiseKeys",
    "KeyDirectory",
    "MaskedInput",
    "RoundSetup",
    "ShareDelivery",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
]

MAX_PARTY_ID = (1 << 63) - 1
SEED_BYTES = 32
MAX_JSON_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _get(data: Mapping[str, Any], message: str, name: str) -> Any:
    if not isinstance(data, Mapping):
        raise MessageError(f"{message} must be a JSON object. Found {type(data).__name__}.")
    if name not in data:
        raise MessageError(f"{message} is missing the field {name!r}.")
    return data[name]


def _party(value: Any, message: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARTY_ID:
        raise MessageError(f"{message} field {name!r} must be a party id in [1, 2**63). Found {value!r}.")
    return int(value)


def _bytes(value: Any, message: str, name: str, length: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise MessageError(f"{message} field {name!r} must be a base64 string. Found {type(value).__name__}.")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError(f"{message} field {name!r} is not valid base64.") from None
    if length is not None and len(decoded) != length:
        raise MessageError(f"{message} field {name!r} must be {length} bytes. Found {len(decoded)}.")
    return decoded


def _parties(value: Any, message: str, name: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise MessageError(f"{message} field {name!r} must be a list of party ids.")
    parties = tuple(_party(v, message, name) for v in value)
    if len(set(parties)) != len(parties):
        raise MessageError(f"{message} field {name!r} lists a party twice.")
    return parties


def _byte_map(value: Any, message: str, name: str, length: int | None = None) -> dict[int, bytes]:
    if not isinstance(value, Mapping):
        raise MessageError(f"{message} field {name!r} must be an object keyed by party id.")
    result: dict[int, bytes] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key.isdigit():
            raise MessageError(f"{message} field {name!r} has a key that is not a party id: {key!r}.")
        result[_party(int(key), message, name)] = _bytes(item, message, f"{name}[{key}]", length)
    return result


def _json_map(values: Mapping[int, bytes]) -> dict[str, str]:
    return {str(k): _b64(v) for k, v in sorted(values.items())}


def _from_json_bytes(data: bytes, message: str) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_JSON_BYTES:
        raise MessageError(f"{message} must be at most {MAX_JSON_BYTES} bytes of JSON.")
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MessageError(f"{message} is not valid UTF-8 JSON: {error}.") from None


class _JsonBytes(abc.ABC):
    """``to_bytes``/``from_bytes`` as UTF-8 JSON of ``to_json``/``from_json``, which each message defines."""

    @abc.abstractmethod
    def to_json(self) -> dict[str, Any]:
        """The message as a JSON object."""

    @classmethod
    @abc.abstractmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """The message from its JSON object, every field checked (MessageError naming the field)."""

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON."""
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse and validate :meth:`to_bytes` output."""
        return cls.from_json(_from_json_bytes(data, cls.__name__))


# --------------------------------------------------------------------------------------------------------
# Round setup
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundSetup(_JsonBytes):
    """What every party of one secure-aggregation round agrees on before it starts (all public).

    Parameters
    ----------
    session_id : str
        Unique per round (e.g. ``"training-7/round-3"``); bound into every key and signature.
    party_ids : tuple of int
        The selected parties, ascending, distinct, in ``[1, 2**63)`` (also their Shamir x coordinates).
    round_seed : bytes
        32 public random bytes that fix the neighbour graph.
    vector_length : int
        Values in every party's input vector.
    config : SecureAggregationConfig
        Protocol, threshold, neighbours, clip norm and bits.
    """

    session_id: str
    party_ids: tuple[int, ...]
    round_seed: bytes
    vector_length: int
    config: SecureAggregationConfig
    _graph: dict[int, frozenset[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        label = "RoundSetup"
        if not isinstance(self.session_id, str) or not 1 <= len(self.session_id) <= 200:
            raise MessageError(f"{label} field 'session_id' must be a string of 1 to 200 characters.")
        parties = tuple(_party(p, label, "party_ids") for p in self.party_ids)
        if len(set(parties)) != len(parties) or list(parties) != sorted(parties):
            raise MessageError(f"{label} field 'party_ids' must be distinct and ascending.")
        object.__setattr__(self, "party_ids", parties)
        if not isinstance(self.round_seed, bytes) or len(self.round_seed) != SEED_BYTES:
            raise MessageError(f"{label} field 'round_seed' must be {SEED_BYTES} bytes.")
        if (
            isinstance(self.vector_length, bool)
            or not isinstance(self.vector_length, int)
            or self.vector_length < 1
        ):
            raise MessageError(f"{label} field 'vector_length' must be a positive integer.")
        try:
            self.config.validate_for(len(parties))
        except ConfigError as error:
            raise MessageError(f"{label}: {error}") from None
        if self.config.protocol == SECAGG:
            graph = complete_graph(parties)
        else:
            k = self.config.neighbours
            graph = harary_graph(
                parties, seed=self.round_seed, neighbours=default_neighbours(len(parties)) if k is None else k
            )
        object.__setattr__(self, "_graph", graph)

    @cached_property
    def context(self) -> bytes:
        """SHA-256 of the canonical setup: bound into every derived key and every signature of the round."""
        return hashlib.sha256(self.to_bytes()).digest()

    def neighbours(self, party: int) -> frozenset[int]:
        """The neighbours of ``party`` (itself excluded)."""
        return self._graph[party]

    def neighbourhood(self, party: int) -> frozenset[int]:
        """``party`` and its neighbours: the parties its secrets are shared among."""
        return self._graph[party] | {party}

    def threshold(self, party: int) -> int:
        """``t`` of ``party``'s neighbourhood."""
        return self.config.threshold_for(len(self._graph[party]) + 1)

    @property
    def num_parties(self) -> int:
        return len(self.party_ids)

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "party_ids": list(self.party_ids),
            "round_seed": _b64(self.round_seed),
            "vector_length": self.vector_length,
            "config": self.config.to_dict(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundSetup:
        label = "RoundSetup"
        config = _get(data, label, "config")
        try:
            parsed = SecureAggregationConfig.from_dict(config)
        except ConfigError as error:
            raise MessageError(f"{label} field 'config': {error}") from None
        except TypeError as error:
            raise MessageError(f"{label} field 'config' is malformed: {error}") from None
        return cls(
            session_id=_get(data, label, "session_id"),
            party_ids=_parties(_get(data, label, "party_ids"), label, "party_ids"),
            round_seed=_bytes(_get(data, label, "round_seed"), label, "round_seed", SEED_BYTES),
            vector_length=_get(data, label, "vector_length"),
            config=parsed,
        )


# --------------------------------------------------------------------------------------------------------
# Messages, in protocol order
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvertiseKeys(_JsonBytes):
    """Phase 1, party -> server: two X25519 public keys signed by the party's Ed25519 identity key.

    ``encryption_key`` encrypts the share bundles sent to this party; ``masking_key`` derives its pairwise
    masks. The signature covers ``signed_payload(context, party_id, encryption_key, masking_key)``.
    """

    party_id: int
    encryption_key: bytes
    masking_key: bytes
    signature: bytes

    @staticmethod
    def signed_payload(context: bytes, party_id: int, encryption_key: bytes, masking_key: bytes) -> bytes:
        """The bytes the identity key signs: label, round context, party id and both public keys."""
        return (
            b"fedsite/secagg/v1/advertise/"
            + context
            + party_id.to_bytes(8, "big")
            + encryption_key
            + masking_key
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "party_id": self.party_id,
            "encryption_key": _b64(self.encryption_key),
            "masking_key": _b64(self.masking_key),
            "signature": _b64(self.signature),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AdvertiseKeys:
        label = cls.__name__
        return cls(
            party_id=_party(_get(data, label, "party_id"), label, "party_id"),
            encryption_key=_bytes(
                _get(data, label, "encryption_key"), label, "encryption_key", PUBLIC_KEY_BYTES
            ),
            masking_key=_bytes(_get(data, label, "masking_key"), label, "masking_key", PUBLIC_KEY_BYTES),
            signature=_bytes(_get(data, label, "signature"), label, "signature", SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class KeyDirectory(_JsonBytes):
    """Phase 1 -> 2, server -> party: the advertisements of the party's neighbours that advertised."""

    advertisements: tuple[AdvertiseKeys, ...]

    def to_json(self) -> dict[str, Any]:
        return {"advertisements": [a.to_json() for a in self.advertisements]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyDirectory:
        items = _get(data, cls.__name__, "advertisements")
        if not isinstance(items, list):
            raise MessageError("KeyDirectory field 'advertisements' must be a list.")
        return cls(advertisements=tuple(AdvertiseKeys.from_json(item) for item in items))


@dataclass(frozen=True)
class ShareKeys(_JsonBytes):
    """Phase 2, party -> server: one AES-GCM ciphertext of a share bundle per neighbour, to route."""

    party_id: int
    ciphertexts: Mapping[int, bytes]

    def to_json(self) -> dict[str, Any]:
        return {"party_id": self.party_id, "ciphertexts": _json_map(self.ciphertexts)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShareKeys:
        label = cls.__name__
        return cls(
            party_id=_party(_get(data, label, "party_id"), label, "party_id"),
            ciphertexts=_byte_map(_get(data, label, "ciphertexts"), label, "ciphertexts"),
        )


@dataclass(frozen=True)
class ShareDelivery(_JsonBytes):
    """Phase 2 -> 3, server -> party: the ciphertexts addressed to it, by sender (who it masks with)."""

    ciphertexts: Mapping[int, bytes]

    def to_json(self) -> dict[str, Any]:
        return {"ciphertexts": _json_map(self.ciphertexts)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShareDelivery:
        return cls(
            ciphertexts=_byte_map(_get(data, cls.__name__, "ciphertexts"), cls.__name__, "ciphertexts")
        )


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Phase 3, party -> server: the masked, quantised update in Z_(2**bits) (safetensors on the wire)."""

    party_id: int
    masked: npt.NDArray[np.unsignedinteger]

    TENSOR = "masked"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MaskedInput)
            and self.party_id == other.party_id
            and self.masked.dtype == other.masked.dtype
            and np.array_equal(self.masked, other.masked)
        )

    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        """A safetensors blob with one tensor ``masked`` and ``party_id`` in its metadata."""
        return safetensors_save(
            {self.TENSOR: np.ascontiguousarray(self.masked)}, metadata={"party_id": str(self.party_id)}
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, length: int, bits: int) -> MaskedInput:
        """Parse a safetensors blob, checking its one tensor's dtype, shape and range for this round."""
        label = cls.__name__
        blob = bytes(data)
        try:
            header_length = int.from_bytes(blob[:8], "little")
            if len(blob) < 8 or header_length > len(blob) - 8:
                raise ValueError("the header length runs past the end of the blob")
            header = json.loads(blob[8 : 8 + header_length])
            metadata = (header.get("__metadata__") or {}) if isinstance(header, dict) else {}
            tensors = safetensors_load(blob)
        except (SafetensorError, ValueError, UnicodeDecodeError) as error:
            raise MessageError(f"{label} is not a valid safetensors blob: {error}.") from None
        if set(tensors) != {cls.TENSOR}:
            raise MessageError(
                f"{label} must hold exactly one tensor {cls.TENSOR!r}. Found {sorted(tensors)}."
            )
        party = metadata.get("party_id", "")
        if not isinstance(party, str) or not party.isdigit():
            raise MessageError(f"{label} metadata field 'party_id' must be a decimal party id.")
        masked = tensors[cls.TENSOR]
        return cls(party_id=_party(int(party), label, "party_id"), masked=masked).checked(
            length=length, bits=bits
        )

    def checked(self, *, length: int, bits: int) -> MaskedInput:
        """Self if its vector has this round's dtype, shape and range, else a :class:`MessageError`."""
        dtype = mask_dtype(bits)
        if self.masked.dtype != dtype or self.masked.shape != (length,):
            raise MessageError(
                f"The masked input of party {self.party_id} must be {np.dtype(dtype).name} "
                f"of shape ({length},). "
                f"Found {self.masked.dtype} of shape {self.masked.shape}."
            )
        if bits < 64 and length and int(self.masked.max()) >> bits:
            raise MessageError(f"The masked input of party {self.party_id} has values >= 2**{bits}.")
        return self


@dataclass(frozen=True)
class UnmaskRequest(_JsonBytes):
    """Phase 4, server -> party: which of its neighbours survived (send their self-mask shares) and which
    dropped after sharing (send their mask-key shares). A party refuses a request that names one neighbour
    in both lists."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UnmaskRequest:
        label = cls.__name__
        return cls(
            survivors=_parties(_get(data, label, "survivors"), label, "survivors"),
            dropped=_parties(_get(data, label, "dropped"), label, "dropped"),
        )


@dataclass(frozen=True)
class UnmaskResponse(_JsonBytes):
    """Phase 4, party -> server: self-mask shares of survivors and mask-key shares of dropped parties."""

    party_id: int
    self_mask_shares: Mapping[int, bytes]
    mask_key_shares: Mapping[int, bytes]

    def to_json(self) -> dict[str, Any]:
        return {
            "party_id": self.party_id,
            "self_mask_shares": _json_map(self.self_mask_shares),
            "mask_key_shares": _json_map(self.mask_key_shares),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UnmaskResponse:
        label = cls.__name__
        return cls(
            party_id=_party(_get(data, label, "party_id"), label, "party_id"),
            self_mask_shares=_byte_map(
                _get(data, label, "self_mask_shares"), label, "self_mask_shares", SHARE_BYTES
            ),
            mask_key_shares=_byte_map(
                _get(data, label, "mask_key_shares"), label, "mask_key_shares", SHARE_BYTES
            ),
        )
