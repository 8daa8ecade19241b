"""The host-side plan of one call: validation, the family's static layout, bucketing, device arrays.

:func:`plan` is the one planning step every entry point uses (``Llava.__call__`` / ``generate``, the eval
harness, the benchmarks, the sharded model): it validates the inputs and every budget before anything is
traced, and returns a :class:`Plan` whose ``static`` part (hashable) selects the compiled program and whose
``arrays`` are its inputs. Prompts are right-padded to a multiple of ``model.bucket`` tokens (exact under causal
attention), so nearby lengths share one program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxprune import families
from jaxprune.engine.cuts import check_llm_reducers
from jaxprune.engine.reducer_inputs import TABLE_KEY, check_reducer_inputs
from jaxprune.engine.sequence import canonical_sequence
from jaxprune.families.base import VisualInputs
from jaxprune.inputs import InputError, bucket_length, check_text
from jaxprune.reducers.base import STAGE_ORDER, BudgetError
from jaxprune.reducers.compose import as_tuple
from jaxprune.reducers.options import OPTIONS, NextOptions, VideoOptions, unwrap


@dataclasses.dataclass(frozen=True)
class EngineStatic:
    """Everything static about a call (hashable): it keys the compiled programs."""

    family: str            # model_type of the family that encodes the pixels
    layout: Any            # the family's static layout (None: text only)
    reducers: tuple = ()   # flattened reducer specs, pipeline order
    reduced: bool = False  # canonical rows (any reducer) instead of the caller's HF layout


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated call: ``arrays`` (device inputs) + ``static`` (the program) + output bookkeeping."""

    arrays: dict                 # input_ids [B, T], valid [B, T], positions [B, T] (unreduced), pixel_values, tables
    static: EngineStatic
    length: int                  # valid columns of the output rows (before bucket padding)
    visual: VisualInputs | None  # host view of the visual inputs (layout, per-image token counts)

    @property
    def batch_shape(self) -> tuple[int, int]:
        """``(rows, bucketed length)`` of the program's input."""
        return tuple(self.arrays["input_ids"].shape)


def split_reducer(reducer) -> tuple[tuple, NextOptions | VideoOptions | None]:
    """``(flattened specs, options or None)``; validates stages and the options wrapper's place."""
    inner, opts = unwrap(reducer)
    reducers = as_tuple(inner)
    for r in reducers:
        if isinstance(r, OPTIONS):
            raise ValueError(f"{r.stage}() must wrap the whole reducer (compose inside it, "
                             "not around it)")
        if getattr(r, "stage", None) not in STAGE_ORDER:
            raise ValueError(f"unknown reducer stage {getattr(r, 'stage', None)!r} of {type(r).__name__}")
    return reducers, (opts if isinstance(reducer, OPTIONS) else None)


def _check_depth(cfg, reducers: tuple) -> None:
    L = cfg.text.num_hidden_layers
    for r in reducers:
        n = getattr(r, "shallow_layers", 0) or 0
        if n > L:
            raise BudgetError(f"{type(r).__name__}.shallow_layers={n} exceeds the decoder's {L} layers")


def validate_reducer(cfg, reducer, images_per_row: int = 1) -> None:
    """Check ``reducer`` against a model config without any input (budgets, layers, options): raises
    :class:`~jaxprune.reducers.BudgetError` / ``ValueError`` naming the problem. What :func:`plan` checks
    for the budget side, so a CLI can refuse a bad spec before loading weights."""
    reducers, opts = split_reducer(reducer)
    st = families.get(cfg.model_type).static(cfg, reducers, opts, images_per_row, None)
    _check_depth(cfg, reducers)
    check_llm_reducers(cfg, reducers, images_per_row, st.V)


def plan(model, input_ids, pixel_values=None, attention_mask=None, image_sizes=None, reducer=None,
         position_ids=None, pixel_values_videos=None, reducer_inputs=None) -> Plan:
    """Validate HF-style inputs (+ ``reducer``) for ``model`` and build the :class:`Plan` of the call.

    ``pixel_values_videos [B_v, frames, C, H, W]``: videos, for families that take them (Video-LLaVA); any other
    family refuses the argument by name. ``reducer_inputs``: ``{name: [images, patches]}`` for reducers that read
    caller-side information (:mod:`jaxprune.engine.reducer_inputs`; names no reducer reads are ignored)."""
    cfg = model.cfg
    fam = families.get(cfg.model_type)
    text = check_text(cfg, input_ids, attention_mask, position_ids)
    B, T = text.input_ids.shape
    tok = cfg.image_token_index
    visual = None
    check_inputs = getattr(fam, "check_inputs", None)
    if check_inputs is not None:  # a family with several placeholder kinds: it maps them onto ``tok`` spans
        text, visual = check_inputs(cfg, text, pixel_values, pixel_values_videos, image_sizes)
    elif pixel_values_videos is not None:
        raise InputError(f"pixel_values_videos was given to a {cfg.model_type!r} model: the {fam.name} family "
                         "takes no video (Video-LLaVA checkpoints, model_type 'video_llava', do)")
    elif pixel_values is None:
        if text.image_tokens:
            raise InputError(f"input_ids contain {text.image_tokens} image tokens (id {tok}) but no pixel_values "
                             "were given")
    else:
        visual = fam.check_visual(cfg, pixel_values, image_sizes, text.image_tokens)
    pad_id = 0 if tok != 0 else 1
    extra = None  # reducer_inputs the spec reads (none without a reducer)
    if reducer is None:
        layout = None if visual is None else fam.static(cfg, (), None, 0, visual)
        Tb = bucket_length(T, model.bucket)
        ids = np.full((B, Tb), pad_id, np.int32)
        ids[:, :T] = np.where(text.mask, text.input_ids, pad_id)  # padded slots never count as image tokens
        valid = np.zeros((B, Tb), bool)
        valid[:, :T] = text.mask
        pos = np.zeros((B, Tb), np.int32)
        pos[:, :T] = text.positions
        arrays = {"input_ids": ids, "valid": valid, "positions": pos}
        static = EngineStatic(cfg.model_type, layout)
        length = T
    else:
        if position_ids is not None:
            raise InputError("position_ids cannot be combined with a reducer (reducers renumber positions)")
        reducers, opts = split_reducer(reducer)
        if visual is None:
            raise InputError("reducers act on visual tokens: pixel_values are required")
        N = len(visual.span_tokens)  # visual spans (images; Video-LLaVA: images or whole videos)
        if N % B:
            raise InputError(f"{N} images for {B} rows: reducers need the same number of images in every row")
        ipr = N // B
        layout = fam.static(cfg, reducers, opts, ipr, visual)
        ids, valid, ipr2, length = canonical_sequence(text.input_ids, text.mask, T, tok, visual.span_tokens,
                                                      layout.S_h, model.bucket, layout.S_full)
        if ipr2 != ipr:
            raise InputError(f"{ipr2} image spans per row but {ipr} images per row")
        _check_depth(cfg, reducers)
        check_llm_reducers(cfg, reducers, ipr, layout.V)
        arrays = {"input_ids": ids, "valid": valid}
        static = EngineStatic(cfg.model_type, layout, reducers, True)
        extra = check_reducer_inputs(cfg, reducers, reducer_inputs, N)
    if visual is not None:
        arrays["pixel_values"] = visual.pixel_values.astype(model.dtype)
        arrays["tables"] = fam.tables(cfg, visual, layout)
        if extra is not None:
            arrays["tables"] = {**arrays["tables"], TABLE_KEY: extra}
    return Plan(arrays=model.put_arrays(arrays), static=static, length=length, visual=visual)
