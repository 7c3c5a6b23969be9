"""Clipping and stochastic quantisation of updates into Z_(2**bits), and dequantisation of their sum.

An update ``x`` is clipped to L2 norm ``C`` (``x * min(1, C / ||x||)``), so every coordinate lies in
``[-C, C]``; with ``L`` levels per side, coordinate ``x_i`` becomes ``q_i = SR(x_i L / C) + L`` in
``[0, 2L]``, where ``SR(z) = floor(z) + Bernoulli(z - floor(z))`` is stochastic rounding (unbiased:
``E[SR(z)] = z``; Gupta et al. 2015, "Deep Learning with Limited Numerical Precision", Section 3).

The modulus cannot wrap: ``L = floor((2**bits - 1) / (2 n))`` for ``n`` parties, so a sum of at most ``n``
values in ``[0, 2L]`` is at most ``2Ln <= 2**bits - 1`` and the sum modulo ``2**bits`` IS the integer sum.
Dequantising a sum of ``m`` quantised updates gives ``(S - m L) C / L``.

Error bound (deterministic): stochastic rounding moves each value by less than one step, so every
coordinate of the dequantised sum of ``m`` clipped updates is within ``m C / L`` (strictly) of the exact sum
of the clipped updates, and within ``sqrt(d) m C / L`` in L2 norm for ``d`` coordinates; the error has mean
zero and, being a sum of independent bounded terms, a standard deviation of at most ``sqrt(m) C / (2L)``
per coordinate. Clipping itself is not an error of this module: the bound is against the CLIPPED updates.

Invariants: randomness for rounding comes from the ``rng`` given (it need not be secret: the mask hides the
value); :func:`quantise` output is in ``[0, 2L]``; :func:`dequantise_sum` refuses a sum above ``2 L m``
(which only a corrupted or wrongly unmasked sum can produce).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from flcore.errors import ConfigError
from flcore.secagg.errors import SecAggError
from flcore.secagg.masks import mask_dtype

__all__ = ["clip_by_l2_norm", "dequantise_sum", "error_bound", "quantisation_levels", "quantise"]

MIN_BITS = 2
MAX_BITS = 48
"""Above 48 bits the float64 scaling no longer resolves fractions of a level (53-bit mantissa)."""


def quantisation_levels(*, bits: int, num_parties: int) -> int:
    """``L``: levels per side such that the sum of ``num_parties`` values in ``[0, 2L]`` fits in ``bits``.

    Raises
    ------
    ConfigError
        Naming ``bits`` when ``2**bits - 1 < 2 * num_parties`` (not even one level per side).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(
            f"secure_aggregation 'bits' must be an integer in [{MIN_BITS}, {MAX_BITS}]. Found {bits!r}."
        )
    if isinstance(num_parties, bool) or not isinstance(num_parties, int) or num_parties < 1:
        raise ConfigError(f"The number of parties must be a positive integer. Found {num_parties!r}.")
    levels = ((1 << bits) - 1) // (2 * num_parties)
    if levels < 1:
        needed = math.ceil(math.log2(2 * num_parties + 1))
        raise ConfigError(
            f"secure_aggregation 'bits' = {bits} is too few for {num_parties} parties: the sum of their "
            f"quantised updates would wrap around 2**{bits}. Use bits >= {needed} (32 is the usual choice)."
        )
    return levels


def clip_by_l2_norm(vector: npt.ArrayLike, clip_norm: float) -> npt.NDArray[np.float64]:
    """``vector * min(1, clip_norm / ||vector||_2)`` in float64 (a new array)."""
    values = np.asarray(vector, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(values)):
        raise SecAggError("The update to quantise contains NaN or infinite values.")
    norm = float(np.linalg.norm(values))
    if norm > clip_norm:
        values = values * (clip_norm / norm)
        # the float64 rescale may land a hair above the norm; never past a coordinate bound of C
        np.clip(values, -clip_norm, clip_norm, out=values)
    return values


def quantise(
    vector: npt.ArrayLike, *, clip_norm: float, bits: int, num_parties: int, rng: np.random.Generator
) -> npt.NDArray[np.unsignedinteger]:
    """Clip ``vector`` to ``clip_norm`` and stochastically round it into ``[0, 2L]`` (see the module)."""
    if not (isinstance(clip_norm, int | float) and math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"secure_aggregation 'clip_norm' must be a finite number > 0. Found {clip_norm!r}.")
    levels = quantisation_levels(bits=bits, num_parties=num_parties)
    scaled = clip_by_l2_norm(vector, clip_norm) * (levels / clip_norm)
    np.clip(scaled, -levels, levels, out=scaled)
    floor = np.floor(scaled)
    rounded = floor + (rng.random(scaled.shape) < (scaled - floor))
    rounded += levels
    return rounded.astype(mask_dtype(bits))


def dequantise_sum(
    total: npt.NDArray[np.unsignedinteger],
    *,
    clip_norm: float,
    bits: int,
    num_parties: int,
    num_summands: int,
) -> npt.NDArray[np.float64]:
    """The float sum of ``num_summands`` quantised updates from their integer sum ``total`` (mod 2**bits)."""
    levels = quantisation_levels(bits=bits, num_parties=num_parties)
    if not 0 <= num_summands <= num_parties:
        raise ValueError(f"num_summands must be in [0, {num_parties}]. Found {num_summands}.")
    if total.size and int(total.max()) > 2 * levels * num_summands:
        raise SecAggError(
            f"The unmasked sum exceeds {2 * levels * num_summands}, the largest sum of {num_summands} "
            "quantised updates: the masks were not removed correctly (corrupted shares or inputs)."
        )
    return (total.astype(np.float64) - float(num_summands * levels)) * (clip_norm / levels)


def error_bound(*, clip_norm: float, bits: int, num_parties: int, num_summands: int) -> float:
    """The strict per-coordinate bound ``m C / L`` on |dequantised sum - exact sum of clipped updates|."""
    levels = quantisation_levels(bits=bits, num_parties=num_parties)
    return num_summands * clip_norm / levels
