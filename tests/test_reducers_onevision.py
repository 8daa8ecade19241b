"""Reducers on LLaVA-OneVision (jaxprune.families.onevision_spans): every registered reducer on image rows and on
video rows at a budget with one compile per budget, the CLS-free saliency surrogate (== a NumPy transcription, and
what FasterVLM ranks by), vision-stage reducers' per-crop split, no-op reductions == the plain forward, refusals.

Tiny config: SigLIP 37 px / patch 7 -> 5 x 5 = 25 patches per crop, pinpoints up to 2x2 / 1x3 tiles, anyres_max_2
-> at most 100 tokens per image; videos of 3 frames -> 3 x 3 x 3 + 1 = 28 tokens.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jaxprune as jp
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.models.onevision_pack import image_tokens
from jaxprune.reducers import registry
from jaxprune.reducers.base import BudgetError

R = jp.reducers
IMG, VID, VOCAB = 60, 61, 64
S, G, P, F = 37, 5, 25, 3
PINS = ((37, 37), (37, 74), (74, 37), (74, 74), (37, 111), (111, 37))
CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        image_size=S, patch_size=7, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                        kind="siglip"),
    text=TextConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, kind="qwen2", tie_word_embeddings=True),
    model_type="llava_onevision", image_token_index=IMG, video_token_index=VID, vision_feature_layer=-1,
    vision_feature_select_strategy="full", image_grid_pinpoints=PINS, vision_aspect_ratio="anyres_max_2")
M = 100                    # CFG.max_image_tokens
VT = F * 9 + 1             # video tokens
BUDGET = {"image": 60, "video": 16}
#: two image batches of other sizes in one layout: crop totals 5 + 3 -> bucket 8, largest crop count 5 (the cap),
#: longest spans 81 and 85 tokens -> 96 slots (onevision_spans "Span sizes")
SIZES = {0: [(74, 70), (37, 74)], 1: [(74, 60), (70, 30)]}


@functools.lru_cache(maxsize=1)
def model() -> jp.Llava:
    return jp.Llava.random(CFG, seed=0)


def n_crops(h, w):
    from jaxprune.processing_anyres import anyres_grid

    gh, gw = anyres_grid((h, w), PINS, S)
    return 1 + gh * gw


def batch(kind, seed=0):
    """Two left-padded rows, one image (anyres) or one video each."""
    rng = np.random.default_rng(seed)
    sizes = SIZES[seed % 2]
    spans = [image_tokens(h, w, PINS, S, G, 2) for h, w in sizes] if kind == "image" else [VT, VT]
    tok = IMG if kind == "image" else VID
    rows = [list(rng.integers(3, IMG - 1, 3)) + [tok] * n + list(rng.integers(3, IMG - 1, 4 + r)) for r, n in
            enumerate(spans)]
    T = max(map(len, rows)) + 2
    ids, mask = np.zeros((2, T), np.int64), np.zeros((2, T), np.int64)
    for r, s in enumerate(rows):
        ids[r, T - len(s):], mask[r, T - len(s):] = s, 1
    n_text = np.array([len(s) - n for s, n in zip(rows, spans)])
    if kind == "image":
        px = np.zeros((2, 5, 3, S, S), np.float32)
        for i, (h, w) in enumerate(sizes):
            px[i, : n_crops(h, w)] = rng.normal(size=(n_crops(h, w), 3, S, S))
        return dict(input_ids=ids, pixel_values=px, attention_mask=mask, image_sizes=np.array(sizes)), n_text, spans
    pv = rng.normal(size=(2, F, 3, S, S)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pv), n_text, spans


NAMES = [n for n in registry.names("llava_onevision") if n != "adsc_grid"]


class VideoBudgets:
    """``CFG`` seen by the factories of video rows: schedules (PyramidDrop, VisionDrop, ADSC) take their totals from
    ``registry.visual_tokens(cfg)`` = ``max_image_tokens`` (the image span); a video span has ``VT`` tokens."""

    max_image_tokens = VT

    def __getattr__(self, k):
        return getattr(CFG, k)


FAST = ("fastervlm", "visionzip", "consensusdrop", "fastv")  # one per kind of path; the rest: ``pytest -m slow``


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in NAMES])
def test_every_registered_reducer_runs_with_one_compile(name, kind):
    spec = registry.make(name, BUDGET[kind], CFG if kind == "image" else VideoBudgets())
    fn = model().programs.forward
    before = fn._cache_size()
    full = M if kind == "image" else VT
    for seed in (0, 1):
        kw, n_text, spans = batch(kind, seed)
        out = model()(**kw, reducer=spec)
        valid = np.asarray(out.attention_mask)
        assert np.isfinite(np.asarray(out.logits)[valid]).all()
        assert valid[:, -1].all()
        if all(r.stage != "llm" for r in jp.engine.split_reducer(spec)[0]):
            kv = np.asarray(out.kept_valid)
            assert (valid.sum(1) == n_text + kv.sum(1)).all()
            assert (kv.sum(1) <= BUDGET[kind]).all()
            kept = np.asarray(out.kept)[kv]
            assert ((kept >= 0) & (kept < max(full, 5 * P + 1))).all()
    assert fn._cache_size() == before + 1


def test_adsc_grid_and_dycoke_refused_by_name():
    with pytest.raises(BudgetError, match="adsc_grid.*llava_onevision"):
        registry.make("adsc_grid", 60, CFG)
    assert "dycoke" not in registry.names("llava_onevision")


def _received_np(q, k):
    """NumPy transcription: softmax(q k^T / sqrt(d)) per head, averaged over the query rows."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p.mean(axis=2)  # [N, heads, S]


def test_surrogate_saliency_and_fastervlm_ranking():
    """The CLS-free saliency == the NumPy transcription; on a multi-image row (span = the base crop's P tokens + a
    newline, no resizing) FasterVLM keeps the top-k patches by it, in raster order."""
    from jaxprune.models.tower import clip_segment, received_attention

    m = model().module
    rng = np.random.default_rng(3)
    px = rng.normal(size=(2, 3, S, S)).astype(np.float32)
    h, q, k = clip_segment(m, m.vision.embed(px), None, 0, CFG.feature_layer_index)
    sal = np.asarray(received_attention(q, k, None, block=7))
    want = _received_np(q, k)
    np.testing.assert_allclose(sal, want, atol=1e-6)
    np.testing.assert_allclose(sal.sum(-1), 1.0, atol=1e-5)
    ids = np.array([[5, 6] + [IMG] * (P + 1) + [7] + [IMG] * (P + 1) + [8, 9]])
    kk = 10
    out = model()(ids, px[:, None], image_sizes=np.array([[37, 37], [50, 30]]), reducer=R.fastervlm(kk))
    kept = np.asarray(out.kept)
    for n in range(2):
        top = np.sort(np.argsort(-want[n].mean(0), kind="stable")[:kk])
        np.testing.assert_array_equal(kept[n], top)


def test_vision_stage_split_and_noop_reductions():
    """VisionZip on images: budget // C_max per crop (the spec's own split) on every crop, CLS slot given to a
    patch; no-op reductions reproduce the plain forward (logits of the text and image slots, image rows)."""
    kw, _, spans = batch("image", 0)
    out = model()(**kw, reducer=R.visionzip.for_budget(60))
    assert np.asarray(out.kept).shape[1] == 60  # 5 crop slots x 12 patches
    kept, kv = np.asarray(out.kept), np.asarray(out.kept_valid)
    per_crop = [np.bincount(kept[n][kv[n]] // P, minlength=5) for n in range(2)]
    assert per_crop[0].tolist() == [12] * 5 and per_crop[1].tolist() == [12] * 3 + [0, 0]
    m = model()
    plain = np.asarray(m(**kw).logits)
    mask = kw["attention_mask"].astype(bool)
    want = [plain[r][mask[r]] for r in range(2)]
    for spec in (R.fastervlm(M), R.fastv(layer=2, keep=M)):
        o = m(**kw, reducer=spec)
        lg, v = np.asarray(o.logits), np.asarray(o.attention_mask)
        for r in range(2):
            np.testing.assert_allclose(lg[r][v[r]][: len(want[r])], want[r], atol=1e-5, rtol=0)


def test_refusals_and_generate():
    kw, _, _ = batch("video", 0)
    toks = model().generate(**kw, max_new_tokens=3, eos_token_id=(), pad_token_id=0,
                            reducer=R.compose(R.fastervlm(16), R.fastv(layer=2, keep=10)))
    assert np.asarray(toks).shape == (2, 3)
    with pytest.raises(ValueError, match="llava_onevision"):
        model()(**kw, reducer=R.video_options(R.fastervlm(8)))
    ikw, _, _ = batch("image", 0)
    ids = np.concatenate([ikw["input_ids"], kw["input_ids"]], 1)  # each row: an image, then a video
    mask = np.concatenate([ikw["attention_mask"], kw["attention_mask"]], 1)
    with pytest.raises(jp.InputError, match="one visual kind"):
        model()(ids, ikw["pixel_values"], attention_mask=mask, image_sizes=ikw["image_sizes"],
                pixel_values_videos=kw["pixel_values_videos"], reducer=R.fastervlm(8))
    with pytest.raises(BudgetError, match="larger than"):
        model()(**ikw, reducer=R.fastervlm(M + 1))


def test_sharded_qwen2_biases_follow_their_kernels():
    from jax.sharding import PartitionSpec as PS

    from jaxprune.sharding import partition_specs

    import dataclasses

    cfg = dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, num_key_value_heads=2))
    specs = partition_specs(cfg, 2)
    assert specs["language.layers.0.self_attn.q_proj.bias"] == PS("model")
    assert specs["language.layers.0.self_attn.o_proj.kernel"] != specs["language.layers.0.self_attn.q_proj.kernel"]
    assert "vision.patch_embedding.bias" in specs
