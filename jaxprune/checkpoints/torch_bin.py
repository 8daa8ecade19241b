"""Read PyTorch ``pytorch_model*.bin`` checkpoints (optional; needs torch).

The original LLaVA-1.5 weights (``liuhaotian/llava-v1.5-7b``) and ``openai/clip-vit-large-patch14-336``
are published as pickled ``.bin`` files only, so the converter accepts them when torch is
installed. Loading uses ``torch.load(mmap=True, weights_only=True)``: no arbitrary code runs and the
tensors stay file-backed until converted. safetensors is preferred whenever a directory has both.

The object mirrors :class:`jaxprune.checkpoints.safetensors_io.SafetensorsCheckpoint`: ``infos``
(name -> :class:`BinTensorInfo`) and ``iter_tensors(names)`` yielding read-only NumPy views.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from jaxprune.checkpoints.errors import CheckpointFileError

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclasses.dataclass(frozen=True)
class BinTensorInfo:
    """Shape and dtype of one tensor of a ``.bin`` file."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    path: Path


def has_bin_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a ``pytorch_model.bin`` (single or indexed)."""
    d = Path(directory)
    return (d / BIN_INDEX).is_file() or (d / BIN_SINGLE).is_file()


def _load(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointFileError(f"{path}: reading PyTorch .bin checkpoints needs torch; install it or convert "
                                  "the checkpoint to safetensors") from None
    if not path.is_file():
        raise CheckpointFileError(f"{path}: file not found")
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt pickle/zip
        raise CheckpointFileError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointFileError(f"{path}: not a state dict")
    return {k: v for k, v in sd.items() if hasattr(v, "shape")}


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


_NP_OF = {"torch.float32": np.float32, "torch.float16": np.float16, "torch.bfloat16": ml_dtypes.bfloat16,
          "torch.float64": np.float64, "torch.int64": np.int64, "torch.int32": np.int32, "torch.bool": np.bool_,
          "torch.uint8": np.uint8, "torch.int8": np.int8, "torch.int16": np.int16}


class TorchBinCheckpoint:
    """``pytorch_model.bin`` or ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json`` (``location``: the
    index, else the single file)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._loaded: dict[Path, dict] = {}
        self._lock = threading.Lock()
        index = self.directory / BIN_INDEX
        self.location = index if index.is_file() else self.directory / BIN_SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointFileError(f"{index}: corrupt index ({e})") from None
            by_file: dict[str, list[str]] = {}
            for k, f in weight_map.items():
                by_file.setdefault(f, []).append(k)
        else:
            by_file = {BIN_SINGLE: []}
        self.infos: dict[str, BinTensorInfo] = {}
        for fname, keys in by_file.items():
            path = self.directory / fname
            if not path.is_file():
                raise CheckpointFileError(f"{index}: shard {fname!r} is missing from {self.directory}")
            sd = _load(path)
            absent = [k for k in keys if k not in sd]
            if absent:
                raise CheckpointFileError(f"{path}: tensor(s) {', '.join(map(repr, absent[:5]))} listed in "
                                          f"{BIN_INDEX} are missing from the shard")
            for k in keys or sd:
                t = sd[k]
                if str(t.dtype) not in _NP_OF:
                    raise CheckpointFileError(f"{path}: tensor {k!r} has unsupported dtype {t.dtype}")
                self.infos[k] = BinTensorInfo(k, tuple(t.shape), np.dtype(_NP_OF[str(t.dtype)]), path)
            del sd

    @property
    def files(self) -> list[Path]:
        return sorted({i.path for i in self.infos.values()})

    def get(self, key: str) -> np.ndarray:
        """Random access to one tensor (its file stays loaded, memory-mapped, until :meth:`close`)."""
        path = self.infos[key].path
        with self._lock:
            sd = self._loaded.get(path)
            if sd is None:
                sd = self._loaded[path] = _load(path)
        a = _to_numpy(sd[key])
        a.flags.writeable = False
        return a

    def release(self, key: str) -> None:
        """No-op (torch owns the mapping)."""

    def close(self) -> None:
        with self._lock:
            self._loaded.clear()

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(key, read-only view)`` file by file."""
        want = set(self.infos) if names is None else set(names)
        for f in self.files:
            sel = [k for k, i in self.infos.items() if i.path == f and k in want]
            if not sel:
                continue
            sd = _load(f)
            for k in sel:
                a = _to_numpy(sd[k])
                a.flags.writeable = False
                yield k, a
            del sd
