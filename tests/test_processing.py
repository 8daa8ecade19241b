"""Tests for jaxprune.processing: bit parity with transformers' slow (PIL) CLIP processor + original expand2square."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import pytest

from jaxprune.processing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VICUNA_V1_SYSTEM,
    ImageProcessorConfig,
    build_vicuna_v1_prompt,
    expand2square,
    expand_image_tokens,
    load_image,
    preprocess_images,
    resize_output_size,
    tokenize_original_llava,
    tokenize_prompts,
)

skdata = pytest.importorskip("skimage.data")
transformers = pytest.importorskip("transformers")
try:  # transformers 5.x: the PIL backend is a separate class; CLIPImageProcessor is torchvision-based.
    from transformers import CLIPImageProcessorPil as _SlowCLIP
except ImportError:  # transformers 4.x: CLIPImageProcessor is the slow PIL one.
    from transformers import CLIPImageProcessor as _SlowCLIP


def _hf():
    return _SlowCLIP(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
                     do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                     image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True)


def _hf_run(img: PIL.Image.Image) -> np.ndarray:
    return np.asarray(_hf()(img, return_tensors="np")["pixel_values"])  # [1, 3, 336, 336]


def _orig_expand2square(pil_img, background_color):  # llava/mm_utils.py, verbatim
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = PIL.Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = PIL.Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def _rgb(h, w, seed=0):
    return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def _images() -> dict[str, PIL.Image.Image]:
    rgba = np.random.RandomState(1).randint(0, 256, (40, 60, 4), dtype=np.uint8)
    return {
        "astronaut": PIL.Image.fromarray(skdata.astronaut()),
        "coffee": PIL.Image.fromarray(skdata.coffee()),
        "chelsea": PIL.Image.fromarray(skdata.chelsea()),
        "camera_L": PIL.Image.fromarray(skdata.camera()),
        "rgba": PIL.Image.fromarray(rgba),
        "palette": _rgb(50, 30, 2).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16),
        "L_small": PIL.Image.fromarray(np.random.RandomState(3).randint(0, 256, (9, 13), dtype=np.uint8)),
        "w1_h250": _rgb(250, 1, 4),  # HF parity at 1:250 (1:1000 costs HF ~8 s of numpy copies)
        "w250_h1": _rgb(1, 250, 5),
        "w7_h5": _rgb(5, 7, 6),
        "sq336": _rgb(336, 336, 7),
    }


IMAGES = _images()


@pytest.mark.parametrize("name", list(IMAGES))
def test_crop_matches_hf_slow_clip(name):
    img = IMAGES[name]
    cfg = ImageProcessorConfig(mode="crop")
    ours = preprocess_images([img], cfg)
    assert ours.shape == (1, 3, 336, 336) and ours.dtype == np.float32
    ref = _hf_run(img.convert("RGB"))  # "pil" conversion = convert("RGB") (original / transformers 4.x)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", list(IMAGES))
def test_pad_matches_expand2square_plus_hf(name):
    img = IMAGES[name]
    bg = tuple(int(x * 255) for x in OPENAI_CLIP_MEAN)
    assert bg == (122, 116, 104)
    ref = _hf_run(_orig_expand2square(img.convert("RGB"), bg))
    np.testing.assert_array_equal(preprocess_images([img], ImageProcessorConfig(mode="pad")), ref)


@pytest.mark.parametrize("hw", [(1000, 1), (1, 1000)])
def test_extreme_aspect_1x1000(hw):
    img = _rgb(*hw, seed=8)
    ref = _hf_run(_orig_expand2square(img, (122, 116, 104)))  # pad path: cheap 1000x1000 square first
    np.testing.assert_array_equal(preprocess_images([img], ImageProcessorConfig()), ref)
    out = preprocess_images([img], ImageProcessorConfig(mode="crop"))[0]  # resized to 336x336000 then cropped
    assert out.shape == (3, 336, 336) and np.isfinite(out).all()
    axis = 2 if hw[1] == 1 else 1  # a 1-px-wide image upsamples to identical columns (rows if 1 px high)
    np.testing.assert_array_equal(out, np.repeat(out.take([0], axis=axis), 336, axis=axis))
    assert out.std() > 0.1


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("JAXPRUNE_SLOW_TESTS"), reason="~10 s; set JAXPRUNE_SLOW_TESTS=1")
@pytest.mark.parametrize("hw", [(1000, 1), (1, 1000)])
def test_crop_extreme_1x1000_matches_hf(hw):
    img = _rgb(*hw, seed=8)
    np.testing.assert_array_equal(preprocess_images([img], ImageProcessorConfig(mode="crop")), _hf_run(img))


def test_pad_matches_hf_llava_do_pad():
    try:
        from transformers import LlavaImageProcessorPil as Llava
    except ImportError:
        pytest.skip("no LlavaImageProcessorPil")
    img = IMAGES["coffee"]
    hf = Llava(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True, resample=3,
               image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    ref = np.asarray(hf(img, return_tensors="np")["pixel_values"])
    np.testing.assert_array_equal(preprocess_images([img], ImageProcessorConfig(mode="pad")), ref)


def test_composite_white_matches_transformers5():
    if not hasattr(transformers, "CLIPImageProcessorPil"):
        pytest.skip("alpha compositing is transformers 5.x behaviour")
    img = IMAGES["rgba"]
    cfg = ImageProcessorConfig(mode="crop", rgb_conversion="composite_white")
    np.testing.assert_array_equal(preprocess_images([img], cfg), _hf_run(img))
    arr = np.asarray(img)  # numpy RGBA path uses HF's numpy formula
    ref = np.asarray(_hf()(arr, return_tensors="np")["pixel_values"])
    np.testing.assert_array_equal(preprocess_images([arr], cfg), ref)


@pytest.mark.parametrize("mode", ["1", "LA", "CMYK", "I;16", "I", "F", "YCbCr", "PA"])
def test_other_pil_modes_convert_like_pil(mode):
    src = np.random.RandomState(9).randint(0, 256, (20, 30), dtype=np.uint8)
    img = PIL.Image.fromarray(src).convert(mode) if mode not in ("I;16",) else PIL.Image.fromarray(
        src.astype(np.uint16) * 300)
    ours = preprocess_images([img], ImageProcessorConfig())
    np.testing.assert_array_equal(ours, preprocess_images([img.convert("RGB")], ImageProcessorConfig()))
    assert np.isfinite(ours).all()


def test_batch_and_numpy_inputs():
    a = np.asarray(IMAGES["chelsea"])  # [H, W, 3] uint8
    cfg = ImageProcessorConfig()
    out = preprocess_images([IMAGES["chelsea"], a, a.astype(np.float32) / 255.0, a[..., :1], a[..., 0]], cfg)
    assert out.shape == (5, 3, 336, 336)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])  # round(x * 255) recovers uint8 exactly
    np.testing.assert_array_equal(out[3], out[4])
    gray = preprocess_images([PIL.Image.fromarray(a[..., 0])], cfg)
    np.testing.assert_array_equal(out[3], gray[0])
    rgba = np.concatenate([a, np.zeros_like(a[..., :1])], -1)  # alpha dropped in "pil" mode
    np.testing.assert_array_equal(preprocess_images([rgba], cfg)[0], out[0])


def test_resize_output_size_and_expand2square():
    assert resize_output_size(480, 640, 336) == (336, 448)
    assert resize_output_size(1000, 1, 336) == (336000, 336)
    assert resize_output_size(5, 7, 336) == (336, int(336 * 7 / 5))
    img = _rgb(5, 7)
    np.testing.assert_array_equal(np.asarray(expand2square(img, (1, 2, 3))),
                                  np.asarray(_orig_expand2square(img, (1, 2, 3))))
    assert expand2square(img, (1, 2, 3)).size == (7, 7)


def test_center_crop_pads_when_smaller():  # shortest_edge < crop: transformers zero-pads (before normalising)
    img = _rgb(9, 13)
    cfg = ImageProcessorConfig(image_size=12, shortest_edge=7, mode="crop")
    hf = _SlowCLIP(size={"shortest_edge": 7}, crop_size={"height": 12, "width": 12}, resample=3)
    ref = np.asarray(hf(img, return_tensors="np")["pixel_values"])
    np.testing.assert_array_equal(preprocess_images([img], cfg), ref)


def test_from_hf_preprocessor_config():
    llava_hf = {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
                "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(OPENAI_CLIP_MEAN),
                "image_processor_type": "CLIPImageProcessor", "image_std": list(OPENAI_CLIP_STD),
                "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
                "size": {"shortest_edge": 336}}
    cfg = ImageProcessorConfig.from_hf_preprocessor_config(llava_hf)
    assert cfg == ImageProcessorConfig(mode="crop")
    assert ImageProcessorConfig.from_hf_preprocessor_config({**llava_hf, "do_pad": True}).mode == "pad"
    assert ImageProcessorConfig.from_hf_preprocessor_config(llava_hf, mode="pad") == ImageProcessorConfig()
    clip_legacy = {"crop_size": 336, "size": 336, "do_center_crop": True, "feature_extractor_type": "x"}
    assert ImageProcessorConfig.from_hf_preprocessor_config(clip_legacy).image_size == 336
    for key, val in [("do_normalize", False), ("do_resize", False), ("size", {"height": 336, "width": 336}),
                     ("crop_size", {"height": 336, "width": 300}), ("image_mean", [0.5]), ("resample", 9),
                     ("image_grid_pinpoints", [[336, 672]]), ("default_to_square", True),
                     ("image_std", [0.0, 1.0, 1.0]), ("rescale_factor", -1.0), ("do_pad", "yes")]:
        with pytest.raises(ValueError, match=key):
            ImageProcessorConfig.from_hf_preprocessor_config({**llava_hf, key: val})


@pytest.mark.parametrize("bad, msg", [
    (PIL.Image.new("RGB", (0, 5)), "empty"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    ("img.png", "expected PIL"),
    (None, "expected PIL"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
    (np.full((4, 4, 3), np.inf, np.float32), "inf"),
    (np.zeros((4, 4, 2), np.uint8), "channel"),
    (np.zeros((3, 8, 8), np.uint8), "channel"),
    (np.zeros((2, 4, 4, 3), np.uint8), "channel"),
    (np.full((4, 4, 3), 2.0), r"\[0, 1\]"),
    (np.full((4, 4, 3), 300, np.int32), r"\[0, 255\]"),
    (np.zeros((4, 4, 3), bool), "dtype"),
])
def test_bad_images(bad, msg):
    with pytest.raises(ValueError, match=msg):
        preprocess_images([bad], ImageProcessorConfig())


def test_bad_batches_and_config():
    with pytest.raises(ValueError, match="empty list"):
        preprocess_images([])
    with pytest.raises(ValueError, match="list"):
        preprocess_images(IMAGES["coffee"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        ImageProcessorConfig(mode="resize")
    with pytest.raises(ValueError, match="std"):
        ImageProcessorConfig(std=(0.0, 1.0, 1.0))


def test_load_image(tmp_path):
    p = tmp_path / "a.png"
    IMAGES["rgba"].save(p)
    img = load_image(p)
    assert img.mode == "RGBA" and img.size == (60, 40)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_image(bad)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(p.read_bytes()[:60])
    with pytest.raises(ValueError, match="trunc.png"):
        load_image(trunc)


# ------------------------------------------------------------------------------------------------ prompts
def test_vicuna_prompt():
    q = "What is shown?\nAnswer the question using a single word or phrase."
    assert build_vicuna_v1_prompt(q) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\n" + q + " ASSISTANT:")
    assert build_vicuna_v1_prompt("hi", with_image=False) == VICUNA_V1_SYSTEM + " USER: hi ASSISTANT:"
    assert expand_image_tokens("a <image> b <image>", 3) == "a <image><image><image> b <image><image><image>"


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", "a", "b", "what", "is", "this", "USER:", "ASSISTANT:"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def test_tokenize_prompts_padding(tok):
    img_id = tok.convert_tokens_to_ids("<image>")
    assert img_id == 11
    prompts = ["USER: <image>\nwhat is this ASSISTANT:", "a b"]
    left = tokenize_prompts(tok, prompts, img_id, num_image_tokens=5)
    ids, m = left["input_ids"], left["attention_mask"]
    assert ids.dtype == np.int32 and m.dtype == np.int32 and ids.shape == (2, 11)
    assert ids[0].tolist() == [1, 9] + [img_id] * 5 + [6, 7, 8, 10] and m[0].all()
    assert ids[1].tolist() == [3] * 8 + [1, 4, 5] and m[1].tolist() == [0] * 8 + [1] * 3
    right = tokenize_prompts(tok, prompts, img_id, num_image_tokens=5, padding_side="right")
    assert right["input_ids"][1].tolist() == [1, 4, 5] + [3] * 8 and right["attention_mask"][1, :3].all()
    np.testing.assert_array_equal(right["input_ids"][0], ids[0])
    two = tokenize_prompts(tok, ["<image> a <image>"], img_id, num_image_tokens=4)
    assert (two["input_ids"] == img_id).sum() == 8


def test_tokenize_prompts_errors(tok):
    with pytest.raises(ValueError, match="expected 5 image tokens"):
        tokenize_prompts(tok, ["<image> a"], 999, num_image_tokens=5)  # wrong image id
    with pytest.raises(ValueError, match="padding_side"):
        tokenize_prompts(tok, ["a"], 11, 5, padding_side="middle")
    with pytest.raises(ValueError, match="non-empty"):
        tokenize_prompts(tok, [], 11, 5)
    tok.pad_token = None
    try:
        out = tokenize_prompts(tok, ["a b", "a"], 11, 5)
        assert out["input_ids"][1, 0] == 0  # pad id falls back to 0
    finally:
        tok.pad_token = "<pad>"


def test_tokenize_original_llava(tok):
    ids = tokenize_original_llava(tok, "USER: <image>\nwhat is this", -200)
    assert ids.tolist() == [1, 9, -200, 6, 7, 8]
    assert tokenize_original_llava(tok, "<image> a", -200).tolist() == [1, -200, 4]
    assert tokenize_original_llava(tok, "a <image>", -200).tolist() == [1, 4, -200]
