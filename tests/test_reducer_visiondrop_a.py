"""VisionDrop stage A == NumPy transcription of the released ``llava/visionzip/clip_encoder.py``; masks,
batching, traces, ``vision_layer`` inside the tower, end to end."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.reducers import BudgetError
from jaxprune.reducers.visiondrop_vision import VisionDropVision, visiondrop_vision
from tests.reducer_testlib import (E2E_BUDGETS, assert_batched_equals_rows, assert_no_callbacks, assert_one_trace,
                                   check_end_to_end, e2e_model, make_batch, random_vision_context)

P = 144


def official_stage_a(attn, hidden, keys, dominant: int, contextual: int):
    """Ruixxxx/VisionDrop @ f7a9444, ``CLIPVisionTower_VisionZip.forward`` for one image, in NumPy.

    ``attn [heads, S]`` (CLS query row), ``hidden [S, D]``, ``keys [S, heads, hd]``; ``dominant`` includes
    CLS (``visionzip(model, dominant, contextual)`` stores ``dominant - 1``).
    Returns the source indices of the output tokens and the tokens ``[dominant ; contextual]``."""
    dominant_num = dominant - 1
    S = hidden.shape[0]
    metric = np.mean(np.asarray(keys, np.float64), axis=1)  # utils.CLIPAttention_forward: raw keys, head mean
    saliency = np.asarray(attn, np.float64)[:, 1:].sum(0)
    order = sorted(range(S - 1), key=lambda j: (-saliency[j], j))  # topk, ties to the lower index
    keep = np.zeros(S, bool)
    keep[0] = True
    keep[np.asarray(order[:dominant_num], int) + 1] = True
    rest = np.flatnonzero(~keep)
    unit = metric[rest] / np.sqrt((metric[rest] ** 2).sum(-1, keepdims=True))
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    merge = [j for j in range(len(rest)) if j not in targets]
    owner = np.argmax(unit[merge] @ unit[targets].T, axis=1)
    ctx_tokens = []
    for c, t in enumerate(targets):
        members = [rest[merge[n]] for n in np.flatnonzero(owner == c)]
        add = np.mean(hidden[members].astype(np.float64), axis=0) if members else 0.0
        ctx_tokens.append(hidden[rest[t]] + add)
    index = np.concatenate([np.flatnonzero(keep), rest[targets]])
    return index, np.concatenate([hidden[keep], np.stack(ctx_tokens)])


def assert_row(out, ctx, i, spec, subset=None):
    sub = np.arange(ctx.valid.shape[1]) if subset is None else subset
    idx, toks = official_stage_a(np.asarray(ctx.cls_attn[i])[:, sub], np.asarray(ctx.hidden[i])[sub],
                                 np.asarray(ctx.keys[i])[sub], spec.dominant, spec.contextual)
    np.testing.assert_array_equal(np.asarray(out.index[i]), np.concatenate([[0], sub[idx]]))
    assert np.asarray(out.valid[i]).all()
    np.testing.assert_allclose(np.asarray(out.tokens[i]), np.concatenate([np.asarray(ctx.hidden[i, :1]), toks]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", [visiondrop_vision(), VisionDropVision.for_budget(32), VisionDropVision(14, 2),
                                  VisionDropVision(3, 40), VisionDropVision(139, 6)],
                         ids=lambda s: f"{s.dominant}+{s.contextual}")
def test_matches_official_numpy(spec):
    ctx = random_vision_context(50, seed=100 + spec.contextual)  # 50 independent random rows
    out = jax.jit(spec)(ctx)
    assert out.tokens.shape == (50, 1 + spec.budget, 16)
    for i in range(50):
        assert_row(out, ctx, i, spec)


def test_invalid_patches_never_selected():
    spec = VisionDropVision(20, 6)
    n_valid = [144, 10, 50, 22]
    ctx = random_vision_context(4, n_valid=n_valid, seed=11)
    assert_batched_equals_rows(spec, ctx)
    out = jax.jit(spec)(ctx)
    idx, ok, valid = np.asarray(out.index), np.asarray(out.valid), np.asarray(ctx.valid)
    for i, nv in enumerate(n_valid):
        assert valid[i][idx[i][ok[i]]].all()
        assert ok[i].sum() == 2 + min(19, nv) + min(6, max(0, nv - 19))
        if nv >= 25:  # enough valid tokens: the released algorithm on the valid prefix alone
            assert_row(out, ctx, i, spec, np.arange(1 + nv))
    # a scattered (non-prefix) mask
    rng = np.random.default_rng(5)
    vm = rng.random((2, 1 + P)) < 0.5
    vm[:, 0] = True
    ctx2 = dataclasses.replace(random_vision_context(2, seed=12), valid=jnp.asarray(vm))
    out2 = jax.jit(spec)(ctx2)
    for i in range(2):
        assert_row(out2, ctx2, i, spec, np.flatnonzero(vm[i]))


def test_one_trace_and_no_callbacks():
    spec = VisionDropVision.for_budget(48, vision_layer=1)
    assert_one_trace(spec, lambda s: random_vision_context(2, seed=s))
    assert_no_callbacks(spec, random_vision_context(2))


def test_released_settings_and_splits():
    r = visiondrop_vision()
    assert (r.dominant, r.contextual, r.vision_layer, r.budget, r.stage) == (42, 6, None, 48, "vision")
    assert r == VisionDropVision.for_budget(48) and hash(r) == hash(VisionDropVision(42, 6))
    assert [(s.dominant, s.contextual) for s in map(VisionDropVision.for_budget, (96, 192, 288))] == [
        (84, 12), (168, 24), (252, 36)]  # seeds.md inferred schedules
    assert r.output_tokens(576) == 48


@pytest.mark.parametrize("budget", E2E_BUDGETS)
def test_end_to_end_inside_tower(budget):
    check_end_to_end(VisionDropVision.for_budget(budget, vision_layer=1), budget)


def _tap(m, px, layer):
    f = jax.jit(lambda p, x: nnx.merge(m.graphdef, p).vision(x, layer, taps=(layer,))[1][layer])
    return f(m.params, jnp.asarray(px))


@pytest.mark.parametrize("layer", [1, None])
def test_model_keeps_official_tokens_at_vision_layer(layer):
    """``kept`` (source patch per LLM visual token, -1 = CLS) == the released selection on the model's own
    CLIP state after ``vision_layer`` (default: the feature layer, hidden_states[2] here)."""
    spec = VisionDropVision.for_budget(48, vision_layer=layer)
    m = e2e_model()
    ids, mask, px = make_batch([4, 9, 6], P, 100, 128, 24, padding="left", seed=48)
    tap = _tap(m, px, layer or m.cfg.feature_layer_index)
    out = m(ids, px, attention_mask=mask, reducer=spec)
    kept = np.asarray(out.kept)
    assert kept.shape == (3, 48) and np.asarray(out.kept_valid).all()
    assert np.isfinite(np.asarray(out.logits)[np.asarray(out.attention_mask)]).all()
    for i in range(3):
        idx, _ = official_stage_a(np.asarray(tap.cls_attn[i]), np.asarray(tap.hidden[i]), np.asarray(tap.keys[i]),
                                  spec.dominant, spec.contextual)
        np.testing.assert_array_equal(kept[i], idx - 1)


def test_budget_errors():
    with pytest.raises(BudgetError, match="dominant=0"):
        VisionDropVision(0, 6)
    with pytest.raises(BudgetError, match="contextual=0"):
        visiondrop_vision(42, 0)
    with pytest.raises(BudgetError, match="vision_layer=0"):
        visiondrop_vision(vision_layer=0)
    with pytest.raises(BudgetError, match="contextual=6 is larger than the 5"):
        VisionDropVision(140, 6).output_tokens(144)
    m = e2e_model()
    ids, mask, px = make_batch([3], P, 100, 128, 24)
    with pytest.raises(BudgetError, match="vision_layer=3 must be in"):
        m(ids, px, attention_mask=mask, reducer=visiondrop_vision(14, 2, vision_layer=3))
    with pytest.raises(BudgetError, match="dominant=150 is larger than the 145"):
        m(ids, px, attention_mask=mask, reducer=visiondrop_vision(150, 2, vision_layer=1))
