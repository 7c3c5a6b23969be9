"""Tests for flcore.data: loaders, fixed splits, partitioners and per-client splits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flcore.data import (
    client_split,
    default_mnist_path,
    load_dataset,
    load_digits,
    load_mnist,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from flcore.errors import ConfigError

MNIST_PATH = Path("/work/shared/data/mnist.npz")
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def assert_disjoint_and_covering(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.shape == (n,)
    assert np.array_equal(np.sort(joined), np.arange(n))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def balanced_labels(rng: np.random.Generator, per_class: int = 60, num_classes: int = 10) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


# ---- loaders -------------------------------------------------------------------------------------------


def test_load_digits_shape_and_range() -> None:
    x, y = load_digits()

    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_load_digits_equals_scikit_learns_loader_without_importing_it() -> None:
    from sklearn.datasets import load_digits as sklearn_load_digits

    x, y = load_digits()
    bunch = sklearn_load_digits()

    assert np.array_equal(x, (bunch.data / 16.0).astype(np.float32))
    assert np.array_equal(y, bunch.target)
    # the file is read directly: a fresh interpreter loads digits without scikit-learn in sys.modules
    probe = (
        "import sys; from flcore.data import load_digits; x, y = load_digits(); "
        "assert x.shape == (1797, 64), x.shape; print('sklearn' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_load_digits_falls_back_to_scikit_learn_when_the_file_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flcore.data

    expected = load_digits()
    monkeypatch.setattr(flcore.data, "DIGITS_CSV", "no-such-file.csv.gz")
    assert flcore.data._digits_csv() is None

    x, y = load_digits()

    assert np.array_equal(x, expected[0]) and np.array_equal(y, expected[1])


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    first, second = load_dataset("digits"), load_dataset("digits")
    _, y = load_digits()

    assert first.x_train.shape == (1438, 64) and first.x_test.shape == (359, 64)
    assert np.array_equal(first.x_test, second.x_test) and np.array_equal(first.y_train, second.y_train)
    test_share = np.bincount(first.y_test, minlength=10) / np.bincount(y, minlength=10)
    assert np.all(np.abs(test_share - 0.2) < 0.01)
    train_rows = {row.tobytes() for row in first.x_train}
    assert sum(row.tobytes() in train_rows for row in first.x_test) < 5  # digits has a few duplicate images
    assert (first.num_classes, first.input_dim) == (10, 64)


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError, match="cifar"):
        load_dataset("cifar")


@pytest.mark.skipif(not MNIST_PATH.is_file(), reason="MNIST not available at /work/shared/data/mnist.npz")
def test_load_mnist_real_file() -> None:
    (x_train, y_train), (x_test, y_test) = load_mnist(MNIST_PATH)

    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0
    assert np.bincount(y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(y_test).tolist() == MNIST_TEST_COUNTS
    assert float(x_train.mean()) == pytest.approx(0.1307, abs=1e-3)


def test_load_mnist_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MNIST_PATH"):
        load_mnist(tmp_path / "nope.npz")


def test_load_mnist_small_archive_and_refuses_pickles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = tmp_path / "tiny.npz"
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    np.savez(
        good,
        x_train=images,
        y_train=np.arange(6, dtype=np.uint8),
        x_test=images[:2],
        y_test=np.zeros(2, np.uint8),
    )
    hostile = tmp_path / "hostile.npz"
    np.savez(
        hostile,
        x_train=np.array([{"a": 1}], dtype=object),
        y_train=np.zeros(1),
        x_test=images,
        y_test=np.zeros(6),
    )

    (x_train, y_train), (x_test, _) = load_mnist(good)

    assert x_train.shape == (6, 784) and x_test.shape == (2, 784)
    np.testing.assert_allclose(x_train[1], images[1].ravel() / 255.0, rtol=1e-6)
    assert y_train.tolist() == list(range(6))
    with pytest.raises(ValueError, match="pickle"):
        load_mnist(hostile)


def test_default_mnist_path_honours_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_PATH", "/somewhere/mnist.npz")
    assert default_mnist_path() == Path("/somewhere/mnist.npz")
    monkeypatch.delenv("MNIST_PATH")
    assert default_mnist_path() == Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist.npz"


# ---- partitioners --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(100, 7), (600, 100), (5, 5)])
def test_partition_iid(n: int, k: int, rng: np.random.Generator) -> None:
    parts = partition_iid(n, k, rng)

    assert len(parts) == k
    assert_disjoint_and_covering(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_partition_iid_is_random_but_seeded() -> None:
    a = partition_iid(50, 5, np.random.default_rng(1))
    b = partition_iid(50, 5, np.random.default_rng(1))
    c = partition_iid(50, 5, np.random.default_rng(2))

    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    assert not np.array_equal(a[0], np.arange(10))


@pytest.mark.parametrize("shards_per_client", [2, 3])
def test_partition_shards_gives_at_most_shards_per_client_labels(
    shards_per_client: int, rng: np.random.Generator
) -> None:
    y = balanced_labels(rng, per_class=60)  # 600 examples; shards of 10 or 20 never straddle two labels
    num_clients = 600 // (10 * shards_per_client)

    parts = partition_shards(y, num_clients, shards_per_client, rng)

    assert_disjoint_and_covering(parts, 600)
    assert {len(p) for p in parts} == {600 // num_clients}
    assert all(len(np.unique(y[p])) <= shards_per_client for p in parts)
    assert np.mean([len(np.unique(y[p])) for p in parts]) > 1.2  # shards are dealt at random, not in order


def test_partition_shards_uneven_sizes_still_cover(rng: np.random.Generator) -> None:
    y = rng.integers(0, 10, 1003)

    parts = partition_shards(y, 10, 2, rng)

    assert_disjoint_and_covering(parts, 1003)
    with pytest.raises(ConfigError):
        partition_shards(y[:5], 3, 2, rng)


def mean_max_class_share(y: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts]))


def test_partition_dirichlet_min_size_and_skew(rng: np.random.Generator) -> None:
    y = balanced_labels(rng, per_class=200)

    skewed = partition_dirichlet(y, 10, 0.1, rng, min_size=20)
    uniform = partition_dirichlet(y, 10, 100.0, rng, min_size=20)

    for parts in (skewed, uniform):
        assert_disjoint_and_covering(parts, 2000)
        assert min(len(p) for p in parts) >= 20
    assert mean_max_class_share(y, skewed) > 0.5
    assert mean_max_class_share(y, uniform) < 0.2
    assert mean_max_class_share(y, skewed) > 2 * mean_max_class_share(y, uniform)


def test_partition_dirichlet_impossible_min_size(rng: np.random.Generator) -> None:
    y = balanced_labels(rng, per_class=10)

    with pytest.raises(ConfigError, match="min_size"):
        partition_dirichlet(y, 10, 0.5, rng, min_size=11)
    with pytest.raises(ConfigError, match="alpha"):
        partition_dirichlet(y, 10, 0.0, rng)


def test_partition_dirichlet_is_seeded() -> None:
    y = balanced_labels(np.random.default_rng(0), per_class=50)

    a = partition_dirichlet(y, 5, 0.5, np.random.default_rng(9))
    b = partition_dirichlet(y, 5, 0.5, np.random.default_rng(9))

    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


def test_too_many_clients(rng: np.random.Generator) -> None:
    with pytest.raises(ConfigError, match="clients"):
        partition_iid(3, 4, rng)


# ---- client_split --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_client_split_is_deterministic_and_disjoint(scheme: str) -> None:
    kwargs = {"num_clients": 5, "scheme": scheme, "seed": 42, "eval_fraction": 0.25}

    first = client_split("digits", client_index=1, **kwargs)  # type: ignore[arg-type]
    again = client_split("digits", client_index=1, **kwargs)  # type: ignore[arg-type]
    other = client_split("digits", client_index=2, **kwargs)  # type: ignore[arg-type]

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    x_train, y_train, x_eval, y_eval = first
    assert len(x_train) == len(y_train) and len(x_eval) == len(y_eval)
    assert len(x_eval) == round(0.25 * (len(x_train) + len(x_eval)))
    mine = {row.tobytes() for row in np.concatenate([x_train, x_eval])}
    theirs = [row.tobytes() for row in np.concatenate([other[0], other[2]])]
    assert sum(row in mine for row in theirs) <= 5  # only digits' few duplicate images may coincide


def test_client_split_covers_the_train_split() -> None:
    total = 0
    for index in range(4):
        x_train, _, x_eval, _ = client_split(
            "digits", num_clients=4, client_index=index, scheme="iid", seed=0
        )
        total += len(x_train) + len(x_eval)

    assert total == 1438


def test_client_split_validates_arguments() -> None:
    with pytest.raises(ConfigError, match="scheme"):
        client_split("digits", num_clients=2, client_index=0, scheme="pathological", seed=0)
    with pytest.raises(ConfigError, match="client_index"):
        client_split("digits", num_clients=2, client_index=2, scheme="iid", seed=0)
    with pytest.raises(ConfigError, match="eval_fraction"):
        client_split("digits", num_clients=2, client_index=0, scheme="iid", seed=0, eval_fraction=1.0)
