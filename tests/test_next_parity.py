"""Rung 1 for LLaVA-NeXT: jaxprune == transformers on a tiny random LlavaNextForConditionalGeneration (fp32),
plus the static anyres packing checked index-for-index against HF's ``pack_image_features``."""

from __future__ import annotations

import types

import numpy as np
import pytest

import jaxprune as jp
from jaxprune.inputs import InputError
from jaxprune.models.anyres import AnyresGeometry, build_layout
from jaxprune.processing_anyres import AnyresProcessorConfig, preprocess_anyres_images
from tests.conftest import perturb_

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

PINS = [[28, 56], [56, 28], [56, 56]]  # (h, w), multiples of the tiny CLIP image_size 28 (patch 7 -> 4x4 grid)
IMG_TOK, VOCAB = 100, 128
# (h, w): tall (2x1 tiles, columns cut), wide (1x2, rows cut), square-ish (2x2, nothing cut), tall-ish (2x2, cut)
SIZES = {"tall": (60, 15), "wide": (20, 70), "square": (50, 48), "tallish": (57, 41)}


def _build_hf_next(seed: int = 0):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=VOCAB,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7)
    cfg = LlavaNextConfig(text_config=tc, vision_config=vc, image_token_index=IMG_TOK, image_grid_pinpoints=PINS,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return perturb_(LlavaNextForConditionalGeneration(cfg).eval())


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    hf = _build_hf_next()
    d = tmp_path_factory.mktemp("hf_next")
    hf.save_pretrained(d)
    return hf, jp.load(d)


PROC = AnyresProcessorConfig(pinpoints=tuple(map(tuple, PINS)), crop_size=28, patch_size=7)


def _images(names, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, SIZES[n] + (3,), dtype=np.uint8) for n in names]


def _hf_token_count(h, w):
    """HF LlavaNextProcessor's expansion count (llava-hf processor_config: num_additional_image_tokens=1)."""
    from transformers import LlavaNextProcessor

    proc = object.__new__(LlavaNextProcessor)  # no tokenizer needed for the count
    proc.image_processor = types.SimpleNamespace(image_grid_pinpoints=PINS)
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = 7, 1, "default"
    return proc._get_number_of_features(h, w, 28, 28) - 1


def _batch(rows_images, counts, seed=0, T=None, prefix=2):
    """rows_images: per row, a list of image indices; left-padded ids/mask with each image's tokens expanded."""
    rng = np.random.default_rng(seed)
    rows = []
    for imgs in rows_images:
        r = list(rng.integers(3, IMG_TOK - 1, prefix))
        for i in imgs:
            r += [IMG_TOK] * int(counts[i]) + list(rng.integers(3, IMG_TOK - 1, int(rng.integers(2, 9))))
        rows.append(r)
    T = T or max(map(len, rows))
    ids, mask = np.zeros((len(rows), T), np.int64), np.zeros((len(rows), T), np.int64)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask


def _hf_logits(hf, ids, mask, pv, sizes):
    pos = np.maximum(mask.cumsum(1) - 1, 0)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pv), image_sizes=torch.tensor(sizes),
                  attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()


def _assert_close(out, ref, mask):
    assert out.shape == ref.shape
    v = mask.astype(bool)
    err = np.abs(out - ref)[v].max()
    assert err <= 1e-4 * max(1.0, np.abs(ref[v]).max()), err


def test_token_counts_match_hf_processor_and_model():
    geom = AnyresGeometry(crop_size=28, grid=4, pinpoints=tuple(map(tuple, PINS)))
    lay = build_layout(geom, [SIZES[n] for n in SIZES])
    want = [_hf_token_count(*SIZES[n]) for n in SIZES]
    assert lay.num_tokens.tolist() == want == [PROC.num_image_tokens(*SIZES[n]) for n in SIZES]
    assert len(set(want)) == len(want)  # four different lengths, one static M
    assert geom.max_tokens == 16 + 8 * 9 and geom.max_crops == 5


@pytest.mark.parametrize("name", ["tall", "wide", "square"])
def test_single_image_logits_match_hf(next_pair, name):
    hf, model = next_pair
    b = preprocess_anyres_images(_images([name], seed=1), PROC)
    ids, mask = _batch([[0]], b.num_image_tokens, seed=2, T=100)  # one T: the three share a compile
    ref = _hf_logits(hf, ids, mask, b.pixel_values, b.image_sizes)
    out = np.asarray(model(ids, b.pixel_values, attention_mask=mask, image_sizes=b.image_sizes).logits)
    _assert_close(out, ref, mask)


def test_mixed_batch_logits_greedy_and_one_compile(next_pair):
    """Left-padded batches, row 0 = two images, rows 1-2 = one each; three different mixes of tall / wide /
    square images (different token counts) all match HF and share one compiled forward / prefill / decode."""
    hf, loaded = next_pair
    model = jp.Llava(loaded.cfg, loaded.graphdef, loaded.params)  # fresh jit caches
    mixes = [["tall", "wide", "square", "tallish"], ["wide", "tall", "tallish", "square"],
             ["wide", "wide", "tall", "tall"]]
    for s, names in enumerate(mixes):
        b = preprocess_anyres_images(_images(names, seed=3 + s), PROC)
        ids, mask = _batch([[0, 1], [2], [3]], b.num_image_tokens, seed=4 + s, T=120)
        ref = _hf_logits(hf, ids, mask, b.pixel_values, b.image_sizes)
        out = np.asarray(model(ids, b.pixel_values, attention_mask=mask, image_sizes=b.image_sizes).logits)
        _assert_close(out, ref, mask)
        with torch.no_grad():
            g = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            pixel_values=torch.tensor(b.pixel_values), image_sizes=torch.tensor(b.image_sizes),
                            max_new_tokens=16, min_new_tokens=16, do_sample=False, num_beams=1, eos_token_id=None,
                            pad_token_id=0)
        ours = np.asarray(model.generate(ids, b.pixel_values, attention_mask=mask, image_sizes=b.image_sizes,
                                         max_new_tokens=16, eos_token_id=(), pad_token_id=0))
        np.testing.assert_array_equal(ours, g[:, ids.shape[1]:].numpy())
    assert model.programs.forward._cache_size() == 1
    assert model.programs.prefill._cache_size() == 1 and model.programs.decode._cache_size() == 1
    # HF's batch-padded crops, the 4-D concatenation and per-image lists give the same logits
    hfb = preprocess_anyres_images(_images(mixes[-1], seed=3 + len(mixes) - 1), PROC, pad_crops="batch")
    assert hfb.pixel_values.shape[1] == 3 < PROC.max_crops
    flat = np.concatenate([b.pixel_values[i, :n] for i, n in enumerate(b.num_crops)])
    for px in (hfb.pixel_values, flat, [b.pixel_values[i, :n] for i, n in enumerate(b.num_crops)]):
        o = np.asarray(model(ids, px, attention_mask=mask, image_sizes=b.image_sizes).logits)
        np.testing.assert_array_equal(o, out)
    assert model.programs.forward._cache_size() == 1


def test_next_input_errors(next_pair):
    _, model = next_pair
    b = preprocess_anyres_images(_images(["tall", "square"], seed=5), PROC)  # 3 and 5 crops
    ids, mask = _batch([[0], [1]], b.num_image_tokens, seed=6)
    pv, sizes = b.pixel_values, b.image_sizes
    with pytest.raises(InputError, match=r"need image_sizes \[N, 2\]"):
        model(ids, pv, attention_mask=mask)
    with pytest.raises(InputError, match=r"image 1 of size \(h, w\) = \(50, 48\) needs 5 \(1 base \+ a 2x2 grid"):
        model(ids, pv[:, :3], attention_mask=mask, image_sizes=sizes)
    with pytest.raises(InputError, match=r"allow at most 5"):
        model(ids, np.concatenate([pv, pv[:, :1]], 1), attention_mask=mask, image_sizes=sizes)
    with pytest.raises(InputError, match=r"contain 128 image tokens .* image_sizes imply 74 visual tokens "
                                         r"\(\[40, 34\] per image\)"):
        model(ids, pv, attention_mask=mask, image_sizes=[SIZES["tall"], SIZES["wide"]])
    with pytest.raises(InputError, match=r"image_sizes must be \[N, 2\]"):
        model(ids, pv, attention_mask=mask, image_sizes=sizes[:, :1])
    with pytest.raises(InputError, match=r"2 images but image_sizes has 1 rows"):
        model(ids, pv, attention_mask=mask, image_sizes=sizes[:1])
    with pytest.raises(InputError, match=r"4-D pixel_values hold 5 crops but image_sizes imply 3"):
        model(ids, pv[0], attention_mask=mask, image_sizes=sizes[:1])


@pytest.mark.parametrize("hw", [(336, 336), (480, 640), (640, 480), (300, 451), (451, 300), (1, 1000), (1000, 1),
                                (333, 1001), (1001, 333), (769, 768), (37, 41), (2048, 500), (12, 700)])
def test_layout_equals_hf_pack_image_features(hw):
    """Standard llava-v1.6 geometry (336/14, 5 pinpoints): our gather index == HF's packing of index-valued
    features, so packed values equal HF's for any features; plus the (crop, row, col) map."""
    from transformers import LlavaNextConfig, LlavaNextModel
    from transformers.models.llava_next.modeling_llava_next import (
        image_size_to_num_patches,
    )

    cfg = LlavaNextConfig()  # 336 / 14, llava-v1.6 pinpoints
    geom = AnyresGeometry(crop_size=336, grid=24, pinpoints=tuple(map(tuple, cfg.image_grid_pinpoints)))
    assert geom.max_tokens == 2928 and geom.max_crops == 5
    n = image_size_to_num_patches(list(hw), cfg.image_grid_pinpoints, 336)
    feats = torch.arange(n * 576, dtype=torch.float64).reshape(n, 576, 1)  # value = source row
    fake = types.SimpleNamespace(config=cfg)
    packed, lens = LlavaNextModel.pack_image_features(fake, [feats], torch.tensor([hw]), "default",
                                                      image_newline=torch.tensor([-1.0], dtype=torch.float64))
    ref = packed[0][:, 0].numpy().astype(np.int64)
    lay = build_layout(geom, [hw])
    k = int(lay.num_tokens[0])
    assert k == int(lens[0]) and lay.num_crops[0] == n and lay.valid[0].sum() == k and not lay.valid[0, k:].any()
    ours = np.where(lay.gather_index[0, :k] == geom.newline_index, -1, lay.gather_index[0, :k])
    np.testing.assert_array_equal(ours, ref)
    real = ~lay.is_newline[0, :k]
    np.testing.assert_array_equal((lay.crop * 576 + lay.row * 24 + lay.col)[0, :k][real], ref[real])
    assert (lay.crop[0, :k][~real] == -1).all() and (ref[~real] == -1).all()
