"""Capture the exact context each reducer of a spec receives on a real model and real inputs.

The capture runs the model's own reduced prefill (:func:`jaxprune.reducers.plan._prefill_reduced`,
i.e. ``plan.pre_llm`` then ``llm.prefill_llm``) under ``jax.jit``, with every reducer of the spec
wrapped in a recorder that hands the real reducer its context, stores the context, and returns the real
output, so the pipeline goes on exactly as in ``Llava.generate``. After the last reducer the trace is
abandoned (nothing downstream of it is compiled) and the stored contexts are the jitted function's
outputs. Nothing of the pipeline is re-implemented here; the benchmarks then time, on those contexts:

* a vision / projector reducer: ``jax.jit(reducer)(ctx)``;
* an LLM-stage reducer: the whole cut, :func:`jaxprune.reducers.llm._cut` (context build incl. layer K's
  q/k when ``needs_next_qk``, the reducer, and the sequence rebuild). ``_cut``'s inputs are exactly the
  fields of the :class:`~jaxprune.reducers.llm.LLMContext` it builds, so they come from the capture;
* a projector reducer with ``shallow_layers > 0`` (ConsensusDrop, source="shallow"): the shallow prefill
  on the full sequence (``plan._merge_sequence`` + ``plan._text_to_image``, as ``plan.pre_llm`` calls
  them), checked against the ``text_to_image`` the capture recorded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from jaxprune import generate as gen
from jaxprune.reducers import llm as llm_stage
from jaxprune.reducers import plan


class _Done(Exception):
    """Raised by the last recorder: the rest of the pipeline is not needed."""


class _Recorder:
    """Stands in for a reducer spec inside the pipeline: every attribute is the reducer's; a call records
    the context, then returns what the reducer returns."""

    def __init__(self, inner, sink: list, last: bool):
        self._inner, self._sink, self._last = inner, sink, last

    def __getattr__(self, name: str):
        if name.startswith("_"):  # our own slots; never forward dunders / privates
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __call__(self, ctx):
        out = self._inner(ctx)
        self._sink.append(ctx)
        if self._last:
            raise _Done
        return out


@dataclasses.dataclass
class Capture:
    """The contexts of every reducer of a spec, in pipeline order, plus the prepared batch."""

    reducers: tuple          # the spec's reducers (stage order)
    contexts: list           # one context pytree per reducer (VisionContext / ProjectorContext / LLMContext)
    batch: Any               # jaxprune.inputs.Batch (bucketed ids, pixels, valid)
    imgs_per_row: int
    visual_per_image: int    # visual tokens per image that reach the LLM


#: XLA options for compile speed over code speed (smoke runs, where timings mean nothing).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def capture(model, input_ids, pixel_values, reducer, attention_mask=None, max_new_tokens: int = 1,
            compiler_options: dict | None = None) -> Capture:
    """Run ``model``'s reduced prefill with ``reducer`` (a spec or ``compose``) up to its last reducer and
    return the context each of its reducers received."""
    b, reducers, ipr, k = plan._prepare(model, input_ids, pixel_values, attention_mask, None, reducer)

    def run(params, ids, px, valid):
        sink: list = []
        recs = tuple(_Recorder(r, sink, i == len(reducers) - 1) for i, r in enumerate(reducers))
        try:
            plan._prefill_reduced(model.graphdef, params, ids, px, valid, reducers=recs, imgs_per_row=ipr,
                                  max_new_tokens=max_new_tokens)
        except _Done:
            pass
        if len(sink) != len(reducers):
            raise RuntimeError(f"captured {len(sink)} contexts for {len(reducers)} reducers")
        return sink

    contexts = jax.jit(run, compiler_options=compiler_options)(model.params, b.input_ids, b.pixel_values, b.valid)
    return Capture(reducers=reducers, contexts=list(contexts), batch=b, imgs_per_row=ipr, visual_per_image=k)


def reducer_fn(model, r, with_cut: bool = True, compiler_options: dict | None = None):
    """A jitted ``f(params, ctx)`` that does the reducer's own work on a captured context.

    Pre-LLM stages: ``r(ctx)``. LLM stage: ``llm._cut`` on the captured inputs (``with_cut``), or ``r(ctx)``
    alone (``with_cut=False``)."""
    graphdef = model.graphdef
    if r.stage == "llm" and with_cut:
        def f(params, ctx):
            m = nnx.merge(graphdef, params)
            return llm_stage._cut(m, r, ctx.hidden, ctx.valid, ctx.positions, ctx.visual_index, ctx.visual_valid,
                                  (ctx.prev_q, ctx.prev_k))
    else:
        def f(params, ctx):
            del params
            return r(ctx)
    return jax.jit(f, compiler_options=compiler_options)


def shallow_fn(model, r, compiler_options: dict | None = None):
    """A jitted ``f(params, input_ids, valid, features, features_valid, text_embeds) -> text_to_image [N, P]``:
    the shallow prefill ``plan.pre_llm`` runs for a projector reducer with ``shallow_layers > 0`` (full
    sequence with ``features`` in the image slots, ``r.shallow_layers`` decoder layers)."""
    graphdef, img_tok = model.graphdef, model.cfg.image_token_index

    def f(params, ids, valid, feats, fvalid, text_emb):
        m = nnx.merge(graphdef, params)
        is_img = (ids == img_tok) & valid
        full_h = plan._merge_sequence(m, ids, valid, is_img, feats, fvalid, text_emb)[0]
        return plan._text_to_image(m, full_h, gen.default_positions(valid), valid, is_img, r.shallow_layers,
                                   getattr(r, "query_rows", 32), feats.shape[0], feats.shape[1])

    return jax.jit(f, compiler_options=compiler_options)


def text_embeds(model, input_ids):
    """LLM input embeddings of the prompt's ids ``[B, T, H]`` (what ``pre_llm`` builds before any stage)."""
    graphdef = model.graphdef
    return jax.jit(lambda params, ids: nnx.merge(graphdef, params).embed_text(ids))(model.params, input_ids)


def shallow_args(model, cap: Capture, ctx) -> tuple:
    """Arguments of :func:`shallow_fn` for a captured projector context ``ctx``."""
    b = cap.batch
    return (model.params, b.input_ids, b.valid, ctx.features, ctx.valid, text_embeds(model, b.input_ids))


__all__ = ["FAST_COMPILE", "Capture", "capture", "reducer_fn", "shallow_args", "shallow_fn", "text_embeds"]
