"""The server side of secure aggregation, as an explicit state machine that never sees an unmasked input.

Bonawitz et al. 2017, Section 4 (Figure 4, rounds 0-2 and 4), over the neighbour graph of
:class:`~flcore.secagg.messages.RoundSetup` (Bell et al. 2020). Phases::

    advertising --close_advertising--> sharing --close_sharing--> collecting --close_collecting-->
    unmasking --finish--> done;   a fail-safe check that does not hold --> failed

Notation: ``U1`` advertised keys, ``U2`` shared keys (``U2 <= U1``), ``U3`` uploaded a masked input
(``U3 <= U2``: the survivors, whose inputs are in the sum), ``U5`` answered the unmask request.

Invariants:

- the server holds public keys, ciphertexts it cannot open, Shamir shares, and ONE vector: the running sum
  of the masked inputs modulo ``2**bits`` (each upload is added and dropped); it is unmasked only in
  :meth:`SecAggServer.finish`, after all the fail-safe checks, so it never holds an individual unmasked
  input (and the sum it reveals covers ``|U3| >= t >= 2`` parties);
- every move checks its phase, every message its sender (a party of the round, of the right set, once);
  a party that shares keys must send a bundle to every neighbour in ``U1``, so the graph of ``U2`` is the
  same for both ends of every pair and the pairwise masks cancel;
- for no party does the server ask for both kinds of share: survivors' self-mask shares, dropped parties'
  mask-key shares (and the parties refuse otherwise);
- fewer than ``t`` possible responders in any neighbourhood raises :class:`NotEnoughSurvivors` BEFORE the
  unmask requests go out (at :meth:`close_collecting`) or before anything is reconstructed
  (:meth:`finish`); a rebuilt masking key is checked against the advertised public key, so a corrupted
  share is caught instead of producing a wrong sum.

Cost of :meth:`finish`: ``|U3|`` self masks plus one X25519 agreement and one mask per (dropped party,
surviving neighbour) pair, i.e. ``O(d (n - d) L)`` for the complete graph with ``d`` dropouts and
``O(d k L)`` for SecAgg+, plus the Shamir reconstructions (``O(t**2)`` per distinct responder set).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flcore.secagg import crypto, shamir
from flcore.secagg.errors import MessageError, NotEnoughShares, NotEnoughSurvivors, ProtocolViolation
from flcore.secagg.masks import PAIRWISE_PURPOSE, SELF_PURPOSE, MaskExpander, pairwise_sign, reduce_inplace
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
from flcore.secagg.quantisation import dequantise_sum, error_bound

__all__ = ["SecAggResult", "SecAggServer", "ServerPhase"]


class ServerPhase(enum.StrEnum):
    ADVERTISING = "advertising"
    SHARING = "sharing"
    COLLECTING = "collecting"
    UNMASKING = "unmasking"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """The outcome of a round: the dequantised sum of the survivors' clipped updates and who is in it.

    Parameters
    ----------
    total : ndarray of float64
        Sum of the clipped updates of ``survivors`` (within ``error_bound`` per coordinate).
    survivors : tuple of int
        ``U3``: the parties whose inputs are in ``total``.
    responders : tuple of int
        ``U5``: the survivors that answered the unmask request.
    dropped_after_advertising, dropped_after_sharing : tuple of int
        ``U1 - U2`` and ``U2 - U3``; parties that never advertised are in neither.
    error_bound : float
        The strict per-coordinate bound on ``|total - exact sum of the clipped updates|``.
    """

    total: npt.NDArray[np.float64]
    survivors: tuple[int, ...]
    responders: tuple[int, ...]
    dropped_after_advertising: tuple[int, ...]
    dropped_after_sharing: tuple[int, ...]
    error_bound: float


class SecAggServer:
    """The aggregator of one round: collects keys, routes shares, sums masked inputs, unmasks the sum.

    Parameters
    ----------
    setup : RoundSetup
        The round's public parameters.
    identity_public_keys : mapping of int to bytes, optional
        The enrolment registry's Ed25519 keys: with it the server refuses a forged advertisement at once
        (the parties check every signature in any case).
    """

    def __init__(self, setup: RoundSetup, *, identity_public_keys: Mapping[int, bytes] | None = None) -> None:
        self.setup = setup
        self.identity_public_keys = None if identity_public_keys is None else dict(identity_public_keys)
        self.phase = ServerPhase.ADVERTISING
        self.advertisements: dict[int, AdvertiseKeys] = {}
        self.share_ciphertexts: dict[int, dict[int, bytes]] = {}  # sender -> recipient -> ciphertext
        self.uploaded: set[int] = set()
        self.masked_sum: npt.NDArray[np.unsignedinteger] | None = None
        self.requests: dict[int, UnmaskRequest] = {}
        self.self_mask_shares: dict[int, dict[int, bytes]] = {}  # owner -> holder -> share
        self.mask_key_shares: dict[int, dict[int, bytes]] = {}
        self.responders: set[int] = set()

    # ---------------------------------------------------------------------------------------------------
    def _expect(self, phase: ServerPhase, action: str) -> None:
        if self.phase != phase:
            raise ProtocolViolation(
                f"The server cannot {action} in phase {self.phase.value!r}; it must be in {phase.value!r}."
            )

    def _fail(self, error: Exception) -> Exception:
        self.phase = ServerPhase.FAILED
        self.masked_sum = None
        self.self_mask_shares.clear()
        self.mask_key_shares.clear()
        return error

    def _check_party(self, party: int, allowed: Iterable[int], what: str) -> None:
        if party not in self.setup.party_ids:
            raise MessageError(f"Party {party} is not a party of this round ({what}).")
        if party not in set(allowed):
            raise ProtocolViolation(f"Party {party} may not {what} now.")

    def _fail_unless_enough(self, candidates: set[int], owners: Iterable[int], when: str) -> None:
        """Fail safe unless every owner's neighbourhood holds ``t`` parties among ``candidates``."""
        for owner in sorted(owners):
            available = len(self.setup.neighbourhood(owner) & candidates)
            threshold = self.setup.threshold(owner)
            if available < threshold:
                raise self._fail(
                    NotEnoughSurvivors(
                        f"{when}: only {available} parties of party {owner}'s neighbourhood can answer, "
                        f"below its threshold of {threshold}. The round fails safe; nothing is unmasked."
                    )
                )

    @property
    def shared(self) -> set[int]:
        """``U2``."""
        return set(self.share_ciphertexts)

    # ---------------------------------------------------------------------------------------------------
    def receive_advertisement(self, message: AdvertiseKeys) -> None:
        """Phase 1: record a party's signed public keys (the signature is checked here and by the peers)."""
        self._expect(ServerPhase.ADVERTISING, "accept advertised keys")
        party = message.party_id
        self._check_party(party, set(self.setup.party_ids) - set(self.advertisements), "advertise keys twice")
        # the server checks too, so one forged advertisement cannot make the whole round abort later
        if self.identity_public_keys is not None:
            identity = self.identity_public_keys.get(party, b"")
            payload = AdvertiseKeys.signed_payload(
                self.setup.context, party, message.encryption_key, message.masking_key
            )
            crypto.verify(identity, message.signature, payload, party=party)
        self.advertisements[party] = message

    def close_advertising(self) -> dict[int, KeyDirectory]:
        """End phase 1: the key directory of every party in ``U1`` (its neighbours' advertisements)."""
        self._expect(ServerPhase.ADVERTISING, "close advertising")
        advertised = set(self.advertisements)
        self._fail_unless_enough(advertised, advertised, "After advertising")
        self.phase = ServerPhase.SHARING
        return {
            party: KeyDirectory(
                advertisements=tuple(
                    self.advertisements[p] for p in sorted(self.setup.neighbourhood(party) & advertised)
                )
            )
            for party in sorted(advertised)
        }

    def receive_shares(self, message: ShareKeys) -> None:
        """Phase 2: keep a party's ciphertexts for routing; one per neighbour in ``U1``, no more, no less."""
        self._expect(ServerPhase.SHARING, "accept shares")
        party = message.party_id
        self._check_party(
            party, set(self.advertisements) - self.shared, "share keys (twice, or without advertising)"
        )
        expected = self.setup.neighbours(party) & set(self.advertisements)
        if set(message.ciphertexts) != expected:
            raise MessageError(
                f"Party {party} must send one encrypted share bundle to each neighbour that advertised keys "
                f"{sorted(expected)}. Found bundles for {sorted(message.ciphertexts)}."
            )
        self.share_ciphertexts[party] = dict(message.ciphertexts)

    def close_sharing(self) -> dict[int, ShareDelivery]:
        """End phase 2: for every party in ``U2``, the bundles addressed to it by its neighbours in ``U2``."""
        self._expect(ServerPhase.SHARING, "close sharing")
        shared = self.shared
        self._fail_unless_enough(shared, shared, "After sharing")
        self.phase = ServerPhase.COLLECTING
        return {
            party: ShareDelivery(
                ciphertexts={
                    sender: self.share_ciphertexts[sender][party]
                    for sender in sorted(self.setup.neighbours(party) & shared)
                }
            )
            for party in sorted(shared)
        }

    def receive_masked_input(self, message: MaskedInput) -> None:
        """Phase 3: add a masked input to the running sum (the input itself is not kept)."""
        self._expect(ServerPhase.COLLECTING, "accept masked inputs")
        party = message.party_id
        self._check_party(
            party, self.shared - self.uploaded, "upload a masked input (twice, or without sharing)"
        )
        config = self.setup.config
        message.checked(length=self.setup.vector_length, bits=config.bits)
        if self.masked_sum is None:
            self.masked_sum = message.masked.copy()
        else:
            np.add(self.masked_sum, message.masked, out=self.masked_sum)
        self.uploaded.add(party)

    def close_collecting(self) -> dict[int, UnmaskRequest]:
        """End phase 3: announce the survivors ``U3``; each survivor's request names each neighbour once."""
        self._expect(ServerPhase.COLLECTING, "close the masked-input collection")
        survivors, shared = set(self.uploaded), self.shared
        # survivors' self masks and dropped parties' masking keys both need t answers from U3
        self._fail_unless_enough(survivors, shared, "After the masked inputs")
        self.requests = {}
        for party in sorted(survivors):
            neighbourhood = self.setup.neighbourhood(party) & shared
            self.requests[party] = UnmaskRequest(
                survivors=tuple(sorted(neighbourhood & survivors)),
                dropped=tuple(sorted(neighbourhood - survivors)),
            )
        self.phase = ServerPhase.UNMASKING
        return dict(self.requests)

    def receive_unmask(self, message: UnmaskResponse) -> None:
        """Phase 4: record a survivor's shares; they must answer exactly the request it was sent."""
        self._expect(ServerPhase.UNMASKING, "accept unmask responses")
        party = message.party_id
        self._check_party(party, self.uploaded - self.responders, "answer the unmask request (twice?)")
        request = self.requests[party]
        if set(message.self_mask_shares) != set(request.survivors) or set(message.mask_key_shares) != set(
            request.dropped
        ):
            raise MessageError(
                f"The unmask response of party {party} does not answer the request it was sent."
            )
        for owner, share in message.self_mask_shares.items():
            shamir.share_from_bytes(share, party=party)
            self.self_mask_shares.setdefault(owner, {})[party] = share
        for owner, share in message.mask_key_shares.items():
            shamir.share_from_bytes(share, party=party)
            self.mask_key_shares.setdefault(owner, {})[party] = share
        self.responders.add(party)

    def finish(self) -> SecAggResult:
        """End phase 4: rebuild the secrets, remove every mask and return the dequantised sum.

        Raises
        ------
        NotEnoughSurvivors
            If some neighbourhood has fewer than ``t`` responders (nothing is unmasked; the round failed).
        """
        total = self._unmask()
        config, survivors = self.setup.config, len(self.uploaded)
        result = dequantise_sum(
            total,
            clip_norm=config.clip_norm,
            bits=config.bits,
            num_parties=self.setup.num_parties,
            num_summands=survivors,
        )
        return self._result(
            result,
            error_bound(
                clip_norm=config.clip_norm,
                bits=config.bits,
                num_parties=self.setup.num_parties,
                num_summands=survivors,
            ),
        )

    def finish_integers(self) -> SecAggResult:
        """End phase 4 for integer inputs (:meth:`SecAggClient.masked_integers`): the unmasked sum modulo
        ``2**bits`` as it is (uint), to be decoded by whoever encoded the inputs; ``error_bound`` is 0."""
        return self._result(self._unmask(), 0.0)

    def _result(self, total: npt.NDArray[np.generic], bound: float) -> SecAggResult:
        survivors, shared = set(self.uploaded), self.shared
        self.phase = ServerPhase.DONE
        return SecAggResult(
            total=total,  # type: ignore[arg-type]
            survivors=tuple(sorted(survivors)),
            responders=tuple(sorted(self.responders)),
            dropped_after_advertising=tuple(sorted(set(self.advertisements) - shared)),
            dropped_after_sharing=tuple(sorted(shared - survivors)),
            error_bound=bound,
        )

    def _unmask(self) -> npt.NDArray[np.unsignedinteger]:
        """Rebuild the secrets and remove every mask from the running sum (reduced modulo ``2**bits``)."""
        self._expect(ServerPhase.UNMASKING, "finish")
        setup, config = self.setup, self.setup.config
        survivors, shared = set(self.uploaded), self.shared
        dropped = shared - survivors
        self._fail_unless_enough(self.responders, shared, "After the unmask responses")
        assert self.masked_sum is not None
        try:
            seeds = {
                owner: shamir.combine(self.self_mask_shares[owner], threshold=setup.threshold(owner))
                for owner in sorted(survivors)
            }
            masking_keys = {
                owner: shamir.combine(self.mask_key_shares[owner], threshold=setup.threshold(owner))
                for owner in sorted(dropped)
            }
        except (NotEnoughShares, MessageError) as error:
            raise self._fail(error) from None
        expander = MaskExpander(length=setup.vector_length, bits=config.bits, context=setup.context)
        total = self.masked_sum
        for owner in sorted(survivors):
            expander.add_inplace(total, seeds[owner], purpose=SELF_PURPOSE, sign=-1)
        for owner in sorted(dropped):
            private = X25519PrivateKey.from_private_bytes(masking_keys[owner])
            if crypto.public_bytes(private) != self.advertisements[owner].masking_key:
                raise self._fail(
                    MessageError(
                        f"The rebuilt masking key of party {owner} does not match its advertised public key: "
                        "a share is corrupted."
                    )
                )
            for survivor in sorted(setup.neighbours(owner) & survivors):
                secret = crypto.agree(private, self.advertisements[survivor].masking_key, peer=survivor)
                # the survivor added sign(survivor, owner) * mask; take it away
                expander.add_inplace(
                    total, secret, purpose=PAIRWISE_PURPOSE, sign=-pairwise_sign(survivor, owner)
                )
        reduce_inplace(total, config.bits)
        return total
