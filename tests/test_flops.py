"""The analytic FLOPs model agrees with XLA's own count of the compiled prefill (within 5%)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.flops import kv_cache_bytes, prefill_cost
from jaxprune.engine.run import prefill_fn

CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                        image_size=112, patch_size=14),
    text=TextConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    image_token_index=255)


@pytest.fixture(scope="module")
def model():
    return jp.Llava.random(CFG)


@pytest.mark.parametrize("make", [
    lambda R: R.fastervlm(16),
    lambda R: R.fastv(layer=2, keep=16),
    lambda R: R.compose(R.visionzip(10, 6), R.fastv(layer=1, keep=8)),
    lambda R: R.compose(R.visiondrop_vision(8, 4, vision_layer=1), R.fastv(layer=3, keep=5)),
    # multi-cut in-LLM methods; PyramidDrop / VisionDrop add the next layer's q/k at each cut (llm_cuts)
    lambda R: R.pyramiddrop((1, 2, 3), (0.5, 0.25, 0.125), total=64),
    lambda R: R.visiondrop_llm((1, 3), ((20, 4), (10, 2))),
    lambda R: R.adsc((1, 2), (32, 16)),
    lambda R: R.dart(layer=2, keep=16),
])
def test_flops_match_xla_cost_analysis(model, make):
    r = make(jp.reducers)
    P = CFG.tokens_per_image
    ids = np.concatenate([np.arange(3, 13), np.full(P, 255), np.arange(20, 42)])[None]  # 32 text tokens
    px = np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32)
    p = model.plan(ids, px, None, None, r)
    f = jax.jit(functools.partial(prefill_fn, model.graphdef), static_argnames=("static", "max_new_tokens"))
    compiled = f.lower(model.params, p.arrays, static=p.static, max_new_tokens=4).compile()
    ca = compiled.cost_analysis()
    xla = (ca if isinstance(ca, dict) else ca[0])["flops"]
    text = p.arrays["input_ids"].shape[1] - (p.static.layout.S_h if p.static.layout is not None else P)  # bucketed
    ours = prefill_cost(CFG, r, text_tokens=text)
    assert 0.97 <= xla / ours.total <= 1.05, (xla, ours.total)
    st = f(model.params, p.arrays, static=p.static, max_new_tokens=4)
    assert st.kv_bytes == kv_cache_bytes(CFG, ours, batch=1, new_tokens=4, itemsize=4)


def test_average_visual_tokens():
    c = prefill_cost(CFG, jp.reducers.fastv(layer=1, keep=16))
    assert c.visual_tokens == (64, 16) and c.average_visual_tokens == (64 + 3 * 16) / 4
