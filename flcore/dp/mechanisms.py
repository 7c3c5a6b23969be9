"""The Gaussian and Laplace noise mechanisms on model parameters.

- Gaussian mechanism: release ``f(D) + N(0, sigma^2 I)``; with ``sigma`` calibrated to the L2 sensitivity
  (:mod:`flcore.dp.calibration`) it is ``(epsilon, delta)``-DP (Dwork and Roth 2014, "The Algorithmic
  Foundations of Differential Privacy", Appendix A, Theorem A.1; Balle and Wang 2018, Theorem 8).
- Laplace mechanism: release ``f(D) + Lap(b)^d`` (density ``exp(-|x| / b) / (2b)`` per coordinate); with
  ``b = Delta_1 / epsilon``, ``Delta_1`` the L1 sensitivity, it is ``epsilon``-DP (Dwork and Roth 2014,
  Definition 3.3, Theorem 3.6). Its noise must be calibrated to the L1 norm, so pair it with
  :func:`flcore.dp.clipping.clip_by_l1_norm`, not with L2 clipping.

Invariants: noise is drawn in float64 from the explicit ``rng`` (tensor by tensor, in the input's order,
so one seeded generator reproduces one release), added in float64 and the sum cast once to float32; inputs
are never modified. numpy's generator is not a cryptographically secure source (see :mod:`flcore.dp`);
in production seed it from ``os.urandom``, e.g. ``np.random.default_rng(secrets.randbits(128))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from flcore.dp._checks import generator, non_negative
from flcore.parameters import Parameters

__all__ = ["add_gaussian_noise", "add_laplace_noise", "gaussian_noise", "laplace_noise"]


def gaussian_noise(
    shape: tuple[int, ...], stddev: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """Return float64 noise ``N(0, stddev^2)`` of ``shape``, i.i.d. per coordinate.

    Parameters
    ----------
    shape : tuple of int
        Shape of the noise.
    stddev : float
        ``sigma >= 0`` (0 returns zeros, drawing nothing).
    rng : numpy.random.Generator
        Source of randomness (not cryptographically secure; see the module docstring).
    """
    sigma = non_negative("stddev", stddev)
    source = generator(rng)
    if sigma == 0.0:
        return np.zeros(shape, dtype=np.float64)
    return source.normal(0.0, sigma, size=shape)


def laplace_noise(shape: tuple[int, ...], scale: float, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Return float64 Laplace noise ``Lap(scale)`` of ``shape``, i.i.d. per coordinate.

    ``Lap(b)`` has density ``exp(-|x| / b) / (2b)``, mean absolute deviation ``b`` and standard deviation
    ``sqrt(2) b`` (Dwork and Roth 2014, Definition 3.3).

    Parameters
    ----------
    shape : tuple of int
        Shape of the noise.
    scale : float
        ``b >= 0`` (0 returns zeros, drawing nothing).
    rng : numpy.random.Generator
        Source of randomness.
    """
    b = non_negative("scale", scale)
    source = generator(rng)
    if b == 0.0:
        return np.zeros(shape, dtype=np.float64)
    return source.laplace(0.0, b, size=shape)


def add_gaussian_noise(
    params: Mapping[str, npt.NDArray[Any]], stddev: float, rng: np.random.Generator
) -> Parameters:
    """Return ``params + N(0, stddev^2 I)`` as new float32 arrays (the Gaussian mechanism).

    The noise is drawn and added in float64, tensor by tensor in the order of ``params``, then cast once.

    Parameters
    ----------
    params : mapping of str to ndarray
        The (already clipped) query result.
    stddev : float
        ``sigma >= 0``: ``noise_multiplier * L2 sensitivity``.
    rng : numpy.random.Generator
        Source of randomness.
    """
    sigma = non_negative("stddev", stddev)
    source = generator(rng)
    return {
        name: (np.asarray(array, dtype=np.float64) + gaussian_noise(np.shape(array), sigma, source)).astype(
            np.float32
        )
        for name, array in params.items()
    }


def add_laplace_noise(
    params: Mapping[str, npt.NDArray[Any]], scale: float, rng: np.random.Generator
) -> Parameters:
    """Return ``params + Lap(scale)`` per coordinate as new float32 arrays (the Laplace mechanism).

    ``epsilon``-DP when ``scale = Delta_1 / epsilon`` with ``Delta_1`` the L1 sensitivity of ``params``
    (Dwork and Roth 2014, Theorem 3.6) — clip with :func:`~flcore.dp.clipping.clip_by_l1_norm` first.

    Parameters
    ----------
    params : mapping of str to ndarray
        The (already L1-clipped) query result.
    scale : float
        ``b >= 0``.
    rng : numpy.random.Generator
        Source of randomness.
    """
    b = non_negative("scale", scale)
    source = generator(rng)
    return {
        name: (np.asarray(array, dtype=np.float64) + laplace_noise(np.shape(array), b, source)).astype(
            np.float32
        )
        for name, array in params.items()
    }
