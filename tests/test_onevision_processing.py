"""OneVision preprocessing == transformers' LlavaOnevisionImageProcessorPil (single and multi-image prompts),
token counts == LlavaOnevisionProcessor's, and the model card's Qwen2 chat template."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from jaxprune.processing_onevision import (
    OnevisionProcessorConfig,
    build_prompt,
    expand_tokens,
    num_video_tokens,
    preprocess_frames,
    preprocess_images,
)

PINS = [[384, 384], [384, 768], [768, 384], [768, 768], [384, 1152], [1152, 384]]
CFG = OnevisionProcessorConfig(pinpoints=PINS)
#: the chat template of the llava-hf OneVision checkpoints (transformers' convert_llava_onevision_weights_to_hf.py)
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{# Render all images first #}"
            "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}"
            "{% endfor %}{# Render all video then #}{% for content in message['content'] | selectattr('type', "
            "'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
            "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
            "{{ content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
            "'equalto', 'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
            "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
            "{% endif %}")


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            ((300, 500), (900, 410), (384, 384), (120, 1300))]


def _hf():
    tr = pytest.importorskip("transformers")
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    del tr
    return LlavaOnevisionImageProcessorPil(image_grid_pinpoints=PINS)


@pytest.mark.parametrize("nested", [False, True], ids=["single", "multi_image"])
def test_pixels_equal_hf_pil_processor(nested):
    ims = _images()
    arg = [ims[:1], ims[1:3], ims[3:]] if nested else ims
    ref = _hf()(arg, return_tensors="np")
    ours = preprocess_images(arg, CFG)
    np.testing.assert_array_equal(ours.image_sizes, ref["image_sizes"])
    np.testing.assert_array_equal(ours.batch_num_images, ref["batch_num_images"])
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)


def test_token_counts_equal_hf_processor():
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    proc.num_image_tokens, proc.vision_aspect_ratio = 729, "anyres_max_9"
    proc.image_processor = type("IP", (), {"image_grid_pinpoints": PINS})()
    b = preprocess_images(_images(), CFG)
    for (h, w), n in zip(b.image_sizes, b.num_image_tokens):
        assert n == proc._get_number_of_features(int(h), int(w), 384, 384)
    assert preprocess_images([_images()[:2]], CFG).num_image_tokens.tolist() == [730, 730]
    assert num_video_tokens(8, CFG) == 8 * 14 * 14 + 1


def test_frames_and_prompt():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 240, 320, 3), dtype=np.uint8)
    px = preprocess_frames(frames, CFG)
    assert px.shape == (3, 3, 384, 384) and px.dtype == np.float32
    one = preprocess_images([PIL.Image.fromarray(frames[0])], CFG)
    np.testing.assert_array_equal(px[0], one.pixel_values[0, 0])  # a frame == the squashed base crop of its pixels
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = None

    class Gen(jinja2.ext.Extension):  # HF's {% generation %} block: renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    env.add_extension(Gen)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is shown?"}, {"type": "image"},
                                         {"type": "video"}]}]
    ref = env.from_string(TEMPLATE).render(messages=msgs, add_generation_prompt=True)
    assert build_prompt("What is shown?", images=1, videos=1) == ref
    assert expand_tokens("<image>a<video>", [2], [3]) == "<image><image>a<video><video><video>"
    with pytest.raises(ValueError, match="placeholders"):
        expand_tokens("<image>", [1, 2])
