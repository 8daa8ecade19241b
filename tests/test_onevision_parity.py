"""Rung 1 for LLaVA-OneVision: jaxprune == transformers' LlavaOnevisionForConditionalGeneration on a tiny random
config (fp32): single images at several aspect ratios (within and past the anyres cap), a multi-image row, videos,
a mixed batch with padding (logits within 1e-4, greedy tokens, one compile per bucket), loading / conversion, the
tap geometry against HF's own packing, and the input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

import jaxprune as jp
from jaxprune.inputs import InputError
from jaxprune.models.onevision_pack import image_tokens, max_image_tokens
from tests.conftest import perturb_

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

IMG_TOK, VID_TOK, VOCAB = 100, 101, 128
S, PATCH = 37, 7          # SigLIP 'valid' conv: 5 x 5 patches per crop, the last 2 pixels unread
G = S // PATCH
P = G * G                 # 25
Q = math.ceil(G / 2)      # pooled video side: 3
F = 3                     # frames per video
PINS = [[37, 37], [37, 74], [74, 37], [74, 74], [37, 111], [111, 37]]
CAP = "anyres_max_2"      # the cap bites on 2x2 (10x10 -> 7x7) and 1x3 (5x15 -> 4x12) grids
SIZES = {"wide": (37, 74), "square_capped": (74, 70), "thin_unpadded": (20, 111), "tall_capped": (111, 40)}


def build_hf(seed: int = 0):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config
    from transformers import SiglipVisionConfig

    tc = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=S, patch_size=PATCH, vision_use_head=False)
    cfg = LlavaOnevisionConfig(text_config=tc, vision_config=vc, image_token_index=IMG_TOK, video_token_index=VID_TOK,
                               image_grid_pinpoints=PINS, vision_aspect_ratio=CAP, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return perturb_(LlavaOnevisionForConditionalGeneration(cfg).eval())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = build_hf()
    d = tmp_path_factory.mktemp("hf_onevision")
    hf.save_pretrained(d)
    return hf, jp.load(d), d


def n_crops(h, w):
    from transformers.image_processing_utils import select_best_resolution

    bh, bw = select_best_resolution((h, w), PINS)
    return 1 + (bh // S) * (bw // S)


def batch(rows, seed=0, T=None, left=True):
    """rows: per row a list of image-size names / "v" (a video); ids / mask padded, placeholders expanded as the
    HF processor does (a row with several images: P + 1 tokens each). Returns ids, mask, px, sizes, num, pv."""
    rng = np.random.default_rng(seed)
    seqs, sizes, crops, num = [], [], [], []
    for kinds in rows:
        s = list(rng.integers(3, IMG_TOK - 1, 2))
        n_i = sum(k != "v" for k in kinds)
        if n_i:
            num.append(n_i)
        for k in kinds:
            if k == "v":
                s += [VID_TOK] * (F * Q * Q + 1)
            else:
                h, w = SIZES[k]
                sizes.append((h, w))
                crops.append(n_crops(h, w) if n_i == 1 else 1)
                s += [IMG_TOK] * (image_tokens(h, w, PINS, S, G, 2) if n_i == 1 else P + 1)
            s += list(rng.integers(3, IMG_TOK - 1, int(rng.integers(2, 6))))
        seqs.append(s)
    T = T or max(map(len, seqs))
    ids, mask = np.zeros((len(seqs), T), np.int64), np.zeros((len(seqs), T), np.int64)
    for b, s in enumerate(seqs):
        a = T - len(s) if left else 0
        ids[b, a:a + len(s)], mask[b, a:a + len(s)] = s, 1
    px = None
    if sizes:
        px = np.zeros((len(sizes), max(crops), 3, S, S), np.float32)
        for i, c in enumerate(crops):
            px[i, :c] = rng.normal(size=(c, 3, S, S))
    n_v = sum(k == "v" for r in rows for k in r)
    pv = rng.normal(size=(n_v, F, 3, S, S)).astype(np.float32) if n_v else None
    return ids, mask, px, (np.array(sizes) if sizes else None), (np.array(num) if num else None), pv


def hf_kwargs(ids, mask, px, sizes, num, pv):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if px is not None:
        kw.update(pixel_values=torch.tensor(px), image_sizes=torch.tensor(sizes), batch_num_images=torch.tensor(num))
    if pv is not None:
        kw["pixel_values_videos"] = torch.tensor(pv)
    return kw


def hf_logits(hf, *b):
    mask = b[1]
    with torch.no_grad():
        return hf(position_ids=torch.tensor(np.maximum(mask.cumsum(1) - 1, 0)), **hf_kwargs(*b)).logits.numpy()


def ours(model, ids, mask, px, sizes, num, pv, **kw):
    return np.asarray(model(ids, px, attention_mask=mask, image_sizes=sizes, pixel_values_videos=pv, **kw).logits)


def assert_close(out, ref, mask):
    assert out.shape == ref.shape
    v = mask.astype(bool)
    err = np.abs(out - ref)[v].max()
    assert err <= 1e-4 * max(1.0, np.abs(ref[v]).max()), err


def test_config_params_and_geometry(pair):
    hf, model, _ = pair
    cfg = model.cfg
    assert (cfg.model_type, cfg.vision.kind, cfg.text.kind) == ("llava_onevision", "siglip", "qwen2")
    assert (cfg.vision.grid, cfg.tokens_per_image, cfg.text.tie_word_embeddings) == (G, P, True)
    names = set(model.flat_params())
    assert "vision.patch_embedding.bias" in names and "language.layers.0.self_attn.q_proj.bias" in names
    assert "language.layers.0.self_attn.o_proj.bias" not in names and "vision.class_embedding" not in names
    assert "lm_head.kernel" not in names and "image_newline" in names
    # token counts == HF's processor formula and bounded by the static maximum
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    proc.num_image_tokens, proc.vision_aspect_ratio = P, CAP
    proc.image_processor = type("IP", (), {"image_grid_pinpoints": PINS})()
    rng = np.random.default_rng(0)
    for h, w in list(SIZES.values()) + [tuple(int(x) for x in rng.integers(5, 300, 2)) for _ in range(40)]:
        n = image_tokens(h, w, PINS, S, G, 2)
        assert n == proc._get_number_of_features(h, w, S, S), (h, w)
        assert n <= max_image_tokens(PINS, S, G, 2) == cfg.max_image_tokens


def test_packing_matches_hf_pack_image_features(pair):
    """The tap tables reproduce HF's pack_image_features / apply_pooling on random features (incl. the cap)."""
    from jaxprune.families.llava_onevision import gather_taps
    from jaxprune.models.onevision_pack import NEWLINE, image_taps, video_taps

    hf, _, _ = pair
    rng = np.random.default_rng(1)
    nl = hf.model.image_newline.detach()
    for h, w in list(SIZES.values()) + [(300, 41), (41, 300), (90, 90)]:
        idx, wt, c = image_taps(h, w, PINS, S, G, 2)
        feats = torch.tensor(rng.normal(size=(c, P, 32)).astype(np.float32))
        ref = hf.model.pack_image_features([feats], torch.tensor([[h, w]]), nl, CAP)[0][0].numpy()
        got = np.asarray(gather_taps(feats.numpy(), nl.numpy(), np.where(idx == NEWLINE, c * P, idx), wt))
        assert got.shape == ref.shape, (h, w)
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-6)
    feats = torch.tensor(rng.normal(size=(F, P, 32)).astype(np.float32))
    ref = hf.model.apply_pooling(feats).reshape(-1, 32).numpy()
    idx, wt = video_taps(F, G)
    got = np.asarray(gather_taps(feats.numpy(), nl.numpy(), np.where(idx == NEWLINE, F * P, idx), wt))
    np.testing.assert_allclose(got[:-1], ref, atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(got[-1], nl.numpy())


@pytest.mark.parametrize("rows", [
    [["wide"]], [["square_capped"]], [["thin_unpadded"], ["tall_capped"]],
    [["wide", "square_capped", "thin_unpadded"]], [["v"]], [["square_capped", "v"], ["wide", "wide"], ["v"]],
], ids=["wide", "past_cap", "unpadded_and_tall_capped", "multi_image", "video", "mixed"])
def test_logits_match_hf(pair, rows):
    hf, model, _ = pair
    b = batch(rows, seed=len(rows))
    assert_close(ours(model, *b), hf_logits(hf, *b), b[1])


def test_mixed_greedy_and_one_compile(pair):
    """Left- and right-padded mixed batches match HF's greedy tokens; new inputs whose crop / token counts fall in
    the same buckets reuse the compiled forward / prefill / decode."""
    hf, loaded, _ = pair
    model = jp.Llava(loaded.cfg, loaded.graphdef, loaded.params)  # fresh jit caches
    for seed, rows in ((1, [["square_capped", "v"], ["wide"]]), (2, [["tall_capped", "v"], ["wide"]])):
        b = batch(rows, seed=seed, T=180)
        assert_close(ours(model, *b), hf_logits(hf, *b), b[1])
        with torch.no_grad():
            g = hf.generate(**hf_kwargs(*b), max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1,
                            eos_token_id=None, pad_token_id=0)
        ids, mask, px, sizes, _, pv = b
        mine = np.asarray(model.generate(ids, px, attention_mask=mask, image_sizes=sizes, pixel_values_videos=pv,
                                         max_new_tokens=6, eos_token_id=(), pad_token_id=0))
        np.testing.assert_array_equal(mine, g[:, ids.shape[1]:].numpy())
    for f in (model.programs.forward, model.programs.prefill, model.programs.decode):
        assert f._cache_size() == 1
    b = batch([["wide"], ["v"]], seed=3, left=False)  # right padding
    assert_close(ours(model, *b), hf_logits(hf, *b), b[1])


def test_convert_and_reload(pair, tmp_path):
    from jaxprune.checkpoints import convert

    _, model, d = pair
    convert(d, tmp_path / "conv")
    again = jp.load(tmp_path / "conv")
    assert again.cfg == model.cfg
    a, b = model.flat_params(), again.flat_params()
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_bad_inputs(pair):
    _, model, _ = pair
    ids, mask, px, sizes, num, pv = batch([["square_capped"]], seed=5)
    with pytest.raises(InputError, match="needs 5 crops"):  # a 2x2 image given only the base + 1 tile
        model(ids, px[:, :2], attention_mask=mask, image_sizes=sizes)
    big = np.zeros((1, 8, 3, S, S), np.float32)  # more crops than the largest pinpoint allows
    with pytest.raises(InputError, match="allow at most 5"):
        model(ids, big, attention_mask=mask, image_sizes=sizes)
    cut = int(np.flatnonzero(ids[0] == IMG_TOK)[0])  # one image token less: a token-count mismatch
    short, smask = np.delete(ids, cut, axis=1), np.delete(mask, cut, axis=1)
    with pytest.raises(InputError, match="neither image 0's"):
        model(short, px, attention_mask=smask, image_sizes=sizes)
    with pytest.raises(InputError, match="image_sizes"):
        model(ids, px, attention_mask=mask)
    ids, mask, _, _, _, pv = batch([["v"]], seed=6)
    with pytest.raises(InputError, match=r"\[videos, frames, C, H, W\]"):  # a wrong frame tensor
        model(ids, attention_mask=mask, pixel_values_videos=pv[0])
    with pytest.raises(InputError, match="frames are 30x30"):
        model(ids, attention_mask=mask, pixel_values_videos=pv[..., :30, :30])
    with pytest.raises(InputError, match="video tokens"):  # one frame short
        model(ids, attention_mask=mask, pixel_values_videos=pv[:, :-1])
