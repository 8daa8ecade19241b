"""Batch-sized OneVision spans (jaxprune.families.onevision_spans, "Span sizes"): a reduced single-image row runs a
span of the bucketed real size (not the config's maximum), vision-stage reducers split the budget over the bucketed
real crop count (exactly the budget when the image's crop count is its bucket), one compile per (budget, layout
bucket) whatever the image size inside the bucket, and ``flops.prefill_cost`` derives the same layout; the ladder
rule itself; the full-size geometry's figures (the benchmark's photo: 3072 slots, 6 crop slots).

Tiny config of tests/test_reducers_onevision.py: 25 patches per crop, at most 5 crops and 100 tokens per image.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jaxprune as jp
from jaxprune import flops
from jaxprune.families.onevision_spans import ladder, reduced_static
from jaxprune.models.onevision_pack import image_tokens
from jaxprune.reducers import registry
from jaxprune.reducers.base import BudgetError
from tests.test_reducers_onevision import CFG, IMG, M, PINS, P, S, G, model, n_crops

R = jp.reducers
PRE, POST = (5, 6, 7), (8, 9, 10, 11)


def one_image(h: int, w: int, seed: int = 0) -> dict:
    """One row: 3 text tokens, the image's placeholders, 4 text tokens; the image's real crops only."""
    rng = np.random.default_rng(seed)
    n = image_tokens(h, w, PINS, S, G, 2)
    ids = np.array([list(PRE) + [IMG] * n + list(POST)])
    px = rng.normal(size=(1, n_crops(h, w), 3, S, S)).astype(np.float32)
    return dict(input_ids=ids, pixel_values=px, image_sizes=np.array([[h, w]]))


def test_ladder_rule():
    assert ladder(2929, 8829) == (3072, 4096, 6144, 8192, 8829)
    assert ladder(55, 100) == (64, 96, 100) and ladder(81, 100) == (96, 100) and ladder(100, 100) == (100,)
    assert ladder(5, 37) == (6, 8, 12, 16, 24, 32, 37) and ladder(5, 5) == (5,) and ladder(40, 37) == (37,)
    with pytest.raises(ValueError, match="positive"):
        ladder(0, 10)


def test_small_image_runs_a_bucketed_span_and_a_shorter_sequence():
    """(37, 37): 2 crops, 55 tokens -> a 64-slot span (not 100); FasterVLM's LLM sequence is shorter than the full
    model's, FastV's pre-cut layers run 64 slots, and the logits of a no-op reduction equal the plain forward."""
    m = model()
    kw = one_image(37, 37)
    assert int((kw["input_ids"] == IMG).sum()) == 55
    full = jp.engine.plan(m, **kw)
    for spec, S_h in ((R.fastervlm(30), 30), (R.fastv(layer=2, keep=30), 64)):
        p = jp.engine.plan(m, **kw, reducer=spec)
        st = p.static.layout
        assert (st.S_full, st.S_h, st.Tc) == (64, S_h, 2), spec
        assert int(p.arrays["tables"]["span_index"].shape[1]) == 64
        assert int((np.asarray(p.arrays["input_ids"]) == IMG).sum()) == S_h
    fv = jp.engine.plan(m, **kw, reducer=R.fastervlm(30))
    assert fv.batch_shape[1] < full.batch_shape[1]
    out, plain = m(**kw, reducer=R.fastervlm(30)), m(**kw)
    assert np.asarray(out.kept_valid).sum() == 30
    assert np.asarray(out.logits).shape[1] < np.asarray(plain.logits).shape[1]
    noop = m(**kw, reducer=R.fastv(layer=2, keep=64))  # keeps every slot: the plain forward's logits
    want = np.asarray(plain.logits)[0]
    lg = np.asarray(noop.logits)[0][np.asarray(noop.attention_mask)[0]]
    np.testing.assert_allclose(lg[: len(want)], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw,crops", [((74, 70), 5), ((111, 40), 4), ((37, 74), 3)])
def test_vision_stage_budget_is_delivered(hw, crops):
    """VisionZip(60) / FasterVLM(60) on an image whose crop count is its own bucket (5 = the cap, 4, 3): exactly 60
    valid visual tokens reach the LLM, ``60 // crops`` per crop for VisionZip."""
    m = model()
    kw = one_image(*hw)
    for spec in (R.visionzip.for_budget(60), R.fastervlm(60)):
        p = jp.engine.plan(m, **kw, reducer=spec)
        out = m(**kw, reducer=spec)
        kv = np.asarray(out.kept_valid)[0]
        assert kv.sum() == 60, (hw, spec)
        if p.static.layout.vision:
            assert p.static.layout.crops == crops
            per_crop = np.bincount(np.asarray(out.kept)[0][kv] // P, minlength=crops)
            assert per_crop.tolist() == [60 // crops] * crops


def test_vision_stage_documented_count_below_the_bucket():
    """A 2-crop image: 60 over 2 slots is 30 per crop, more than a crop's 25 patches, so the next crop bucket (3)
    is taken: ``2 * (60 // 3)`` = 40 tokens, the documented ``crops * (budget // slots)``."""
    kw = one_image(37, 37)
    p = jp.engine.plan(model(), **kw, reducer=R.visionzip.for_budget(60))
    assert (p.static.layout.crops, p.static.layout.S) == (3, 60)
    assert np.asarray(model()(**kw, reducer=R.visionzip.for_budget(60)).kept_valid).sum() == 2 * 20


def test_one_compile_per_budget_and_layout_bucket():
    """Same budget, images of different sizes in one bucket -> no recompile; another bucket -> one more program."""
    m = model()
    fn = m.programs.forward
    before = fn._cache_size()
    spec = R.fastervlm(29)  # budgets no other test of this module compiles
    for hw in ((37, 20), (20, 37), (37, 25)):  # 45, 43, 45 tokens, 2 crops each -> 48 slots
        assert jp.engine.plan(m, **one_image(*hw), reducer=spec).static.layout.S_full == 48
        m(**one_image(*hw), reducer=spec)
    assert fn._cache_size() == before + 1
    m(**one_image(37, 37), reducer=spec)  # 55 tokens -> 64 slots
    assert fn._cache_size() == before + 2
    vz = R.visionzip.for_budget(48)
    for hw in ((111, 40), (20, 111)):  # 4 crops each, 80 / 73 tokens -> 4 crop slots, 96 slots
        m(**one_image(*hw), reducer=vz)
    assert fn._cache_size() == before + 3


def test_prefill_cost_follows_the_layout():
    """``flops.prefill_cost(image_tokens, crops)`` = the plan's layout: same span / pool, tower on its crops."""
    m = model()
    last = {"fastervlm": 7 + 30, "fastv": 7 + 30, "visionzip": 7 + 60}  # text + the last segment's visual tokens
    for name, spec in (("fastervlm", R.fastervlm(30)), ("fastv", R.fastv(layer=2, keep=30)),
                       ("visionzip", R.visionzip.for_budget(60))):
        for hw in ((37, 37), (74, 70)):
            kw = one_image(*hw)
            st = jp.engine.plan(m, **kw, reducer=spec).static.layout
            k, c = int((kw["input_ids"] == IMG).sum()), n_crops(*hw)
            ref = reduced_static(CFG, jp.engine.split_reducer(spec)[0], None, 1, None, image=(k, c))
            assert dataclasses.replace(ref, Tc=st.Tc) == st, (name, hw)
            cost = flops.prefill_cost(CFG, spec, text_tokens=7, image_tokens=k, crops=c)
            assert cost.segments[-1][1] == last[name] and cost.segments[0][1] == 7 + st.S, (name, hw)
            one = flops.prefill_cost(CFG, None, text_tokens=7, crops=1).vision  # the whole tower on 1 crop
            assert cost.vision == pytest.approx(one * (st.crops if st.vision else st.Tc)), (name, hw)
    small = flops.prefill_cost(CFG, R.fastv(layer=2, keep=30), text_tokens=7, image_tokens=55, crops=2)
    big = flops.prefill_cost(CFG, R.fastv(layer=2, keep=30), text_tokens=7)  # the config's largest image
    assert small.segments[0] == (2, 7 + 64) and big.segments[0] == (2, 7 + M)


def test_oversized_budget_takes_the_next_size():
    """A budget above the batch's bucket takes the next ladder value (valid per config stays valid); above the
    config's maximum it is refused as before."""
    kw = one_image(37, 37)  # 55 tokens -> 64
    assert jp.engine.plan(model(), **kw, reducer=R.fastervlm(80)).static.layout.S_full == 96
    assert jp.engine.plan(model(), **kw, reducer=R.fastv(layer=2, keep=97)).static.layout.S_full == M
    with pytest.raises(BudgetError, match="larger than"):
        jp.engine.plan(model(), **kw, reducer=R.fastervlm(M + 1))


def test_full_size_photo_layout_and_flops_limits():
    """The released geometry (experiments/bench_onevision.py's config, no model built): the 480x640 photo (5 crops,
    2929 tokens) gets 3072 span slots and 6 crop slots; every reducer row of the benchmark costs fewer prefill
    FLOPs than the full model (FLOPs limit > 1; ConsensusDrop's shallow pass included)."""
    from experiments import bench_onevision as bo
    from experiments.bench_budgets import shallow_flops

    cfg = bo.onevision_config()
    text = bo.PREFIX + bo.QUESTION
    full = flops.prefill_cost(cfg, None, text_tokens=text, image_tokens=2929, crops=5).total
    for f in bo.IMAGE_FRACTIONS:
        for name in bo.IMAGE_REDUCERS:
            spec = registry.make(name, round(2929 / f), cfg)
            st = reduced_static(cfg, jp.engine.split_reducer(spec)[0], None, 1, None, image=(2929, 5))
            assert st.S_full == 3072 and (not st.vision or (st.crops, st.S) == (6, 6 * (round(2929 / f) // 6)))
            cost = flops.prefill_cost(cfg, spec, text_tokens=text, image_tokens=2929, crops=5).total
            cost += shallow_flops(cfg, spec, text + st.S_h, 1)
            assert full / cost > 1.3, (name, f, full / cost)
