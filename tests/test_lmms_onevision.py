"""The lmms-eval model's backend (jaxprune.eval.lmms) on LLaVA-OneVision: the chat-template prompt, anyres image
rows, greedy generation, and loglikelihood == transformers' LlavaOnevision log-softmax on the same rows."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_eval_onevision import ov_dir  # noqa: F401  (the tiny HF checkpoint fixture)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 9 * i, 61, 3), dtype=np.uint8)) for i in range(n)]


def test_generate_and_loglikelihood_equal_transformers(ov_dir):  # noqa: F811
    from transformers import LlavaOnevisionForConditionalGeneration

    from jaxprune.eval.lmms.backend import Backend
    from jaxprune.eval.lmms.options import parse_model_args
    from jaxprune.eval.lmms.requests import GenRequest, GenSettings, LoglikRequest, chat_prompt, continuation_text

    b = Backend(parse_model_args({"pretrained": str(ov_dir), "batch_size": 2}))
    assert chat_prompt("what ?", 1, "", b.model_type) == "<|im_start|>user\n<image>\nwhat ?<|im_end|>\n" \
                                                       "<|im_start|>assistant\n"
    im = _images(2)
    out = b.generate([GenRequest("is there a red square ?", (im[0],), GenSettings(4)),
                      GenRequest("how many circle", (im[1],), GenSettings(4))])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(ov_dir).eval()
    reqs = [LoglikRequest("is there a red square ?", " yes", (im[0],)), LoglikRequest("how many", " no", (im[1],))]
    got = b.loglikelihood(reqs)
    for r, (lp, _) in zip(reqs, got):
        p = chat_prompt(r.context, 1, "", b.model_type)
        full = b.encode(0, continuation_text(p, r.continuation), r.images[0], "t")
        n = len(b.encode(0, p, r.images[0], "t").ids)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([full.ids]), pixel_values=torch.tensor(full.pixels[None]),
                     image_sizes=torch.tensor([full.hw]), batch_num_images=torch.tensor([1])).logits[0]
        ref = torch.log_softmax(ref.double(), -1).numpy()
        want = sum(ref[n - 1 + j, t] for j, t in enumerate(full.ids[n:]))
        assert lp == pytest.approx(want, abs=2e-4), (r.continuation, lp, want)
