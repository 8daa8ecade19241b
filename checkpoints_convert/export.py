"""Canonical jaxprune parameters -> a Hugging Face LLaVA checkpoint (safetensors + config.json).

``export_hf(cfg, params, dst, layout)`` writes the tensors under legacy llava-hf names
(``language_model.model.*``, ``vision_tower.vision_model.*``, ...) or transformers-5 names
(``model.language_model.*``, flattened ``model.vision_tower.*``, ``lm_head.weight``), undoing the
layout transforms of :mod:`checkpoints_convert.keys`, so HF -> jaxprune -> HF is bit-identical.
Tensors are transposed and written one at a time (one tensor of temporary memory); above
``max_shard_bytes`` the output is sharded with a ``model.safetensors.index.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from checkpoints_convert.errors import DestinationExistsError, ParamMismatchError
from checkpoints_convert.keys import LAYOUTS, canonical_to_hf
from checkpoints_convert.orbax_io import flatten
from checkpoints_convert.safetensors_io import write_sharded
from checkpoints_convert.source import copy_support_files
from jaxprune.config import LlavaConfig
from jaxprune.models.param_spec import param_shapes

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                "f32": "float32", "f16": "float16"}


def is_float_dtype(dtype: Any) -> bool:
    """Floating point, including the ``ml_dtypes`` types (``bfloat16``, ``float8_*``) NumPy does not classify."""
    dt = np.dtype(dtype)
    return bool(np.issubdtype(dt, np.floating)) or dt.type in (
        ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)


def parse_dtype(dtype: Any) -> np.dtype | None:
    """``None`` -> ``None``; a name (``"bfloat16"``, ``"bf16"``, ``"float32"``), NumPy or JAX dtype -> ``np.dtype``."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = _DTYPE_NAMES.get(dtype.lower(), dtype.lower())
        if name == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        dtype = name
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None
    if not is_float_dtype(dt):
        raise ValueError(f"dtype {dt} is not a floating-point type")
    return dt


def check_params(cfg: LlavaConfig, params: Mapping[str, Any], where: str = "parameters") -> None:
    """Raise one :class:`ParamMismatchError` if ``params`` lacks, adds or mis-shapes any canonical name."""
    expected = param_shapes(cfg)
    missing = [k for k in expected if k not in params]
    unexpected = [k for k in params if k not in expected]
    mis = [f"{k}: expected {tuple(expected[k])}, got {tuple(np.shape(params[k]))}"
           for k in expected if k in params and tuple(np.shape(params[k])) != tuple(expected[k])]
    if missing or unexpected or mis:
        lines = [f"{where} do not match the config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ParamMismatchError("\n".join(lines), missing, unexpected, mis)


class _Lazy:
    """A transposed view produced on demand (keeps host copies of device arrays to one at a time)."""

    def __init__(self, value: Any, perm: tuple[int, ...] | None):
        self.value, self.perm = value, perm
        shape = np.shape(value)
        self.shape = shape if perm is None else tuple(shape[p] for p in perm)
        self.dtype = np.dtype(value.dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.value)
        a = a if self.perm is None else a.transpose(self.perm)
        return a if dtype is None else a.astype(dtype)


def hf_state_dict(cfg: LlavaConfig, params: Mapping[str, Any], layout: str = "legacy") -> dict[str, np.ndarray]:
    """HF key -> HF-layout view of each parameter (lazy transposes; no data is copied here)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown HF layout {layout!r} (expected one of {LAYOUTS})")
    flat = flatten(params) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
    check_params(cfg, flat)
    out: dict[str, np.ndarray] = {}
    for name in param_shapes(cfg):
        key, perm = canonical_to_hf(name, layout)  # type: ignore[arg-type]
        v = flat[name]
        if isinstance(v, np.ndarray):
            out[key] = v if perm is None else v.transpose(perm)
        else:
            out[key] = _Lazy(v, perm)  # type: ignore[assignment]
    return out


@contextlib.contextmanager
def atomic_dir(dst: Path, force: bool) -> Iterator[Path]:
    """Yield a temp directory next to ``dst``; on success it replaces ``dst``, on failure it is removed."""
    if dst.exists() and not force:
        raise DestinationExistsError(f"{dst} already exists (use --force / force=True to overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            trash = dst.parent / f".{dst.name}.old-{tag}"
            os.replace(dst, trash)
            os.replace(tmp, dst)
            shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_hf(cfg: LlavaConfig, params: Mapping[str, Any], dst: str | os.PathLike, layout: str = "legacy",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False,
              support_dir: str | os.PathLike | None = None) -> Path:
    """Write ``params`` as an HF LLaVA checkpoint in ``dst`` (``layout`` ``"legacy"`` or ``"v5"``).

    ``params`` is the flat canonical dict (or its nested form, or jax arrays). Writes
    ``config.json`` (``cfg.to_hf_dict()``) and ``model.safetensors`` or shards + index, atomically
    (temp dir + rename); ``support_dir``'s tokenizer / processor files are copied along.
    """
    dst = Path(dst).expanduser()
    tensors = hf_state_dict(cfg, params, layout)
    with atomic_dir(dst, force) as tmp:
        write_sharded(tmp, tensors, max_shard_bytes, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        if support_dir is not None:
            copy_support_files(tmp, Path(support_dir))
    return dst
