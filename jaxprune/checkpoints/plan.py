"""Plan a checkpoint from its config and tensor headers, before any data is read.

:func:`plan_checkpoint` reads ``config.json`` and the headers of an HF (any key generation) or
original-LLaVA directory (plus the separate CLIP directory of an original checkpoint), maps every
tensor to its canonical name (:func:`jaxprune.models.param_spec.param_shapes`) and checks the lot
against the config, so a checkpoint that does not match fails with ONE :class:`ParamMismatchError`
listing every missing, unexpected and mis-shaped tensor. A missing tensor is named both by its
canonical name and by its key spelled as the checkpoint's own files spell their keys (legacy
``language_model.model.*``, transformers-5 ``model.language_model.*``, flattened CLIP
``model.vision_tower.*``, original ``model.mm_projector.0.*``, ...), with the file it is missing from.
:func:`check_params` does the same check for parameters already in canonical form.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from jaxprune.checkpoints import original as orig
from jaxprune.checkpoints.dtypes import is_float_dtype
from jaxprune.checkpoints.errors import CheckpointError, ParamMismatchError
from jaxprune.checkpoints.keys import (
    HF_SPELLINGS,
    KeyMapping,
    canonical_to_normal,
    file_spelling,
    inverse_perm,
    map_hf_key,
    map_normal_key,
    model_part,
    permuted_shape,
)
from jaxprune.checkpoints.source import open_tensors
from jaxprune.config import ConfigError, LlavaConfig
from jaxprune.models.param_spec import param_shapes


@dataclasses.dataclass
class PlanEntry:
    """One canonical parameter: which reader holds it under which key, and how to lay it out."""

    reader: Any
    mapping: KeyMapping
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass
class CheckpointPlan:
    """Everything known about a checkpoint from its config and headers, before reading data."""

    cfg: LlavaConfig
    entries: dict[str, PlanEntry]
    layout: str
    info: dict[str, Any]

    def close(self) -> None:
        """Close every reader of the plan (unmaps the files :meth:`PlanEntry.reader.get` opened)."""
        for reader in {id(e.reader): e.reader for e in self.entries.values()}.values():
            reader.close()


@dataclasses.dataclass
class _Source:
    """One set of tensor files: its reader, the mapping of each key, how it spells keys, which parts it holds."""

    reader: Any
    maps: list[KeyMapping]
    spell: Callable[[str], str]
    parts: frozenset[str] | None = None  # None: every part of the model

    def holds(self, normal: str) -> bool:
        return self.parts is None or model_part(normal) in self.parts


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no config.json (not a LLaVA checkpoint directory)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return d


def _hf_layout(keys: list[str]) -> str:
    legacy = any(k.startswith(("language_model.model.", "vision_tower.", "image_tower.", "video_tower.",
                               "multi_modal_projector.")) for k in keys)
    v5 = any(k.startswith("model.") for k in keys)
    if legacy and v5:
        return "hf-mixed"
    if v5:
        flat = any(k.startswith(f"model.{t}.") and not k.startswith(f"model.{t}.vision_model.")
                   for k in keys for t in ("vision_tower", "image_tower", "video_tower"))
        return "hf-v5-flat-clip" if flat else "hf-v5"
    return "hf-legacy"


def _source(reader: Any, maps: list[KeyMapping], spellings, parts: frozenset[str] | None = None) -> _Source:
    return _Source(reader, maps, file_spelling(maps, spellings), parts)


def _open_sources(src_dir: Path, clip_dir: Path | None) -> tuple[LlavaConfig, list[_Source], str, dict[str, Any]]:
    d = _read_json(src_dir / "config.json")
    if not orig.is_original_config(d):
        cfg = LlavaConfig.from_hf_dict(d)
        main = open_tensors(src_dir)
        return cfg, [_source(main, [map_hf_key(k) for k in main.infos], HF_SPELLINGS)], _hf_layout(list(main.infos)), {}
    main = open_tensors(src_dir)
    maps = []
    for k in main.infos:
        normal = orig.normalize_original_key(k)
        maps.append(KeyMapping(k, k, "ignored") if normal is None else map_normal_key(k, normal))
    has_tower = any(m.canonical and m.canonical.startswith("vision.") for m in maps)
    clip_weights = clip_dir if clip_dir is not None else orig.local_tower_dir(d)
    if not has_tower and clip_weights is None:
        raise CheckpointError(f"{src_dir}: the CLIP tower ({d.get('mm_vision_tower')}) is not in the checkpoint; "
                              "pass --clip-dir with a local copy of it")
    vision = orig.vision_dict_for(d, clip_dir)
    cfg = LlavaConfig.from_hf_dict(orig.original_to_hf_dict(d, vision))
    tower = frozenset({"vision_tower"})
    everything_else = frozenset({"language_model", "lm_head", "multi_modal_projector", "image_newline"})
    sources = [_source(main, maps, orig.ORIGINAL_SPELLINGS, None if has_tower else everything_else)]
    if not has_tower:
        clip = open_tensors(Path(clip_weights))
        cmaps = []
        for k in clip.infos:
            normal = orig.normalize_clip_key(k)
            cmaps.append(KeyMapping(k, k, "ignored") if normal is None else map_normal_key(k, normal))
        sources.append(_source(clip, cmaps, orig.CLIP_SPELLINGS, tower))
    info = {"processing": orig.processing_hints(d), "vision_weights": "checkpoint" if has_tower else str(clip_weights)}
    return cfg, sources, "original", info


def _where(location: Path, src_dir: Path) -> str:
    """A reader's file, relative to the checkpoint directory when it is inside it."""
    try:
        return str(location.relative_to(src_dir))
    except ValueError:
        return str(location)


def _missing_line(name: str, sources: list[_Source], src_dir: Path) -> str:
    normal = canonical_to_normal(name)[0]
    source = next((s for s in sources if s.holds(normal)), sources[0])
    return f"{name}: no tensor {source.spell(normal)!r} in {_where(source.reader.location, src_dir)}"


def plan_checkpoint(src_dir: Path, clip_dir: Path | None = None) -> CheckpointPlan:
    """Read ``config.json`` and the tensor headers of ``src_dir`` (and ``clip_dir``) and validate them.

    Raises :class:`ParamMismatchError` listing every missing, unexpected (including duplicate) and
    mis-shaped tensor at once; each missing tensor is named as the checkpoint's files spell their keys.
    """
    cfg, sources, layout, info = _open_sources(src_dir, clip_dir)
    expected = param_shapes(cfg)
    entries: dict[str, PlanEntry] = {}
    unexpected, mis_shaped = [], []
    for src in sources:
        for m in src.maps:
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
            ti = src.reader.infos[m.source]
            try:
                shape = permuted_shape(ti.shape, m.perm)
            except ValueError:
                shape = None
            if shape != tuple(expected[m.canonical]):
                want = permuted_shape(tuple(expected[m.canonical]), inverse_perm(m.perm))
                mis_shaped.append(f"{m.source}: shape {tuple(ti.shape)}, expected {want} (-> {m.canonical})")
            if not is_float_dtype(ti.dtype):
                mis_shaped.append(f"{m.canonical}: dtype {ti.dtype} is not floating point ({m.source})")
            entries[m.canonical] = PlanEntry(src.reader, m, tuple(expected[m.canonical]), ti.dtype)
    missing = [k for k in expected if k not in entries]
    if missing or unexpected or mis_shaped:
        parts = []
        shown_missing = [_missing_line(k, sources, src_dir) for k in missing]
        for title, items in (("missing", shown_missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if items:
                parts.append(f"  {title} ({len(items)}):\n" + "\n".join(f"    {x}" for x in items))
        raise ParamMismatchError(
            f"checkpoint {src_dir} does not match its config ({len(missing) + len(unexpected) + len(mis_shaped)} "
            "problem(s)):\n" + "\n".join(parts), missing, unexpected, mis_shaped)
    ordered = {k: entries[k] for k in expected}
    return CheckpointPlan(cfg, ordered, layout, info)


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
