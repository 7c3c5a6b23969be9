"""Stored updates mapped side by side as one matrix (flcore.stacked_files), and the rules read through it."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest

from flcore.errors import SerdeError
from flcore.parameters import ParameterSpec, iter_file_tensors, to_bytes
from flcore.stacked_files import StackedFiles, map_files_stacked
from flcore.strategies.base import FlatLayout
from flcore.strategies.krum import Krum
from flcore.strategies.median import CoordinateMedian
from flcore.strategies.trimmed_mean import TrimmedMean

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="map_files_stacked maps side by side on Linux"
)

# Storage order (safetensors sorts by name) differs from the model order here, and the sizes are not
# multiples of a page, so the offsets and the stride both matter.
SHAPES = {"layer1.weight": (37, 23), "layer1.bias": (23,), "layer0.weight": (11, 37), "head": (5,)}


def _write(tmp_path: Path, n: int, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], list[Path]]:
    rng = np.random.default_rng(seed)
    updates, paths = [], []
    for i in range(n):
        update = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
        path = tmp_path / f"update-{i}.safetensors"
        path.write_bytes(to_bytes(update))
        updates.append(update)
        paths.append(path)
    return updates, paths


def _mappings_of(directory: Path) -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if str(directory) in line)


def test_every_row_is_its_file(tmp_path: Path) -> None:
    updates, paths = _write(tmp_path, 7)

    stacked = map_files_stacked(paths)

    assert isinstance(stacked, StackedFiles)
    assert len(stacked) == 7
    assert stacked.matrix.shape == (7, sum(int(np.prod(s)) for s in SHAPES.values()))
    for update, row in zip(updates, stacked, strict=True):
        assert set(row) == set(update)
        for name, values in update.items():
            np.testing.assert_array_equal(row[name], values)
    np.testing.assert_array_equal(stacked[-1]["head"], updates[-1]["head"])
    np.testing.assert_array_equal(stacked[2:4][1]["layer1.bias"], updates[3]["layer1.bias"])


def test_the_matrix_is_read_only_and_unmapped_with_its_last_view(tmp_path: Path) -> None:
    _, paths = _write(tmp_path, 3)
    stacked = map_files_stacked(paths)
    assert stacked is not None
    view = stacked[1]["layer0.weight"]
    assert not stacked.matrix.flags.writeable and not view.flags.writeable
    with pytest.raises(ValueError):
        stacked.matrix.flags.writeable = True
    with pytest.raises(ValueError):
        view[0, 0] = 1.0
    assert _mappings_of(tmp_path) == 3

    del stacked
    gc.collect()
    assert _mappings_of(tmp_path) == 3  # the view keeps the whole range alive
    del view
    gc.collect()
    assert _mappings_of(tmp_path) == 0


def test_files_of_different_layouts_are_not_stacked(tmp_path: Path) -> None:
    _, paths = _write(tmp_path, 3)
    other = tmp_path / "other.safetensors"
    other.write_bytes(
        to_bytes({name: np.zeros(shape, np.float32) for name, shape in reversed(SHAPES.items())})
    )
    bigger = tmp_path / "bigger.safetensors"
    bigger.write_bytes(to_bytes({"head": np.zeros(6, np.float32)}))

    assert map_files_stacked([*paths, bigger]) is None
    assert map_files_stacked([]) is None
    stacked = map_files_stacked([*paths, other])  # the same names, shapes and offsets: the same layout
    assert stacked is not None and len(stacked) == 4
    assert _mappings_of(tmp_path) == 4
    del stacked
    gc.collect()
    assert _mappings_of(tmp_path) == 0  # nothing is left mapped when it gives up either


def test_a_malformed_file_raises_as_when_mapped_alone(tmp_path: Path) -> None:
    _, paths = _write(tmp_path, 2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(paths[0].read_bytes()[:-4])

    with pytest.raises(SerdeError) as info:
        map_files_stacked([*paths, bad])
    assert info.value.code == "bad_header"


@pytest.mark.parametrize("n", [1, 2, 9, 10, 101])
def test_coordinate_rules_read_through_the_matrix_equal_the_float64_brute_force(
    tmp_path: Path, n: int
) -> None:
    updates, paths = _write(tmp_path, n, seed=n)
    stacked = map_files_stacked(paths)
    assert stacked is not None
    spec = ParameterSpec.from_parameters(updates[0])
    layout = FlatLayout(spec)
    flat = np.stack([np.concatenate([u[t.name].reshape(-1) for t in spec.tensors]) for u in updates])
    flat64 = flat.astype(np.float64)
    weights = np.ones(n)
    cut = int(0.2 * n)
    ordered = np.sort(flat64, axis=0)
    expected = {
        "median": np.median(flat64, axis=0).astype(np.float32),
        "trimmed": ordered[cut : n - cut].mean(axis=0).astype(np.float32),
    }

    for start, stop in [(0, spec.num_parameters), (3, 900), (spec.num_parameters - 7, spec.num_parameters)]:
        median = CoordinateMedian().range_combine(layout, stacked, start, stop, weights)
        np.testing.assert_array_equal(median, expected["median"][start:stop])
        if cut == 0:
            continue  # below 5 updates a 20% trim cuts nothing, which the rule refuses
        trimmed = TrimmedMean(trim_fraction=0.2).range_combine(layout, stacked, start, stop, weights)
        np.testing.assert_allclose(trimmed, expected["trimmed"][start:stop], rtol=1e-6, atol=1e-7)


def test_krum_statistics_and_row_gathers_through_the_matrix_equal_the_files_mapped_one_by_one(
    tmp_path: Path,
) -> None:
    updates, paths = _write(tmp_path, 8)
    stacked = map_files_stacked(paths)
    assert stacked is not None
    one_by_one = [dict(iter_file_tensors(path)) for path in paths]
    layout = FlatLayout(ParameterSpec.from_parameters(updates[0]))
    total = layout.spec.num_parameters

    np.testing.assert_array_equal(layout.stack(stacked, 5, total - 3), layout.stack(one_by_one, 5, total - 3))
    rows = [1, 6]
    np.testing.assert_array_equal(
        layout.stack(stacked, 0, total, rows=rows)[rows], layout.stack(one_by_one, 0, total, rows=rows)[rows]
    )
    krum = Krum(num_malicious=2)
    np.testing.assert_array_equal(
        krum.range_statistics(layout, stacked, 0, total), krum.range_statistics(layout, one_by_one, 0, total)
    )
