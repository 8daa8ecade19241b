"""The in-LLM machinery: gather == mask, decode with cut caches == forward, KV bytes, errors."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.reducers import BudgetError, compose
from jaxprune.reducers.fastv import fastv
from jaxprune.reducers.llm import LLMContext, LLMReduced, LLMReducerBase
from tests.reducer_testlib import run_forward
from tests.reducer_testlib import E2E_CFG, e2e_model, make_batch


@dataclasses.dataclass(frozen=True)
class EveryNth(LLMReducerBase):
    """Test reducer: keep every ``n``-th visual slot (query-independent, so decode can be checked)."""

    layer: int
    n: int
    pos: str = "keep"
    positions: ClassVar[str] = "keep"

    def __post_init__(self):
        object.__setattr__(self, "positions", self.pos)

    def output_visual(self, available: int) -> int:
        return -(-available // self.n)

    def __call__(self, ctx: LLMContext) -> LLMReduced:
        V = ctx.visual_index.shape[1]
        slots = jnp.broadcast_to(jnp.arange(0, V, self.n)[None], (ctx.valid.shape[0], -(-V // self.n)))
        return LLMReduced(slots=slots, tokens=jnp.take_along_axis(ctx.visual_hidden, slots[..., None], axis=1),
                          valid=jnp.take_along_axis(ctx.visual_valid, slots, axis=1))


def _batch(seed=0, padding="left"):
    return make_batch([4, 9, 6], E2E_CFG.tokens_per_image, 100, 128, 24, padding=padding, seed=seed)


@pytest.mark.parametrize("layer,keep", [(1, 16), (2, 48), (3, 5)])
def test_fastv_gather_equals_mask(layer, keep):
    m = e2e_model()
    ids, mask, px = _batch(layer)
    r = fastv(layer=layer, keep=keep)
    g = run_forward(m, ids, px, mask, None, r)
    mk = run_forward(m, ids, px, mask, None, r, mask_only=True)
    gv, mv = np.asarray(g.attention_mask), np.asarray(mk.attention_mask)
    assert g.logits.shape[1] == ids.shape[1] - 144 + keep
    a, b = np.asarray(g.logits)[gv], np.asarray(mk.logits)[mv]
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max())


@pytest.mark.parametrize("pos", ["keep", "renumber"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_decode_with_cut_caches_equals_forward(pos, padding):
    """Greedy tokens from the segmented cache == argmax of a fresh forward over prompt + tokens so far."""
    m = e2e_model()
    ids, mask, px = _batch(7, padding)
    r = compose(EveryNth(layer=1, n=3, pos=pos), EveryNth(layer=3, n=2, pos=pos))
    toks = np.asarray(m.generate(ids, px, attention_mask=mask, reducer=r, max_new_tokens=5, eos_token_id=()))
    B, T = ids.shape
    for i in range(B):
        row = ids[i][mask[i].astype(bool)]
        seq = list(row)
        for t in range(5):
            out = m(np.asarray(seq)[None], px[i:i + 1], reducer=r)
            nxt = int(np.argmax(np.asarray(out.logits)[0, -1]))
            assert nxt == toks[i, t], (i, t)
            seq.append(nxt)


def test_kv_cache_bytes_after_cuts():
    m = e2e_model()
    ids, mask, px = _batch(1)
    from jaxprune import engine

    r = compose(EveryNth(layer=1, n=3), fastv(layer=3, keep=10))
    p = m.plan(ids, px, mask, None, r)
    st = engine.prefill(m, p, max_new_tokens=8)
    T = p.arrays["input_ids"].shape[1]
    t = E2E_CFG.text
    per_tok = 2 * 3 * t.num_key_value_heads * t.head_dim * 4  # k+v, B=3, fp32
    caps = [T + 8] + [T - 144 + 48 + 8] * 2 + [T - 144 + 10 + 8]
    assert [c.capacity for c in st.caches] == caps
    assert st.kv_bytes == per_tok * sum(caps)


@pytest.mark.parametrize("spec,match", [
    (lambda: fastv(layer=0, keep=4), r"layer=0 is outside \[1"),
    (lambda: fastv(layer=4, keep=4), r"layer=4 is outside \[1, 4\)"),
    (lambda: fastv(layer=2, keep=200), r"larger than the 144 tokens"),
    (lambda: compose(fastv(layer=1, keep=20), fastv(layer=2, keep=30)), r"larger than the 20 tokens"),
    (lambda: compose(fastv(layer=2, keep=20), fastv(layer=2, keep=10)), r"strictly increasing"),
    (lambda: fastv(layer=2, keep=0), r"keep=0 must be > 0"),
    (lambda: fastv(layer=2), r"exactly one of keep"),
])
def test_errors(spec, match):
    m = e2e_model()
    ids, mask, px = _batch()
    with pytest.raises((BudgetError, ValueError), match=match):
        m(ids, px, attention_mask=mask, reducer=spec())
