"""VisionDrop stage B == NumPy transcription of ``visiondrop_rank_drop`` (Ruixxxx/VisionDrop @ f7a9444) on random
contexts; batching, traces, callbacks; a float64 NumPy reference of the whole prefill on the e2e model;
the full method (stage A + B) end to end; schedules and errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.engine import decoder as gen
from jaxprune.reducers import BudgetError, compose
from jaxprune.reducers.llm import LLMContext
from tests.reducer_testlib import pre_llm
from jaxprune.reducers.pyramiddrop import average_visual_tokens
from jaxprune.reducers.visiondrop_vision import VisionDropVision
from jaxprune.reducers.visiondrop_llm import (RELEASED, VisionDropCut, schedule_for, visiondrop, visiondrop_llm,
                                              visiondrop_released, visiondrop_schedule)
from tests.reducer_testlib import E2E_CFG, assert_no_callbacks, make_batch
from tests.test_reducer_pyramiddrop import for_spec, random_llm_context, reference_rows, sharp_model

P = E2E_CFG.tokens_per_image  # 144


# ---------------------------------------------------------------------------------------------------
# NumPy transcription of the inference branch of visiondrop_rank_drop (one row, valid tokens only)
def official_visiondrop(q, k, features, image_index: int, image_tokens: int, dominant_num: int,
                        contextual_num: int):
    """``q [T, N, hd]``, ``k [T, Kv, hd]``: post-RoPE q/k of layer ``rank_layer``; ``features [T, H]``.

    Returns (positions of the output tokens relative to ``image_index``: dominant then targets,
    ``features_save = [dominant ; contextual]``, the smallest score gap at the top-``d`` boundary and
    the smallest argmax margin of the assignment)."""
    q = np.asarray(q, np.float64).transpose(1, 0, 2)  # [N, T, hd]
    k = np.asarray(k, np.float64).transpose(1, 0, 2)  # [Kv, T, hd]
    N, T, hd = q.shape
    cur_key_states = k
    k_rep = np.repeat(k, N // k.shape[0], axis=0)  # repeat_kv (the official model has Kv == N)
    eager = np.where(np.arange(T)[None, :] <= np.arange(T)[:, None], 0.0, -np.inf)  # causal 4-d mask
    image_query_states = q[:, image_index:image_index + image_tokens, :]
    image_eager_attention_mask = eager[image_index:image_index + image_tokens][None]
    attn = image_query_states @ k_rep.transpose(0, 2, 1) / np.sqrt(hd) + image_eager_attention_mask
    attn = np.exp(attn - attn.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)  # [N, n, T]
    attention_avg_head = attn.mean(0)[:, image_index:image_index + image_tokens]  # [n, n]
    attention_avg_image = attention_avg_head.mean(0)  # [n]
    metric = cur_key_states.mean(0)[image_index:image_index + image_tokens]  # [n, hd]
    vision_tokens = np.asarray(features, np.float64)[image_index:image_index + image_tokens]
    order = sorted(range(image_tokens), key=lambda j: (-attention_avg_image[j], j))  # topk, ties -> lower
    topk_indices = np.asarray(order[:dominant_num], int)
    srt = attention_avg_image[order]
    gap = srt[dominant_num - 1] - srt[dominant_num]
    mask = np.ones(image_tokens, bool)
    mask[topk_indices] = False
    dominant_tokens = vision_tokens[~mask]
    metric_filtered = metric[mask]
    vision_tokens_filtered = vision_tokens[mask]
    metric_normalized = metric_filtered / np.linalg.norm(metric_filtered, axis=-1, keepdims=True)
    step = max(1, metric_normalized.shape[0] // contextual_num)
    target_indices = np.arange(0, metric_normalized.shape[0], step)[:contextual_num]
    target_tokens = metric_normalized[target_indices]
    others = ~np.isin(np.arange(metric_normalized.shape[0]), target_indices)
    similarity = metric_normalized[others] @ target_tokens.T
    s2 = np.sort(similarity, axis=1)
    margin = (s2[:, -1] - s2[:, -2]).min() if similarity.shape[0] and contextual_num > 1 else np.inf
    assign_one_hot = np.zeros((similarity.shape[0], contextual_num))
    assign_one_hot[np.arange(similarity.shape[0]), similarity.argmax(1)] = 1
    counts = np.maximum(assign_one_hot.sum(0), 1)[:, None]
    aggregated_hidden = assign_one_hot.T @ vision_tokens_filtered[others] / counts
    contextual_tokens = vision_tokens_filtered[target_indices] + aggregated_hidden
    features_save = np.concatenate([dominant_tokens, contextual_tokens])
    rest = np.flatnonzero(mask)
    return np.concatenate([np.flatnonzero(~mask), rest[target_indices]]), features_save, gap, margin


def official_row(ctx: LLMContext, i: int, d: int, c: int):
    """The transcription on row ``i`` of a context (valid tokens only), mapped back to visual-pool slots."""
    seq = np.flatnonzero(np.asarray(ctx.valid[i]))
    vis_slots = np.asarray(ctx.visual_index[i])[np.asarray(ctx.visual_valid[i])]
    pool = np.flatnonzero(np.asarray(ctx.visual_valid[i]))
    image_index = int(np.searchsorted(seq, vis_slots[0]))
    assert (seq[image_index:image_index + len(vis_slots)] == vis_slots).all()
    rel, toks, gap, margin = official_visiondrop(np.asarray(ctx.next_q[i])[seq], np.asarray(ctx.next_k[i])[seq],
                                                 np.asarray(ctx.hidden[i])[seq], image_index, len(vis_slots), d, c)
    return pool[rel], toks, gap, margin


SPEC = VisionDropCut(layer=2, dominant=7, contextual=3)
run_spec = jax.jit(lambda c: SPEC(for_spec(c, SPEC)))  # shared by the tests below (one compile per input shape)


def test_official_transcription_50_seeds():
    spec, f = SPEC, run_spec
    for seed in range(50):
        ctx = random_llm_context(seed, B=1, padding=("left", "right")[seed % 2])
        out = f(ctx)
        slots, toks, gap, margin = official_row(ctx, 0, 7, 3)
        assert gap > 1e-6 and margin > 1e-6, (seed, gap, margin)  # tie-free
        np.testing.assert_array_equal(np.asarray(out.slots[0]), slots, err_msg=f"seed {seed}")
        assert np.asarray(out.valid).all()
        np.testing.assert_allclose(np.asarray(out.tokens[0]), toks, atol=1e-5, rtol=1e-5)


def test_batched_equals_rows_and_official():
    ctx = random_llm_context(11, B=4, vis_valid=[24, 17, 11, 8], padding="right")
    full = run_spec(ctx)
    for i in range(4):
        one = run_spec(jax.tree.map(lambda x, i=i: x[i:i + 1], ctx))  # same shapes as the 50-seed test
        np.testing.assert_array_equal(np.asarray(full.slots[i]), np.asarray(one.slots[0]))
        np.testing.assert_array_equal(np.asarray(full.valid[i]), np.asarray(one.valid[0]))
        np.testing.assert_allclose(np.asarray(full.tokens[i]), np.asarray(one.tokens[0]), atol=1e-5)
        slots = np.asarray(full.slots[i])
        assert len(set(slots.tolist())) == 10  # distinct slots even when some cannot be filled
        n_valid = int(np.asarray(ctx.visual_valid[i]).sum())
        if n_valid >= 10:  # the official code is defined
            want, toks, _, _ = official_row(ctx, i, 7, 3)
            assert np.asarray(full.valid[i]).all()
            np.testing.assert_array_equal(slots, want)
            np.testing.assert_allclose(np.asarray(full.tokens[i]), toks, atol=1e-5, rtol=1e-5)
        else:  # 8 valid: 7 dominant, one target (all remaining), two unfillable contextual slots
            np.testing.assert_array_equal(np.asarray(full.valid[i]), [True] * 8 + [False] * 2)
            hid = np.asarray(ctx.visual_hidden[i])
            np.testing.assert_allclose(np.asarray(full.tokens[i, 7]), hid[slots[7]], atol=1e-6)


def test_one_trace_and_no_callbacks():
    spec = VisionDropCut(layer=1, dominant=5, contextual=4)
    chex.clear_trace_counter()
    f = jax.jit(chex.assert_max_traces(lambda c: spec(for_spec(c, spec)), n=1))
    for s in range(20):
        jax.block_until_ready(f(random_llm_context(200 + s, B=2, n_text=[3, 5], vis_valid=[24, 20 + s % 5])).tokens)
    assert_no_callbacks(spec, for_spec(random_llm_context(0, B=2, n_text=[3, 5]), spec))


# ---------------------------------------------------------------------------------------------------
def vd_select(q, k, h, image_index, n_img, r):
    rel, toks, gap, margin = official_visiondrop(q, k, h, image_index, n_img, r.dominant, r.contextual)
    assert gap > 1e-7 and margin > 1e-5, (gap, margin)  # well separated (float32 vs float64)
    return toks, rel


def test_full_visiondrop_end_to_end_and_float64_reference():
    """Stage A (42 + 6 in CLIP) + stage B after layers 1/2/3 (the released schedule on the 4-layer model):
    logits == a float64 NumPy prefill with the official stage-B selection on the stage-A output; generate."""
    m = sharp_model()
    r = visiondrop_released(num_layers=4)
    assert isinstance(r.reducers[0], VisionDropVision)
    assert [(c.layer, c.dominant, c.contextual) for c in r.reducers[1:]] == [(1, 30, 5), (2, 22, 4), (3, 16, 3)]
    ids, mask, px = make_batch([4, 9, 6], P, 100, 128, 24, padding="left", seed=1)
    out = m(ids, px, attention_mask=mask, reducer=r)
    T = ids.shape[1]
    assert out.logits.shape == (3, T - P + 19, 128)
    lg, v = np.asarray(out.logits), np.asarray(out.attention_mask)
    assert np.isfinite(lg[v]).all()
    np.testing.assert_array_equal(v.sum(1), 2 + 19 + np.asarray([4, 9, 6]))

    # the LLM input after stage A (the model's own pre-LLM stage), then stage B by hand
    h0, valid0, _, _, _, is_vis = (np.asarray(a) for a in pre_llm(m, ids, px, mask, r.reducers[0]))
    rows = [(h0[i][valid0[i]], is_vis[i][valid0[i]]) for i in range(3)]
    assert all(x[1].sum() == 48 for x in rows)
    ref, _ = reference_rows(m, rows, compose(*r.reducers[1:]), vd_select)
    for i in range(3):
        assert len(ref[i]) == v[i].sum()
        np.testing.assert_allclose(lg[i][v[i]], ref[i], atol=2e-4, rtol=1e-4)

    toks = np.asarray(m.generate(ids, px, attention_mask=mask, reducer=r, max_new_tokens=16, eos_token_id=()))
    assert toks.shape == (3, 16) and ((toks >= 0) & (toks < 128)).all()
    last = np.asarray(gen.last_valid_index(jnp.asarray(v)))
    np.testing.assert_array_equal(toks[:, 0], lg[np.arange(3), last].argmax(-1))


# ---------------------------------------------------------------------------------------------------
# schedules
def test_released_schedule():
    r = visiondrop.released()
    a, cuts = r.reducers[0], r.reducers[1:]
    assert (a.dominant, a.contextual, a.vision_layer) == (42, 6, None)
    assert [(c.layer, c.dominant, c.contextual) for c in cuts] == [(8, 30, 5), (16, 22, 4), (24, 16, 3)]
    assert average_visual_tokens(48, (8, 16, 24), (35, 26, 19), 32) == 32.0
    assert visiondrop() == r == visiondrop_schedule(32)
    assert RELEASED["stages"] == ((30, 5), (22, 4), (16, 3))


@pytest.mark.parametrize("budget,a,stages", [
    (64, (84, 12), ((60, 10), (44, 8), (32, 6))),
    (128, (168, 24), ((120, 20), (88, 16), (64, 12))),
    (192, (252, 36), ((180, 30), (132, 24), (96, 18))),
])
def test_inferred_schedules(budget, a, stages):
    s = schedule_for(budget)
    assert (s["dominant"], s["contextual"]) == a and s["stages"] == stages and s["layers"] == (8, 16, 24)
    assert s["average"] == budget
    r = visiondrop.schedule(budget)
    assert (r.reducers[0].dominant, r.reducers[0].contextual) == a
    assert tuple((c.dominant, c.contextual) for c in r.reducers[1:]) == stages
    assert schedule_for(budget, num_layers=4)["layers"] == (1, 2, 3)


@pytest.mark.parametrize("make,match", [
    (lambda: visiondrop_llm((1, 2), ((30, 5), (40, 5))), r"grows the visual token count \(35 -> 45\)"),
    (lambda: visiondrop(42, 6, (8,), ((50, 5),)), r"grows the visual token count \(48 -> 55\)"),
    (lambda: visiondrop_llm((8, 8), ((30, 5), (20, 5))), r"strictly increasing"),
    (lambda: visiondrop_llm((16, 8), ((30, 5), (20, 5))), r"strictly increasing"),
    (lambda: visiondrop_llm((8, 16), ((30, 5),)), r"2 layers but 1"),
    (lambda: visiondrop_llm((8,), ((30, 5, 1),)), r"pair"),
    (lambda: VisionDropCut(layer=2, dominant=5, contextual=0), r"contextual=0 must be > 0"),
    (lambda: VisionDropCut(layer=0, dominant=5, contextual=1), r"layer=0 is outside"),
])
def test_schedule_errors(make, match):
    with pytest.raises(BudgetError, match=match):
        make()


@pytest.mark.parametrize("spec,match", [
    (lambda: VisionDropCut(1, 140, 10), r"contextual=10 is larger than the 4 tokens available"),
    (lambda: compose(VisionDropCut(1, 20, 5), VisionDropCut(2, 30, 5)), r"larger than the 25 tokens"),
    (lambda: compose(VisionDropCut(2, 20, 5), VisionDropCut(2, 10, 5)), r"strictly increasing"),
    (lambda: visiondrop_schedule(32, num_layers=32), r"layer=8 is outside \[1, 4\)"),
])
def test_model_errors(spec, match):
    m = sharp_model()
    ids, mask, px = make_batch([4, 9, 6], P, 100, 128, 24, padding="left", seed=0)
    with pytest.raises(BudgetError, match=match):
        m(ids, px, attention_mask=mask, reducer=spec())
