"""FastV == a PyTorch transcription of the official in-place FastV applied to the same tiny HF model.

The transcription follows pkunlp-icler/FastV @ d1659729 ``modeling_llama.py`` (``USE_FAST_V and
FASTV_INPLACE``): layers 0..K-1 on the full sequence; the attention probabilities of layer K-1
(``layer_outputs[1]``, here recomputed explicitly as ``softmax(QK^T/sqrt(d) + causal)``) averaged
over heads, last row, image columns; ``topk`` of the kept count; ``keep_indexs`` = system + sorted
image picks + text; ``hidden_states[:, keep_indexs]``, ``position_ids = keep_indexs``, and a fresh
causal mask for layers K..L-1. Batch 1, as the official code.
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxprune as jp
from jaxprune.reducers.fastv import fastv
from tests.conftest import make_batch

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _causal(T: int) -> "torch.Tensor":
    m = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)
    return m[None, None]


def official_fastv(hf, ids: np.ndarray, px: np.ndarray, K: int, keep: int, image_token: int):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = hf.model.language_model
    with torch.no_grad():
        ti = torch.tensor(ids)
        emb = lm.embed_tokens(torch.where(ti == image_token, 0, ti))
        feats = hf.model.get_image_features(pixel_values=torch.tensor(px))
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats
        h = emb.masked_scatter((ti == image_token)[..., None].expand_as(emb), feats.reshape(-1, emb.shape[-1]))
        T = h.shape[1]
        img = np.flatnonzero(ids[0] == image_token)
        img_start, img_len = int(img[0]), len(img)
        pos = torch.arange(T)[None]
        for i in range(K):
            layer = lm.layers[i]
            pe = lm.rotary_emb(h, pos)
            if i == K - 1:  # layer_outputs[1]: this layer's attention probabilities
                x = layer.input_layernorm(h)
                a = layer.self_attn
                hd = a.head_dim
                q = a.q_proj(x).view(1, T, -1, hd).transpose(1, 2)
                k = a.k_proj(x).view(1, T, -1, hd).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, *pe)
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                attn = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5 + _causal(T), dim=-1)
            h = layer(h, attention_mask=_causal(T), position_ids=pos, position_embeddings=pe)
        scores = attn[0].mean(dim=0)[-1][img_start:img_start + img_len]
        top = scores.topk(keep).indices + img_start
        keep_idx = torch.cat([torch.arange(img_start), top, torch.arange(img_start + img_len, T)]).sort().values
        h = h[:, keep_idx]
        pos = keep_idx[None]
        T2 = h.shape[1]
        for layer in lm.layers[K:]:
            pe = lm.rotary_emb(h, pos)
            h = layer(h, attention_mask=_causal(T2), position_ids=pos, position_embeddings=pe)
        logits = hf.lm_head(lm.norm(h))
    return (top - img_start).sort().values.numpy(), logits.numpy()


@pytest.mark.parametrize("name,K,keep", [("mha", 1, 5), ("gqa_full", 2, 9), ("gqa_full", 1, 3)])
def test_fastv_matches_official_transcription(hf_llava_dir, name, K, keep):
    hf, path = hf_llava_dir(name)
    hf.config._attn_implementation = "eager"
    model = jp.load(path)
    cfg = model.cfg
    for seed in range(3):
        ids, mask, px = make_batch([7 + seed], cfg.tokens_per_image, cfg.image_token_index, cfg.text.vocab_size,
                                   cfg.vision.image_size, seed=seed)
        ref_kept, ref_logits = official_fastv(hf, ids, px, K, keep, cfg.image_token_index)
        r = fastv(layer=K, keep=keep)
        from jaxprune.reducers.llm import LLMContext  # noqa: F401  (the scores come from FastV.scores)

        out = model(ids, px, reducer=r)
        assert out.logits.shape == ref_logits.shape
        err = np.abs(np.asarray(out.logits) - ref_logits).max()
        assert err <= 1e-4 * max(1.0, np.abs(ref_logits).max()), err
        # the kept set: gather == official (recover it from the logits-equivalent selection)
        kept = _kept_indices(model, ids, px, r)
        np.testing.assert_array_equal(kept, ref_kept)


def _kept_indices(model, ids, px, r):
    """Kept visual slots of the single cut, read through the reducer on the real context."""
    import jax
    from flax import nnx

    from jaxprune.engine import decoder as gen
    from jaxprune.engine.cuts import visual_slots as _visual_slots
    from jaxprune.reducers.llm import LLMContext
    from tests.reducer_testlib import pre_llm

    m = nnx.merge(model.graphdef, model.params)
    h, valid, pos, _, _, is_vis = pre_llm(model, ids, px, None, r)
    h, _, qk = gen.decoder_prefill(m, h, pos, valid, range(r.layer), 0, return_qk=True)
    vis = _visual_slots(is_vis, model.cfg.tokens_per_image)
    ctx = LLMContext(hidden=h, valid=valid, positions=pos, visual_index=vis,
                     visual_valid=jax.numpy.take_along_axis(valid, vis, axis=1),
                     last_index=gen.last_valid_index(valid), prev_q=qk[0], prev_k=qk[1], next_q=None, next_k=None,
                     normed=h)
    return np.asarray(r(ctx).slots[0])
