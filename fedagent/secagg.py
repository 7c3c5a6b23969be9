"""The agent's side of secure aggregation: its identity key, and one protocol party per round.

A training with ``secure_aggregation`` hands the agent four tasks per round (``docs/agent-protocol.md``,
"Secure aggregation"): ``secagg_advertise``, ``secagg_share``, ``secagg_masked_input`` (train, then upload
the masked vector) and ``secagg_unmask``. :class:`SecAggParty` turns each task's JSON into the bytes of
the answer with :class:`flcore.secagg.SecAggClient`, whose secrets stay in this process's memory.

Invariants:

- The Ed25519 identity private key lives only in ``<state_dir>/identity_ed25519.key`` (mode 0600, 32 raw
  bytes) and in memory; only its public half and a proof of possession are sent, once, at connect.
- One :class:`~flcore.secagg.SecAggClient` per session id; it is forgotten once it answered the unmask
  request, or when it refused a request (an aborted party answers nothing more).
- The masked input is ``[w u, w C]`` with ``u`` the delta clipped to ``C`` and
  ``w = min(num_examples, weight_cap) / weight_cap`` (trainings/secagg_config.py says why); the agent
  refuses an unmask request that asks for both shares of one neighbour (SecAggClient does).
- ``drop_after`` (tests only) makes the agent stop answering after the named phase, as a crashed agent
  would; ``record_dir`` (tests only) writes the clipped delta, its weight and its quantised vector, so a
  test can compute the plain weighted mean the server must reproduce and search storage for them.
"""

from __future__ import annotations

import base64
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flcore.parameters import Parameters, ParameterSpec
from flcore.secagg import (
    KeyDirectory,
    RoundSetup,
    SecAggClient,
    ShareDelivery,
    UnmaskRequest,
)
from flcore.secagg.quantisation import clip_by_l2_norm, quantise

IDENTITY_KEY_FILE = "identity_ed25519.key"
IDENTITY_PROOF_LABEL = b"fedsite/identity-key/v1/"
DROP_PHASES = ("advertise", "share", "upload")
KIND_ADVERTISE = "secagg_advertise"
KIND_SHARE = "secagg_share"
KIND_MASKED_INPUT = "secagg_masked_input"
KIND_UNMASK = "secagg_unmask"
SECAGG_KINDS = frozenset({KIND_ADVERTISE, KIND_SHARE, KIND_MASKED_INPUT, KIND_UNMASK})


class SecAggTaskError(Exception):
    """The agent cannot (or will not) answer a secure-aggregation task; the message says why."""


def load_or_create_identity_key(state_dir: Path) -> Ed25519PrivateKey:
    """The agent's Ed25519 identity key from ``state_dir`` (created, mode 0600, when absent)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / IDENTITY_KEY_FILE
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != 32:
            raise ValueError(
                f"{path} must hold the 32 raw bytes of an Ed25519 private key. Found {len(raw)} bytes."
            )
        return Ed25519PrivateKey.from_private_bytes(raw)
    key = Ed25519PrivateKey.generate()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.private_bytes_raw())
    return key


def identity_registration(agent_id: str, key: Ed25519PrivateKey) -> tuple[str, str]:
    """``(public_key, proof)`` in base64 for ``POST identity-key``."""
    public = key.public_key().public_bytes_raw()
    proof = key.sign(IDENTITY_PROOF_LABEL + agent_id.encode("utf-8") + b"/" + public)
    return base64.b64encode(public).decode("ascii"), base64.b64encode(proof).decode("ascii")


def masked_input_vector(
    delta: Parameters, spec: ParameterSpec, *, clip_norm: float, weight_cap: int, num_examples: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]:
    """``([w u, w C], u, w)``: the vector to mask, the clipped delta ``u`` and the weight ``w``."""
    flat = np.concatenate([np.asarray(delta[t.name], dtype=np.float64).ravel() for t in spec.tensors])
    clipped = clip_by_l2_norm(flat, clip_norm)
    weight = min(num_examples, weight_cap) / weight_cap
    return np.concatenate([weight * clipped, [weight * clip_norm]]), clipped, weight


@dataclass
class SecAggParty:
    """Every secure-aggregation round this agent is in, by session id.

    Parameters
    ----------
    identity_key : Ed25519PrivateKey
        The key the agent registered; it signs the round keys.
    drop_after : {"advertise", "share", "upload"} or None
        Tests only: after answering that phase, answer no further phase of any round.
    record_dir : Path or None
        Tests only: write ``<session>-<party>.npz`` with the clipped delta ``u``, the weight ``w`` and the
        quantised vector (before masking).
    """

    identity_key: Ed25519PrivateKey
    drop_after: str | None = None
    record_dir: Path | None = None
    sessions: dict[str, SecAggClient] = field(default_factory=dict)
    dropped: bool = False

    def __post_init__(self) -> None:
        if self.drop_after is not None and self.drop_after not in DROP_PHASES:
            raise ValueError(f"drop_after must be one of {DROP_PHASES}. Found {self.drop_after!r}.")

    def _after(self, phase: str) -> None:
        if self.drop_after == phase:
            self.dropped = True

    def _client(self, secagg: dict[str, Any]) -> SecAggClient:
        session_id = str(secagg.get("session_id", ""))
        client = self.sessions.get(session_id)
        if client is None:
            raise SecAggTaskError(
                f"The agent holds no secure-aggregation state for session {session_id!r} (it restarted, "
                "or refused an earlier request of the round); it cannot answer this phase."
            )
        return client

    def advertise(self, secagg: dict[str, Any]) -> bytes:
        """Phase 1: a fresh party for the round; its two public keys, signed."""
        setup = RoundSetup.from_json(secagg["setup"])
        registry = {int(p): base64.b64decode(key) for p, key in dict(secagg["identity_keys"]).items()}
        party = int(secagg["party_id"])
        mine = self.identity_key.public_key().public_bytes_raw()
        if registry.get(party) != mine:
            raise SecAggTaskError(
                f"The round lists another identity key for party {party} than the one this agent holds."
            )
        client = SecAggClient(
            setup=setup, party_id=party, identity_key=self.identity_key, identity_public_keys=registry
        )
        self.sessions[setup.session_id] = client
        body = client.advertise_keys().to_bytes()
        self._after("advertise")
        return body

    def share(self, secagg: dict[str, Any]) -> bytes:
        """Phase 2: check the neighbours' signatures, share both secrets, one ciphertext per neighbour."""
        client = self._client(secagg)
        try:
            body = client.share_keys(KeyDirectory.from_json(secagg["directory"])).to_bytes()
        except Exception:
            self.sessions.pop(client.setup.session_id, None)
            raise
        self._after("share")
        return body

    def masked_input(
        self,
        secagg: dict[str, Any],
        delta: Parameters,
        spec: ParameterSpec,
        *,
        num_examples: int,
        rng: np.random.Generator,
    ) -> bytes:
        """Phase 3: the clipped, weighted delta, quantised and masked (safetensors); in a training with
        distributed DP (``secagg["distributed_dp"]``), this agent's Skellam share, masked as it is."""
        client = self._client(secagg)
        if "distributed_dp" in secagg:
            return self._masked_share(client, secagg, delta, rng)
        vector, clipped, weight = masked_input_vector(
            delta,
            spec,
            clip_norm=float(secagg["clip_norm"]),
            weight_cap=int(secagg["weight_cap"]),
            num_examples=num_examples,
        )
        recording = copy.deepcopy(rng) if self.record_dir is not None else None
        try:
            masked = client.masked_input(ShareDelivery.from_json(secagg["delivery"]), vector, rng=rng)
        except Exception:
            self.sessions.pop(client.setup.session_id, None)
            raise
        if recording is not None and self.record_dir is not None:
            # the quantised vector is the one masked_input drew: its only randomness is the rounding
            config = client.setup.config
            quantised = quantise(
                vector,
                clip_norm=config.clip_norm,
                bits=config.bits,
                num_parties=client.setup.num_parties,
                rng=recording,
            )
            self.record_dir.mkdir(parents=True, exist_ok=True)
            name = client.setup.session_id.replace("/", "_")
            np.savez(
                self.record_dir / f"{name}-{client.party_id}.npz",
                clipped=clipped,
                weight=weight,
                quantised=quantised,
            )
        self._after("upload")
        return masked.to_bytes()

    def _masked_share(
        self, client: SecAggClient, secagg: dict[str, Any], delta: Parameters, rng: np.random.Generator
    ) -> bytes:
        from fedagent.local_dp import distributed_dp_share

        try:
            share = distributed_dp_share(delta, secagg["distributed_dp"], rng)
            masked = client.masked_integers(ShareDelivery.from_json(secagg["delivery"]), share)
        except Exception:
            self.sessions.pop(client.setup.session_id, None)
            raise
        self._after("upload")
        return masked.to_bytes()

    def unmask(self, secagg: dict[str, Any]) -> bytes:
        """Phase 4: the shares the request asks for (refused if it asks for both of one neighbour)."""
        client = self._client(secagg)
        try:
            return client.unmask(UnmaskRequest.from_json(secagg["request"])).to_bytes()
        finally:
            self.sessions.pop(client.setup.session_id, None)
