"""The one prefill / decode path of every family, as jitted pure functions of ``(params, arrays)``.

``encode`` (family tower + pre-LLM reducers + placement) -> decoder segments with in-LLM cuts -> logits or the
decode state; the unreduced model is the same path with no reducer. :class:`Programs` holds the three jitted
programs of one module graph (``forward``, ``prefill``, ``decode``), keyed by the plan's static part, so each
(batch bucket, text-length bucket, image layout, reducer spec) compiles once. :func:`forward`, :func:`prefill`
and :func:`decode` are what ``Llava``, the eval harness, the benchmarks and the sharded model call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune import families
from jaxprune.engine import decoder as dec
from jaxprune.engine.cuts import prefill_llm, run_llm
from jaxprune.engine.plan import EngineStatic, Plan
from jaxprune.engine.sequence import place_spans, place_valid
from jaxprune.engine.vision import text_to_image


@dataclasses.dataclass(frozen=True)
class LlavaOutput:
    logits: jax.Array  # [B, T_out, V] fp32
    attention_mask: jax.Array | None = None  # [B, T_out] validity of the (reduced) sequence; None = as given
    kept: jax.Array | None = None            # [N_img, k] source index of each visual token (-1: empty/CLS)
    kept_valid: jax.Array | None = None      # [N_img, k] bool


def encode(m, static: EngineStatic, arrays: dict):
    """The LLM input of a planned call. Returns ``(h [B, T, H], valid [B, T], positions [B, T],
    is_pool [B, T] | None, n_visual, kept [N, S] | None, kept_valid [N, S] | None)``; ``n_visual`` = the
    static in-LLM visual pool per row."""
    cfg = m.cfg
    ids, valid = arrays["input_ids"], arrays["valid"]
    text_emb = m.embed_text(ids)  # [B, T, H]
    if "pixel_values" not in arrays:
        return text_emb, valid, arrays["positions"], None, 0, None, None
    fam = families.get(static.family)
    lay = static.layout
    px, tables = arrays["pixel_values"], arrays["tables"]
    is_img = (ids == cfg.image_token_index) & valid
    if not static.reduced:
        tok, tvalid, _, kept = fam.encode(m, lay, (), px, tables, None, None, None)
        # a family whose unreduced spans are all valid (LLaVA-1.5) places by rank, no search
        h = place_valid(text_emb, is_img, tok, None if getattr(lay, "dense", False) else tvalid)
        return h, valid, arrays["positions"], is_img, 0, None, None
    ipr = lay.ipr
    N = ids.shape[0] * ipr  # spans: every canonical row holds ipr (pixel arrays may hold crops / frames instead)
    row = jnp.arange(N) // ipr
    te, tv = text_emb[row], (valid & ~is_img)[row]  # [N, T, H], [N, T]: the prompt that owns each image

    def t2i(tokens, tok_valid, layers: int, query_rows: int):  # shallow prefill on the full sequence
        K = tokens.shape[1]
        hf, vf, imgf = place_spans(ids, valid, is_img, text_emb, tokens, tok_valid, jnp.ones(tok_valid.shape, bool),
                                   lay.S_h, ipr)
        return text_to_image(m, hf, dec.default_positions(vf), vf, imgf, layers, query_rows, N, K)

    tok, tvalid, pool, kept = fam.encode(m, lay, static.reducers, px, tables, te, tv, t2i)
    h, v2, is_pool = place_spans(ids, valid, is_img, text_emb, tok, tvalid, pool, lay.S_h, ipr)
    return h, v2, dec.default_positions(v2), is_pool, ipr * lay.V, kept, tvalid


def _llm(static: EngineStatic) -> list:
    return [r for r in static.reducers if r.stage == "llm"]


def forward_fn(graphdef, params, arrays, *, static: EngineStatic, mask_only: bool = False):
    """Logits ``[B, T_out, V]``, the output validity ``[B, T_out]`` and ``(kept, kept_valid)``."""
    m = nnx.merge(graphdef, params)
    h, valid, pos, is_pool, n_vis, kept, kept_valid = encode(m, static, arrays)
    logits, valid_out = run_llm(m, _llm(static), h, pos, valid, is_pool, n_vis, mask_only)
    return logits, valid_out, kept, kept_valid


def prefill_fn(graphdef, params, arrays, *, static: EngineStatic, max_new_tokens: int) -> dec.DecodeState:
    """First-token logits plus the decode state (each segment's cache sized ``T_s + max_new_tokens``)."""
    m = nnx.merge(graphdef, params)
    h, valid, pos, is_pool, n_vis, _, _ = encode(m, static, arrays)
    return prefill_llm(m, _llm(static), h, pos, valid, max_new_tokens, is_pool, n_vis)


def decode_fn(graphdef, params, state: dec.DecodeState, *, max_new_tokens: int, eos_ids: tuple[int, ...],
              pad_id: int) -> jax.Array:
    """Greedy tokens ``[B, max_new_tokens]`` continuing ``state``."""
    m = nnx.merge(graphdef, params)
    return dec.greedy_decode(m, state, max_new_tokens, eos_ids, pad_id)


class Programs:
    """The jitted programs of one module graph; ``.forward`` / ``.prefill`` / ``.decode`` are ``jax.jit``
    objects (``.lower(...)`` works for ahead-of-time compilation and cost analysis)."""

    def __init__(self, graphdef: Any):
        self.forward = jax.jit(functools.partial(forward_fn, graphdef), static_argnames=("static", "mask_only"))
        self.prefill = jax.jit(functools.partial(prefill_fn, graphdef), static_argnames=("static", "max_new_tokens"))
        self.decode = jax.jit(functools.partial(decode_fn, graphdef),
                              static_argnames=("max_new_tokens", "eos_ids", "pad_id"))

    def clear_cache(self) -> None:
        """Release every compiled executable (long sweeps: one row's programs at a time)."""
        for f in (self.forward, self.prefill, self.decode):
            f.clear_cache()


def forward(model, p: Plan, mask_only: bool = False) -> LlavaOutput:
    """``model(...)`` of a plan: logits of the caller's rows (unreduced) or of the reduced sequence.

    ``mask_only`` (reference semantics, tests): in-LLM cuts mask dropped tokens out of attention instead of
    removing them; logits then cover the whole post-pre-LLM sequence."""
    logits, valid_out, kept, kept_valid = model.programs.forward(model.params, p.arrays, static=p.static,
                                                                 mask_only=mask_only)
    pad = p.arrays["input_ids"].shape[1] - p.length  # bucket padding sits at the end of every row
    t_out = logits.shape[1] - pad
    if not p.static.reduced:
        return LlavaOutput(logits=logits[:, :t_out])
    return LlavaOutput(logits=logits[:, :t_out], attention_mask=valid_out[:, :t_out], kept=kept,
                       kept_valid=kept_valid)


def prefill(model, p: Plan, max_new_tokens: int) -> dec.DecodeState:
    """Run the prompt (tower, reducers, decoder) and return the :class:`~jaxprune.engine.decoder.DecodeState`."""
    return model.programs.prefill(model.params, p.arrays, static=p.static, max_new_tokens=max_new_tokens)


def decode(model, state: dec.DecodeState, max_new_tokens: int, eos_ids: tuple[int, ...] = (), pad_id: int = 0
           ) -> jax.Array:
    """Greedy continuation of a prefill: ``[B, max_new_tokens]`` int32 (finished rows filled with ``pad_id``)."""
    return model.programs.decode(model.params, state, max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids),
                                 pad_id=int(pad_id))
