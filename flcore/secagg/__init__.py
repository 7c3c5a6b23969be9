"""Secure aggregation (Bonawitz et al. 2017) with the SecAgg+ neighbour graph (Bell et al. 2020), Django-free.

The server learns the sum of the surviving parties' clipped, quantised updates and nothing else: every
party adds a self mask and pairwise masks (expanded by AES-256-CTR from 256-bit secrets) to its update in
Z_(2**bits); the pairwise masks cancel in the sum, and Shamir shares of the self-mask seeds (of survivors)
and of the masking keys (of parties that dropped after sharing) let the server remove the rest. Advertised
keys are signed with each party's Ed25519 identity key, so a server that swaps keys is caught.

Modules: :mod:`~flcore.secagg.shamir` (secret sharing), :mod:`~flcore.secagg.crypto` (X25519, HKDF,
AES-GCM, Ed25519), :mod:`~flcore.secagg.masks` (the PRG), :mod:`~flcore.secagg.quantisation`,
:mod:`~flcore.secagg.graph`, :mod:`~flcore.secagg.config`, :mod:`~flcore.secagg.messages`, and the two
roles :mod:`~flcore.secagg.client` and :mod:`~flcore.secagg.server`. The threat model and the parameters:
``docs/secure-aggregation.md``.
"""

from flcore.secagg.client import ClientPhase, SecAggClient
from flcore.secagg.config import (
    COMPATIBLE_ALGORITHMS,
    PROTOCOLS,
    SecureAggregationConfig,
    check_strategy_compatible,
)
from flcore.secagg.errors import (
    InvalidSignature,
    MessageError,
    NotEnoughShares,
    NotEnoughSurvivors,
    ProtocolViolation,
    SecAggError,
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
from flcore.secagg.server import SecAggResult, SecAggServer, ServerPhase

__all__ = [
    "COMPATIBLE_ALGORITHMS",
    "PROTOCOLS",
    "AdvertiseKeys",
    "ClientPhase",
    "InvalidSignature",
    "KeyDirectory",
    "MaskedInput",
    "MessageError",
    "NotEnoughShares",
    "NotEnoughSurvivors",
    "ProtocolViolation",
    "RoundSetup",
    "SecAggClient",
    "SecAggError",
    "SecAggResult",
    "SecAggServer",
    "SecureAggregationConfig",
    "ServerPhase",
    "ShareDelivery",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "check_strategy_compatible",
]
