"""Model parameters, their specification and their safetensors wire format.

Invariants:

- :data:`Parameters` is an insertion-ordered ``dict[str, ndarray]`` of float32 arrays; the helpers here
  never mutate their arguments and return new arrays in the order of their first argument.
- :func:`to_bytes` writes only float32, C-contiguous, little-endian tensors (safetensors dtype ``F32``) and
  records the tensor order in the reserved metadata key :data:`ORDER_METADATA_KEY`, because safetensors
  itself stores tensors sorted by name.
- :func:`from_bytes` and :func:`load_file` never materialise a blob before its size, its header (parsed
  here with ``struct`` and ``json``), its dtypes and, when a spec is given, its names and shapes have been
  checked; every result they return is writeable float32 and finite. Every rejection is a
  :class:`~flcore.errors.SerdeError` with a machine-readable ``code``. :func:`validate_file` makes the
  same checks on a file without materialising it and returns its L2 norm.
- :func:`iter_file_tensors` yields read-only, zero-copy views of a memory-mapped file; it checks the header
  but not the values, so it is meant for blobs already validated at upload.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import numpy as np
import numpy.typing as npt
import safetensors.numpy

from flcore.errors import SerdeError

__all__ = [
    "MAX_HEADER_BYTES",
    "ORDER_METADATA_KEY",
    "ParameterSpec",
    "Parameters",
    "TensorSpec",
    "add",
    "allclose",
    "flatten",
    "from_bytes",
    "iter_file_tensors",
    "l2_norm",
    "load_file",
    "read_header",
    "read_metadata",
    "scale",
    "sha256_hex",
    "subtract",
    "to_bytes",
    "unflatten",
    "validate_file",
]

Parameters: TypeAlias = dict[str, npt.NDArray[np.float32]]
"""Model parameters: tensor name to float32 array, in the model's order."""

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest safetensors JSON header accepted (16 MiB); a longer length field is treated as hostile."""

ORDER_METADATA_KEY = "flcore.tensor_order"
"""Reserved ``__metadata__`` key holding the JSON list of tensor names in their original order."""

_SUPPORTED_DTYPE = "F32"
_ITEMSIZE = 4
_LITTLE_F32 = np.dtype("<f4")
_HEADER_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


# --------------------------------------------------------------------------------------------------------
# Specifications
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one parameter tensor.

    Parameters
    ----------
    name : str
        Tensor name, e.g. ``"layer0.weight"``.
    shape : tuple of int
        Tensor shape; every dimension is a non-negative int.
    dtype : str
        safetensors dtype string; only ``"F32"`` is supported.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = _SUPPORTED_DTYPE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SerdeError("bad_header", f"A tensor name must be a non-empty string. Found {self.name!r}.")
        if self.name == "__metadata__":
            raise SerdeError(
                "bad_header", "'__metadata__' is reserved by safetensors and cannot name a tensor."
            )
        if not isinstance(self.shape, tuple) or not all(_is_int(d) and d >= 0 for d in self.shape):
            raise SerdeError(
                "shape_mismatch",
                f"Tensor {self.name!r} has shape {self.shape!r}; expected a tuple of non-negative ints.",
            )
        if self.dtype != _SUPPORTED_DTYPE:
            raise SerdeError(
                "wrong_dtype", f"Tensor {self.name!r} has dtype {self.dtype!r}; only 'F32' is supported."
            )

    @property
    def num_parameters(self) -> int:
        """Number of scalar values in the tensor."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParameterSpec:
    """Ordered list of tensor specifications describing a model's parameters.

    Parameters
    ----------
    tensors : tuple of TensorSpec
        The tensors, in model order; names are unique and there is at least one tensor.
    """

    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, tuple) or not all(isinstance(t, TensorSpec) for t in self.tensors):
            raise SerdeError("bad_header", "ParameterSpec.tensors must be a tuple of TensorSpec.")
        if not self.tensors:
            raise SerdeError("empty", "A ParameterSpec needs at least one tensor; found none.")
        seen: set[str] = set()
        for tensor in self.tensors:
            if tensor.name in seen:
                raise SerdeError("name_mismatch", f"Tensor name {tensor.name!r} appears more than once.")
            seen.add(tensor.name)

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names in model order."""
        return tuple(t.name for t in self.tensors)

    @property
    def num_parameters(self) -> int:
        """Total number of scalar parameters."""
        return sum(t.num_parameters for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Size of the raw tensor data in bytes (float32)."""
        return self.num_parameters * _ITEMSIZE

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Return the shape of the tensor called ``name``.

        Raises
        ------
        SerdeError
            With code ``"name_mismatch"`` if there is no such tensor.
        """
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor.shape
        raise SerdeError("name_mismatch", f"Tensor {name!r} is not part of the model; expected {self.names}.")

    @classmethod
    def from_parameters(cls, params: Mapping[str, npt.NDArray[Any]]) -> ParameterSpec:
        """Describe existing parameters (names in their order, shapes, dtype F32)."""
        return cls(
            tuple(TensorSpec(str(name), tuple(int(d) for d in np.shape(a))) for name, a in params.items())
        )

    def to_json(self) -> list[dict[str, Any]]:
        """Return a JSON-serialisable list ``[{"name": ..., "shape": [...], "dtype": "F32"}, ...]``."""
        return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors]

    @classmethod
    def from_json(cls, data: Any) -> ParameterSpec:
        """Build and validate a spec from the output of :meth:`to_json`.

        Raises
        ------
        SerdeError
            If ``data`` is not a list of ``{"name", "shape", "dtype"}`` objects with valid values.
        """
        if not isinstance(data, list):
            raise SerdeError(
                "bad_header", f"A parameter spec must be a JSON list; found {type(data).__name__}."
            )
        tensors = []
        for i, item in enumerate(data):
            if (
                not isinstance(item, dict)
                or set(item) - {"name", "shape", "dtype"}
                or not {"name", "shape"} <= set(item)
            ):
                raise SerdeError(
                    "bad_header",
                    f"Parameter spec entry {i} must be an object with keys 'name', 'shape' and optional "
                    f"'dtype'; found {item!r}.",
                )
            shape = item["shape"]
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise SerdeError(
                    "shape_mismatch",
                    f"Tensor {item['name']!r} has shape {shape!r}; expected a list of non-negative ints.",
                )
            tensors.append(TensorSpec(item["name"], tuple(shape), item.get("dtype", _SUPPORTED_DTYPE)))
        return cls(tuple(tensors))

    def zeros(self) -> Parameters:
        """Return new zero-filled float32 parameters matching this spec."""
        return {t.name: np.zeros(t.shape, dtype=np.float32) for t in self.tensors}

    def validate(self, params: Mapping[str, npt.NDArray[Any]]) -> None:
        """Check that ``params`` has exactly this spec's names and shapes.

        Raises
        ------
        SerdeError
            With code ``"name_mismatch"`` or ``"shape_mismatch"``.
        """
        self.validate_shapes({name: tuple(np.shape(array)) for name, array in params.items()})

    def validate_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Check that ``shapes`` (tensor name to shape) has exactly this spec's names and shapes.

        Raises
        ------
        SerdeError
            With code ``"name_mismatch"`` or ``"shape_mismatch"``.
        """
        _check_names(self, list(shapes))
        for t in self.tensors:
            _check_shape(t, tuple(shapes[t.name]))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_names(spec: ParameterSpec, names: list[str]) -> None:
    expected = set(spec.names)
    found = set(names)
    missing = [n for n in spec.names if n not in found]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {missing}")
        if extra:
            parts.append(f"unexpected tensor(s) {extra}")
        raise SerdeError(
            "name_mismatch",
            f"The parameters have {' and '.join(parts)}; the model expects {list(spec.names)}.",
        )


def _check_shape(tensor: TensorSpec, shape: tuple[int, ...]) -> None:
    if shape != tensor.shape:
        raise SerdeError(
            "shape_mismatch", f"Tensor {tensor.name!r} has shape {shape}; the model expects {tensor.shape}."
        )


# --------------------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HeaderEntry:
    name: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Header:
    entries: tuple[_HeaderEntry, ...]  # in storage (offset) order
    metadata: dict[str, str]
    raw: dict[str, Any]
    data_start: int

    def ordered_names(self) -> list[str]:
        """Names in the writer's order when recorded and consistent, else in storage order."""
        storage = [e.name for e in self.entries]
        recorded = self.metadata.get(ORDER_METADATA_KEY)
        if recorded is not None:
            try:
                order = json.loads(recorded)
            except json.JSONDecodeError:
                order = None
            if isinstance(order, list) and sorted(order) == sorted(storage) and len(set(order)) == len(order):
                return [str(n) for n in order]
        return storage


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise SerdeError("bad_header", f"The safetensors header names {key!r} more than once.")
        result[key] = value
    return result


def _header_length(prefix: bytes, total_size: int) -> int:
    if total_size == 0:
        raise SerdeError("empty", "The parameter blob is empty; expected a safetensors file.")
    if total_size < 8:
        raise SerdeError(
            "bad_header",
            f"The parameter blob is {total_size} bytes long; a safetensors file starts with an 8-byte header "
            "length.",
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise SerdeError(
            "bad_header",
            f"The safetensors header length field says {length} bytes; "
            f"at most {MAX_HEADER_BYTES} is accepted.",
        )
    if length > total_size - 8:
        raise SerdeError(
            "bad_header",
            f"The safetensors header length field says {length} bytes but only {total_size - 8} bytes follow "
            "it; the blob is truncated or not safetensors.",
        )
    if length < 2:
        raise SerdeError("bad_header", f"The safetensors header length field says {length} bytes; too short.")
    return int(length)


def _parse_header(header_bytes: bytes, total_size: int) -> _Header:
    data_start = 8 + len(header_bytes)
    try:
        raw = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SerdeError("bad_header", f"The safetensors header is not valid UTF-8 JSON: {exc}.") from None
    if not isinstance(raw, dict):
        raise SerdeError(
            "bad_header", f"The safetensors header must be a JSON object; found {type(raw).__name__}."
        )
    metadata_raw = raw.get("__metadata__", {})
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise SerdeError("bad_header", "The safetensors '__metadata__' must map strings to strings.")
    entries = []
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != _HEADER_FIELDS:
            raise SerdeError(
                "bad_header",
                f"Tensor {name!r} has header entry {info!r}; expected an object with exactly "
                "'dtype', 'shape' and 'data_offsets'.",
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise SerdeError(
                "bad_header", f"Tensor {name!r} has shape {shape!r}; expected non-negative ints."
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise SerdeError(
                "bad_header",
                f"Tensor {name!r} has data_offsets {offsets!r}; expected [begin, end], 0 <= begin <= end.",
            )
        if dtype != _SUPPORTED_DTYPE:
            raise SerdeError(
                "wrong_dtype", f"Tensor {name!r} has dtype {dtype!r}; only 'F32' (float32) is accepted."
            )
        expected_bytes = math.prod(shape) * _ITEMSIZE
        if offsets[1] - offsets[0] != expected_bytes:
            raise SerdeError(
                "bad_header",
                f"Tensor {name!r} has shape {tuple(shape)} ({expected_bytes} bytes of F32) "
                f"but its data_offsets span {offsets[1] - offsets[0]} bytes.",
            )
        entries.append(_HeaderEntry(name, tuple(shape), offsets[0], offsets[1]))
    if not entries:
        raise SerdeError("empty", "The safetensors file holds no tensors; expected the model's parameters.")
    entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            raise SerdeError(
                "bad_header",
                f"Tensor {entry.name!r} starts at byte {entry.begin} of the data section; "
                f"expected {position} (tensors must be packed without gaps or overlaps).",
            )
        position = entry.end
    data_size = total_size - data_start
    if position != data_size:
        raise SerdeError(
            "bad_header",
            f"The tensors cover {position} bytes but the data section holds {data_size} bytes; the blob is "
            "truncated or has trailing bytes.",
        )
    return _Header(tuple(entries), dict(metadata_raw), raw, data_start)


def _header_from_bytes(data: bytes) -> _Header:
    length = _header_length(data[:8], len(data))
    return _parse_header(bytes(data[8 : 8 + length]), len(data))


def _header_from_handle(handle: BinaryIO, total_size: int) -> _Header:
    """Read and validate the header of the file open at its start, whose size is ``total_size``."""
    return _parse_header(handle.read(_header_length(handle.read(8), total_size)), total_size)


def _header_from_path(path: str | os.PathLike[str]) -> _Header:
    with open(path, "rb") as handle:
        return _header_from_handle(handle, os.fstat(handle.fileno()).st_size)


def read_header(data_or_path: bytes | str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and validate the JSON header of a safetensors blob or file without reading tensor data.

    Parameters
    ----------
    data_or_path : bytes or path
        The blob itself, or the path of a file (of which only the header is read).

    Returns
    -------
    dict
        The header as decoded JSON: tensor name to ``{"dtype", "shape", "data_offsets"}``, plus
        ``"__metadata__"`` when present.

    Raises
    ------
    SerdeError
        If the header is malformed, holds no tensors or a tensor is not F32.
    """
    if isinstance(data_or_path, bytes | bytearray | memoryview):
        return _header_from_bytes(bytes(data_or_path)).raw
    return _header_from_path(data_or_path).raw


def read_metadata(data_or_path: bytes | str | os.PathLike[str]) -> dict[str, str]:
    """Return the user metadata stored by :func:`to_bytes` (without flcore's reserved keys)."""
    header = read_header(data_or_path)
    metadata: dict[str, str] = header.get("__metadata__", {})
    return {k: v for k, v in metadata.items() if k != ORDER_METADATA_KEY}


# --------------------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------------------


def to_bytes(params: Mapping[str, npt.NDArray[Any]], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise float32 parameters to safetensors bytes, keeping their order.

    Parameters
    ----------
    params : mapping of str to ndarray
        Float32 tensors; any memory layout is accepted (a C-contiguous little-endian copy is written).
    metadata : dict of str to str, optional
        Free-form text metadata stored in the header; the key :data:`ORDER_METADATA_KEY` is reserved.

    Returns
    -------
    bytes
        A safetensors file.

    Raises
    ------
    SerdeError
        If there are no tensors, a tensor is not float32 or the metadata is invalid.
    """
    if not params:
        raise SerdeError("empty", "There are no tensors to serialise; expected at least one.")
    tensors: dict[str, npt.NDArray[Any]] = {}
    for name, array in params.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise SerdeError("bad_header", f"Tensor name {name!r} is invalid; expected a non-empty string.")
        array = np.asarray(array)
        if array.dtype != np.float32:
            raise SerdeError(
                "wrong_dtype", f"Tensor {name!r} has dtype {array.dtype}; only float32 can be serialised."
            )
        tensors[name] = np.asarray(array, dtype=_LITTLE_F32, order="C")  # (ascontiguousarray makes 0-d 1-d)
    header_metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in header_metadata.items()):
        raise SerdeError("bad_header", "Metadata must map strings to strings.")
    if ORDER_METADATA_KEY in header_metadata:
        raise SerdeError("bad_header", f"Metadata key {ORDER_METADATA_KEY!r} is reserved by flcore.")
    header_metadata[ORDER_METADATA_KEY] = json.dumps(list(tensors))
    # Stored sorted by name, as the format's reference writer stores float32 tensors: the layout that
    # FedAvgAccumulator.add_file and StackedFiles take in one pass (the writer's order is in the metadata).
    return safetensors_bytes({name: tensors[name] for name in sorted(tensors)}, header_metadata)


def safetensors_bytes(tensors: Mapping[str, npt.NDArray[Any]], metadata: dict[str, str]) -> bytes:
    """The safetensors file of C-contiguous little-endian float32 ``tensors``, stored in the mapping's
    order (:func:`to_bytes` passes them sorted by name): the 8-byte header length, the JSON header padded
    with spaces to a multiple of 8 (as the format's reference writer pads it), then every tensor's bytes,
    joined in one copy.

    ``safetensors.numpy.save`` copies each tensor with ``tobytes()`` and then again into its output; every
    agent serialises its update every round (``bench/serialise.py``; docs/benchmarks.md section 2i). Files are
    read back with ``safetensors`` itself (:func:`from_bytes`), whose checks (contiguous, complete data
    offsets; dtype sizes) every file written here passes: the tests load them with the library.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, array in tensors.items():
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    data = (memoryview(array.reshape(-1)).cast("B") for array in tensors.values())
    return b"".join([struct.pack("<Q", len(encoded)), encoded, *data])


def from_bytes(data: bytes, *, spec: ParameterSpec | None = None, max_bytes: int) -> Parameters:
    """Deserialise and validate untrusted safetensors bytes into float32 parameters.

    Checks run cheapest first: size, header length, header JSON, dtypes, names and shapes against ``spec``;
    only then is the data materialised by ``safetensors.numpy.load`` and scanned for NaN and Inf.

    Parameters
    ----------
    data : bytes
        The blob to read.
    spec : ParameterSpec, optional
        The expected tensors; when given, names must match exactly and shapes must agree.
    max_bytes : int
        Largest accepted blob size in bytes.

    Returns
    -------
    Parameters
        Writeable float32 arrays, in spec order (or in the writer's order without a spec).

    Raises
    ------
    SerdeError
        With ``code`` one of ``"empty"``, ``"too_large"``, ``"bad_header"``, ``"wrong_dtype"``,
        ``"name_mismatch"``, ``"shape_mismatch"``, ``"non_finite"``.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive. Found {max_bytes}.")
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > max_bytes:
        raise SerdeError(
            "too_large", f"The parameter blob is {len(data)} bytes; at most {max_bytes} bytes are accepted."
        )
    header = _header_from_bytes(data)
    names = _names_checked(header, spec)
    try:
        loaded = safetensors.numpy.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise SerdeError("bad_header", f"safetensors could not parse the blob: {exc}.") from None
    result: Parameters = {}
    for name in names:
        array = loaded[name]
        if array.dtype != np.float32 or not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, dtype=np.float32, order="C")
        _check_finite(name, array)
        result[name] = array
    return result


def _names_checked(header: _Header, spec: ParameterSpec | None) -> list[str]:
    """Return the tensor names to read: the spec's, once the header's names and shapes match it."""
    names = header.ordered_names()
    if spec is None:
        return names
    _check_names(spec, names)
    shapes = {e.name: e.shape for e in header.entries}
    for tensor in spec.tensors:
        _check_shape(tensor, shapes[tensor.name])
    return list(spec.names)


def _check_finite(name: str, array: npt.NDArray[np.float32]) -> None:
    if not np.isfinite(array).all():
        num_nan = int(np.isnan(array).sum())
        num_inf = int(np.isinf(array).sum())
        raise SerdeError(
            "non_finite",
            f"Tensor {name!r} contains {num_nan} NaN and {num_inf} infinite value(s); "
            "every value must be finite.",
        )


def load_file(
    path: str | os.PathLike[str], *, spec: ParameterSpec | None = None, max_bytes: int
) -> Parameters:
    """Read and validate a safetensors file; see :func:`from_bytes`.

    The file size is checked against ``max_bytes`` before anything is read.
    """
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise SerdeError(
            "too_large", f"The parameter file is {size} bytes; at most {max_bytes} bytes are accepted."
        )
    return from_bytes(Path(path).read_bytes(), spec=spec, max_bytes=max_bytes)


_NORM_BLOCK = 65536
"""float32 values widened to float64 at a time by :func:`validate_file` (512 KiB: stays in cache)."""


def validate_file(
    path: str | os.PathLike[str], *, spec: ParameterSpec | None = None, max_bytes: int
) -> float:
    """Validate a safetensors file as :func:`load_file` does and return its float64 L2 norm, in one pass.

    The same checks and errors as :func:`from_bytes` (size first, then header, dtypes, names and shapes
    against ``spec``, then NaN and Inf), without materialising the values: the file is memory-mapped and
    its values are widened to float64 one cache-sized block at a time and their squares summed. That sum
    is also the finiteness check, exactly: the square of a finite float32 is at most about 1.2e77, so a
    sum of 2**31 of them is finite in float64, while one NaN or infinity makes it NaN or infinite (only then
    are the tensor's values scanned, to count them for the error). What the upload path needs from an
    agent's update before it becomes a blob: one read of 4 MB instead of three copies, a bool mask and a
    float64 copy (:func:`load_file` then :func:`l2_norm`).

    Raises
    ------
    SerdeError
        As :func:`from_bytes`.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive. Found {max_bytes}.")
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise SerdeError(
                "too_large", f"The parameter file is {size} bytes; at most {max_bytes} bytes are accepted."
            )
        header = _header_from_handle(handle, size)
        names = _names_checked(header, spec)
        total = header.entries[-1].end
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if total else None
    if mapping is None:
        return 0.0
    entries = {entry.name: entry for entry in header.entries}
    block = np.empty(_NORM_BLOCK, dtype=np.float64)
    squares = 0.0
    for name in names:
        entry = entries[name]
        values = np.frombuffer(
            mapping,
            dtype=_LITTLE_F32,
            count=(entry.end - entry.begin) // 4,
            offset=header.data_start + entry.begin,
        )
        part = 0.0
        for start in range(0, values.size, _NORM_BLOCK):
            widened = block[: min(_NORM_BLOCK, values.size - start)]
            np.copyto(widened, values[start : start + _NORM_BLOCK])
            part += float(np.dot(widened, widened))
        if not math.isfinite(part):
            _check_finite(name, values)
        squares += part
        del values  # the mapping is unmapped with its last view, here
    return math.sqrt(squares)


_MAPPED_HEADERS: OrderedDict[tuple[int, int, int, int], _Header] = OrderedDict()
"""Parsed headers of files :func:`iter_file_tensors` mapped, by (device, inode, size, mtime in ns)."""
_MAPPED_HEADERS_MAX = 4096
_MAPPED_HEADERS_LOCK = threading.Lock()


def _mapped_header(handle: BinaryIO, status: os.stat_result) -> _Header:
    """Return the validated header of the open file, parsed once per version of the file.

    A chunked aggregation maps every stored update once per coordinate range (in each task of its chord),
    and the header's JSON parse and validation were most of a mapping's cost (about 30 of 55 us per file).
    A file's version is its identity, size and modification time: a stored blob is content-addressed and
    never rewritten, a rewrite in place changes its size or modification time, and a file replaced by a
    rename has a new inode. A header that fails validation is not kept.
    """
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
    with _MAPPED_HEADERS_LOCK:
        cached = _MAPPED_HEADERS.get(key)
        if cached is not None:
            _MAPPED_HEADERS.move_to_end(key)
            return cached
    header = _header_from_handle(handle, status.st_size)
    with _MAPPED_HEADERS_LOCK:
        _MAPPED_HEADERS[key] = header
        if len(_MAPPED_HEADERS) > _MAPPED_HEADERS_MAX:
            _MAPPED_HEADERS.popitem(last=False)
    return header


def iter_file_tensors(path: str | os.PathLike[str]) -> Iterator[tuple[str, npt.NDArray[np.float32]]]:
    """Memory-map a safetensors file and yield zero-copy, read-only float32 views in storage order.

    The header is validated (structure, F32 dtypes, packed offsets); the values are not, so use this only
    for blobs already checked by :func:`from_bytes` or :func:`load_file`. Each view keeps the mapping
    alive for as long as it is referenced. The parsed header is kept per version of the file (see
    :func:`_mapped_header`), so mapping the same stored update again costs an ``open``, an ``fstat`` and an
    ``mmap``.

    Parameters
    ----------
    path : path
        The safetensors file.

    Yields
    ------
    tuple of (str, ndarray)
        Tensor name and a read-only view of its data.
    """
    with open(path, "rb") as handle:  # the mapping outlives the file object
        header = _mapped_header(handle, os.fstat(handle.fileno()))
        total = header.entries[-1].end
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if total else None
    if mapping is None:
        for entry in header.entries:
            yield entry.name, np.zeros(entry.shape, dtype=np.float32)
        return
    base = np.frombuffer(mapping, dtype=np.uint8, count=total, offset=header.data_start)
    for entry in header.entries:
        view = base[entry.begin : entry.end].view(_LITTLE_F32).reshape(entry.shape)
        yield entry.name, view


# --------------------------------------------------------------------------------------------------------
# Arithmetic helpers
# --------------------------------------------------------------------------------------------------------


def _check_same_structure(a: Mapping[str, npt.NDArray[Any]], b: Mapping[str, npt.NDArray[Any]]) -> None:
    spec = ParameterSpec.from_parameters(a)
    spec.validate(b)


def add(a: Mapping[str, npt.NDArray[Any]], b: Mapping[str, npt.NDArray[Any]]) -> Parameters:
    """Return ``a + b`` tensor by tensor (same names and shapes required), as new float32 arrays."""
    _check_same_structure(a, b)
    return {k: np.add(a[k], b[k], dtype=np.float32) for k in a}


def subtract(a: Mapping[str, npt.NDArray[Any]], b: Mapping[str, npt.NDArray[Any]]) -> Parameters:
    """Return ``a - b`` tensor by tensor (same names and shapes required), as new float32 arrays."""
    _check_same_structure(a, b)
    return {k: np.subtract(a[k], b[k], dtype=np.float32) for k in a}


def scale(a: Mapping[str, npt.NDArray[Any]], s: float) -> Parameters:
    """Return ``s * a`` tensor by tensor, as new float32 arrays."""
    return {k: np.multiply(v, s, dtype=np.float32) for k, v in a.items()}


def l2_norm(params: Mapping[str, npt.NDArray[Any]]) -> float:
    """Return the Euclidean norm of all tensors taken together, computed in float64."""
    total = 0.0
    for array in params.values():
        flat = np.asarray(array, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def flatten(params: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
    """Concatenate all tensors, raveled in C order, into one new float32 vector (in dict order)."""
    if not params:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in params.values()])


def unflatten(vector: npt.NDArray[Any], spec: ParameterSpec) -> Parameters:
    """Split a flat vector into float32 tensors shaped and ordered as ``spec``; inverse of :func:`flatten`.

    Raises
    ------
    SerdeError
        With code ``"shape_mismatch"`` if the vector length differs from ``spec.num_parameters``.
    """
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.shape[0] != spec.num_parameters:
        raise SerdeError(
            "shape_mismatch",
            f"The flat vector has shape {vector.shape}; the model expects ({spec.num_parameters},).",
        )
    result: Parameters = {}
    offset = 0
    for tensor in spec.tensors:
        size = tensor.num_parameters
        result[tensor.name] = np.array(vector[offset : offset + size], dtype=np.float32).reshape(tensor.shape)
        offset += size
    return result


def allclose(
    a: Mapping[str, npt.NDArray[Any]],
    b: Mapping[str, npt.NDArray[Any]],
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> bool:
    """Return whether ``a`` and ``b`` have the same names and shapes and all values are close."""
    if set(a) != set(b):
        return False
    return all(
        np.shape(a[k]) == np.shape(b[k]) and bool(np.allclose(a[k], b[k], atol=atol, rtol=rtol)) for k in a
    )


def sha256_hex(data: bytes) -> str:
    """Return the lowercase hexadecimal SHA-256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()
