"""Canonical jaxprune parameters -> a Hugging Face LLaVA checkpoint (safetensors + config.json).

``export_hf(cfg, params, dst, layout)`` writes the tensors under legacy llava-hf names
(``language_model.model.*``, ``vision_tower.vision_model.*``, ...) or transformers-5 names
(``model.language_model.*``, flattened ``model.vision_tower.*``, ``lm_head.weight``), undoing the
layout transforms of :mod:`jaxprune.checkpoints.keys`, so HF -> jaxprune -> HF is bit-identical.
Tensors are transposed and written one at a time (one tensor of temporary memory); above
``max_shard_bytes`` the output is sharded with a ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxprune.checkpoints.keys import LAYOUTS, canonical_to_hf
from jaxprune.checkpoints.orbax_io import flatten
from jaxprune.checkpoints.plan import check_params
from jaxprune.checkpoints.safetensors_write import write_sharded
from jaxprune.checkpoints.source import atomic_dir, copy_support_files
from jaxprune.config import LlavaConfig
from jaxprune.models.param_spec import param_shapes

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


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
