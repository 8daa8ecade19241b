"""Write safetensors files with NumPy only (no torch), one tensor at a time, single-file or sharded.

:func:`write_safetensors` / :func:`write_sharded` write files that ``safetensors.torch.load_file`` and
``transformers``' ``from_pretrained`` accept (format: :mod:`jaxprune.checkpoints.safetensors_io`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from jaxprune.checkpoints.safetensors_io import dtype_code



def _header_bytes(entries: list[tuple[str, np.ndarray]], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, a in entries:
        nb = _nbytes(a)
        header[name] = {"dtype": dtype_code(a.dtype), "shape": [int(d) for d in a.shape],
                        "data_offsets": [pos, pos + nb]}
        pos += nb
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # pad so the data buffer starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _nbytes(a) -> int:
    """Byte size from ``shape``/``dtype`` alone (works for lazy or device arrays without fetching them)."""
    return math.prod(int(d) for d in a.shape) * np.dtype(a.dtype).itemsize


def _ordered(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    # Larger itemsizes first (stable): every tensor then starts aligned to its own itemsize.
    items = [(k, v if hasattr(v, "shape") and hasattr(v, "dtype") else np.asarray(v)) for k, v in tensors.items()]
    return sorted(items, key=lambda kv: -np.dtype(kv[1].dtype).itemsize)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to one safetensors file (atomically: a temp file, then ``os.replace``).

    Tensors are written one at a time; a non-contiguous view (e.g. a transpose) or any object with
    ``shape``, ``dtype`` and ``__array__`` (a device array, a lazy transpose) costs one contiguous
    host copy of that tensor only. ``metadata`` defaults to ``{"format": "pt"}``, which
    ``transformers`` requires.
    """
    path = Path(path)
    meta = {"format": "pt"} if metadata is None else metadata
    entries = _ordered(tensors)
    for name, _ in entries:
        if name == "__metadata__":
            raise ValueError("'__metadata__' is not a valid tensor name")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_header_bytes(entries, meta))
            for _, a in entries:
                if _nbytes(a):
                    c = np.ascontiguousarray(np.asarray(a))
                    if c.dtype.byteorder == ">":
                        c = c.astype(c.dtype.newbyteorder("<"))
                    f.write(memoryview(c.reshape(-1).view(np.uint8)))
                    del c
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_sharded(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray], max_shard_bytes: int,
                  metadata: Mapping[str, str] | None = None, prefix: str = "model") -> list[Path]:
    """Write ``tensors`` as ``{prefix}.safetensors``, or, if larger than ``max_shard_bytes``, as
    ``{prefix}-0000i-of-0000n.safetensors`` shards plus ``{prefix}.safetensors.index.json``
    (``{"metadata": {"total_size": ...}, "weight_map": {...}}``, transformers' layout).

    Tensors are packed greedily in the given order; a single tensor larger than the limit gets a
    shard of its own. Returns the written files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k, v in tensors.items():
        nb = _nbytes(v) if hasattr(v, "shape") and hasattr(v, "dtype") else np.asarray(v).nbytes
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nb
    if len(shards) == 1:
        out = directory / f"{prefix}.safetensors"
        write_safetensors(out, shards[0], metadata)
        return [out]
    n = len(shards)
    written, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"{prefix}-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(directory / fname, shard, metadata)
        weight_map.update({k: fname for k in shard})
        written.append(directory / fname)
    total = sum(_nbytes(v) for shard in shards for v in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    written.append(directory / f"{prefix}.safetensors.index.json")
    return written
