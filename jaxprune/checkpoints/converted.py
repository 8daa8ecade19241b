"""Converted jaxprune checkpoint directories: write one (:func:`convert`), recognise and load it, or load any.

A converted directory holds ``params/`` (orbax), ``config.json`` (``LlavaConfig.to_hf_dict``),
``jaxprune.json`` (:data:`MARKER`: format version, source, dtype, source layout) and the
tokenizer / processor / generation files of the source. It is written into a temporary sibling
directory and renamed into place, so an interrupted or failed conversion leaves no ``DST``.
:func:`convert` streams: each tensor is read, transposed and cast only when orbax writes it
(:func:`~jaxprune.checkpoints.read.lazy_params`), a couple at a time.

:func:`load_params` is the one entry point for any checkpoint: a converted directory, an HF LLaVA
directory (any key layout) or an original-LLaVA one (``jaxprune.load`` uses it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.checkpoints.dtypes import parse_dtype
from jaxprune.checkpoints.errors import CheckpointError, DestinationExistsError
from jaxprune.checkpoints.orbax_io import restore_params, save_params
from jaxprune.checkpoints.plan import check_params, plan_checkpoint
from jaxprune.checkpoints.read import lazy_params, read_checkpoint
from jaxprune.checkpoints.source import atomic_dir, copy_support_files, resolve_source
from jaxprune.config import LlavaConfig, load_config

MARKER = "jaxprune.json"
FORMAT = "jaxprune-params"
FORMAT_VERSION = 1
PARAMS_DIR = "params"


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = None, force: bool = False,
            clip_dir: str | os.PathLike | None = None) -> Path:
    """Convert ``src`` (HF or original-LLaVA dir, hub id, or a converted dir to re-cast) into ``dst``.

    Refuses an existing ``dst`` unless ``force``. The checkpoint is validated before anything is
    written, and ``dst`` appears only once complete.
    """
    dst = Path(dst).expanduser()
    if dst.exists() and not force:
        raise DestinationExistsError(f"{dst} already exists (use --force / force=True to overwrite)")
    src_dir = resolve_source(src)
    clip = resolve_source(clip_dir) if clip_dir is not None else None
    if dst.exists() and dst.resolve() in (src_dir.resolve(), clip.resolve() if clip else None):
        raise CheckpointError(f"{dst} is the source checkpoint; refusing to overwrite it")
    target = parse_dtype(dtype)
    if is_converted(src_dir):  # re-cast / copy a converted directory (holds its parameters in memory)
        cfg, params = load_converted(src_dir, target)
        layout, info, writer = "jaxprune", {}, (lambda path: save_params(path, params))
    else:
        plan = plan_checkpoint(src_dir, clip)
        cfg, layout, info = plan.cfg, plan.layout, plan.info

        def writer(path: Path) -> None:
            try:
                save_params(path, lazy_params(plan, target))  # streamed: one tensor at a time
            finally:
                plan.close()

    with atomic_dir(dst, force) as tmp:
        writer(tmp / PARAMS_DIR)
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        copied = copy_support_files(tmp, src_dir, clip)
        marker = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": str(src),
                  "source_layout": layout, "dtype": str(target) if target is not None else "source",
                  "support_files": copied, **info}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return dst


def is_converted(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`convert`."""
    return (Path(path) / MARKER).is_file()


def load_converted(dst: str | os.PathLike, dtype: Any = None) -> tuple[LlavaConfig, dict[str, np.ndarray]]:
    """Load a directory written by :func:`convert` (parameters as NumPy arrays, cast to ``dtype`` if given)."""
    dst = Path(dst).expanduser()
    try:
        marker = json.loads((dst / MARKER).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{dst}: no {MARKER} (not a converted jaxprune checkpoint)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{dst / MARKER}: corrupt ({e})") from None
    if marker.get("format") != FORMAT or marker.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{dst / MARKER}: unsupported format {marker.get('format')!r} version "
                           f"{marker.get('format_version')!r} (this jaxprune reads {FORMAT!r} v{FORMAT_VERSION})")
    cfg = load_config(dst)
    if not (dst / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{dst}: the orbax parameter directory {PARAMS_DIR}/ is missing")
    params = restore_params(dst / PARAMS_DIR, parse_dtype(dtype))
    check_params(cfg, params, where=str(dst))
    return cfg, params


def load_params(path: str | os.PathLike, dtype: Any = None,
                clip_dir: str | os.PathLike | None = None) -> tuple[LlavaConfig, dict[str, np.ndarray]]:
    """Load parameters from a converted directory, an HF LLaVA directory or an original-LLaVA directory."""
    p = resolve_source(path)
    if is_converted(p):
        return load_converted(p, dtype)
    return read_checkpoint(p, dtype, clip_dir)
