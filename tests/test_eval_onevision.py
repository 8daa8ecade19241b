"""jaxprune-eval on LLaVA-OneVision: a tiny HF LlavaOnevision checkpoint (transformers, random weights) runs the full
model and reducers (one per kind of path, the CLS-surrogate ones included) end to end through the CLI on the POPE
fixture; the harness' rows are the OneVision chat-template prompt with HF's placeholder counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import perturb_

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

FIX = Path(__file__).parent / "fixtures" / "benchmarks"
PINS = [[37, 37], [37, 74], [74, 37], [74, 74]]  # SigLIP 37 px / patch 7: 5x5 patches per crop, at most 5 crops
BUDGET = 40


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config
    from transformers import SiglipVisionConfig

    from jaxprune.eval.demo_model import DEMO_CFG, save_demo_tokenizer

    tc = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=DEMO_CFG.text.vocab_size, eos_token_id=2, pad_token_id=0,
                     tie_word_embeddings=True)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=37, patch_size=7, vision_use_head=False)
    cfg = LlavaOnevisionConfig(text_config=tc, vision_config=vc, image_token_index=DEMO_CFG.image_token_index,
                               video_token_index=DEMO_CFG.image_token_index - 1, image_grid_pinpoints=PINS,
                               vision_aspect_ratio="anyres_max_2", tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = perturb_(LlavaOnevisionForConditionalGeneration(cfg).eval())
    d = tmp_path_factory.mktemp("tiny-llava-onevision")
    hf.save_pretrained(d)
    save_demo_tokenizer(d)
    return d


def test_cli_runs_full_and_reducers_end_to_end(ov_dir, tmp_path):
    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval.cli import main

    names = ("fastervlm", "visionzip", "fastv", "adafv")
    flags = ["--model", str(ov_dir), "--benchmark", "pope", "--data", str(FIX / "pope"), "--out", str(tmp_path),
             "--batch-size", "4", "--max-new-tokens", "3", "--no-progress", "--on-error", "stop"]
    for n in names:
        flags += ["--reducer", f"{n}:{BUDGET}"]
    assert main(flags) in (0, None)
    runs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "pope").glob("*/run.json")}
    n_q = len(get_benchmark("pope").load(FIX / "pope"))
    assert set(runs) == {"full"} | {f"{n}_{BUDGET}" for n in names}, sorted(runs)
    for label, rec in runs.items():
        assert rec["n_answered"] == n_q and rec["n_skipped"] == 0, label
        assert rec["headline"] is not None, label
        assert rec["efficiency"]["ttft_ms"] > 0, label
    full, fv = runs["full"]["efficiency"], runs[f"fastervlm_{BUDGET}"]["efficiency"]
    assert fv["flops_llm_swiglu"] < full["flops_llm_swiglu"]


def test_harness_rows_are_the_onevision_prompt(ov_dir):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from jaxprune.eval import Context, load_model
    from jaxprune.eval.batching import Batch, build_rows, make_items
    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval.runner import max_image_tokens

    model, tok, model_id, path = load_model(str(ov_dir))
    ctx = Context.create(model, tok, model_id, model_dir=path)
    qs = get_benchmark("pope").load(FIX / "pope")[:3]
    items = make_items(qs, tok, max_image_tokens(ctx), ctx.img_cfg)
    assert items[0].prompt.startswith("<|im_start|>user\n<image>\n") and items[0].prompt.endswith("assistant\n")
    rows = build_rows(Batch(tuple(items), 3, max(i.length for i in items), 1), range(3), tok,
                      model.cfg.image_token_index, max_image_tokens(ctx), ctx.img_cfg, model.cfg.vision.image_size)
    proc = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=PINS, size={"height": 37, "width": 37})
    for j, q in enumerate(qs):
        ref = proc(images=[q.load_image().convert("RGB")], return_tensors="np")
        n = ref["pixel_values"].shape[1]
        np.testing.assert_allclose(rows.pixel_values[j, :n], ref["pixel_values"][0], atol=1e-6)
        assert tuple(rows.image_sizes[j]) == tuple(ref["image_sizes"][0])
        want = ctx.img_cfg.num_image_tokens(*ref["image_sizes"][0])
        assert int((rows.input_ids[j] == model.cfg.image_token_index).sum()) == want
    out = model(rows.input_ids, rows.pixel_values, attention_mask=rows.attention_mask, image_sizes=rows.image_sizes)
    assert np.isfinite(np.asarray(out.logits)).all()
