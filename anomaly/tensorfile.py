"""A file of named arrays that cannot execute code, can be memory-mapped, and is written atomically.

The layout is the safetensors one (8-byte little-endian header length, a JSON header
naming each array's dtype, shape and byte range, then the raw bytes), so other tools
can read a bank with the ``safetensors`` library. It is implemented here because a
bank's pyramid features can be larger than memory: arrays are streamed to disk from
memory maps and read back as memory maps, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I32": np.int32, "I64": np.int64}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 64 * 1024 * 1024


class TensorFileError(ValueError):
    """The file is not a readable tensor file; the message names the file and the reason."""


def write(path: str | Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write ``arrays`` and string ``metadata`` to ``path`` atomically (temporary file, fsync, rename).

    A crash at any point leaves either the previous file or the new one, never a mix.
    """
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, array in arrays.items():
        dtype = np.dtype(array.dtype)
        if dtype not in _NAMES:
            raise TypeError(f"array {name!r} has unsupported dtype {dtype}")
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors does
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for array in arrays.values():
                _write_array(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_array(f, array: np.ndarray) -> None:
    """Stream an array (possibly a memory map) in chunks so it is never copied whole."""
    flat = array.reshape(-1) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1)
    step = max(1, _CHUNK // max(1, flat.itemsize))
    for start in range(0, flat.size, step):
        f.write(np.ascontiguousarray(flat[start : start + step]).tobytes())


def read(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays (read-only memory maps) and metadata of a tensor file, validated against its size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_length = f.read(8)
            if len(raw_length) < 8:
                raise TensorFileError(f"{path}: not a bank file (too short)")
            (length,) = struct.unpack("<Q", raw_length)
            if length > _MAX_HEADER or 8 + length > size:
                raise TensorFileError(f"{path}: not a bank file (invalid header)")
            header_bytes = f.read(length)
    except OSError as exc:
        raise TensorFileError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TensorFileError(f"{path}: not a bank file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: not a bank file (header is not a table)")
    metadata = header.pop("__metadata__", {}) or {}
    data_start = 8 + length
    arrays: dict[str, np.ndarray] = {}
    for name, spec in header.items():
        arrays[name] = _map_array(path, name, spec, data_start, size)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TensorFileError(f"{path}: not a bank file (metadata must be text)")
    return arrays, metadata


def _map_array(path: Path, name: str, spec: object, data_start: int, size: int) -> np.ndarray:
    try:
        dtype = np.dtype(_DTYPES[spec["dtype"]])
        shape = tuple(int(n) for n in spec["shape"])
        begin, end = (int(n) for n in spec["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise TensorFileError(f"{path}: not a bank file (bad entry {name!r})") from None
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if min(shape, default=0) < 0 or end - begin != expected or begin < 0:
        raise TensorFileError(f"{path}: corrupt bank file (entry {name!r} has inconsistent size)")
    if data_start + end > size:
        raise TensorFileError(f"{path}: truncated bank file ({size} bytes, needs {data_start + end})")
    if expected == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
