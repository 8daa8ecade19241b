"""Rung 1 of the correctness ladder: jaxprune == transformers on tiny random LLaVA-1.5 models (fp32)."""

from __future__ import annotations

import numpy as np
import pytest

import jaxprune as jp
from tests.conftest import TINY_CONFIGS, make_batch

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _hf_logits(hf, ids, mask, px):
    pos = np.maximum(mask.cumsum(1) - 1, 0)  # generate's positions; see Llava.__call__ docstring
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos)).logits.numpy()


def _hf_generate(hf, ids, mask, px, n, eos, pad):
    with torch.no_grad():
        g = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), attention_mask=torch.tensor(mask),
                        max_new_tokens=n, min_new_tokens=0, do_sample=False, num_beams=1, eos_token_id=eos,
                        pad_token_id=pad)
    out = g[:, ids.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=pad)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_match_hf(hf_llava_dir, name, padding):
    hf, path = hf_llava_dir(name)
    model = jp.load(path)
    cfg = model.cfg
    ids, mask, px = make_batch([9, 4, 13], cfg.tokens_per_image, cfg.image_token_index, cfg.text.vocab_size,
                               cfg.vision.image_size, padding=padding, seed=1)
    ref = _hf_logits(hf, ids, mask, px)
    out = np.asarray(model(ids, px, attention_mask=mask).logits)
    assert out.shape == ref.shape
    valid = mask.astype(bool)
    err = np.abs(out - ref)[valid].max()
    assert err <= 1e-4 * max(1.0, np.abs(ref[valid]).max()), err


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_greedy_generate_matches_hf(hf_llava_dir, name):
    hf, path = hf_llava_dir(name)
    model = jp.load(path)
    cfg = model.cfg
    ids, mask, px = make_batch([7, 3, 11], cfg.tokens_per_image, cfg.image_token_index, cfg.text.vocab_size,
                               cfg.vision.image_size, padding="left", seed=2)
    ref = _hf_generate(hf, ids, mask, px, 16, None, 0)
    ours = np.asarray(model.generate(ids, px, attention_mask=mask, max_new_tokens=16, eos_token_id=(), pad_token_id=0))
    np.testing.assert_array_equal(ours, ref)
    # per-row EOS stop: make a token row 0 emits mid-way the EOS; rows stop independently, pad after
    eos = int(ref[0, 5])
    ref_e = _hf_generate(hf, ids, mask, px, 16, eos, 0)
    ours_e = np.asarray(model.generate(ids, px, attention_mask=mask, max_new_tokens=16, eos_token_id=eos,
                                       pad_token_id=0))
    np.testing.assert_array_equal(ours_e, ref_e)
    j = int(np.flatnonzero(ref[0] == eos)[0])  # first time row 0 emits it (may be before step 5)
    assert (ours_e[0, :j + 1] == ref[0, :j + 1]).all() and (ours_e[0, j + 1:] == 0).all()


def test_right_padded_generate_equals_unpadded_rows(hf_llava_dir):
    """Right padding is also handled by generate: each row equals its own unpadded B=1 run."""
    _, path = hf_llava_dir("mha")
    model = jp.load(path)
    cfg = model.cfg
    ids, mask, px = make_batch([2, 9], cfg.tokens_per_image, cfg.image_token_index, cfg.text.vocab_size,
                               cfg.vision.image_size, padding="right", seed=3)
    batch = np.asarray(model.generate(ids, px, attention_mask=mask, max_new_tokens=8, eos_token_id=()))
    for i in range(2):
        n = int(mask[i].sum())
        single = np.asarray(model.generate(ids[i:i + 1, :n], px[i:i + 1], max_new_tokens=8, eos_token_id=()))
        np.testing.assert_array_equal(batch[i], single[0])
