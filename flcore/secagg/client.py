"""The party (agent) side of secure aggregation, as an explicit state machine.

Bonawitz et al. 2017, Section 4 and Figure 4 (the semi-honest protocol with signatures of the malicious
variant's round 0), over the neighbour graph of :class:`~flcore.secagg.messages.RoundSetup` (Bell et al.
2020). Phases::

    new --advertise_keys--> advertised --share_keys--> shared --masked_input--> masked --unmask--> done
      any failure (bad signature, too few parties, a request that would unmask) --> aborted

Invariants:

- each method runs only in its phase (else :class:`ProtocolViolation`) and moves to the next; an aborted or
  finished party answers nothing more, so one party answers ONE unmask request per round;
- the party checks the Ed25519 signature of every neighbour's advertised keys (and that its own keys came
  back unchanged) before it encrypts anything to them: a server that swaps keys is detected;
- it refuses an unmask request that names a neighbour both as survivor and as dropped, that leaves out or
  invents a neighbour, that calls itself dropped, or that leaves fewer than ``t`` survivors in its
  neighbourhood (:class:`NotEnoughSurvivors`): for no neighbour does the server ever get both its
  self-mask share and its mask-key share from this party;
- secrets (the two X25519 private keys, the 32-byte self-mask seed) never leave the object except as
  Shamir shares encrypted to a neighbour; a self-mask seed is fresh per round.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flcore.secagg import crypto, shamir
from flcore.secagg.errors import InvalidSignature, MessageError, NotEnoughSurvivors, ProtocolViolation
from flcore.secagg.masks import (
    PAIRWISE_PURPOSE,
    SELF_PURPOSE,
    MaskExpander,
    mask_dtype,
    pairwise_sign,
    reduce_inplace,
)
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
from flcore.secagg.quantisation import quantise

__all__ = ["ClientPhase", "SecAggClient", "share_bundle_aad"]

SHARE_PURPOSE = b"share-encryption"
_ID = 8
_BUNDLE_BYTES = 2 * _ID + 2 * shamir.SHARE_BYTES


class ClientPhase(enum.StrEnum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"
    ABORTED = "aborted"


def share_bundle_aad(context: bytes, sender: int, recipient: int) -> bytes:
    """Associated data of the share bundle ``sender -> recipient``: a ciphertext opens only there."""
    return (
        b"fedsite/secagg/v1/shares/" + context + sender.to_bytes(_ID, "big") + recipient.to_bytes(_ID, "big")
    )


class SecAggClient:
    """One party of one round of secure aggregation.

    Parameters
    ----------
    setup : RoundSetup
        The round's public parameters (parties, seed, vector length, configuration).
    party_id : int
        This party's id (one of ``setup.party_ids``).
    identity_key : Ed25519PrivateKey
        The long-term key whose public half the party registered at enrolment.
    identity_public_keys : mapping of int to bytes
        Every party's registered Ed25519 public key (from the enrolment registry, not from the server's
        round messages), used to verify the advertised keys.
    """

    def __init__(
        self,
        *,
        setup: RoundSetup,
        party_id: int,
        identity_key: Ed25519PrivateKey,
        identity_public_keys: Mapping[int, bytes],
    ) -> None:
        if party_id not in setup.party_ids:
            raise ValueError(f"Party {party_id} is not one of this round's parties.")
        missing = sorted(set(setup.neighbours(party_id)) - set(identity_public_keys))
        if missing:
            raise ValueError(f"No registered identity key for neighbours {missing} of party {party_id}.")
        self.setup = setup
        self.party_id = party_id
        self.threshold = setup.threshold(party_id)
        self.phase = ClientPhase.NEW
        self._identity_key = identity_key
        self._identity_public_keys = dict(identity_public_keys)
        self._encryption_key = crypto.generate_x25519()
        self._masking_key = crypto.generate_x25519()
        self._self_mask_seed = secrets.token_bytes(shamir.SECRET_BYTES)
        self._advertisement: AdvertiseKeys | None = None
        self._directory: dict[int, AdvertiseKeys] = {}
        self._own_shares: tuple[bytes, bytes] | None = None
        self._received_shares: dict[int, tuple[bytes, bytes]] = {}
        # X25519 is symmetric: the key that encrypts u -> v also opens v -> u (the AAD tells them apart)
        self._share_keys: dict[int, bytes] = {}

    # ---------------------------------------------------------------------------------------------------
    def _expect(self, phase: ClientPhase, action: str) -> None:
        if self.phase != phase:
            raise ProtocolViolation(
                f"Party {self.party_id} cannot {action} in phase {self.phase.value!r}; "
                f"it must be in {phase.value!r}."
            )

    def _abort(self, error: Exception) -> Exception:
        self.phase = ClientPhase.ABORTED
        self._self_mask_seed = b""
        return error

    # ---------------------------------------------------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        """Phase 1: the two public keys of this round, signed with the identity key."""
        self._expect(ClientPhase.NEW, "advertise keys")
        encryption_key = crypto.public_bytes(self._encryption_key)
        masking_key = crypto.public_bytes(self._masking_key)
        payload = AdvertiseKeys.signed_payload(self.setup.context, self.party_id, encryption_key, masking_key)
        self._advertisement = AdvertiseKeys(
            party_id=self.party_id,
            encryption_key=encryption_key,
            masking_key=masking_key,
            signature=crypto.sign(self._identity_key, payload),
        )
        self.phase = ClientPhase.ADVERTISED
        return self._advertisement

    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        """Phase 2: verify the neighbours' keys, Shamir-share both secrets, encrypt a bundle per neighbour."""
        self._expect(ClientPhase.ADVERTISED, "share keys")
        neighbours = self.setup.neighbours(self.party_id)
        context = self.setup.context
        seen: dict[int, AdvertiseKeys] = {}
        for advertisement in directory.advertisements:
            party = advertisement.party_id
            if party in seen:
                raise self._abort(ProtocolViolation(f"The key directory lists party {party} twice."))
            if party != self.party_id and party not in neighbours:
                continue  # not a neighbour: nothing is shared with it
            payload = AdvertiseKeys.signed_payload(
                context, party, advertisement.encryption_key, advertisement.masking_key
            )
            try:
                crypto.verify(
                    self._identity_public_keys.get(party, b""), advertisement.signature, payload, party=party
                )
            except InvalidSignature as error:
                raise self._abort(error) from None
            seen[party] = advertisement
        if seen.get(self.party_id) != self._advertisement:
            raise self._abort(
                InvalidSignature(
                    f"The key directory does not return party {self.party_id}'s own keys unchanged."
                )
            )
        alive = sorted(seen.keys() - {self.party_id})
        if len(alive) + 1 < self.threshold:
            raise self._abort(
                NotEnoughSurvivors(
                    f"Only {len(alive)} neighbours of party {self.party_id} advertised keys; its threshold "
                    f"of {self.threshold} needs at least {self.threshold - 1}."
                )
            )
        self._directory = seen
        x_coordinates = [*alive, self.party_id]
        key_shares = shamir.split(
            self._masking_key.private_bytes_raw(), threshold=self.threshold, x_coordinates=x_coordinates
        )
        seed_shares = shamir.split(
            self._self_mask_seed, threshold=self.threshold, x_coordinates=x_coordinates
        )
        self._own_shares = (key_shares[self.party_id], seed_shares[self.party_id])
        ciphertexts: dict[int, bytes] = {}
        sender = self.party_id.to_bytes(_ID, "big")
        for party in alive:
            secret = crypto.agree(self._encryption_key, seen[party].encryption_key, peer=party)
            key = self._share_keys[party] = crypto.derive_key(secret, purpose=SHARE_PURPOSE, context=context)
            bundle = sender + party.to_bytes(_ID, "big") + key_shares[party] + seed_shares[party]
            ciphertexts[party] = crypto.encrypt(
                key, bundle, associated_data=share_bundle_aad(context, self.party_id, party)
            )
        self.phase = ClientPhase.SHARED
        return ShareKeys(party_id=self.party_id, ciphertexts=ciphertexts)

    def masked_input(
        self, delivery: ShareDelivery, update: npt.ArrayLike, *, rng: np.random.Generator
    ) -> MaskedInput:
        """Phase 3: open the neighbours' share bundles, quantise ``update`` and add every mask to it."""
        self._expect(ClientPhase.SHARED, "upload a masked input")
        values = np.asarray(update, dtype=np.float64).reshape(-1)
        self._check_length(values.size)
        senders = self._open_deliveries(delivery)
        config = self.setup.config
        quantised = quantise(
            values, clip_norm=config.clip_norm, bits=config.bits, num_parties=self.setup.num_parties, rng=rng
        )
        return self._mask(quantised, senders)

    def masked_integers(self, delivery: ShareDelivery, values: npt.ArrayLike) -> MaskedInput:
        """Phase 3 for an input already in ``Z_(2**bits)`` (e.g. a distributed-DP Skellam share): mask it
        as it is, with no clipping or quantisation here."""
        self._expect(ClientPhase.SHARED, "upload a masked input")
        integers = np.asarray(values)
        bits = self.setup.config.bits
        if integers.dtype.kind not in "ui" or integers.ndim != 1:
            raise ValueError(f"The integer input of party {self.party_id} must be a 1-D integer array.")
        self._check_length(integers.size)
        if integers.size and (int(integers.min()) < 0 or int(integers.max()) >> bits):
            raise ValueError(f"The integer input of party {self.party_id} must lie in [0, 2**{bits}).")
        senders = self._open_deliveries(delivery)
        return self._mask(integers.astype(mask_dtype(bits)), senders)

    def _check_length(self, size: int) -> None:
        if size != self.setup.vector_length:
            raise ValueError(
                f"The update of party {self.party_id} has {size} values; this round sums "
                f"{self.setup.vector_length}."
            )

    def _open_deliveries(self, delivery: ShareDelivery) -> list[int]:
        """Decrypt the neighbours' share bundles (aborting on any bad one); returns the senders."""
        context = self.setup.context
        senders = sorted(delivery.ciphertexts)
        strangers = [p for p in senders if p not in self._directory or p == self.party_id]
        if strangers:
            raise self._abort(
                ProtocolViolation(f"Party {self.party_id} received shares from non-neighbours {strangers}.")
            )
        if len(senders) + 1 < self.threshold:
            raise self._abort(
                NotEnoughSurvivors(
                    f"Only {len(senders)} neighbours of party {self.party_id} shared keys; its threshold of "
                    f"{self.threshold} needs at least {self.threshold - 1}."
                )
            )
        for sender in senders:
            try:
                bundle = crypto.decrypt(
                    self._share_keys[sender],
                    delivery.ciphertexts[sender],
                    associated_data=share_bundle_aad(context, sender, self.party_id),
                    sender=sender,
                )
            except (ProtocolViolation, MessageError) as error:
                raise self._abort(error) from None
            if len(bundle) != _BUNDLE_BYTES or int.from_bytes(bundle[:_ID], "big") != sender:
                raise self._abort(ProtocolViolation(f"The share bundle from party {sender} is malformed."))
            start = 2 * _ID
            middle = start + shamir.SHARE_BYTES
            self._received_shares[sender] = (bundle[start:middle], bundle[middle:])
        return senders

    def _mask(self, masked: npt.NDArray[np.unsignedinteger], senders: list[int]) -> MaskedInput:
        """Add the self mask and the pairwise masks to ``masked`` (in place) and end phase 3."""
        config, context = self.setup.config, self.setup.context
        expander = MaskExpander(length=self.setup.vector_length, bits=config.bits, context=context)
        expander.add_inplace(masked, self._self_mask_seed, purpose=SELF_PURPOSE)
        for sender in senders:
            secret = crypto.agree(self._masking_key, self._directory[sender].masking_key, peer=sender)
            expander.add_inplace(
                masked, secret, purpose=PAIRWISE_PURPOSE, sign=pairwise_sign(self.party_id, sender)
            )
        reduce_inplace(masked, config.bits)
        self.phase = ClientPhase.MASKED
        return MaskedInput(party_id=self.party_id, masked=masked)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 4: shares of the survivors' self-mask seeds and of the dropped parties' masking keys.

        Raises
        ------
        ProtocolViolation
            If the request names a neighbour as both survivor and dropped, omits or invents a neighbour,
            or calls this party dropped; or if this party already answered.
        NotEnoughSurvivors
            If fewer than ``t`` of this party's neighbourhood survived (nothing is sent: fail safe).
        """
        self._expect(ClientPhase.MASKED, "answer an unmask request")
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = sorted(survivors & dropped)
        if both:
            raise self._abort(
                ProtocolViolation(
                    f"Party {self.party_id} refuses the unmask request: it asks for both the self-mask "
                    f"share and the mask-key share of parties {both}, which would unmask their inputs."
                )
            )
        if self.party_id not in survivors:
            raise self._abort(
                ProtocolViolation(
                    f"Party {self.party_id} uploaded its masked input but is not listed as a survivor."
                )
            )
        expected = set(self._received_shares) | {self.party_id}
        if survivors | dropped != expected:
            raise self._abort(
                ProtocolViolation(
                    f"Party {self.party_id} refuses the unmask request: it must name each of the neighbours "
                    f"{sorted(expected)} exactly once. Missing {sorted(expected - survivors - dropped)}, "
                    f"unknown {sorted((survivors | dropped) - expected)}."
                )
            )
        if len(survivors) < self.threshold:
            raise self._abort(
                NotEnoughSurvivors(
                    f"Only {len(survivors)} parties of party {self.party_id}'s neighbourhood survived; the "
                    f"threshold is {self.threshold}. Nothing is revealed."
                )
            )
        assert self._own_shares is not None
        shares = {**self._received_shares, self.party_id: self._own_shares}
        response = UnmaskResponse(
            party_id=self.party_id,
            self_mask_shares={p: shares[p][1] for p in sorted(survivors)},
            mask_key_shares={p: shares[p][0] for p in sorted(dropped)},
        )
        self.phase = ClientPhase.DONE
        self._self_mask_seed = b""
        return response
