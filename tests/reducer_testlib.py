"""Shared checks for reducer tests: random contexts, batching, trace counts, jaxpr hygiene, end to end.

Budgets "equivalent to 192/128/64 of 576" on the test model with 144 patches are 48/32/16.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.reducers.base import ProjectorContext, VisionContext
from tests.conftest import make_batch

# 12 x 12 patch grid (P = 144) so budgets 48/32/16 mirror 192/128/64 of 576.
E2E_CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        image_size=24, patch_size=2),
    text=TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    image_token_index=100)
E2E_BUDGETS = (48, 32, 16)
GRID = 12


def random_projector_context(n: int, p: int = GRID * GRID, seed: int = 0, n_valid: list[int] | None = None,
                             h: int = 24, dv: int = 16, heads: int = 4, t: int = 10,
                             with_t2i: bool = False) -> ProjectorContext:
    """A random, tie-free projector-stage context; rows may have fewer valid tokens (a valid prefix)."""
    rng = np.random.default_rng(seed)
    g = int(round(p ** 0.5))
    valid = np.ones((n, p), bool)
    if n_valid is not None:
        for i, nv in enumerate(n_valid):
            valid[i, nv:] = False
    attn = rng.random((n, heads, p)).astype(np.float32)
    attn /= attn.sum(-1, keepdims=True)
    tv = np.ones((n, t), bool)
    tv[:, t // 2 + 1:] = rng.random((n, t - t // 2 - 1)) > 0.3
    return ProjectorContext(
        features=jnp.asarray(rng.standard_normal((n, p, h)), jnp.float32),
        valid=jnp.asarray(valid),
        vision_hidden=jnp.asarray(rng.standard_normal((n, p, dv)), jnp.float32),
        cls_attn=jnp.asarray(attn),
        keys=jnp.asarray(rng.standard_normal((n, p, heads, dv // heads)), jnp.float32),
        text_embeds=jnp.asarray(rng.standard_normal((n, t, h)), jnp.float32),
        text_valid=jnp.asarray(tv),
        text_to_image=jnp.asarray(rng.random((n, p)), jnp.float32) if with_t2i else None,
        grid=(g, g),
    )


def random_vision_context(n: int, p: int = GRID * GRID, seed: int = 0, n_valid: list[int] | None = None,
                          dv: int = 16, heads: int = 4, h: int = 24, t: int = 10) -> VisionContext:
    """A random vision-stage context (CLS at index 0, always valid)."""
    rng = np.random.default_rng(seed)
    g = int(round(p ** 0.5))
    valid = np.ones((n, 1 + p), bool)
    if n_valid is not None:
        for i, nv in enumerate(n_valid):
            valid[i, 1 + nv:] = False
    attn = rng.random((n, heads, 1 + p)).astype(np.float32)
    attn /= attn.sum(-1, keepdims=True)
    return VisionContext(
        hidden=jnp.asarray(rng.standard_normal((n, 1 + p, dv)), jnp.float32),
        cls_attn=jnp.asarray(attn),
        keys=jnp.asarray(rng.standard_normal((n, 1 + p, heads, dv // heads)), jnp.float32),
        valid=jnp.asarray(valid),
        text_embeds=jnp.asarray(rng.standard_normal((n, t, h)), jnp.float32),
        text_valid=jnp.asarray(np.ones((n, t), bool)),
        grid=(g, g),
    )


def slice_ctx(ctx, i: int):
    """Row ``i`` of a context as a batch of one (static fields kept)."""
    return jax.tree.map(lambda x: x[i:i + 1], ctx)


def assert_batched_equals_rows(reducer, ctx, atol: float = 1e-5) -> None:
    """B rows at once == each row alone: identical indices/validity, tokens within ``atol``."""
    full = jax.jit(reducer)(ctx)
    for i in range(ctx.valid.shape[0]):
        one = jax.jit(reducer)(slice_ctx(ctx, i))
        np.testing.assert_array_equal(np.asarray(full.index[i]), np.asarray(one.index[0]))
        np.testing.assert_array_equal(np.asarray(full.valid[i]), np.asarray(one.valid[0]))
        np.testing.assert_allclose(np.asarray(full.tokens[i]), np.asarray(one.tokens[0]), atol=atol)


def assert_one_trace(reducer, make_ctx, n: int = 20) -> None:
    """``n`` different inputs of one shape trace ``reducer`` once."""
    chex.clear_trace_counter()

    def run(ctx):
        return reducer(ctx)

    f = jax.jit(chex.assert_max_traces(run, n=1))
    for s in range(n):
        jax.block_until_ready(f(make_ctx(s)).tokens)


def assert_no_callbacks(reducer, ctx) -> None:
    """No host callbacks anywhere in the reducer's jaxpr (including sub-jaxprs)."""
    jaxpr = jax.make_jaxpr(reducer)(ctx)

    def walk(j):
        for eqn in j.eqns:
            assert "callback" not in eqn.primitive.name, eqn.primitive.name
            for v in eqn.params.values():
                subs = v if isinstance(v, (list, tuple)) else [v]
                for s in subs:
                    if hasattr(s, "jaxpr"):
                        walk(s.jaxpr if hasattr(s.jaxpr, "eqns") else s.jaxpr.jaxpr)
                    elif hasattr(s, "eqns"):
                        walk(s)

    walk(jaxpr.jaxpr)


@functools.lru_cache(maxsize=1)
def e2e_model() -> jp.Llava:
    return jp.Llava.random(E2E_CFG, seed=0)


def check_end_to_end(reducer, budget: int, *, max_new_tokens: int = 4) -> None:
    """``model(..., reducer)`` and ``generate`` on a padded batch of 3: finite logits, sequence length
    ``prefix + budget + text`` per row, visual validity, generate shape."""
    m = e2e_model()
    P = E2E_CFG.tokens_per_image
    n_text = [4, 9, 6]
    ids, mask, px = make_batch(n_text, P, 100, 128, 24, padding="left", seed=budget)
    out = m(ids, px, attention_mask=mask, reducer=reducer)
    T = ids.shape[1]
    assert out.logits.shape == (3, T - P + budget, 128), out.logits.shape
    logits = np.asarray(out.logits)
    valid = np.asarray(out.attention_mask)
    assert np.isfinite(logits[valid]).all()
    # every row: prefix (2) + its visual tokens + its text; the visual ones that are valid are <= budget
    n_valid_tokens = valid.sum(1)
    assert (n_valid_tokens <= 2 + budget + np.asarray(n_text)).all()
    assert (n_valid_tokens >= 2 + 1 + np.asarray(n_text)).all()
    kept = np.asarray(out.kept)
    assert kept.shape == (3, budget) and (kept < P).all()
    toks = np.asarray(m.generate(ids, px, attention_mask=mask, reducer=reducer, max_new_tokens=max_new_tokens))
    assert toks.shape == (3, max_new_tokens) and (toks >= 0).all() and (toks < 128).all()


def forward_cache_size(m) -> int:
    """Compiled entries of the model's forward program (full and reduced calls share it)."""
    return m.programs.forward._cache_size()


def run_forward(model, ids, px, mask, image_sizes, reducer, mask_only: bool = False):
    """``model(..., reducer=...)`` through the public engine, optionally with mask-only cut semantics."""
    from jaxprune import engine

    return engine.forward(model, model.plan(ids, px, mask, image_sizes, reducer), mask_only=mask_only)


def pre_llm(model, ids, px, mask, reducer):
    """The LLM input of a reduced call (``engine.encode``): ``(h, valid, positions, kept, kept_valid, is_pool)``."""
    from flax import nnx

    from jaxprune import engine

    p = model.plan(ids, px, mask, None, reducer)
    fn = jax.jit(lambda params, arrays: engine.encode(nnx.merge(model.graphdef, params), p.static, arrays))
    h, valid, pos, is_pool, _, kept, kept_valid = fn(model.params, p.arrays)
    return h, valid, pos, kept, kept_valid, is_pool
