"""Tests for flcore.parameters: spec, serde round trip, hostile blobs, streaming reads, helpers."""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from flcore.errors import FlcoreError, SerdeError
from flcore.parameters import (
    MAX_HEADER_BYTES,
    Parameters,
    ParameterSpec,
    TensorSpec,
    add,
    allclose,
    flatten,
    from_bytes,
    iter_file_tensors,
    l2_norm,
    load_file,
    read_header,
    read_metadata,
    scale,
    sha256_hex,
    subtract,
    to_bytes,
    unflatten,
    validate_file,
)

MAX = 10_000_000


def raw_blob(header: dict[str, Any], data: bytes = b"", *, length: int | None = None) -> bytes:
    """Build a safetensors-like blob by hand, optionally lying about the header length."""
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def f32_entry(shape: list[int], begin: int) -> dict[str, Any]:
    size = int(np.prod(shape)) * 4
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + size]}


def expect_code(code: str, data: bytes, **kwargs: Any) -> SerdeError:
    """Expect ``code`` from ``from_bytes`` and the same refusal from ``validate_file`` on that file."""
    max_bytes = kwargs.pop("max_bytes", MAX)
    with pytest.raises(SerdeError) as info:
        from_bytes(data, max_bytes=max_bytes, **kwargs)
    assert info.value.code == code, str(info.value)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "blob.safetensors"
        path.write_bytes(data)
        with pytest.raises(SerdeError) as from_file:
            validate_file(path, max_bytes=max_bytes, **kwargs)
    assert from_file.value.code == code, str(from_file.value)
    if code != "too_large":  # that one names a blob or a file
        assert str(from_file.value) == str(info.value)
    return info.value


# ---- specs ---------------------------------------------------------------------------------------------


def test_parameter_spec_properties_and_json_round_trip(params: Parameters) -> None:
    spec = ParameterSpec.from_parameters(params)

    assert spec.names == ("layer1.weight", "layer0.weight", "layer0.bias")
    assert spec.num_parameters == 12 + 20 + 4
    assert spec.nbytes == 4 * 36
    assert spec.to_json()[0] == {"name": "layer1.weight", "shape": [4, 3], "dtype": "F32"}
    assert ParameterSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    zeros = spec.zeros()
    assert list(zeros) == list(spec.names)
    assert all(z.dtype == np.float32 and not z.any() for z in zeros.values())


@pytest.mark.parametrize(
    "data",
    [
        {"name": "a"},
        [{"name": "a", "shape": [-1]}],
        [{"name": "a", "shape": [2], "dtype": "F64"}],
        [{"name": "a", "shape": [2]}, {"name": "a", "shape": [3]}],
        [{"name": "", "shape": [2]}],
        [{"name": "a", "shape": [2], "extra": 1}],
        [{"name": "a", "shape": [True]}],
        [],
    ],
)
def test_parameter_spec_from_json_rejects_invalid(data: Any) -> None:
    with pytest.raises(SerdeError):
        ParameterSpec.from_json(data)


def test_tensor_spec_rejects_bad_shape() -> None:
    with pytest.raises(SerdeError, match="non-negative"):
        TensorSpec("w", (2, -1))


# ---- round trip ----------------------------------------------------------------------------------------


def test_round_trip_keeps_names_order_values_and_metadata(params: Parameters) -> None:
    data = to_bytes(params, metadata={"round": "3", "training": "abc"})

    loaded = from_bytes(data, max_bytes=MAX)

    assert list(loaded) == list(params)
    for name, array in params.items():
        assert loaded[name].dtype == np.float32
        assert loaded[name].tobytes() == array.tobytes()
        assert loaded[name].flags.writeable
    assert read_metadata(data) == {"round": "3", "training": "abc"}


def test_round_trip_with_spec_returns_spec_order(params: Parameters) -> None:
    spec = ParameterSpec(tuple(reversed(ParameterSpec.from_parameters(params).tensors)))

    loaded = from_bytes(to_bytes(params), spec=spec, max_bytes=MAX)

    assert list(loaded) == list(spec.names)
    loaded["layer0.bias"][0] = 42.0  # writeable


def test_to_bytes_accepts_non_contiguous_float32(params: Parameters) -> None:
    transposed = {"w": params["layer0.weight"].T}

    loaded = from_bytes(to_bytes(transposed), max_bytes=MAX)

    np.testing.assert_array_equal(loaded["w"], params["layer0.weight"].T)


def test_blob_without_order_metadata_uses_storage_order() -> None:
    arrays = {"b": np.ones(2, np.float32), "a": np.zeros(3, np.float32)}
    data = safetensors.numpy.save(arrays)

    loaded = from_bytes(data, max_bytes=MAX)

    assert sorted(loaded) == ["a", "b"]
    np.testing.assert_array_equal(loaded["b"], arrays["b"])


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.float16])
def test_to_bytes_refuses_non_float32(dtype: Any) -> None:
    with pytest.raises(SerdeError) as info:
        to_bytes({"w": np.zeros(3, dtype=dtype)})
    assert info.value.code == "wrong_dtype"
    assert "'w'" in str(info.value)


def test_to_bytes_refuses_reserved_metadata_key_and_empty(params: Parameters) -> None:
    with pytest.raises(SerdeError):
        to_bytes(params, metadata={"flcore.tensor_order": "[]"})
    with pytest.raises(SerdeError) as info:
        to_bytes({})
    assert info.value.code == "empty"


def test_serde_error_is_a_value_error() -> None:
    assert issubclass(SerdeError, FlcoreError)
    assert issubclass(SerdeError, ValueError)


# ---- hostile inputs ------------------------------------------------------------------------------------


def test_empty_blob() -> None:
    expect_code("empty", b"")


def test_shorter_than_length_field() -> None:
    expect_code("bad_header", b"\x01\x02\x03")


def test_truncated_blob(params: Parameters) -> None:
    data = to_bytes(params)
    for cut in (4, 12, len(data) // 2, len(data) - 4):
        expect_code("bad_header", data[:cut])


def test_trailing_bytes(params: Parameters) -> None:
    expect_code("bad_header", to_bytes(params) + b"\x00" * 8)


def test_garbage(rng: np.random.Generator) -> None:
    expect_code("bad_header", rng.bytes(200))
    expect_code("bad_header", struct.pack("<Q", 10) + b"not json!!")
    expect_code("bad_header", struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc")
    expect_code("bad_header", raw_blob([1, 2, 3]))  # type: ignore[arg-type]


def test_header_length_field_lying(params: Parameters) -> None:
    data = to_bytes(params)
    (length,) = struct.unpack("<Q", data[:8])
    expect_code("bad_header", struct.pack("<Q", length + 1000) + data[8:])  # longer than the blob
    expect_code("bad_header", struct.pack("<Q", length - 10) + data[8:])  # cuts the JSON


def test_huge_header_length() -> None:
    error = expect_code("bad_header", struct.pack("<Q", 2**63) + b"{}")
    assert "header length" in str(error)
    too_long = struct.pack("<Q", MAX_HEADER_BYTES + 8) + b" " * (MAX_HEADER_BYTES + 16)
    error = expect_code("bad_header", too_long, max_bytes=len(too_long))
    assert str(MAX_HEADER_BYTES) in str(error)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.float16])
def test_non_f32_tensor_is_rejected(dtype: Any) -> None:
    data = safetensors.numpy.save({"layer0.weight": np.zeros((2, 2), dtype=dtype)})

    error = expect_code("wrong_dtype", data)

    assert "'layer0.weight'" in str(error) and "F32" in str(error)


def test_header_with_no_tensors() -> None:
    expect_code("empty", raw_blob({"__metadata__": {"a": "b"}}))


def test_duplicate_header_keys() -> None:
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    text = b'{"w":' + entry + b',"w":' + entry + b"}"
    expect_code("bad_header", struct.pack("<Q", len(text)) + text + b"\x00" * 4)


def test_inconsistent_offsets_and_shapes() -> None:
    data = b"\x00" * 16
    expect_code("bad_header", raw_blob({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, data))
    overlapping = {"a": f32_entry([2], 0), "b": f32_entry([2], 4)}
    expect_code("bad_header", raw_blob(overlapping, data))
    gap = {"a": f32_entry([1], 0), "b": f32_entry([2], 8)}
    expect_code("bad_header", raw_blob(gap, data))
    expect_code("bad_header", raw_blob({"w": {"dtype": "F32", "shape": [4]}}, data))
    expect_code("bad_header", raw_blob({"w": f32_entry([4], 0), "__metadata__": {"a": 1}}, data))


def test_extra_and_missing_names(params: Parameters) -> None:
    spec = ParameterSpec.from_parameters(params)
    extra = dict(params, surprise=np.zeros(1, np.float32))
    missing = dict(list(params.items())[:2])

    assert "'surprise'" in str(expect_code("name_mismatch", to_bytes(extra), spec=spec))
    assert "'layer0.bias'" in str(expect_code("name_mismatch", to_bytes(missing), spec=spec))


def test_wrong_shape(params: Parameters) -> None:
    spec = ParameterSpec.from_parameters(params)
    wrong = dict(params, **{"layer0.weight": np.zeros((5, 5), np.float32)})

    error = expect_code("shape_mismatch", to_bytes(wrong), spec=spec)

    assert str(error) == "Tensor 'layer0.weight' has shape (5, 5); the model expects (5, 4)."


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(params: Parameters, bad: float) -> None:
    poisoned = {k: v.copy() for k, v in params.items()}
    poisoned["layer0.bias"][2] = bad

    error = expect_code("non_finite", to_bytes(poisoned))

    assert "'layer0.bias'" in str(error)


def test_oversize_blob(params: Parameters) -> None:
    data = to_bytes(params)
    expect_code("too_large", data, max_bytes=len(data) - 1)
    assert from_bytes(data, max_bytes=len(data))


def test_load_file_checks_size_and_content(tmp_path: Path, params: Parameters) -> None:
    path = tmp_path / "update.safetensors"
    path.write_bytes(to_bytes(params))
    spec = ParameterSpec.from_parameters(params)

    assert allclose(load_file(path, spec=spec, max_bytes=MAX), params, atol=0, rtol=0)
    with pytest.raises(SerdeError) as info:
        load_file(path, spec=spec, max_bytes=10)
    assert info.value.code == "too_large"


@pytest.mark.parametrize("sizes", [[3], [5, 70_000, 1], [65_536, 65_537, 131_072, 2]])
def test_validate_file_returns_the_float64_norm(tmp_path: Path, sizes: list[int]) -> None:
    # Tensors shorter than, equal to and longer than the widening block, and values near float32's
    # maximum, whose squares overflow float32 but not float64.
    rng = np.random.default_rng(len(sizes))
    params = {f"t{i}": rng.standard_normal(size).astype(np.float32) for i, size in enumerate(sizes)}
    params["t0"][0] = np.finfo(np.float32).max
    path = tmp_path / "update.safetensors"
    path.write_bytes(to_bytes(params))
    spec = ParameterSpec.from_parameters(params)

    norm = validate_file(path, spec=spec, max_bytes=MAX)

    exact = math.fsum(float(x) ** 2 for a in params.values() for x in a.astype(np.float64))
    assert norm == pytest.approx(math.sqrt(exact), rel=1e-13)
    assert norm == pytest.approx(l2_norm(params), rel=1e-13)
    with pytest.raises(SerdeError) as info:
        validate_file(path, spec=spec, max_bytes=path.stat().st_size - 1)
    assert info.value.code == "too_large"


def test_read_header_from_bytes_and_path(tmp_path: Path, params: Parameters) -> None:
    data = to_bytes(params)
    path = tmp_path / "p.safetensors"
    path.write_bytes(data)

    for header in (read_header(data), read_header(path)):
        assert header["layer0.weight"]["shape"] == [5, 4]
        assert header["layer0.weight"]["dtype"] == "F32"


# ---- streaming -----------------------------------------------------------------------------------------


def test_iter_file_tensors_yields_read_only_zero_copy_views(tmp_path: Path, params: Parameters) -> None:
    path = tmp_path / "p.safetensors"
    path.write_bytes(to_bytes(params))

    seen = dict(iter_file_tensors(path))

    assert set(seen) == set(params)
    for name, view in seen.items():
        np.testing.assert_array_equal(view, params[name])
        assert view.dtype == np.float32
        assert not view.flags.writeable
        assert not view.flags.owndata


def test_iter_file_tensors_rejects_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors.numpy.save({"w": np.zeros(3, np.float64)}))

    with pytest.raises(SerdeError) as info:
        list(iter_file_tensors(path))

    assert info.value.code == "wrong_dtype"


def test_iter_file_tensors_sees_a_file_rewritten_in_place_or_replaced(
    tmp_path: Path, params: Parameters
) -> None:
    # The parsed header is kept per version of a file: a rewrite in place (a new size) and a replacement
    # by rename (a new inode, the same size) must both be mapped with their own header.
    path = tmp_path / "p.safetensors"
    path.write_bytes(to_bytes(params))
    assert set(dict(iter_file_tensors(path))) == set(params)

    other = {"w": np.arange(7, dtype=np.float32)}
    path.write_bytes(to_bytes(other))
    seen = dict(iter_file_tensors(path))
    assert list(seen) == ["w"]
    np.testing.assert_array_equal(seen["w"], other["w"])

    renamed = {name: np.zeros(a.shape, dtype=np.float32) for name, a in params.items()}
    renamed["layer0.weighT"] = renamed.pop("layer0.weight")  # another name of the same length
    assert len(to_bytes(renamed)) == len(to_bytes(params))
    staged = tmp_path / "staged.safetensors"
    path.write_bytes(to_bytes(params))
    dict(iter_file_tensors(path))
    staged.write_bytes(to_bytes(renamed))
    before = path.stat()
    os.utime(staged, ns=(before.st_atime_ns, before.st_mtime_ns))  # only the inode tells them apart
    os.replace(staged, path)
    assert set(dict(iter_file_tensors(path))) == set(renamed)


def test_iter_file_tensors_rejects_a_file_truncated_after_it_was_mapped(
    tmp_path: Path, params: Parameters
) -> None:
    path = tmp_path / "p.safetensors"
    data = to_bytes(params)
    path.write_bytes(data)
    list(iter_file_tensors(path))

    path.write_bytes(data[:-4])

    with pytest.raises(SerdeError) as info:
        list(iter_file_tensors(path))
    assert info.value.code == "bad_header"


# ---- helpers -------------------------------------------------------------------------------------------


def test_arithmetic_helpers(params: Parameters) -> None:
    doubled = add(params, params)
    assert allclose(doubled, scale(params, 2.0), atol=0, rtol=0)
    assert allclose(subtract(doubled, params), params, atol=0, rtol=0)
    assert list(doubled) == list(params)
    assert all(v.dtype == np.float32 for v in doubled.values())
    with pytest.raises(SerdeError):
        add(params, {"layer0.bias": params["layer0.bias"]})


def test_l2_norm_matches_float64_reference(params: Parameters) -> None:
    expected = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in params.values()))

    assert l2_norm(params) == pytest.approx(expected, rel=1e-12)
    assert l2_norm({"a": np.array([3.0, 4.0], np.float32)}) == 5.0


def test_flatten_unflatten_round_trip(params: Parameters) -> None:
    spec = ParameterSpec.from_parameters(params)

    vector = flatten(params)

    assert vector.shape == (spec.num_parameters,)
    np.testing.assert_array_equal(vector[:12], params["layer1.weight"].ravel())
    assert allclose(unflatten(vector, spec), params, atol=0, rtol=0)
    with pytest.raises(SerdeError):
        unflatten(vector[:-1], spec)


def test_allclose_detects_differences(params: Parameters) -> None:
    other = {k: v.copy() for k, v in params.items()}
    other["layer0.bias"][0] += 1.0

    assert not allclose(params, other)
    assert not allclose(params, {"x": np.zeros(1, np.float32)})
    assert allclose(params, {k: v.copy() for k, v in params.items()})


def test_sha256_hex() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    "arrays",
    [
        {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.float32([1.5, -2.0])},
        {"scalar": np.array(3.25, dtype=np.float32), "empty": np.zeros((0, 5), np.float32)},
        {"zé/名": np.ones(7, np.float32), "t": np.arange(6, dtype=np.float32).reshape(2, 3).T},
        {"big-endian": np.arange(5, dtype=">f4").astype(np.float32), "z": np.full(3, np.nan, np.float32)},
    ],
)
def test_to_bytes_writes_files_the_safetensors_library_reads_exactly(arrays: dict[str, Any]) -> None:
    """flcore writes the file itself (one copy, not the library's three): the library's own reader and
    its lazy ``safe_open`` must see every tensor, name, shape and value, and the header padded to 8."""
    from safetensors import safe_open

    data = to_bytes(arrays, metadata={"round": "7"})

    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0
    header = json.loads(data[8 : 8 + length])
    # stored sorted by name, as the library stores float32 tensors: FedAvgAccumulator.add_file's one-pass
    # layout (the writer's order is kept in the metadata instead)
    stored = sorted(
        (entry["data_offsets"][0], name) for name, entry in header.items() if name != "__metadata__"
    )
    assert [name for _, name in stored] == sorted(arrays)
    loaded = safetensors.numpy.load(data)
    assert sorted(loaded) == sorted(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == np.float32 and loaded[name].shape == array.shape
        assert loaded[name].tobytes() == np.asarray(array, dtype="<f4", order="C").tobytes()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "blob.safetensors"
        path.write_bytes(data)
        with safe_open(str(path), framework="numpy") as handle:
            assert handle.metadata()["round"] == "7"
            for name, array in arrays.items():
                np.testing.assert_array_equal(handle.get_tensor(name), array)
    # the same tensors through the library's writer read back to the same values
    reference = safetensors.numpy.load(
        safetensors.numpy.save({k: np.asarray(v, dtype="<f4", order="C") for k, v in arrays.items()})
    )
    for name in arrays:
        assert loaded[name].tobytes() == reference[name].tobytes()
