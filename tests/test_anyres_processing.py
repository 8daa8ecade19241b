"""jaxprune.processing_anyres: bit parity with transformers' LlavaNextImageProcessorPil and with a transcription
of the original LLaVA ``process_anyres_image``; anyres geometry and token counts."""

from __future__ import annotations

import math
import types

import numpy as np
import PIL.Image
import pytest

from jaxprune.processing_anyres import (
    LLAVA_V16_PINPOINTS,
    AnyresProcessorConfig,
    anyres_grid,
    expand_image_tokens_anyres,
    max_image_tokens,
    num_image_tokens,
    preprocess_anyres_image,
    preprocess_anyres_images,
    select_best_resolution,
    unpad_box,
)

skdata = pytest.importorskip("skimage.data")
transformers = pytest.importorskip("transformers")
from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil
from transformers.image_processing_utils import select_best_resolution as hf_select

PINS = [list(p) for p in LLAVA_V16_PINPOINTS]


def _hf(pins=PINS, size=336, **kw):
    return LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                      image_grid_pinpoints=pins, do_pad=True, resample=3, **kw)


# ---- original LLaVA (haotian-liu/LLaVA llava/mm_utils.py), transcribed for the test --------------------------------
def _orig_select_best_resolution(original_size, possible_resolutions):
    original_width, original_height = original_size
    best_fit, max_effective_resolution, min_wasted_resolution = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
                effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution):
            max_effective_resolution, min_wasted_resolution = effective_resolution, wasted_resolution
            best_fit = (width, height)
    return best_fit


def _orig_resize_and_pad_image(image, target_resolution):
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height, new_width = target_height, min(math.ceil(original_width * scale_h), target_width)
    resized_image = image.resize((new_width, new_height))  # PIL default filter
    new_image = PIL.Image.new("RGB", (target_width, target_height), (0, 0, 0))
    new_image.paste(resized_image, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return new_image


def _orig_process_anyres_image(image, processor, grid_pinpoints):
    best_resolution = _orig_select_best_resolution(image.size, grid_pinpoints)
    image_padded = _orig_resize_and_pad_image(image, best_resolution)
    ps = processor.crop_size["height"]
    patches = [image_padded.crop((j, i, j + ps, i + ps))
               for i in range(0, image_padded.size[1], ps) for j in range(0, image_padded.size[0], ps)]
    image_original_resize = image.resize((processor.size["shortest_edge"], processor.size["shortest_edge"]))
    return np.stack([processor.preprocess(p, return_tensors="np")["pixel_values"][0]
                     for p in [image_original_resize] + patches])


def _orig_unpad_rows_cols(original_size_wh, cur_h, cur_w):  # llava_arch.unpad_image on shapes
    original_width, original_height = original_size_wh
    if original_width / original_height > cur_w / cur_h:
        new_height = int(original_height * (cur_w / original_width))
        pad = (cur_h - new_height) // 2
        return cur_h - 2 * pad, cur_w
    new_width = int(original_width * (cur_h / original_height))
    pad = (cur_w - new_width) // 2
    return cur_h, cur_w - 2 * pad


def _clip336():  # the CLIPImageProcessor the original applies to each crop (4.x slow == 5.x Pil backend)
    return CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3)


def _photos():
    rocket = skdata.rocket()  # [427, 640, 3]
    return {"astronaut": skdata.astronaut(), "coffee": skdata.coffee(), "chelsea": skdata.chelsea(),
            "rocket": rocket, "rocket_tall": np.ascontiguousarray(rocket.transpose(1, 0, 2))}


def _rand(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- geometry -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw,want", [
    ((336, 336), (336, 672)),   # every pinpoint keeps all pixels; the first least-wasteful wins
    ((512, 512), (672, 672)), ((480, 640), (672, 672)), ((640, 480), (672, 672)),
    ((300, 1000), (336, 1008)), ((1000, 300), (1008, 336)), ((400, 700), (672, 672)), ((250, 600), (336, 672)), ((1, 1), (336, 672)),
])
def test_select_best_resolution_cases(hw, want):
    assert select_best_resolution(hw, LLAVA_V16_PINPOINTS) == want == tuple(hf_select(hw, PINS))
    # the original's (w, h) call on (w, h) pinpoints picks the same pinpoint
    assert _orig_select_best_resolution(hw[::-1], [p[::-1] for p in PINS]) == want[::-1]


def test_select_best_resolution_random_and_asymmetric():
    rng = np.random.default_rng(0)
    pins = [[336, 672], [336, 1008], [672, 672]]  # asymmetric: orientation matters
    for h, w in rng.integers(1, 2500, (300, 2)):
        assert select_best_resolution((h, w), pins) == tuple(hf_select((h, w), pins))
        assert select_best_resolution((w, h), pins) == _orig_select_best_resolution((w, h), pins)
    with pytest.raises(ValueError, match="positive"):
        select_best_resolution((0, 5), pins)


def test_token_counts_match_hf_processor_and_v16_constants():
    from transformers import LlavaNextProcessor

    proc = object.__new__(LlavaNextProcessor)
    proc.image_processor = types.SimpleNamespace(image_grid_pinpoints=PINS)
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = 14, 1, "default"
    rng = np.random.default_rng(1)
    sizes = [(336, 336), (672, 672), (1, 1000), (1000, 1), (55, 176)] + [tuple(s) for s in rng.integers(1, 3000, (300, 2))]
    for h, w in sizes:
        assert num_image_tokens((h, w), PINS, 336, 14) == proc._get_number_of_features(h, w, 336, 336) - 1
    assert max_image_tokens(PINS, 336, 14) == 2928 == num_image_tokens((900, 900), PINS, 336, 14)
    assert AnyresProcessorConfig().max_crops == 5 and AnyresProcessorConfig().max_tokens == 2928
    assert anyres_grid((300, 1000), PINS, 336) == (1, 3)


def test_unpad_rounding_hf_vs_original():
    """HF rounds int(round(x, 7)), the original truncates: (55, 176) keeps 16 vs 14 feature rows."""
    gh, gw = anyres_grid((55, 176), PINS, 336)
    assert unpad_box(55, 176, gh * 24, gw * 24, "hf") == (4, 20, 0, 48)
    assert unpad_box(55, 176, gh * 24, gw * 24, "original") == (5, 19, 0, 48)
    r, c = _orig_unpad_rows_cols((176, 55), gh * 24, gw * 24)
    assert (r, c) == (14, 48)
    orig = AnyresProcessorConfig(convention="original", pinpoints=tuple(p[::-1] for p in LLAVA_V16_PINPOINTS))
    assert AnyresProcessorConfig().num_image_tokens(55, 176) == 576 + 16 * 49
    assert orig.num_image_tokens(55, 176) == 576 + r * (c + 1)


# ---- pixels: HF PIL backend ---------------------------------------------------------------------------------------
def test_photos_bit_exact_with_hf_pil_processor():
    photos = _photos()
    ims = list(photos.values())
    ref = _hf()(ims, return_tensors="np")
    ours = preprocess_anyres_images(ims, AnyresProcessorConfig(), pad_crops="batch")
    assert ours.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])
    np.testing.assert_array_equal(ours.image_sizes, ref["image_sizes"])
    assert ours.num_crops.tolist() == [5, 5, 3, 5, 5]
    static = preprocess_anyres_images(ims, AnyresProcessorConfig())  # default: padded to the config's 5 crops
    np.testing.assert_array_equal(static.pixel_values, ref["pixel_values"])


@pytest.mark.parametrize("hw", [(1, 1), (1, 700), (700, 1), (333, 1001), (769, 768), (37, 41), (1009, 335),
                                (55, 176), (340, 337)])
def test_odd_sizes_bit_exact_with_hf_pil_processor(hw):
    img = _rand(*hw, seed=hw[0])
    ref = _hf()(PIL.Image.fromarray(img), return_tensors="np")
    px, size = preprocess_anyres_image(PIL.Image.fromarray(img))
    np.testing.assert_array_equal(px, ref["pixel_values"][0, : px.shape[0]])
    assert not ref["pixel_values"][0, px.shape[0]:].any() and size == tuple(ref["image_sizes"][0])


def test_tiny_config_bit_exact_with_hf():
    """The geometry of tests/test_next_parity.py (crop 28, small pinpoints)."""
    pins = [[28, 56], [56, 28], [56, 56]]
    cfg = AnyresProcessorConfig(pinpoints=tuple(map(tuple, pins)), crop_size=28, patch_size=7)
    ims = [_rand(60, 15, 1), _rand(20, 70, 2), _rand(50, 48, 3), _rand(57, 41, 4)]
    ref = _hf(pins, 28)(ims, return_tensors="np")
    ours = preprocess_anyres_images(ims, cfg, pad_crops="batch")
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])
    assert preprocess_anyres_images(ims, cfg).pixel_values.shape == (4, 5, 3, 28, 28)


def test_alpha_and_numpy_inputs():
    rgba = _rand(90, 130, 5)
    rgba = np.concatenate([rgba, np.linspace(0, 255, 90 * 130).reshape(90, 130, 1).astype(np.uint8)], -1)
    img = PIL.Image.fromarray(rgba, "RGBA")
    ref = _hf()(img, return_tensors="np")["pixel_values"][0]  # transformers 5.x: composite onto white
    px, _ = preprocess_anyres_image(img, AnyresProcessorConfig(rgb_conversion="composite_white"))
    np.testing.assert_array_equal(px, ref[: px.shape[0]])
    px_pil, _ = preprocess_anyres_image(img)  # original / 4.x: alpha dropped
    np.testing.assert_array_equal(px_pil, preprocess_anyres_image(img.convert("RGB"))[0])
    np.testing.assert_array_equal(preprocess_anyres_image(rgba[..., :3])[0], px_pil)  # numpy HWC == PIL


# ---- pixels: original code ----------------------------------------------------------------------------------------
def test_photos_match_original_process_anyres_image():
    orig_pins = [p[::-1] for p in PINS]  # an original config lists (w, h); this set is symmetric anyway
    cfg = AnyresProcessorConfig(convention="original", pinpoints=tuple(map(tuple, orig_pins)))
    clip = _clip336()
    for name, arr in list(_photos().items())[1:4]:
        img = PIL.Image.fromarray(arr)
        ref = _orig_process_anyres_image(img, clip, orig_pins)
        ours, _ = preprocess_anyres_image(img, cfg)
        np.testing.assert_array_equal(ours, ref, err_msg=name)
        np.testing.assert_array_equal(ours, preprocess_anyres_image(img)[0])  # == HF for RGB + symmetric set


def test_asymmetric_pinpoints_orientation():
    """HF reads (h, w), the original (w, h): the same list gives a wide grid in one and a tall one in the other."""
    pins = [[336, 672]]
    img = PIL.Image.fromarray(_rand(200, 300, 7))
    hf_px, _ = preprocess_anyres_image(img, AnyresProcessorConfig(pinpoints=((336, 672),)))
    np.testing.assert_array_equal(hf_px, _hf(pins)(img, return_tensors="np")["pixel_values"][0])
    o_cfg = AnyresProcessorConfig(pinpoints=((336, 672),), convention="original")
    o_px, _ = preprocess_anyres_image(img, o_cfg)
    np.testing.assert_array_equal(o_px, _orig_process_anyres_image(img, _clip336(), pins))
    assert hf_px.shape == o_px.shape == (3, 3, 336, 336) and not np.array_equal(hf_px, o_px)
    assert o_cfg.pinpoints_hw == ((672, 336),)


# ---- helpers and errors -------------------------------------------------------------------------------------------
def test_expand_and_config_errors():
    assert expand_image_tokens_anyres("a<image>b<image>", [2, 3]) == "a<image><image>b<image><image><image>"
    with pytest.raises(ValueError, match="2 '<image>' placeholders but 1"):
        expand_image_tokens_anyres("<image><image>", [4])
    with pytest.raises(ValueError, match="not a pair of positive multiples of the crop size 336"):
        AnyresProcessorConfig(pinpoints=((336, 600),))
    with pytest.raises(ValueError, match="convention"):
        AnyresProcessorConfig(convention="llava")
    d = {"aspect_ratio_setting": "anyres", "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
         "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
         "image_grid_pinpoints": PINS, "image_mean": [0.48145466, 0.4578275, 0.40821073],
         "image_processor_type": "LlavaNextImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
         "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 1 / 255,
         "size": {"shortest_edge": 336}}
    assert AnyresProcessorConfig.from_hf_preprocessor_config(d) == AnyresProcessorConfig()
    with pytest.raises(ValueError, match="shortest_edge=224 != crop_size=336"):
        AnyresProcessorConfig.from_hf_preprocessor_config({**d, "size": {"shortest_edge": 224}})
    with pytest.raises(ValueError, match="pad_crops"):
        preprocess_anyres_images([_rand(5, 5)], pad_crops="none")
    with pytest.raises(ValueError, match="empty list"):
        preprocess_anyres_images([])
