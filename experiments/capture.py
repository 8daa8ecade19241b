"""Capture the exact context each reducer of a spec receives on a real model and real inputs.

The capture runs the model's own prefill program (:func:`jaxprune.engine.run.prefill_fn` on the plan of
``model.plan(..., reducer=spec)``: the family's tower and pre-LLM stages, the placement, then the decoder with
its in-LLM cuts) under ``jax.jit``, with every reducer of the plan's static part wrapped in a recorder that
hands the real reducer its context, stores the context, and returns the real output, so the pipeline goes on
exactly as in ``Llava.generate``. After the last reducer the trace is abandoned (nothing downstream of it is
compiled) and the stored contexts are the jitted function's outputs. Nothing of the pipeline is re-implemented
here; the benchmarks then time, on those contexts:

* a vision / projector reducer: ``jax.jit(reducer)(ctx)``;
* an LLM-stage reducer: the whole cut, :func:`jaxprune.engine.cuts.cut` (context build incl. layer K's
  q/k when ``needs_next_qk``, the reducer, and the sequence rebuild). ``cut``'s inputs are exactly the
  fields of the :class:`~jaxprune.reducers.llm.LLMContext` it builds, so they come from the capture;
* a projector reducer with ``shallow_layers > 0`` (ConsensusDrop, source="shallow"): the shallow prefill
  on the full sequence (:func:`jaxprune.engine.sequence.place_spans` +
  :func:`jaxprune.engine.vision.text_to_image`, as :func:`jaxprune.engine.encode` calls them), checked against
  the ``text_to_image`` the capture recorded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.engine import cuts
from jaxprune.engine import decoder as dec
from jaxprune.engine.run import prefill_fn
from jaxprune.engine.sequence import place_spans
from jaxprune.engine.vision import text_to_image


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
    """The contexts of every reducer of a spec, in pipeline order, plus the plan of the call."""

    reducers: tuple          # the spec's reducers (stage order)
    contexts: list           # one context pytree per reducer (VisionContext / ProjectorContext / LLMContext)
    plan: Any                # jaxprune.engine.Plan (canonical bucketed rows, pixels, valid; static layout)
    imgs_per_row: int
    visual_per_image: int    # visual tokens per image that reach the LLM


#: XLA options for compile speed over code speed (smoke runs, where timings mean nothing).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def capture(model, input_ids, pixel_values, reducer, attention_mask=None, max_new_tokens: int = 1,
            compiler_options: dict | None = None) -> Capture:
    """Run ``model``'s reduced prefill with ``reducer`` (a spec or ``compose``) up to its last reducer and
    return the context each of its reducers received."""
    p = model.plan(input_ids, pixel_values, attention_mask, None, reducer)
    reducers = p.static.reducers

    def run(params, arrays):
        sink: list = []
        recs = tuple(_Recorder(r, sink, i == len(reducers) - 1) for i, r in enumerate(reducers))
        try:
            prefill_fn(model.graphdef, params, arrays, static=dataclasses.replace(p.static, reducers=recs),
                       max_new_tokens=max_new_tokens)
        except _Done:
            pass
        if len(sink) != len(reducers):
            raise RuntimeError(f"captured {len(sink)} contexts for {len(reducers)} reducers")
        return sink

    contexts = jax.jit(run, compiler_options=compiler_options)(model.params, p.arrays)
    lay = p.static.layout
    return Capture(reducers=reducers, contexts=list(contexts), plan=p, imgs_per_row=lay.ipr, visual_per_image=lay.S)


def reducer_fn(model, r, with_cut: bool = True, compiler_options: dict | None = None):
    """A jitted ``f(params, ctx)`` that does the reducer's own work on a captured context.

    Pre-LLM stages: ``r(ctx)``. LLM stage: ``engine.cuts.cut`` on the captured inputs (``with_cut``), or ``r(ctx)``
    alone (``with_cut=False``)."""
    graphdef = model.graphdef
    if r.stage == "llm" and with_cut:
        def f(params, ctx):
            m = nnx.merge(graphdef, params)
            return cuts.cut(m, r, ctx.hidden, ctx.valid, ctx.positions, ctx.visual_index, ctx.visual_valid,
                            (ctx.prev_q, ctx.prev_k))
    else:
        def f(params, ctx):
            del params
            return r(ctx)
    return jax.jit(f, compiler_options=compiler_options)


def shallow_fn(model, r, layout, compiler_options: dict | None = None):
    """A jitted ``f(params, input_ids, valid, features, features_valid, text_embeds) -> text_to_image [N, P]``:
    the shallow prefill :func:`jaxprune.engine.encode` runs for a projector reducer with ``shallow_layers > 0``
    (the plan's rows -- ``layout`` = its ``static.layout`` -- with ``features`` in the image spans,
    ``r.shallow_layers`` decoder layers)."""
    graphdef, img_tok = model.graphdef, model.cfg.image_token_index

    def f(params, ids, valid, feats, fvalid, text_emb):
        m = nnx.merge(graphdef, params)
        is_img = (ids == img_tok) & valid
        hf, vf, imgf = place_spans(ids, valid, is_img, text_emb, feats, fvalid, jnp.ones(fvalid.shape, bool),
                                   layout.S_h, layout.ipr)
        return text_to_image(m, hf, dec.default_positions(vf), vf, imgf, r.shallow_layers,
                             getattr(r, "query_rows", 32), feats.shape[0], feats.shape[1])

    return jax.jit(f, compiler_options=compiler_options)


def text_embeds(model, input_ids):
    """LLM input embeddings of the prompt's ids ``[B, T, H]`` (what ``engine.encode`` builds before any stage)."""
    graphdef = model.graphdef
    return jax.jit(lambda params, ids: nnx.merge(graphdef, params).embed_text(ids))(model.params, input_ids)


def shallow_args(model, cap: Capture, ctx) -> tuple:
    """Arguments of :func:`shallow_fn` for a captured projector context ``ctx``."""
    ids, valid = cap.plan.arrays["input_ids"], cap.plan.arrays["valid"]
    return (model.params, ids, valid, ctx.features, ctx.valid, text_embeds(model, ids))


__all__ = ["FAST_COMPILE", "Capture", "capture", "reducer_fn", "shallow_args", "shallow_fn", "text_embeds"]
