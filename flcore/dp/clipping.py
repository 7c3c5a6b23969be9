"""Norm clipping of model updates, the step that bounds one client's contribution (its sensitivity).

Clipping a delta to L2 norm ``C`` multiplies it by ``min(1, C / ||Delta||_2)`` (Abadi et al. 2016, "Deep
Learning with Differential Privacy", CCS, Algorithm 1, "clip gradient"; McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models", ICLR, Algorithm 1, ``ClipFn``); the sum of clipped
deltas then has L2 sensitivity ``C`` under adding or removing one client.

Invariants:

- Norms are computed in float64 over all tensors taken together (or per tensor for per-layer clipping);
  the clipped values are computed in float64 and returned as new float32 arrays in the input's order.
- An update already within the bound is returned unchanged (bit for bit, factor exactly 1).
- A clipped update's norm never exceeds the bound despite the cast to float32: the factor is shrunk by
  :data:`ROUNDING_MARGIN` (rounding to float32 changes each coordinate by at most a relative ``2**-24``, so
  the norm grows by at most that factor), so the sensitivity bound holds for the float32 values sent on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from flcore.dp._checks import non_negative, positive
from flcore.errors import FlcoreError
from flcore.parameters import Parameters, ParameterSpec, l2_norm

__all__ = [
    "ROUNDING_MARGIN",
    "clip_by_l1_norm",
    "clip_by_l2_norm",
    "clip_factor",
    "clip_per_layer",
    "per_layer_clip_norms",
    "per_layer_sensitivity",
]

ROUNDING_MARGIN = 1.0 - 2.0**-22
"""Factor applied to every clipping factor below 1, so that float32 rounding cannot push a norm above C."""


def clip_factor(norm: float, clip_norm: float) -> float:
    """Return the clipping factor ``min(1, C / norm)`` (shrunk by :data:`ROUNDING_MARGIN` when below 1).

    Parameters
    ----------
    norm : float
        The update's norm (finite, ``>= 0``).
    clip_norm : float
        The bound ``C`` (``>= 0``; 0 zeroes every non-zero update).
    """
    if norm <= clip_norm:
        return 1.0
    return clip_norm / norm * ROUNDING_MARGIN


def _scaled(params: Mapping[str, npt.NDArray[Any]], factor: float) -> Parameters:
    if factor == 1.0:
        return {name: np.array(array, dtype=np.float32) for name, array in params.items()}
    return {
        name: (np.asarray(array, dtype=np.float64) * factor).astype(np.float32)
        for name, array in params.items()
    }


def _check_finite_norm(norm: float) -> None:
    if not math.isfinite(norm):
        raise FlcoreError("The update contains NaN or Inf (its norm is not finite); cannot clip it.")


def clip_by_l2_norm(
    params: Mapping[str, npt.NDArray[Any]], clip_norm: float
) -> tuple[Parameters, float, float]:
    """Clip ``params`` (all tensors together) to L2 norm ``clip_norm``.

    ``clip(Delta) = Delta * min(1, C / ||Delta||_2)`` (McMahan et al. 2018, Algorithm 1, ``ClipFn``), so that
    ``||clip(Delta)||_2 <= C``.

    Parameters
    ----------
    params : mapping of str to ndarray
        The update (e.g. a client delta).
    clip_norm : float
        ``C > 0``.

    Returns
    -------
    tuple of (Parameters, float, float)
        The clipped update (new float32 arrays), the original L2 norm (float64) and the factor applied
        (1.0 when the update was within the bound).

    Raises
    ------
    FlcoreError
        If ``clip_norm`` is not positive and finite or the update holds NaN or Inf.
    """
    bound = positive("clip_norm", clip_norm)
    norm = l2_norm(params)
    _check_finite_norm(norm)
    factor = clip_factor(norm, bound)
    return _scaled(params, factor), norm, factor


def l1_norm(params: Mapping[str, npt.NDArray[Any]]) -> float:
    """Return the L1 norm of all tensors taken together, computed in float64."""
    return math.fsum(float(np.abs(np.asarray(a, dtype=np.float64)).sum()) for a in params.values())


def clip_by_l1_norm(
    params: Mapping[str, npt.NDArray[Any]], clip_norm: float
) -> tuple[Parameters, float, float]:
    """Clip ``params`` (all tensors together) to L1 norm ``clip_norm``, the bound the Laplace mechanism needs.

    ``clip(Delta) = Delta * min(1, C / ||Delta||_1)``: the Laplace mechanism is calibrated to the L1
    sensitivity (Dwork and Roth 2014, "The Algorithmic Foundations of Differential Privacy", Definition 3.1
    and Theorem 3.6).

    Returns
    -------
    tuple of (Parameters, float, float)
        The clipped update, the original L1 norm and the factor applied.
    """
    bound = positive("clip_norm", clip_norm)
    norm = l1_norm(params)
    _check_finite_norm(norm)
    factor = clip_factor(norm, bound)
    return _scaled(params, factor), norm, factor


def clip_per_layer(
    params: Mapping[str, npt.NDArray[Any]], clip_norms: Mapping[str, float]
) -> tuple[Parameters, dict[str, float], dict[str, float]]:
    """Clip each tensor ``l`` to its own L2 norm ``c_l`` (per-layer clipping).

    McMahan et al. (2018, Section 3, "per-layer clipping"): with per-layer bounds ``c_l`` the whole update
    has L2 norm at most ``sqrt(sum_l c_l^2)`` (:func:`per_layer_sensitivity`), which is the sensitivity to
    calibrate noise to. :func:`per_layer_clip_norms` splits a total bound ``C`` so that this equals ``C``.

    Parameters
    ----------
    params : mapping of str to ndarray
        The update.
    clip_norms : mapping of str to float
        A bound ``c_l >= 0`` for every tensor of ``params`` (exactly the same names).

    Returns
    -------
    tuple of (Parameters, dict, dict)
        The clipped update, each tensor's original norm and each tensor's factor.

    Raises
    ------
    FlcoreError
        If the names differ, a bound is negative or not finite, or a tensor holds NaN or Inf.
    """
    if set(clip_norms) != set(params):
        raise FlcoreError(
            f"clip_norms must name exactly the update's tensors {list(params)}; found {list(clip_norms)}."
        )
    bounds = {name: non_negative(f"clip_norms[{name!r}]", clip_norms[name]) for name in params}
    clipped: Parameters = {}
    norms: dict[str, float] = {}
    factors: dict[str, float] = {}
    for name, array in params.items():
        norm = l2_norm({name: array})
        if not math.isfinite(norm):
            raise FlcoreError(f"Tensor {name!r} contains NaN or Inf; cannot clip it.")
        factor = clip_factor(norm, bounds[name])
        clipped[name] = _scaled({name: array}, factor)[name]
        norms[name] = norm
        factors[name] = factor
    return clipped, norms, factors


def per_layer_sensitivity(clip_norms: Mapping[str, float]) -> float:
    """Return ``sqrt(sum_l c_l^2)``, the L2 sensitivity of an update clipped per layer to ``c_l``."""
    return math.sqrt(math.fsum(non_negative("clip norm", c) ** 2 for c in clip_norms.values()))


def per_layer_clip_norms(
    layers: ParameterSpec | Mapping[str, npt.NDArray[Any]] | Sequence[tuple[str, int]],
    total_clip_norm: float,
    *,
    split: Literal["equal", "sqrt_size"] = "equal",
) -> dict[str, float]:
    """Split a total L2 bound ``C`` into per-layer bounds ``c_l`` with ``sqrt(sum_l c_l^2) = C``.

    - ``"equal"``: ``c_l = C / sqrt(L)`` for ``L`` layers (the equal split of McMahan et al. 2018, Section 3).
    - ``"sqrt_size"``: ``c_l = C * sqrt(n_l / sum_k n_k)`` for a layer of ``n_l`` values, so every
      coordinate gets the same share of the budget whatever its layer (empty layers get 0).

    Parameters
    ----------
    layers : ParameterSpec, mapping of str to ndarray, or sequence of (name, size)
        The layers, in order.
    total_clip_norm : float
        ``C > 0``.
    split : {"equal", "sqrt_size"}
        How to split.

    Returns
    -------
    dict of str to float
        ``c_l`` per layer name, in order.
    """
    bound = positive("total_clip_norm", total_clip_norm)
    if isinstance(layers, ParameterSpec):
        sizes = [(t.name, t.num_parameters) for t in layers.tensors]
    elif isinstance(layers, Mapping):
        sizes = [(str(name), int(np.size(array))) for name, array in layers.items()]
    else:
        sizes = [(str(name), int(size)) for name, size in layers]
    if not sizes:
        raise FlcoreError("per_layer_clip_norms needs at least one layer; found none.")
    if split == "equal":
        share = bound / math.sqrt(len(sizes))
        return {name: share for name, _ in sizes}
    if split == "sqrt_size":
        total = sum(size for _, size in sizes)
        if total <= 0:
            raise FlcoreError("split='sqrt_size' needs at least one non-empty layer; all layers are empty.")
        return {name: bound * math.sqrt(size / total) for name, size in sizes}
    raise FlcoreError(f"split must be 'equal' or 'sqrt_size'. Found {split!r}.")
