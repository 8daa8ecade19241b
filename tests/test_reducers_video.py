"""Reducers on Video-LLaVA video rows (jaxprune.families.video_llava): every registered reducer at a budget, one
compile per budget, per-frame vs global budgets, CLS handling, no-op reductions == the plain forward.

Tiny config: CLIP 28 px / patch 7 -> 16 patches + CLS = 17 tokens per frame, 4 frames -> 68 video tokens (the real
2056 = 8 x 257); two rows of one video each, left-padded.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jaxprune as jp
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.reducers import registry
from jaxprune.reducers.base import BudgetError

R = jp.reducers
F, P_F, IMG, VID, VOCAB = 4, 17, 60, 61, 64
FULL = F * P_F
CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        image_size=28, patch_size=7),
    text=TextConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8),
    model_type="video_llava", image_token_index=IMG, video_token_index=VID, num_frames=F)
BUDGET = 32  # of 68 (8 per frame)
BUDGETS = {"dycoke": 48}  # DyCoke keeps frames 0 and 2 whole (34 tokens): its budgets lie in [36, 68)


@functools.lru_cache(maxsize=1)
def model() -> jp.Llava:
    return jp.Llava.random(CFG, seed=0)


def batch(seed=0, T=None):
    rng = np.random.default_rng(seed)
    rows = [list(rng.integers(3, IMG - 1, 3)) + [VID] * FULL + list(rng.integers(3, IMG - 1, 4 + r + seed % 3))
            for r in range(2)]
    T = T or FULL + 16
    ids, mask = np.zeros((2, T), np.int64), np.zeros((2, T), np.int64)
    for r, s in enumerate(rows):
        ids[r, T - len(s):], mask[r, T - len(s):] = s, 1
    return ids, mask, rng.normal(size=(2, F, 3, 28, 28)).astype(np.float32), np.array([len(s) - FULL for s in rows])


def run(spec, seed=0):
    ids, mask, pv, n_text = batch(seed)
    return model()(ids, attention_mask=mask, pixel_values_videos=pv, reducer=spec), n_text


NAMES = [n for n in registry.names() if n != "adsc_grid"]


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_reducer_runs_on_video_with_one_compile(name):
    spec = registry.make(name, BUDGETS.get(name, BUDGET), CFG)
    fn = model().programs.forward
    before = fn._cache_size()
    for seed in (0, 1):
        out, n_text = run(spec, seed)
        valid = np.asarray(out.attention_mask)
        assert np.isfinite(np.asarray(out.logits)[valid]).all()
        assert valid[:, -1].all()
        if all(r.stage != "llm" for r in jp.engine.split_reducer(spec)[0]):
            kv = np.asarray(out.kept_valid)
            assert (valid.sum(1) == n_text + kv.sum(1)).all()
            kept = np.asarray(out.kept)[kv]
            assert ((kept >= 0) & (kept < FULL)).all()
    assert fn._cache_size() == before + 1


def test_adsc_grid_refused_by_name():
    with pytest.raises(BudgetError, match="adsc_grid.*video_llava"):
        registry.make("adsc_grid", BUDGET, CFG)


def _per_frame_counts(out):
    kept, kv = np.asarray(out.kept), np.asarray(out.kept_valid)
    return np.stack([np.bincount(kept[n][kv[n]] // P_F, minlength=F) for n in range(kept.shape[0])])


def test_per_frame_and_global_budgets():
    """per_frame: exactly budget // F tokens from every frame, in frame order; global: the budget over the whole
    video (any split), each token ranked by its own frame's CLS attention; the frame CLS is a candidate."""
    out, _ = run(R.fastervlm(BUDGET))  # default = per_frame
    np.testing.assert_array_equal(_per_frame_counts(out), BUDGET // F)
    kept = np.asarray(out.kept)
    assert (np.diff(kept, axis=1) > 0).all()  # frame-major, raster within a frame
    g, _ = run(R.video_options(R.fastervlm(BUDGET), frames="global"))
    assert _per_frame_counts(g).sum(1).tolist() == [BUDGET, BUDGET]
    assert (np.diff(np.asarray(g.kept), axis=1) > 0).all()
    # the per-frame choice is the top-(budget/F) of each frame's own CLS ranking, a subset of what global may pick
    # only when the frames' scores interleave: global and per-frame differ on random weights
    assert not np.array_equal(np.asarray(g.kept), kept)
    # vision-stage reducers keep every frame's CLS inside the tower: budget + F tokens, CLS at j = 0 of each frame
    v, _ = run(R.visionzip.for_budget(BUDGET))
    kv = np.asarray(v.kept)
    assert kv.shape[1] == BUDGET + F and set(range(0, FULL, P_F)) <= set(kv[0].tolist())
    with pytest.raises(BudgetError, match="per_frame"):
        run(R.video_options(R.visionzip.for_budget(BUDGET), frames="global"))


def test_noop_reductions_reproduce_the_plain_forward():
    ids, mask, pv, _ = batch(3)
    m = model()
    plain = np.asarray(m(ids, attention_mask=mask, pixel_values_videos=pv).logits)
    want = [plain[r][mask[r].astype(bool)] for r in range(2)]
    for spec in (R.fastervlm(FULL), R.video_options(R.fastervlm(FULL), frames="global"),
                 R.fastv(layer=2, keep=FULL)):
        out = m(ids, attention_mask=mask, pixel_values_videos=pv, reducer=spec)
        lg, v = np.asarray(out.logits), np.asarray(out.attention_mask)
        for r in range(2):
            np.testing.assert_allclose(lg[r][v[r]][: len(want[r])], want[r], atol=1e-5, rtol=0)


def test_generate_and_refusals():
    ids, mask, pv, _ = batch(4)
    toks = model().generate(ids, attention_mask=mask, pixel_values_videos=pv, max_new_tokens=3, eos_token_id=(),
                            pad_token_id=0, reducer=R.compose(R.fastervlm(BUDGET), R.fastv(layer=2, keep=16)))
    assert np.asarray(toks).shape == (2, 3)
    # a reducer on a batch mixing images and videos is refused by name
    rng = np.random.default_rng(0)
    ids2 = np.array([[5] + [IMG] * 16 + [6] + [VID] * FULL + [7]])
    with pytest.raises(jp.InputError, match="one visual kind"):
        model()(ids2, rng.normal(size=(1, 3, 28, 28)).astype(np.float32), pixel_values_videos=pv[:1],
                reducer=R.fastervlm(8))
    with pytest.raises(ValueError, match="video_options"):
        model()(ids, attention_mask=mask, pixel_values_videos=pv, reducer=R.next_options(R.fastervlm(8)))
    with pytest.raises(ValueError, match="frames"):
        R.video_options(R.fastervlm(8), frames="sometimes")


def test_prefill_cost_counts_the_video():
    from jaxprune import flops

    full, red = flops.prefill_cost(CFG, None, text_tokens=20), flops.prefill_cost(CFG, R.fastervlm(BUDGET), 20)
    assert full.projector == F * 2 * P_F * (16 * 16 + 16 * 16)  # every frame's 17 tokens through the projector
    assert red.llm_swiglu < full.llm_swiglu and red.vision == full.vision
