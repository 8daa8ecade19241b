"""Read safetensors files with NumPy only (no torch), streaming tensor by tensor.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length ``N``,
``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the data buffer; offsets are relative to the start of the buffer, tensors are
C-contiguous and little-endian, and together they tile the buffer exactly (no gap, no overlap).

Reading never loads a file: the header is parsed and validated up front (so a truncated or corrupt
file is refused before any work is done, with an error naming the file and, where it applies, the
tensor), then the file is memory-mapped once and each tensor is a zero-copy read-only NumPy view.
:func:`iter_tensors` drops the pages of a tensor from the process (``madvise(MADV_DONTNEED)``;
the mapping stays valid and re-reads from disk if touched again) once the consumer moves on, so
streaming a checkpoint keeps at most one tensor's pages resident.

Sharded checkpoints (``model.safetensors.index.json`` with a ``weight_map``) are read through
:class:`SafetensorsCheckpoint` (sequentially with ``iter_tensors``, or randomly, thread-safe, with
``get`` / ``release``). Writing is :mod:`jaxprune.checkpoints.safetensors_write`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from jaxprune.checkpoints.errors import CheckpointFileError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit

#: safetensors dtype code -> NumPy dtype.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors code (``"F32"``, ``"BF16"``, ...) of a NumPy dtype."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _CODES[dt]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. ``start`` is the absolute byte offset in ``path``."""

    name: str
    code: str
    shape: tuple[int, ...]
    start: int
    nbytes: int
    path: Path

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.code]


def _corrupt(path: Path, what: str) -> CheckpointFileError:
    return CheckpointFileError(f"{path}: {what}")


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of ``path``; returns ``(tensors by name, __metadata__)``.

    Raises :class:`CheckpointFileError` naming the file (and tensor) when the file is missing,
    truncated (data beyond the end of the file), has an unparseable header, or has offsets that
    overlap, leave gaps or disagree with the tensor's shape and dtype.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"file is truncated ({size} bytes; a safetensors file starts with an 8-byte "
                                     "header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise _corrupt(path, f"header length {n} exceeds the file size {size}: the file is truncated or "
                                     "not a safetensors file")
            if n > _MAX_HEADER:
                raise _corrupt(path, f"header length {n} is implausibly large: corrupt header")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointFileError(f"{path}: file not found") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"corrupt header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "corrupt header (the JSON header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _corrupt(path, "corrupt header (__metadata__ must map strings to strings)")
    base = 8 + n
    data_len = size - base
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise _corrupt(path, f"corrupt header entry for tensor {name!r}: {e!r}")
        code, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if code not in DTYPES:
            raise _corrupt(path, f"tensor {name!r} has unsupported dtype {code!r}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in shape)):
            raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and o >= 0 for o in offs)
                or offs[0] > offs[1]):
            raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offs!r}")
        need = math.prod(shape) * DTYPES[code].itemsize
        if offs[1] - offs[0] != need:
            raise _corrupt(path, f"tensor {name!r}: data_offsets {offs} span {offs[1] - offs[0]} bytes but dtype "
                                 f"{code} and shape {shape} need {need} (misaligned offsets)")
        infos[name] = TensorInfo(name, code, tuple(shape), base + offs[0], need, path)
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos, prev = 0, None
    for b, e, name in spans:
        if b < pos:
            raise _corrupt(path, f"tensors {prev!r} and {name!r} overlap (data_offsets)")
        if b > pos:
            raise _corrupt(path, f"gap of {b - pos} bytes before tensor {name!r} (data_offsets)")
        if e > data_len:
            raise _corrupt(path, f"file is truncated: tensor {name!r} needs bytes up to {base + e} but the file "
                                 f"has {size}")
        pos, prev = e, name
    if pos != data_len:
        raise _corrupt(path, f"{data_len - pos} trailing bytes after the last tensor: corrupt file")
    return infos, meta


class MappedFile:
    """A safetensors file mapped read-only; :meth:`get` returns zero-copy views."""

    def __init__(self, path: str | os.PathLike, infos: Mapping[str, TensorInfo] | None = None):
        self.path = Path(path)
        self.infos = dict(infos) if infos is not None else read_header(self.path)[0]
        self._f = open(self.path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def get(self, name: str) -> np.ndarray:
        """Read-only view of tensor ``name`` (valid while this object, or the view, is alive)."""
        info = self.infos[name]
        if info.nbytes == 0:
            return np.empty(info.shape, info.dtype)
        return np.frombuffer(self._mm, dtype=info.dtype, count=info.nbytes // info.dtype.itemsize,
                             offset=info.start).reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop the resident pages of tensor ``name`` from this process (the view stays valid)."""
        info = self.infos[name]
        if self._mm is None or info.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = info.start // page * page
        hi = min(-(-(info.start + info.nbytes) // page) * page, len(self._mm))
        with contextlib.suppress(OSError, ValueError):
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        """Unmap now if no view is alive; otherwise the mapping goes away with the last view."""
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
        self._f.close()

    def __enter__(self) -> "MappedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_tensors(path: str | os.PathLike, names: Iterable[str] | None = None,
                 infos: Mapping[str, TensorInfo] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, read-only view)`` for the tensors of one file, in file order.

    The pages of each tensor are released when the consumer asks for the next one, so consume
    (copy/convert) each view before advancing if the data must stay resident.
    """
    with MappedFile(path, infos) as mf:
        want = set(mf.infos) if names is None else set(names)
        for name in sorted(want, key=lambda k: mf.infos[k].start):
            yield name, mf.get(name)
            mf.release(name)


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every tensor of one file into owned (writable) arrays. For tests and small files."""
    return {k: np.array(v) for k, v in iter_tensors(path)}


class SafetensorsCheckpoint:
    """The safetensors files of a checkpoint directory, single-file or sharded.

    Uses ``model.safetensors.index.json`` when present (the index is authoritative: a shard it
    names must exist and contain every key it assigns there), else ``model.safetensors``, else
    every ``*.safetensors`` file in the directory (a key in two files is an error). ``location`` is
    where a key is looked up: the index, the single file, or the directory of several files.
    """

    def __init__(self, directory: str | os.PathLike, index_name: str = INDEX_NAME):
        self.directory = Path(directory)
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._open: dict[Path, MappedFile] = {}
        self._lock = threading.Lock()
        index = self.directory / index_name
        if index.is_file():
            self.location = index
            self._from_index(index)
        else:
            files = ([self.directory / SINGLE_NAME] if (self.directory / SINGLE_NAME).is_file()
                     else sorted(self.directory.glob("*.safetensors")))
            if not files:
                raise CheckpointFileError(f"{self.directory}: no *.safetensors file and no {index_name}")
            self.location = files[0] if len(files) == 1 else self.directory
            for f in files:
                infos, meta = read_header(f)
                self.metadata.update(meta)
                for k, info in infos.items():
                    if k in self.infos:
                        raise CheckpointFileError(f"tensor {k!r} is in both {self.infos[k].path} and {f}")
                    self.infos[k] = info

    def _from_index(self, index: Path) -> None:
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointFileError(f"{index}: corrupt index ({e})") from None
        by_file: dict[str, list[str]] = {}
        for k, fname in weight_map.items():
            by_file.setdefault(fname, []).append(k)
        for fname, keys in by_file.items():
            shard = self.directory / fname
            if not shard.is_file():
                raise CheckpointFileError(f"{index}: shard {fname!r} (holding e.g. {keys[0]!r}) is missing from "
                                          f"{self.directory}")
            infos, meta = read_header(shard)
            self.metadata.update(meta)
            absent = [k for k in keys if k not in infos]
            if absent:
                raise CheckpointFileError(f"{shard}: tensor(s) {', '.join(map(repr, absent[:5]))}"
                                          f"{' ...' if len(absent) > 5 else ''} listed in {index.name} are missing "
                                          "from the shard")
            for k in keys:
                self.infos[k] = infos[k]

    @property
    def files(self) -> list[Path]:
        """The files that hold tensors, in a stable order."""
        return sorted({i.path for i in self.infos.values()})

    def _mapped(self, path: Path) -> MappedFile:
        with self._lock:
            mf = self._open.get(path)
            if mf is None:
                mf = self._open[path] = MappedFile(path, {k: i for k, i in self.infos.items() if i.path == path})
            return mf

    def get(self, key: str) -> np.ndarray:
        """Random access: a read-only view of tensor ``key`` (its file stays mapped until :meth:`close`)."""
        return self._mapped(self.infos[key].path).get(key)

    def release(self, key: str) -> None:
        """Drop the resident pages of tensor ``key`` (after its data has been copied)."""
        self._mapped(self.infos[key].path).release(key)

    def close(self) -> None:
        """Unmap the files opened by :meth:`get`."""
        with self._lock:
            for mf in self._open.values():
                mf.close()
            self._open.clear()

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(key, read-only view)`` file by file, in on-disk order (see :func:`iter_tensors`)."""
        want = set(self.infos) if names is None else set(names)
        for f in self.files:
            infos = {k: i for k, i in self.infos.items() if i.path == f}
            sel = [k for k in infos if k in want]
            if sel:
                yield from iter_tensors(f, sel, infos=infos)
