"""The distributed Skellam mechanism: each agent adds integer noise, and the SUM over agents is the mechanism.

Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for Differentially Private Federated Learning",
NeurIPS. With secure aggregation the server sees only the sum of the agents' vectors, so it cannot clip or
noise individual updates; instead every agent clips, scales, rotates and rounds its update to integers and
adds its share of Skellam noise. ``Sk(mu) = Poisson(mu) - Poisson(mu)`` (variance ``2 mu``, pmf
``P(k) = e^(-2 mu) I_k(2 mu)``) is closed under summation: ``n`` agents adding ``Sk(mu)`` each give
``Sk(n mu)`` on the sum, exactly, which is what :func:`skellam_rdp` accounts.

One agent's share (:func:`skellam_encode`, the paper's Algorithm 1 without the final modular clip, which
the secure-aggregation layer applies):

1. flatten the delta and clip it to L2 norm ``c``;
2. multiply by the scale ``s`` (the granularity is ``1 / s``);
3. pad to ``d' = 2^ceil(log2 d)`` and rotate with the randomized Walsh-Hadamard transform ``H D / sqrt(d')``
   (``D`` random signs from a PUBLIC per-round seed shared by all agents and the server: it spreads the
   mass over all coordinates so that the sum fits the modulus; it is orthogonal, so the norm is kept);
4. round to integers by CONDITIONAL randomized rounding (Kairouz, Liu and Steinke 2021, "The Distributed
   Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML, Section 4.1, used by
   Agarwal et al. 2021, Section 4): unbiased stochastic rounding, repeated until the integer vector's L2
   norm is at most :func:`rounded_l2_bound`
   ``min(sqrt(c^2 s^2 + d'/4 + sqrt(2 ln(1/beta)) (c s + sqrt(d')/2)), c s + sqrt(d'))``; one stochastic
   rounding meets it with probability at least ``1 - beta``, and the second term always holds (each
   coordinate moves by less than 1);
5. add ``Sk(mu)`` noise per coordinate (two numpy Poisson draws from an OS-seeded generator).

The server reduces the modular sum to the centred range, rotates back and divides by ``s``
(:func:`skellam_decode`).

The RDP bound (Agarwal et al. 2021, Theorem 3.5; stated there for ``Sk_{mu,mu}`` noise): for integer
``alpha > 1`` and an integer-valued query whose L1 and L2 sensitivities are ``Delta_1`` and ``Delta_2``,
the mechanism with ``Sk(mu)`` noise per coordinate is ``(alpha, eps(alpha))``-RDP with

    eps(alpha) <= alpha Delta_2^2 / (4 mu)
                  + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (16 mu^2), 3 Delta_1 / (4 mu)).

The first term is the Gaussian mechanism's RDP at the same variance ``2 mu``; the second vanishes
relative to it as ``mu`` grows. For a non-integer order we use the bound at ``ceil(alpha)``: Renyi
divergence is non-decreasing in its order, so that is still an upper bound. The sensitivities of one
agent's rounded vector are ``Delta_2 = rounded_l2_bound(...)`` and ``Delta_1 = min(Delta_2^2, sqrt(d')
Delta_2)`` (an integer vector has ``|v_i| <= v_i^2``, and Cauchy-Schwarz) (:func:`rounded_l1_bound`).

Invariants: every noise draw comes from the explicit ``rng`` (in production
``np.random.default_rng(secrets.randbits(128))``; numpy's generator is not cryptographically secure, see
:mod:`flcore.dp`); the rotation seed is public and is never used for noise; :func:`conditional_round`
never returns a vector above its bound (it raises instead), so the sensitivity the accountant assumes holds
for every output, not just with high probability; integer vectors are int64; inputs are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from flcore.dp._checks import count, generator, non_negative, positive
from flcore.errors import FlcoreError
from flcore.parameters import Parameters, ParameterSpec, flatten, unflatten

__all__ = [
    "DEFAULT_BETA",
    "MAX_ROUNDING_ATTEMPTS",
    "SkellamParameters",
    "aggregate_coordinate_bound",
    "conditional_round",
    "padded_dimension",
    "randomized_hadamard",
    "randomized_hadamard_inverse",
    "rounded_l1_bound",
    "rounded_l2_bound",
    "skellam_decode",
    "skellam_encode",
    "skellam_noise",
    "skellam_rdp",
    "to_modular",
]

DEFAULT_BETA = math.exp(-0.5)
"""Conditional rounding's ``beta``: one stochastic rounding meets the tight bound with probability
``>= 1 - beta`` (the value Kairouz et al. 2021 and Agarwal et al. 2021 use in their experiments)."""

MAX_ROUNDING_ATTEMPTS = 1000
"""Conditional rounding gives up (raises) after this many stochastic roundings: ``beta^1000`` is
negligible for any ``beta < 0.97``."""

MAX_BITS = 62
"""Widest modulus ``2^bits`` whose centred range fits int64."""


# ---------------------------------------------------------------------------------------------------------
# Noise and the RDP bound
# ---------------------------------------------------------------------------------------------------------
def skellam_noise(shape: tuple[int, ...], mu: float, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Return int64 noise ``Sk(mu) = Poisson(mu) - Poisson(mu)`` of ``shape``, i.i.d. per coordinate.

    Mean 0, variance ``2 mu``; pmf ``e^(-2 mu) I_k(2 mu)`` (Skellam 1946). The sum of independent
    ``Sk(mu_i)`` is ``Sk(sum_i mu_i)`` (Agarwal et al. 2021, Section 3).

    Parameters
    ----------
    shape : tuple of int
        Shape of the noise.
    mu : float
        ``>= 0``: the mean of each Poisson (0 returns zeros, drawing nothing).
    rng : numpy.random.Generator
        Source of randomness; in production seeded from the operating system.
    """
    mean = non_negative("mu", mu)
    source = generator(rng)
    if mean == 0.0:
        return np.zeros(shape, dtype=np.int64)
    first = source.poisson(mean, size=shape).astype(np.int64)
    second = source.poisson(mean, size=shape).astype(np.int64)
    return first - second


def skellam_rdp(
    orders: npt.ArrayLike, *, l1_sensitivity: float, l2_sensitivity: float, mu: float
) -> npt.NDArray[np.float64]:
    """Return the RDP of ``Sk(mu)`` noise on an integer query, at each order (Agarwal et al. 2021, Thm 3.5).

    ``eps(alpha) = alpha D2^2 / (4 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu))``,
    evaluated at ``ceil(alpha)`` (the theorem is for integer orders; RDP is non-decreasing in the order).

    Parameters
    ----------
    orders : array_like of float
        Renyi orders, each ``> 1``.
    l1_sensitivity, l2_sensitivity : float
        ``Delta_1, Delta_2 >= 0`` of the integer query (0 gives RDP 0).
    mu : float
        ``> 0``: the Poisson mean of the TOTAL noise on the query (``n`` agents with ``mu_i`` each:
        ``sum_i mu_i``); its variance is ``2 mu``.
    """
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.size and (not np.all(np.isfinite(alphas)) or np.any(alphas <= 1.0)):
        raise FlcoreError(f"Every Renyi order must be a finite number above 1. Found {orders!r}.")
    delta_1 = non_negative("l1_sensitivity", l1_sensitivity)
    delta_2 = non_negative("l2_sensitivity", l2_sensitivity)
    mean = positive("mu", mu)
    alpha = np.ceil(alphas)
    squared = delta_2 * delta_2
    leading = alpha * squared / (4.0 * mean)
    correction = np.minimum(
        ((2.0 * alpha - 1.0) * squared + 6.0 * delta_1) / (16.0 * mean * mean), 3.0 * delta_1 / (4.0 * mean)
    )
    result: npt.NDArray[np.float64] = leading + correction
    return result


# ---------------------------------------------------------------------------------------------------------
# Sensitivity of one agent's rounded vector
# ---------------------------------------------------------------------------------------------------------
def padded_dimension(dimension: int) -> int:
    """Return ``2^ceil(log2 d)``, the length the Walsh-Hadamard rotation works on (1 for ``d = 1``)."""
    d = count("dimension", dimension)
    if d < 1:
        raise FlcoreError(f"dimension must be at least 1. Found {dimension!r}.")
    return 1 << (d - 1).bit_length()


def rounded_l2_bound(clip_norm: float, scale: float, dimension: int, beta: float = DEFAULT_BETA) -> float:
    """Return the L2 bound of a conditionally rounded vector: the L2 sensitivity of one agent's share.

    For ``||x||_2 <= c s`` in ``d`` coordinates, stochastic rounding gives ``||round(x)||_2^2 <= c^2 s^2 +
    d / 4 + sqrt(2 ln(1 / beta)) (c s + sqrt(d) / 2)`` with probability at least ``1 - beta`` (Kairouz,
    Liu and Steinke 2021, Section 4.1), and always ``||round(x)||_2 < c s + sqrt(d)``. The smaller of the
    two is returned; ``beta = 0`` means no conditioning (the deterministic bound).

    Parameters
    ----------
    clip_norm : float
        ``c > 0`` (before scaling).
    scale : float
        ``s > 0``.
    dimension : int
        ``d >= 1``: the number of rounded coordinates (the PADDED dimension when rotating).
    beta : float
        In ``[0, 1)``.
    """
    cs = positive("clip_norm", clip_norm) * positive("scale", scale)
    d = count("dimension", dimension)
    if d < 1:
        raise FlcoreError(f"dimension must be at least 1. Found {dimension!r}.")
    b = non_negative("beta", beta)
    if b >= 1.0:
        raise FlcoreError(f"beta must be in [0, 1). Found {beta!r}.")
    deterministic = cs + math.sqrt(d)
    if b == 0.0:
        return deterministic
    conditional = math.sqrt(
        cs * cs + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / b)) * (cs + math.sqrt(d) / 2.0)
    )
    return min(conditional, deterministic)


def rounded_l1_bound(l2_bound: float, dimension: int) -> float:
    """Return ``min(D2^2, sqrt(d) D2)``: the L1 bound of an integer vector of L2 norm ``<= D2`` in ``d`` dims.

    For integers ``|v_i| <= v_i^2``, so ``||v||_1 <= ||v||_2^2``; and ``||v||_1 <= sqrt(d) ||v||_2``.
    """
    bound = non_negative("l2_bound", l2_bound)
    d = count("dimension", dimension)
    return min(bound * bound, math.sqrt(d) * bound)


def aggregate_coordinate_bound(
    *, num_agents: int, clip_norm: float, scale: float, dimension: int, agent_mu: float, stddevs: float
) -> float:
    """Return ``k`` standard deviations of one rotated coordinate of the sum of ``n`` agents' shares.

    ``k sqrt((n c s)^2 / d' + n (2 mu + 1/4))``: after the random rotation a vector of norm ``n c s`` (every
    agent's clipped update pointing the same way, the worst case) has coordinates of variance
    ``(n c s)^2 / d'``; each agent adds rounding error of variance at most ``1/4`` and noise of variance
    ``2 mu``. The modulus must exceed twice this for the centred sum not to wrap (a wrap only costs
    accuracy: privacy is unaffected, the modular reduction being post-processing).
    """
    n = count("num_agents", num_agents)
    cs = positive("clip_norm", clip_norm) * positive("scale", scale)
    padded = padded_dimension(dimension)
    variance = (n * cs) ** 2 / padded + n * (2.0 * non_negative("agent_mu", agent_mu) + 0.25)
    return positive("stddevs", stddevs) * math.sqrt(variance)


# ---------------------------------------------------------------------------------------------------------
# Rotation and rounding
# ---------------------------------------------------------------------------------------------------------
def _walsh_hadamard(vector: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Return ``H v / sqrt(len(v))`` (orthonormal, its own inverse) in ``O(d log d)``; ``len(v) = 2^k``."""
    result = np.array(vector, dtype=np.float64)
    length = result.shape[0]
    half = 1
    while half < length:
        blocks = result.reshape(-1, 2, half)
        first, second = blocks[:, 0, :].copy(), blocks[:, 1, :]
        blocks[:, 0, :] += second
        blocks[:, 1, :] = first - second
        half *= 2
    return result / math.sqrt(length)


def _signs(padded: int, rotation_seed: int) -> npt.NDArray[np.float64]:
    # Public randomness (the same for every agent and the server), not noise: a seeded generator is right.
    return np.random.default_rng(count("rotation_seed", rotation_seed)).choice([-1.0, 1.0], size=padded)


def randomized_hadamard(vector: npt.ArrayLike, rotation_seed: int) -> npt.NDArray[np.float64]:
    """Return ``H D pad(v) / sqrt(d')``: pad to a power of 2, flip signs from the public seed, rotate."""
    flat = np.asarray(vector, dtype=np.float64).ravel()
    padded = padded_dimension(flat.shape[0])
    out = np.zeros(padded, dtype=np.float64)
    out[: flat.shape[0]] = flat
    return _walsh_hadamard(out * _signs(padded, rotation_seed))


def randomized_hadamard_inverse(
    vector: npt.ArrayLike, rotation_seed: int, dimension: int
) -> npt.NDArray[np.float64]:
    """Return the first ``dimension`` coordinates of ``D H v / sqrt(d')``, the inverse of the rotation."""
    flat = np.asarray(vector, dtype=np.float64).ravel()
    padded = padded_dimension(dimension)
    if flat.shape[0] != padded:
        raise FlcoreError(
            f"A rotated vector of a {dimension}-parameter model has {padded} coordinates. "
            f"Found {flat.shape[0]}."
        )
    return (_walsh_hadamard(flat) * _signs(padded, rotation_seed))[:dimension]


def conditional_round(
    vector: npt.ArrayLike,
    l2_bound: float,
    rng: np.random.Generator,
    *,
    max_attempts: int = MAX_ROUNDING_ATTEMPTS,
) -> npt.NDArray[np.int64]:
    """Round to integers stochastically (unbiased per coordinate) until the L2 norm is at most ``l2_bound``.

    Each coordinate ``x`` becomes ``floor(x) + 1`` with probability ``x - floor(x)`` and ``floor(x)``
    otherwise; the whole vector is redrawn while ``||round(x)||_2^2 > l2_bound^2`` (checked exactly in
    integers). Kairouz, Liu and Steinke (2021), Section 4.1.

    Raises
    ------
    FlcoreError
        If ``max_attempts`` roundings all exceed the bound (the input's norm is far above the one the bound
        was computed for): the vector is never returned above its bound.
    """
    values = np.asarray(vector, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise FlcoreError("The vector to round contains NaN or Inf; every value must be finite.")
    bound = non_negative("l2_bound", l2_bound)
    source = generator(rng)
    floor = np.floor(values)
    fraction = values - floor
    base = floor.astype(np.int64)
    limit = bound * bound
    for _ in range(max(1, count("max_attempts", max_attempts))):
        rounded = base + (source.random(values.shape) < fraction).astype(np.int64)
        if float(np.dot(rounded, rounded)) <= limit:
            return rounded
    raise FlcoreError(
        f"Conditional rounding found no integer vector of L2 norm <= {bound:.6g} in {max_attempts} attempts "
        f"(the input's norm is {float(np.linalg.norm(values)):.6g}): clip the update before rounding."
    )


# ---------------------------------------------------------------------------------------------------------
# One round's parameters, the agent's share and the server's decoding
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkellamParameters:
    """What every agent needs to compute its share of a round's distributed Skellam mechanism.

    Parameters
    ----------
    clip_norm : float
        ``c > 0``: the L2 bound of each agent's delta.
    scale : float
        ``s > 0``: values are multiplied by ``s`` before rounding.
    agent_mu : float
        ``mu > 0``: each agent adds ``Sk(mu)`` per coordinate (``n`` agents: ``Sk(n mu)`` on the sum).
    bits : int
        The sum lives in ``Z_(2^bits)`` (secure aggregation's modulus), ``1 <= bits <= 62``.
    dimension : int
        ``d``: the model's number of parameters.
    beta : float
        Conditional rounding's ``beta`` in ``[0, 1)``.
    rotation_seed : int
        The round's PUBLIC seed of the rotation's random signs (the same for every agent and the server).
    """

    clip_norm: float
    scale: float
    agent_mu: float
    bits: int
    dimension: int
    beta: float = DEFAULT_BETA
    rotation_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip_norm", positive("clip_norm", self.clip_norm))
        object.__setattr__(self, "scale", positive("scale", self.scale))
        object.__setattr__(self, "agent_mu", positive("agent_mu", self.agent_mu))
        bits = count("bits", self.bits)
        if not 1 <= bits <= MAX_BITS:
            raise FlcoreError(f"bits must be an integer in [1, {MAX_BITS}]. Found {self.bits!r}.")
        object.__setattr__(self, "bits", bits)
        padded_dimension(self.dimension)
        object.__setattr__(self, "dimension", int(self.dimension))
        rounded_l2_bound(self.clip_norm, self.scale, 1, self.beta)  # validates beta
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "rotation_seed", count("rotation_seed", self.rotation_seed))

    @property
    def padded_dimension(self) -> int:
        """``d' = 2^ceil(log2 d)``: the number of integers each agent sends."""
        return padded_dimension(self.dimension)

    @property
    def l2_sensitivity(self) -> float:
        """``Delta_2``: the L2 bound of one agent's rounded vector (:func:`rounded_l2_bound` in ``d'``)."""
        return rounded_l2_bound(self.clip_norm, self.scale, self.padded_dimension, self.beta)

    @property
    def l1_sensitivity(self) -> float:
        """``Delta_1 = min(Delta_2^2, sqrt(d') Delta_2)``."""
        return rounded_l1_bound(self.l2_sensitivity, self.padded_dimension)

    @property
    def modulus(self) -> int:
        """``2^bits``."""
        return 1 << self.bits

    def to_json(self) -> dict[str, Any]:
        """Return the parameters as a JSON object (for a task's configuration)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> SkellamParameters:
        """Build from :meth:`to_json`'s form; raise FlcoreError naming a missing or unknown key."""
        if not isinstance(data, Mapping):
            raise FlcoreError(f"Skellam parameters must be a JSON object. Found {type(data).__name__}.")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise FlcoreError(f"Unknown Skellam parameter(s) {unknown}; expected {sorted(known)}.")
        missing = sorted(
            key for key in ("clip_norm", "scale", "agent_mu", "bits", "dimension") if key not in data
        )
        if missing:
            raise FlcoreError(f"Skellam parameter(s) {missing} are required.")
        return cls(**dict(data))


def skellam_encode(
    delta: Mapping[str, npt.NDArray[Any]], parameters: SkellamParameters, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Return one agent's share: clip, scale, rotate, conditionally round, add ``Sk(agent_mu)`` (int64).

    The result has ``d'`` signed integers; reduce it with :func:`to_modular` for secure aggregation.
    ``rng`` supplies the rounding and the noise (in production seeded from the operating system).

    Raises
    ------
    FlcoreError
        If the delta's size differs from ``parameters.dimension`` or holds NaN or Inf.
    """
    source = generator(rng)
    flat = flatten(delta).astype(np.float64)
    if flat.shape[0] != parameters.dimension:
        raise FlcoreError(
            f"The delta has {flat.shape[0]} parameters; the round's Skellam parameters are for "
            f"{parameters.dimension}."
        )
    if not np.all(np.isfinite(flat)):
        raise FlcoreError("The delta contains NaN or Inf; every value must be finite.")
    norm = float(np.linalg.norm(flat))
    if norm > parameters.clip_norm:
        flat = flat * (parameters.clip_norm / norm)
    rotated = randomized_hadamard(flat * parameters.scale, parameters.rotation_seed)
    rounded = conditional_round(rotated, parameters.l2_sensitivity, source)
    return rounded + skellam_noise(rounded.shape, parameters.agent_mu, source)


def to_modular(values: npt.ArrayLike, bits: int) -> npt.NDArray[np.int64]:
    """Return ``values mod 2^bits`` in ``[0, 2^bits)`` (int64)."""
    width = count("bits", bits)
    if not 1 <= width <= MAX_BITS:
        raise FlcoreError(f"bits must be an integer in [1, {MAX_BITS}]. Found {bits!r}.")
    result: npt.NDArray[np.int64] = np.mod(np.asarray(values, dtype=np.int64), np.int64(1) << width)
    return result


def skellam_decode(
    total: npt.ArrayLike, parameters: SkellamParameters, spec: ParameterSpec | None = None
) -> Parameters | npt.NDArray[np.float64]:
    """Return the dequantised SUM of the agents' deltas from the (modular or signed) sum of their shares.

    Centres ``total mod 2^bits`` into ``[-2^(bits-1), 2^(bits-1))``, undoes the rotation and divides by
    ``s``. With ``spec`` the result is the model's tensors (float32), else a float64 vector of ``d``.
    """
    values = np.asarray(total, dtype=np.int64).ravel()
    half = np.int64(1) << (parameters.bits - 1)
    centred = np.mod(values + half, np.int64(parameters.modulus)) - half
    flat = (
        randomized_hadamard_inverse(centred, parameters.rotation_seed, parameters.dimension)
        / parameters.scale
    )
    if spec is None:
        return flat
    return unflatten(flat, spec)
