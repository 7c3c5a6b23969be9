"""The Synthetic(alpha, beta) federated data sets of Li et al. (2020), FedProx, after Shamir et al. (2014).

Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith (2020), "Federated Optimization in Heterogeneous Networks"
(MLSys), Section 5.1 and Appendix C.1, following Shamir, Srebro and Zhang (2014), "Communication-Efficient
Distributed Optimization using an Approximate Newton-type Method" (ICML). For device ``k``:

- ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)`` (scalars);
- ``W_k ~ N(u_k, 1)`` of shape ``(60, 10)`` and ``b_k ~ N(u_k, 1)`` of shape ``(10,)``;
- ``v_k ~ N(B_k, 1)`` of shape ``(60,)``, the mean of the device's inputs;
- ``x ~ N(v_k, Sigma)`` with ``Sigma`` diagonal, ``Sigma_jj = j^-1.2`` (``j = 1 .. 60``);
- ``y = argmax(softmax(W_k^T x + b_k))``, i.e. the largest logit.

``alpha`` controls how much the local models differ, ``beta`` how much the local inputs differ.
Synthetic(0, 0), (0.5, 0.5) and (1, 1) are the paper's data sets. Device sizes follow a power law: as in the
authors' generator (``litian96/FedProx``, ``data/synthetic_1_1/generate_synthetic.py``),
``n_k = floor(LogNormal(4, 2)) + 50``. Where the paper's ``N(mean, s)`` notation is ambiguous the reference
generator decides: ``alpha`` and ``beta`` are standard deviations (``numpy.random.normal(0, alpha)``), which
for the (0, 0) and (1, 1) data sets coincides with variances. Each device's examples are shuffled and split
into train and test (80/20 by default, the paper's Appendix C.1; the authors' synthetic generator uses 90/10).

Invariants: every value comes from the ``rng`` argument, in a fixed order (sizes, ``u``, ``B``, every ``v_k``,
then per device ``W_k``, ``b_k``, its inputs, its shuffle), so a seed gives the same data in every process;
inputs are float32 and labels int64 in ``[0, num_classes)``; the labels are exactly
``argmax(x @ W_k + b_k)`` of the stored float32 inputs, computed in float64, so they are a deterministic
function of the stored data and the returned device models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from flcore.errors import ConfigError

__all__ = [
    "SYNTHETIC_DIMENSION",
    "SYNTHETIC_NUM_CLASSES",
    "SYNTHETIC_NUM_DEVICES",
    "SyntheticDevice",
    "SyntheticFederation",
    "synthetic_covariance_diagonal",
    "synthetic_device_sizes",
    "synthetic_federation",
    "synthetic_labels",
]

SYNTHETIC_NUM_DEVICES = 30
SYNTHETIC_DIMENSION = 60
SYNTHETIC_NUM_CLASSES = 10
_COVARIANCE_DECAY = 1.2
_SIZE_LOG_MEAN = 4.0
_SIZE_LOG_SIGMA = 2.0
_SIZE_MINIMUM = 50

FloatArray = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
LabelArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class SyntheticDevice:
    """One device of a synthetic federation: its data and the model that labelled it.

    Parameters
    ----------
    x_train, y_train, x_test, y_test : ndarray
        float32 inputs ``(n, dimension)`` and int64 labels ``(n,)``.
    weight : ndarray of shape (dimension, num_classes)
        ``W_k`` (float64).
    bias : ndarray of shape (num_classes,)
        ``b_k`` (float64).
    input_mean : ndarray of shape (dimension,)
        ``v_k`` (float64).
    """

    x_train: FloatArray
    y_train: LabelArray
    x_test: FloatArray
    y_test: LabelArray
    weight: Float64Array
    bias: Float64Array
    input_mean: Float64Array

    @property
    def num_examples(self) -> int:
        """Train plus test examples."""
        return int(self.y_train.shape[0] + self.y_test.shape[0])


@dataclass(frozen=True)
class SyntheticFederation:
    """A Synthetic(alpha, beta) data set: one :class:`SyntheticDevice` per device.

    Parameters
    ----------
    alpha, beta : float
        The heterogeneity parameters it was drawn with.
    devices : tuple of SyntheticDevice
        The devices, in order.
    dimension, num_classes : int
        Input dimension and number of classes.
    """

    alpha: float
    beta: float
    devices: tuple[SyntheticDevice, ...]
    dimension: int
    num_classes: int

    @property
    def name(self) -> str:
        """``"synthetic(alpha,beta)"``, e.g. ``"synthetic(1,1)"``."""
        return f"synthetic({self.alpha:g},{self.beta:g})"

    def test_union(self) -> tuple[FloatArray, LabelArray]:
        """All devices' test examples, concatenated in device order (the paper's global test set)."""
        x = np.concatenate([d.x_test for d in self.devices]).astype(np.float32, copy=False)
        y = np.concatenate([d.y_test for d in self.devices]).astype(np.int64, copy=False)
        return x, y

    def train_union(self) -> tuple[FloatArray, LabelArray]:
        """All devices' training examples, concatenated in device order."""
        x = np.concatenate([d.x_train for d in self.devices]).astype(np.float32, copy=False)
        y = np.concatenate([d.y_train for d in self.devices]).astype(np.int64, copy=False)
        return x, y


def _positive_int(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{field} must be a positive integer. Found {value!r}.")
    return value


def _non_negative(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{field} must be a finite number of at least 0. Found {value!r}.")
    return float(value)


def synthetic_covariance_diagonal(dimension: int = SYNTHETIC_DIMENSION) -> Float64Array:
    """Return the diagonal of ``Sigma``: ``Sigma_jj = j^-1.2`` for ``j = 1 .. dimension`` (float64)."""
    _positive_int(dimension, "dimension")
    result: Float64Array = np.arange(1, dimension + 1, dtype=np.float64) ** -_COVARIANCE_DECAY
    return result


def synthetic_device_sizes(num_devices: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Draw the devices' numbers of examples: ``floor(LogNormal(4, 2)) + 50``, a heavy (power-law-like) tail.

    This is the authors' generator (``np.random.lognormal(4, 2, NUM_USER).astype(int) + 50``); every device
    has at least 50 examples.
    """
    _positive_int(num_devices, "num_devices")
    draws = rng.lognormal(_SIZE_LOG_MEAN, _SIZE_LOG_SIGMA, num_devices)
    return np.floor(draws).astype(np.int64) + _SIZE_MINIMUM


def synthetic_labels(x: npt.NDArray[Any], weight: npt.NDArray[Any], bias: npt.NDArray[Any]) -> LabelArray:
    """Return ``argmax(softmax(x @ weight + bias))`` row-wise, computed in float64.

    Softmax is increasing in every logit, so this is the index of the largest logit; the exponentials are
    never formed.
    """
    logits: Float64Array = np.asarray(x, dtype=np.float64) @ np.asarray(weight, dtype=np.float64)
    logits += np.asarray(bias, dtype=np.float64)
    labels: LabelArray = logits.argmax(axis=1).astype(np.int64)
    return labels


def synthetic_federation(
    alpha: float,
    beta: float,
    rng: np.random.Generator,
    *,
    num_devices: int = SYNTHETIC_NUM_DEVICES,
    dimension: int = SYNTHETIC_DIMENSION,
    num_classes: int = SYNTHETIC_NUM_CLASSES,
    test_fraction: float = 0.2,
    device_sizes: npt.ArrayLike | None = None,
) -> SyntheticFederation:
    """Draw Synthetic(alpha, beta) of Li et al. (2020), Section 5.1 (see the module docstring).

    Parameters
    ----------
    alpha, beta : float
        Standard deviations of ``u_k`` (model heterogeneity) and ``B_k`` (input heterogeneity), >= 0.
    rng : numpy.random.Generator
        The only source of randomness.
    num_devices, dimension, num_classes : int
        30, 60 and 10 in the paper.
    test_fraction : float
        Fraction of every device's examples held out for testing, in ``[0, 1)``; the test split gets
        ``n_k - floor((1 - test_fraction) * n_k)`` examples (the authors' ``int(0.9 * n)`` rule, at 80/20).
    device_sizes : array-like of int, optional
        Examples per device (train plus test); by default :func:`synthetic_device_sizes`, drawn first from
        ``rng``. Every size must be at least 1, and at least 2 when ``test_fraction > 0``.

    Returns
    -------
    SyntheticFederation
        The devices with their splits and labelling models.

    Raises
    ------
    ConfigError
        If an argument is invalid.
    """
    alpha = _non_negative(alpha, "alpha")
    beta = _non_negative(beta, "beta")
    _positive_int(num_devices, "num_devices")
    _positive_int(dimension, "dimension")
    _positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2. Found {num_classes}.")
    if isinstance(test_fraction, bool) or not (0.0 <= test_fraction < 1.0):
        raise ConfigError(f"test_fraction must be in [0, 1). Found {test_fraction!r}.")
    if device_sizes is None:
        sizes = synthetic_device_sizes(num_devices, rng)
    else:
        sizes = np.asarray(device_sizes)
        if sizes.shape != (num_devices,) or not np.issubdtype(sizes.dtype, np.integer):
            raise ConfigError(
                f"device_sizes must be {num_devices} integers, one per device. Found shape {sizes.shape}, "
                f"dtype {sizes.dtype}."
            )
        smallest = 2 if test_fraction > 0 else 1
        if sizes.min() < smallest:
            raise ConfigError(f"Every device needs at least {smallest} examples. Found {int(sizes.min())}.")
        sizes = sizes.astype(np.int64)

    # Same order of draws as the reference generator: u (= mean of W and b), B, then every v_k.
    model_means = rng.normal(0.0, alpha, num_devices)
    input_mean_centres = rng.normal(0.0, beta, num_devices)
    input_means = rng.normal(input_mean_centres[:, None], 1.0, (num_devices, dimension))
    scale = np.sqrt(synthetic_covariance_diagonal(dimension))

    devices: list[SyntheticDevice] = []
    for k in range(num_devices):
        n = int(sizes[k])
        weight = rng.normal(model_means[k], 1.0, (dimension, num_classes))
        bias = rng.normal(model_means[k], 1.0, num_classes)
        # x ~ N(v_k, diag(Sigma)): independent coordinates, so scale standard normals per coordinate.
        x = (input_means[k] + rng.standard_normal((n, dimension)) * scale).astype(np.float32)
        y = synthetic_labels(x, weight, bias)
        order = rng.permutation(n)
        # The small epsilon keeps e.g. 0.8 * 55 = 44.00000000000001 and 0.8 * 10 = 8 exact under floor.
        num_train = max(1, math.floor((1.0 - test_fraction) * n + 1e-9))
        train, test = order[:num_train], order[num_train:]
        devices.append(
            SyntheticDevice(
                x_train=x[train],
                y_train=y[train],
                x_test=x[test],
                y_test=y[test],
                weight=weight,
                bias=bias,
                input_mean=input_means[k].copy(),
            )
        )
    return SyntheticFederation(
        alpha=alpha, beta=beta, devices=tuple(devices), dimension=dimension, num_classes=num_classes
    )
