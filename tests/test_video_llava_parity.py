"""Rung 1 for Video-LLaVA: jaxprune == transformers' VideoLlavaForConditionalGeneration on a tiny random config
(fp32): image-only, video-only and mixed batches with padding (logits, greedy tokens, one compile per bucket),
checkpoint loading / conversion, and the input errors."""

from __future__ import annotations

import numpy as np
import pytest

import jaxprune as jp
from jaxprune.inputs import InputError
from tests.conftest import perturb_

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

IMG_TOK, VID_TOK, VOCAB = 100, 101, 128
F = 4             # frames per video in the tests
P_I, P_F = 16, 17  # tiny CLIP 28 px / patch 7: 4x4 patches; a frame keeps its CLS


def build_hf(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=VOCAB,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7)
    cfg = VideoLlavaConfig(text_config=tc, vision_config=vc, image_token_index=IMG_TOK, video_token_index=VID_TOK,
                           image_seq_length=P_I, video_seq_length=F * P_F, vision_feature_layer=-2,
                           vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return perturb_(VideoLlavaForConditionalGeneration(cfg).eval())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = build_hf()
    d = tmp_path_factory.mktemp("hf_video_llava")
    hf.save_pretrained(d)
    return hf, jp.load(d), d


def batch(rows, seed=0, T=None, left=True):
    """rows: per row a list of "i" (image) / "v" (video); padded ids / mask with each placeholder expanded."""
    rng = np.random.default_rng(seed)
    seqs = []
    for kinds in rows:
        s = list(rng.integers(3, IMG_TOK - 1, 2))
        for k in kinds:
            s += [IMG_TOK] * P_I if k == "i" else [VID_TOK] * (F * P_F)
            s += list(rng.integers(3, IMG_TOK - 1, int(rng.integers(2, 7))))
        seqs.append(s)
    T = T or max(map(len, seqs))
    ids, mask = np.zeros((len(seqs), T), np.int64), np.zeros((len(seqs), T), np.int64)
    for b, s in enumerate(seqs):
        a = T - len(s) if left else 0
        ids[b, a:a + len(s)], mask[b, a:a + len(s)] = s, 1
    n_i = sum(k == "i" for r in rows for k in r)
    n_v = sum(k == "v" for r in rows for k in r)
    px = rng.normal(size=(n_i, 3, 28, 28)).astype(np.float32) if n_i else None
    pv = rng.normal(size=(n_v, F, 3, 28, 28)).astype(np.float32) if n_v else None
    return ids, mask, px, pv


def hf_logits(hf, ids, mask, px, pv):
    pos = np.maximum(mask.cumsum(1) - 1, 0)
    kw = {}
    if px is not None:
        kw["pixel_values_images"] = torch.tensor(px)
    if pv is not None:
        kw["pixel_values_videos"] = torch.tensor(pv)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                  **kw).logits.numpy()


def assert_close(out, ref, mask):
    assert out.shape == ref.shape
    v = mask.astype(bool)
    err = np.abs(out - ref)[v].max()
    assert err <= 1e-4 * max(1.0, np.abs(ref[v]).max()), err


def test_config_and_params(pair):
    _, model, _ = pair
    cfg = model.cfg
    assert (cfg.model_type, cfg.video_token_index, cfg.num_frames) == ("video_llava", VID_TOK, F)
    assert (cfg.tokens_per_image, cfg.tokens_per_frame, cfg.tokens_per_video) == (P_I, P_F, F * P_F)
    names = set(model.flat_params())
    assert any(n.startswith("image_tower.layers.2.") for n in names)
    assert any(n.startswith("video_tower.layers.2.") for n in names)
    assert not any(n.startswith("vision.") for n in names)


@pytest.mark.parametrize("rows", [[["i"], ["i", "i"]], [["v"], ["v"]], [["i", "v"], ["v"], ["i"]],
                                  [["v", "i"], []]], ids=["images", "videos", "mixed", "video_then_image"])
def test_logits_match_hf(pair, rows):
    hf, model, _ = pair
    ids, mask, px, pv = batch(rows, seed=len(rows))
    ref = hf_logits(hf, ids, mask, px, pv)
    out = np.asarray(model(ids, px, attention_mask=mask, pixel_values_videos=pv).logits)
    assert_close(out, ref, mask)


def test_mixed_greedy_and_one_compile(pair):
    """Left- and right-padded mixed batches match HF's greedy tokens; new inputs of one shape bucket reuse the
    compiled forward / prefill / decode."""
    hf, loaded, _ = pair
    model = jp.Llava(loaded.cfg, loaded.graphdef, loaded.params)  # fresh jit caches
    rows = [["i", "v"], ["v"], ["i"]]
    for seed in (1, 2):
        ids, mask, px, pv = batch(rows, seed=seed, T=2 * F * P_F + 40)
        out = np.asarray(model(ids, px, attention_mask=mask, pixel_values_videos=pv).logits)
        assert_close(out, hf_logits(hf, ids, mask, px, pv), mask)
        with torch.no_grad():
            g = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            pixel_values_images=torch.tensor(px), pixel_values_videos=torch.tensor(pv),
                            max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=1, eos_token_id=None,
                            pad_token_id=0)
        ours = np.asarray(model.generate(ids, px, attention_mask=mask, pixel_values_videos=pv, max_new_tokens=8,
                                         eos_token_id=(), pad_token_id=0))
        np.testing.assert_array_equal(ours, g[:, ids.shape[1]:].numpy())
    for f in (model.programs.forward, model.programs.prefill, model.programs.decode):
        assert f._cache_size() == 1
    ids, mask, px, pv = batch([["v"], ["v"]], seed=3, left=False)  # right padding
    assert_close(np.asarray(model(ids, px, attention_mask=mask, pixel_values_videos=pv).logits),
                 hf_logits(hf, ids, mask, px, pv), mask)


def test_convert_and_reload(pair, tmp_path):
    from jaxprune.checkpoints import convert

    _, model, d = pair
    convert(d, tmp_path / "conv")
    again = jp.load(tmp_path / "conv")
    a, b = model.flat_params(), again.flat_params()
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_input_errors(pair):
    _, model, _ = pair
    ids, mask, px, pv = batch([["v"], ["i"]], seed=5)
    with pytest.raises(InputError, match="video tokens .* 2 video"):
        model(ids, px, attention_mask=mask, pixel_values_videos=np.concatenate([pv, pv]))
    with pytest.raises(InputError, match="no pixel_values_videos"):
        model(ids, px, attention_mask=mask)
    with pytest.raises(InputError, match=r"pixel_values_videos must be \[videos, frames"):
        model(ids, px, attention_mask=mask, pixel_values_videos=pv[0])
    with pytest.raises(InputError, match="pixel_values_videos frames are 14x14"):
        model(ids, px, attention_mask=mask, pixel_values_videos=pv[..., :14, :14])
    with pytest.raises(InputError, match="video tokens"):  # 3 frames instead of 4: the count names the mismatch
        model(ids, px, attention_mask=mask, pixel_values_videos=pv[:, :3])
    with pytest.raises(InputError, match="image tokens"):
        model(ids, None, attention_mask=mask, pixel_values_videos=pv)


def test_llava_refuses_videos():
    from tests.conftest import TINY_CONFIGS  # noqa: F401
    from jaxprune.config import LlavaConfig, TextConfig, VisionConfig

    cfg = LlavaConfig(vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=28, patch_size=7),
                      text=TextConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8),
                      image_token_index=IMG_TOK)
    m = jp.Llava.random(cfg)
    with pytest.raises(InputError, match="pixel_values_videos .* 'llava'"):
        m(np.array([[5, 6]]), pixel_values_videos=np.zeros((1, 2, 3, 28, 28), np.float32))
