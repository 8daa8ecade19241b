"""DyCoke TTM (jaxprune.reducers.dycoke) == a NumPy transcription of the official ``dycole_ttm``
(KD-TAO/DyCoke @ dd74634, llava/model/llava_arch.py), and end to end on a tiny Video-LLaVA."""

from __future__ import annotations

import numpy as np
import pytest

import jaxprune as jp
from jaxprune.config import LlavaConfig
from jaxprune.reducers import registry
from jaxprune.reducers.base import BudgetError, ProjectorContext
from jaxprune.reducers.dycoke import DyCoke, dycoke, frame_plan


def official_ttm(image_feature, num_tokens_per_frame=196, merging_ratio=0.7):
    """The official function line by line (torch -> NumPy); returns (features, source index) in its output order.
    ``topk(largest=False)`` -> stable ascending argsort (the inputs below have no ties)."""
    ids = np.arange(image_feature.shape[0])
    num_frames = image_feature.shape[0] // num_tokens_per_frame
    merging_ratio = 1 - merging_ratio

    def normalize(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def cosine(a, b):
        return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-8)

    def frame(i):
        sl = slice(i * num_tokens_per_frame, (i + 1) * num_tokens_per_frame)
        return image_feature[sl], ids[sl]

    similarities = []
    for i in range(0, num_frames - 1, 2):
        f1, f2 = frame(i)[0], frame(i + 1)[0]
        similarities.append(cosine(normalize(f1), normalize(f2)))
    modified = []
    for i in range(0, num_frames - 1, 2):
        (f1, i1), (f2, i2) = frame(i), frame(i + 1)
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        keep = np.argsort(similarities[i // 2], kind="stable")[:num_tokens_to_keep]
        modified.append((f1, i1))
        modified.append((f2[keep], i2[keep]))
    odd = []
    for i in range(0, num_frames - 4, 4):
        odd.append(cosine(frame(i)[0], frame(i + 2)[0]))
    if not odd:  # the official torch.stack([]) raises here (F <= 4)
        raise RuntimeError("stack expects a non-empty TensorList")
    for i in range(0, num_frames - 4, 4):
        (f1, i1), (f2, i2) = frame(i), frame(i + 2)
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        keep = np.argsort(odd[i // 4], kind="stable")[:num_tokens_to_keep]
        modified[i] = (f1, i1)
        modified[i + 2] = (f2[keep], i2[keep])
    return np.concatenate([m[0] for m in modified]), np.concatenate([m[1] for m in modified])


def video_features(F, P, H=12, seed=0, repeat=0.6):
    """Frames where a share of tokens nearly repeats the previous frame (the redundancy TTM removes)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(F, P, H)).astype(np.float32)
    for f in range(1, F):
        same = rng.random(P) < repeat
        x[f, same] = x[f - 1, same] + 0.05 * rng.normal(size=(int(same.sum()), H)).astype(np.float32)
    return x.reshape(F * P, H)


def ctx(x, valid=None):
    n = x.shape[1]
    z = np.zeros(x.shape[:2], np.float32)
    return ProjectorContext(features=x, valid=np.ones(x.shape[:2], bool) if valid is None else valid,
                            vision_hidden=x, cls_attn=z[:, None], keys=x[:, :, None], text_embeds=x[:, :1],
                            text_valid=np.ones((x.shape[0], 1), bool), text_to_image=None, grid=(1, n))


@pytest.mark.parametrize("F,P,ratio", [(8, 9, 0.7), (8, 257, 0.7), (16, 11, 0.5), (12, 7, 0.8)])
def test_matches_official_transcription(F, P, ratio):
    x = np.stack([video_features(F, P, seed=s) for s in range(2)])
    spec = dycoke(ratio, frames=F, tokens_per_frame=P)
    red = spec(ctx(x))
    idx, tok, ok = np.asarray(red.index), np.asarray(red.tokens), np.asarray(red.valid)
    assert ok.all() and idx.shape == (2, spec.budget)
    for n in range(2):
        want_tok, want_idx = official_ttm(x[n], P, ratio)
        assert len(want_idx) == spec.budget
        # same kept set per frame; ours in raster order within each frame (documented deviation)
        np.testing.assert_array_equal(idx[n], np.sort(want_idx))
        np.testing.assert_array_equal(tok[n], x[n][np.sort(want_idx)])
        order = np.argsort(want_idx)
        np.testing.assert_array_equal(tok[n], want_tok[order])


def test_frame_plan_and_deviations():
    assert frame_plan(8) == {1: 0, 3: 2, 5: 4, 7: 6, 2: 0}  # frames 0, 4, 6 whole (official loop bound)
    assert frame_plan(4) == {1: 0, 3: 2}
    with pytest.raises(RuntimeError):  # official: F <= 4 crashes; ours runs pass 1 only
        official_ttm(video_features(4, 5), 5)
    x = video_features(5, 6)[None]  # odd F: the official drops the last frame, we keep it whole
    red = dycoke(0.5, frames=5, tokens_per_frame=6)(ctx(x))
    assert np.asarray(red.index)[0, -6:].tolist() == list(range(24, 30))
    valid = np.ones(x.shape[:2], bool)
    valid[0, 6:9] = False  # padded tokens of frame 1 are never kept while valid ones remain
    red = DyCoke(keep=3, frames=5, tokens_per_frame=6)(ctx(x, valid))
    assert not np.isin(np.asarray(red.index)[0], [6, 7, 8]).any()


def test_budgets_and_refusals():
    from tests.test_reducers_video import CFG, F, P_F

    r = registry.make("dycoke", 48, CFG)  # F=4: frames 0, 2 whole (34) + 7 from each of frames 1, 3
    assert (r.keep, r.frames, r.tokens_per_frame, r.budget) == (7, F, P_F, 48)
    with pytest.raises(BudgetError, match="out of range"):
        registry.make("dycoke", 30, CFG)
    with pytest.raises(BudgetError, match="llava models take no video"):
        registry.make("dycoke", 300, LlavaConfig())
    with pytest.raises(NotImplementedError):
        r.per_segment(4)


def test_end_to_end_on_video_rows():
    """On the tiny Video-LLaVA: DyCoke runs on the whole video whatever video_options says, composes with an
    in-LLM cut, and is refused on image rows."""
    from tests.test_reducers_video import BUDGET, CFG, F, FULL, P_F, batch, model

    R = jp.reducers
    ids, mask, pv, n_text = batch(0)
    spec = registry.make("dycoke", 48, CFG)
    out = model()(ids, attention_mask=mask, pixel_values_videos=pv, reducer=R.video_options(spec))
    kept, kv = np.asarray(out.kept), np.asarray(out.kept_valid)
    assert kv.all() and kept.shape == (2, 48)
    counts = np.stack([np.bincount(k // P_F, minlength=F) for k in kept])
    np.testing.assert_array_equal(counts, [[P_F, 7, P_F, 7]] * 2)
    out = model()(ids, attention_mask=mask, pixel_values_videos=pv, reducer=R.compose(spec, R.fastv(2, BUDGET)))
    assert np.isfinite(np.asarray(out.logits)[np.asarray(out.attention_mask)]).all()
    img_ids = np.array([[5] + [60] * 16 + [6]])
    with pytest.raises(jp.InputError, match="video rows"):
        model()(img_ids, np.zeros((1, 3, 28, 28), np.float32), reducer=spec)
    assert FULL == F * P_F
