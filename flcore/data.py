"""Data sets, federated partitions and per-client splits.

Invariants:

- Inputs are float32 in ``[0, 1]`` of shape ``(n, input_dim)``; labels are int64 in ``[0, num_classes)``.
- Data is only ever read from local files (MNIST from an ``.npz`` read with ``allow_pickle=False``, digits
  from scikit-learn's bundled copy); nothing is downloaded.
- The digits train/test split is fixed (stratified 80/20, seed 0), so every process agrees on it.
- Every partitioner returns disjoint index arrays (each sorted ascending) that together cover all examples;
  all randomness comes from the ``rng`` argument, so the same seed gives the same partition in every
  process.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from flcore.errors import ConfigError

__all__ = [
    "DATASETS",
    "PARTITION_SCHEMES",
    "Dataset",
    "client_split",
    "default_mnist_path",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
]

DATASETS = ("digits", "mnist")
#: The digits file inside scikit-learn's package (``sklearn/datasets/data/``).
DIGITS_CSV = "digits.csv.gz"
PARTITION_SCHEMES = ("iid", "dirichlet", "shards")
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2
_MAX_DIRICHLET_ATTEMPTS = 1000

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]
IndexArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Dataset:
    """A classification data set with its train/test split.

    Parameters
    ----------
    name : str
        ``"digits"`` or ``"mnist"``.
    x_train, y_train, x_test, y_test : ndarray
        float32 inputs ``(n, input_dim)`` in ``[0, 1]`` and int64 labels ``(n,)``.
    num_classes : int
        Number of classes.
    input_dim : int
        Number of input features.
    """

    name: str
    x_train: FloatArray
    y_train: LabelArray
    x_test: FloatArray
    y_test: LabelArray
    num_classes: int
    input_dim: int


def _digits_csv() -> Path | None:
    """The path of scikit-learn's ``digits.csv.gz``, found without importing scikit-learn (or None)."""
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "datasets" / "data" / DIGITS_CSV
        if path.is_file():
            return path
    return None


def load_digits() -> tuple[FloatArray, LabelArray]:
    """Return scikit-learn's bundled 8x8 digits: x float32 ``(1797, 64)`` in ``[0, 1]``, y int64.

    Read straight from the CSV that scikit-learn ships, as ``sklearn.datasets.load_digits`` reads it (64
    pixel columns then the label, integers), without importing scikit-learn: that import costs about a
    CPU-second, paid by every agent process of a demo. Falls back to scikit-learn's loader when the file
    is not where its package keeps it.
    """
    path = _digits_csv()
    if path is None:
        from sklearn.datasets import load_digits as sklearn_load_digits  # heavy import

        bunch = sklearn_load_digits()
        pixels, target = np.asarray(bunch.data), np.asarray(bunch.target)
    else:
        with gzip.open(path, "rt", encoding="ascii") as handle:
            data = np.loadtxt(handle, delimiter=",", dtype=np.float64)
        pixels, target = data[:, :-1], data[:, -1]
    x = (np.asarray(pixels, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    y = np.asarray(target, dtype=np.int64)
    return x, y


def default_mnist_path() -> Path:
    """Return ``$MNIST_PATH`` if set, else ``<project root>/../shared/data/mnist.npz``."""
    env = os.environ.get("MNIST_PATH")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


def load_mnist(
    path: str | os.PathLike[str],
) -> tuple[tuple[FloatArray, LabelArray], tuple[FloatArray, LabelArray]]:
    """Load MNIST from an ``.npz`` with uint8 ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    Images are flattened to 784 features and scaled by 1/255 to float32; labels become int64.

    Returns
    -------
    tuple
        ``((x_train, y_train), (x_test, y_test))``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (the message says how to point to the file).
    ConfigError
        If the archive lacks a key or has unexpected shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST file not found at {str(path)!r}. Pass mnist_path or set the MNIST_PATH environment "
            "variable to an .npz with x_train, y_train, x_test, y_test (data is never downloaded)."
        )
    with np.load(path, allow_pickle=False) as archive:
        missing = sorted({"x_train", "y_train", "x_test", "y_test"} - set(archive.files))
        if missing:
            raise ConfigError(f"MNIST archive {str(path)!r} lacks key(s) {missing}.")
        splits = []
        for split in ("train", "test"):
            images = archive[f"x_{split}"]
            labels = archive[f"y_{split}"]
            if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
                raise ConfigError(
                    f"MNIST {split} images have shape {images.shape} and labels {labels.shape}; expected "
                    "(n, 28, 28) and (n,)."
                )
            x = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
            splits.append((x.astype(np.float32, copy=False), labels.astype(np.int64)))
    return splits[0], splits[1]


def _stratified_split(
    y: LabelArray, test_fraction: float, rng: np.random.Generator
) -> tuple[IndexArray, IndexArray]:
    """Return sorted (train, test) indices with ``round(test_fraction * n_c)`` test examples of each class."""
    train_parts, test_parts = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_test = round(test_fraction * members.shape[0])
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))


def load_dataset(name: str, *, mnist_path: str | os.PathLike[str] | None = None) -> Dataset:
    """Load a data set with its fixed train/test split.

    ``"digits"`` is split 80/20, stratified by class, with seed 0; ``"mnist"`` uses the official 60k/10k
    split and is read from ``mnist_path`` (default: :func:`default_mnist_path`).

    Raises
    ------
    ConfigError
        If ``name`` is unknown.
    """
    if name == "digits":
        x, y = load_digits()
        train, test = _stratified_split(y, _DIGITS_TEST_FRACTION, np.random.default_rng(_DIGITS_SPLIT_SEED))
        return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10, input_dim=64)
    if name == "mnist":
        (x_train, y_train), (x_test, y_test) = load_mnist(mnist_path or default_mnist_path())
        return Dataset("mnist", x_train, y_train, x_test, y_test, num_classes=10, input_dim=784)
    raise ConfigError(f"Unknown data set {name!r}; expected one of {list(DATASETS)}.")


# --------------------------------------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------------------------------------


def _check_num_clients(num_clients: int, num_examples: int) -> None:
    if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
        raise ConfigError(f"num_clients must be a positive integer. Found {num_clients!r}.")
    if num_clients > num_examples:
        raise ConfigError(
            f"Cannot split {num_examples} examples among {num_clients} clients; expected at most one client "
            "per example."
        )


def _labels(y: npt.NDArray[Any]) -> LabelArray:
    labels = np.asarray(y)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"Labels must be a 1-D integer array. Found shape {labels.shape}, dtype {labels.dtype}."
        )
    return labels.astype(np.int64, copy=False)


def partition_iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[IndexArray]:
    """Split ``range(num_examples)`` at random into ``num_clients`` parts whose sizes differ by <= 1.

    This is the IID setting of McMahan et al. (2017), section 3 (e.g. MNIST: 100 clients of 600 examples).
    """
    _check_num_clients(num_clients, num_examples)
    permutation = rng.permutation(num_examples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(permutation, num_clients)]


def partition_dirichlet(
    y: npt.NDArray[np.integer[Any]],
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
) -> list[IndexArray]:
    """Split examples among clients with per-class proportions drawn from ``Dirichlet(alpha)``.

    Label-skew partition of Hsu et al. (2019), "Measuring the Effects of Non-Identical Data Distribution
    for Federated Visual Classification", section 3: for each class ``c``, ``p_c ~ Dir(alpha * 1)`` over the
    clients and the class's examples are dealt out in those proportions. As in the NIID-Bench implementation
    (Li et al. 2022, "Federated Learning on Non-IID Data Silos: An Experimental Study"), clients that already
    hold ``n / num_clients`` examples get no more of later classes. The draw is repeated until every client
    has at least ``min_size`` examples. Smaller ``alpha`` means more skew.

    Raises
    ------
    ConfigError
        If ``alpha`` is not positive, ``min_size * num_clients > n``, or no valid draw is found in
        1000 attempts (lower ``min_size`` or raise ``alpha``).
    """
    labels = _labels(y)
    n = labels.shape[0]
    _check_num_clients(num_clients, n)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be positive and finite. Found {alpha!r}.")
    if not isinstance(min_size, int) or min_size < 0:
        raise ConfigError(f"min_size must be a non-negative integer. Found {min_size!r}.")
    if min_size * num_clients > n:
        raise ConfigError(
            f"Cannot give each of {num_clients} clients at least {min_size} examples from {n}; lower "
            "min_size or num_clients."
        )
    classes = np.unique(labels)
    for _ in range(_MAX_DIRICHLET_ATTEMPTS):
        parts: list[list[IndexArray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            proportions = proportions * (sizes < n / num_clients)
            if proportions.sum() <= 0:
                proportions = np.full(num_clients, 1.0)
            proportions = proportions / proportions.sum()
            cuts = (np.cumsum(proportions) * members.shape[0]).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
                sizes[client] += chunk.shape[0]
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise ConfigError(
        f"No Dirichlet(alpha={alpha}) partition gave all {num_clients} clients at least {min_size} examples "
        f"in {_MAX_DIRICHLET_ATTEMPTS} attempts; lower min_size or raise alpha."
    )


def partition_shards(
    y: npt.NDArray[np.integer[Any]], num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[IndexArray]:
    """Pathological non-IID split: sort by label, cut into equal shards, deal shards at random.

    McMahan et al. (2017), section 3: "sort the data by digit label, divide it into 200 shards of size 300,
    and assign each of 100 clients 2 shards". Here ``num_clients * shards_per_client`` shards are made
    (sizes differ by at most 1 when ``n`` is not divisible) and each client receives ``shards_per_client``
    random shards. Ties in the sort are broken by index (stable), so the result depends only on ``rng``.

    Raises
    ------
    ConfigError
        If ``shards_per_client`` < 1 or there are fewer examples than shards.
    """
    labels = _labels(y)
    n = labels.shape[0]
    if not isinstance(shards_per_client, int) or shards_per_client < 1:
        raise ConfigError(f"shards_per_client must be a positive integer. Found {shards_per_client!r}.")
    _check_num_clients(num_clients, n)
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ConfigError(f"Cannot cut {n} examples into {num_shards} non-empty shards; use fewer shards.")
    order = np.argsort(labels, kind="stable").astype(np.int64)
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards)
    return [
        np.sort(
            np.concatenate(
                [shards[s] for s in assignment[c * shards_per_client : (c + 1) * shards_per_client]]
            )
        )
        for c in range(num_clients)
    ]


def client_split(
    name: str,
    *,
    num_clients: int,
    client_index: int,
    scheme: str,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int,
    eval_fraction: float = 0.2,
    mnist_path: str | os.PathLike[str] | None = None,
) -> tuple[FloatArray, LabelArray, FloatArray, LabelArray]:
    """Return one client's private data: its part of the train split, divided into local train and eval.

    The train split of data set ``name`` is partitioned with ``scheme`` using
    ``numpy.random.default_rng(seed)``, so every process computes the same partition. Then client
    ``client_index``'s examples are shuffled with ``default_rng([seed, client_index])`` and the first
    ``round(eval_fraction * n_k)`` become its held-out evaluation set.

    Parameters
    ----------
    name : str
        ``"digits"`` or ``"mnist"``.
    num_clients : int
        Number of clients in the federation.
    client_index : int
        This client, ``0 <= client_index < num_clients``.
    scheme : {"iid", "dirichlet", "shards"}
        Partitioner (see :func:`partition_iid`, :func:`partition_dirichlet`, :func:`partition_shards`).
    alpha : float
        Dirichlet concentration for ``"dirichlet"``.
    shards_per_client : int
        Shards per client for ``"shards"``.
    seed : int
        Seed shared by all clients.
    eval_fraction : float
        Fraction of the client's examples held out, in ``[0, 1)``.
    mnist_path : path, optional
        MNIST file for ``"mnist"``.

    Returns
    -------
    tuple
        ``(x_train, y_train, x_eval, y_eval)``.

    Raises
    ------
    ConfigError
        If an argument is invalid.
    """
    if scheme not in PARTITION_SCHEMES:
        raise ConfigError(f"Unknown partition scheme {scheme!r}; expected one of {list(PARTITION_SCHEMES)}.")
    if not isinstance(client_index, int) or not 0 <= client_index < num_clients:
        raise ConfigError(f"client_index must be in [0, {num_clients - 1}]. Found {client_index!r}.")
    if not (0.0 <= eval_fraction < 1.0):
        raise ConfigError(f"eval_fraction must be in [0, 1). Found {eval_fraction!r}.")
    dataset = load_dataset(name, mnist_path=mnist_path)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = partition_iid(dataset.y_train.shape[0], num_clients, rng)
    elif scheme == "dirichlet":
        parts = partition_dirichlet(dataset.y_train, num_clients, alpha, rng)
    else:
        parts = partition_shards(dataset.y_train, num_clients, shards_per_client, rng)
    local = np.random.default_rng([seed, client_index]).permutation(parts[client_index])
    n_eval = round(eval_fraction * local.shape[0])
    eval_idx, train_idx = np.sort(local[:n_eval]), np.sort(local[n_eval:])
    return (
        dataset.x_train[train_idx],
        dataset.y_train[train_idx],
        dataset.x_train[eval_idx],
        dataset.y_train[eval_idx],
    )
