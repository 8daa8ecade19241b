"""HF / original-LLaVA checkpoints -> canonical jaxprune parameters -> orbax, and back.

Public functions::

    read_checkpoint(src, dtype=None, clip_dir=None) -> (LlavaConfig, {name: np.ndarray})
    convert(src, dst, dtype=None, force=False, clip_dir=None) -> Path
    load_converted(dst, dtype=None) -> (LlavaConfig, {name: np.ndarray})
    load_params(path, dtype=None, clip_dir=None) -> (LlavaConfig, {name: np.ndarray})
    export_hf(cfg, params, dst, layout="legacy", max_shard_bytes=..., force=False)   (see export.py)
    resolve_source(src) -> Path                                                       (see source.py)

Names and layouts are those of :func:`jaxprune.models.param_spec.param_shapes`. Reading is
planned from the file headers first (config, key mapping, shapes), so a checkpoint that does not
match its config fails with ONE :class:`ParamMismatchError` listing every missing, unexpected and
mis-shaped tensor before any data is read. :func:`read_checkpoint` then streams the data tensor by
tensor into a single preallocated buffer (cast and transposed on the way), so it needs the size of
the converted parameters plus one tensor; the source files' pages are released as they are
consumed. :func:`convert` does not even hold that: each tensor is read, transposed and cast only
when orbax writes it (:class:`~checkpoints_convert.orbax_io.LazyArray`), a couple at a time.

A converted directory holds ``params/`` (orbax), ``config.json`` (``LlavaConfig.to_hf_dict``),
``jaxprune.json`` (:data:`MARKER`: format version, source, dtype, source layout) and the
tokenizer / processor / generation files of the source. It is written into a temporary sibling
directory and renamed into place, so an interrupted or failed conversion leaves no ``DST``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from checkpoints_convert import original as orig
from checkpoints_convert.errors import ConvertError, DestinationExistsError, ParamMismatchError
from checkpoints_convert.export import atomic_dir, check_params, export_hf, is_float_dtype, parse_dtype  # noqa: F401  (re-exported)
from checkpoints_convert.keys import (
    KeyMapping,
    canonical_to_normal,
    inverse_perm,
    map_hf_key,
    map_normal_key,
    permuted_shape,
)
from checkpoints_convert.orbax_io import LazyArray, restore_params, save_params
from checkpoints_convert.source import copy_support_files, open_tensors, resolve_source
from jaxprune.config import ConfigError, LlavaConfig, load_config
from jaxprune.models.param_spec import param_shapes

MARKER = "jaxprune.json"
FORMAT = "jaxprune-params"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
_ALIGN = 64


@dataclasses.dataclass
class _Entry:
    """One canonical parameter: which reader holds it under which key, and how to lay it out."""

    reader: Any
    mapping: KeyMapping
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass
class CheckpointPlan:
    """Everything known about a checkpoint from its config and headers, before reading data."""

    cfg: LlavaConfig
    entries: dict[str, _Entry]
    layout: str
    info: dict[str, Any]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(f"{path.parent}: no config.json (not a LLaVA checkpoint directory)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return d


def _hf_layout(keys: list[str]) -> str:
    legacy = any(k.startswith(("language_model.model.", "vision_tower.", "multi_modal_projector.")) for k in keys)
    v5 = any(k.startswith("model.") for k in keys)
    if legacy and v5:
        return "hf-mixed"
    if v5:
        flat = any(k.startswith("model.vision_tower.") and not k.startswith("model.vision_tower.vision_model.")
                   for k in keys)
        return "hf-v5-flat-clip" if flat else "hf-v5"
    return "hf-legacy"


def plan_checkpoint(src_dir: Path, clip_dir: Path | None = None) -> CheckpointPlan:
    """Read ``config.json`` and the tensor headers of ``src_dir`` (and ``clip_dir``) and validate them.

    Raises :class:`ParamMismatchError` listing every missing, unexpected (including duplicate) and
    mis-shaped tensor at once.
    """
    d = _read_json(src_dir / "config.json")
    sources: list[tuple[Any, list[KeyMapping]]] = []
    info: dict[str, Any] = {}
    if orig.is_original_config(d):
        main = open_tensors(src_dir)
        maps = []
        for k in main.infos:
            normal = orig.normalize_original_key(k)
            maps.append(KeyMapping(k, k, "ignored") if normal is None else map_normal_key(k, normal))
        sources.append((main, maps))
        has_tower = any(m.canonical and m.canonical.startswith("vision.") for m in maps)
        clip_weights = clip_dir if clip_dir is not None else orig.local_tower_dir(d)
        if not has_tower and clip_weights is None:
            raise ConvertError(f"{src_dir}: the CLIP tower ({d.get('mm_vision_tower')}) is not in the checkpoint; "
                               "pass --clip-dir with a local copy of it")
        vision = orig.vision_dict_for(d, clip_dir)
        cfg = LlavaConfig.from_hf_dict(orig.original_to_hf_dict(d, vision))
        if not has_tower:
            clip = open_tensors(Path(clip_weights))
            cmaps = []
            for k in clip.infos:
                normal = orig.normalize_clip_key(k)
                cmaps.append(KeyMapping(k, k, "ignored") if normal is None else map_normal_key(k, normal))
            sources.append((clip, cmaps))
        layout = "original"
        info = {"processing": orig.processing_hints(d),
                "vision_weights": "checkpoint" if has_tower else str(clip_weights)}
    else:
        cfg = LlavaConfig.from_hf_dict(d)
        main = open_tensors(src_dir)
        sources.append((main, [map_hf_key(k) for k in main.infos]))
        layout = _hf_layout(list(main.infos))

    expected = param_shapes(cfg)
    entries: dict[str, _Entry] = {}
    unexpected, mis_shaped = [], []
    for reader, maps in sources:
        for m in maps:
            if m.status == "ignored":
                continue
            if m.status == "unknown" or m.canonical not in expected:
                if m.canonical == "lm_head.kernel" and cfg.text.tie_word_embeddings:
                    continue  # a tied head saved anyway: the embedding is the source of truth
                unexpected.append(m.source if m.status == "unknown" else f"{m.source} (-> {m.canonical})")
                continue
            if m.canonical in entries:
                unexpected.append(f"{m.source} (duplicate of {entries[m.canonical].mapping.source})")
                continue
            ti = reader.infos[m.source]
            try:
                shape = permuted_shape(ti.shape, m.perm)
            except ValueError:
                shape = None
            if shape != tuple(expected[m.canonical]):
                want = permuted_shape(tuple(expected[m.canonical]), inverse_perm(m.perm))
                mis_shaped.append(f"{m.source}: shape {tuple(ti.shape)}, expected {want} (-> {m.canonical})")
            if not is_float_dtype(ti.dtype):
                mis_shaped.append(f"{m.canonical}: dtype {ti.dtype} is not floating point ({m.source})")
            entries[m.canonical] = _Entry(reader, m, tuple(expected[m.canonical]), ti.dtype)
    missing = [k for k in expected if k not in entries]
    if missing or unexpected or mis_shaped:
        parts = []
        shown_missing = [f"{k} (HF {canonical_to_normal(k)[0]})" for k in missing]
        for title, items in (("missing", shown_missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if items:
                parts.append(f"  {title} ({len(items)}):\n" + "\n".join(f"    {x}" for x in items))
        raise ParamMismatchError(
            f"checkpoint {src_dir} does not match its config ({len(missing) + len(unexpected) + len(mis_shaped)} "
            "problem(s)):\n" + "\n".join(parts), missing, unexpected, mis_shaped)
    ordered = {k: entries[k] for k in expected}
    return CheckpointPlan(cfg, ordered, layout, info)


def _copy_into(out: np.ndarray, src: np.ndarray, perm: tuple[int, ...] | None) -> None:
    """``out[...] = transpose(src, perm)`` cast to ``out.dtype``.

    Large 2-D transposes go in 128x128 tiles: 3-4x faster than one strided ``copyto`` (each tile's
    source rows stay in cache), which matters for the ~14 GB of kernels of a 7B model.
    """
    if perm is None:
        np.copyto(out, src.reshape(out.shape), casting="unsafe")
        return
    view = src.transpose(perm)
    if view.ndim != 2 or view.size < (1 << 16):
        np.copyto(out, view, casting="unsafe")
        return
    tile = 128
    rows, cols = view.shape
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            np.copyto(out[i:i + tile, j:j + tile], view[i:i + tile, j:j + tile], casting="unsafe")


def materialize(plan: CheckpointPlan, dtype: Any = None) -> dict[str, np.ndarray]:
    """Read the planned tensors into one preallocated buffer (per-tensor views), casting to ``dtype``."""
    target = parse_dtype(dtype)
    layout: dict[str, tuple[int, np.dtype]] = {}
    total = 0
    for name, e in plan.entries.items():
        dt = target if target is not None else e.dtype
        layout[name] = (total, dt)
        total += -(-math.prod(e.shape) * dt.itemsize // _ALIGN) * _ALIGN
    buf = np.empty(max(total, 1), np.uint8)
    out: dict[str, np.ndarray] = {}
    for name, e in plan.entries.items():
        off, dt = layout[name]
        n = math.prod(e.shape) * dt.itemsize
        out[name] = buf[off:off + n].view(dt).reshape(e.shape)
    by_reader: dict[int, tuple[Any, dict[str, str]]] = {}
    for name, e in plan.entries.items():
        by_reader.setdefault(id(e.reader), (e.reader, {}))[1][e.mapping.source] = name
    for reader, src_to_name in by_reader.values():
        for key, arr in reader.iter_tensors(list(src_to_name)):
            name = src_to_name[key]
            _copy_into(out[name], arr, plan.entries[name].mapping.perm)
            del arr
    return out


def lazy_params(plan: CheckpointPlan, dtype: Any = None) -> dict[str, LazyArray]:
    """The planned tensors as :class:`LazyArray` s: each is read, transposed and cast only when asked for."""
    target = parse_dtype(dtype)

    def make(e: _Entry) -> LazyArray:
        dt = target if target is not None else e.dtype

        def fn() -> np.ndarray:
            out = np.empty(e.shape, dt)
            _copy_into(out, e.reader.get(e.mapping.source), e.mapping.perm)
            e.reader.release(e.mapping.source)
            return out

        return LazyArray(e.shape, dt, fn)

    return {name: make(e) for name, e in plan.entries.items()}


def _close(plan: CheckpointPlan) -> None:
    for reader in {id(e.reader): e.reader for e in plan.entries.values()}.values():
        reader.close()


def read_checkpoint(src: str | os.PathLike, dtype: Any = None,
                    clip_dir: str | os.PathLike | None = None) -> tuple[LlavaConfig, dict[str, np.ndarray]]:
    """Read an HF (any key generation) or original-LLaVA checkpoint into canonical JAX-layout arrays.

    ``dtype=None`` keeps each tensor's stored dtype; otherwise every tensor is cast (``"bfloat16"``,
    ``"float32"``, ``jnp.bfloat16``, ...). ``clip_dir`` supplies the CLIP tower of an original
    checkpoint that does not contain it.
    """
    src_dir = resolve_source(src)
    clip = resolve_source(clip_dir) if clip_dir is not None else None
    plan = plan_checkpoint(src_dir, clip)
    return plan.cfg, materialize(plan, dtype)


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
        raise ConvertError(f"{dst} is the source checkpoint; refusing to overwrite it")
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
                _close(plan)

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
        raise ConvertError(f"{dst}: no {MARKER} (not a converted jaxprune checkpoint)") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{dst / MARKER}: corrupt ({e})") from None
    if marker.get("format") != FORMAT or marker.get("format_version") != FORMAT_VERSION:
        raise ConvertError(f"{dst / MARKER}: unsupported format {marker.get('format')!r} version "
                           f"{marker.get('format_version')!r} (this jaxprune reads {FORMAT!r} v{FORMAT_VERSION})")
    cfg = load_config(dst)
    if not (dst / PARAMS_DIR).is_dir():
        raise ConvertError(f"{dst}: the orbax parameter directory {PARAMS_DIR}/ is missing")
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
