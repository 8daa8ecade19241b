"""jaxprune-eval on LLaVA-NeXT: a tiny HF LlavaNext checkpoint (transformers, random weights) with its own
``preprocessor_config.json`` runs the full model and every registered reducer end to end through the CLI, and
the harness' anyres rows equal what ``LlavaNextProcessor`` would feed the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import perturb_

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

FIX = Path(__file__).parent / "fixtures" / "benchmarks"
PINS = [[28, 56], [56, 28], [56, 56]]  # (h, w); tiny CLIP 28 px / patch 7 -> 4x4 patches per crop, M = 88
BUDGET = 32  # of the 88 packed tokens of the largest image (the 1.5 convention's ~192/576 at this scale)


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers import LlavaNextImageProcessor

    from jaxprune.eval.demo_model import DEMO_CFG, save_demo_tokenizer

    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=DEMO_CFG.text.vocab_size, eos_token_id=2, pad_token_id=0,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7)
    cfg = LlavaNextConfig(text_config=tc, vision_config=vc, image_token_index=DEMO_CFG.image_token_index,
                          image_grid_pinpoints=PINS, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    hf = perturb_(LlavaNextForConditionalGeneration(cfg).eval())
    d = tmp_path_factory.mktemp("tiny-llava-next")
    hf.save_pretrained(d)
    LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                            image_grid_pinpoints=PINS).save_pretrained(d)
    save_demo_tokenizer(d)
    return d


def _runs(out: Path, bench: str) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / bench).glob("*/run.json")}


@pytest.mark.slow  # ~2.5 min on 2 cores: one compile per reducer
def test_every_registered_reducer_on_llava_next(next_dir, tmp_path):
    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval.cli import main
    from jaxprune.reducers import registry

    names = [n for n in registry.names("llava_next") if n != "adsc_grid"]  # adsc_grid: refused on NeXT (next test)
    flags = ["--model", str(next_dir), "--benchmark", "pope", "--data", str(FIX / "pope"), "--out", str(tmp_path),
             "--batch-size", "4", "--max-new-tokens", "3", "--no-progress", "--on-error", "stop"]
    for n in names:
        flags += ["--reducer", f"{n}:{BUDGET}"]
    assert main(flags) in (0, None)
    runs = _runs(tmp_path, "pope")
    n_q = len(get_benchmark("pope").load(FIX / "pope"))
    assert set(runs) == {"full"} | {f"{n}_{BUDGET}" for n in names}, sorted(runs)
    for label, rec in runs.items():
        assert rec["n_answered"] == n_q and rec["n_skipped"] == 0, label
        assert rec["headline"] is not None, label
        e = rec["efficiency"]
        assert e["ttft_ms"] > 0 and e["kv_cache_bytes"] > 0, label
    full, fv = runs["full"]["efficiency"], runs[f"fastervlm_{BUDGET}"]["efficiency"]
    assert fv["visual_tokens"] == BUDGET and full["visual_tokens"] == full["visual_tokens_full"] > BUDGET
    assert fv["flops_llm_swiglu"] < full["flops_llm_swiglu"]


def test_adsc_grid_refused_on_llava_next_before_running(next_dir, tmp_path, capsys):
    from jaxprune.eval.cli import main

    code = main(["--model", str(next_dir), "--benchmark", "pope", "--data", str(FIX / "pope"), "--out",
                 str(tmp_path), "--reducer", f"adsc_grid:{BUDGET}", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "adsc_grid" in err and "llava_next" in err
    assert not (tmp_path / "pope").exists()  # refused before any model run


def test_harness_rows_equal_the_hf_processor(next_dir):
    """The rows the harness builds for a NeXT question: pixels / image_sizes as LlavaNextImageProcessor gives,
    and the <image> expansion of LlavaNextProcessor (one placeholder per packed token)."""
    from transformers import LlavaNextImageProcessor

    from jaxprune.eval import Context, load_model
    from jaxprune.eval.batching import Batch, build_rows, make_items
    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval.runner import max_image_tokens

    model, tok, model_id, path = load_model(str(next_dir))
    ctx = Context.create(model, tok, model_id, model_dir=path)
    qs = get_benchmark("pope").load(FIX / "pope")[:3]
    items = make_items(qs, tok, max_image_tokens(ctx), ctx.img_cfg)
    rows = build_rows(Batch(tuple(items), 3, max(i.length for i in items), 1), range(3), tok,
                      model.cfg.image_token_index, max_image_tokens(ctx), ctx.img_cfg, model.cfg.vision.image_size)
    proc = LlavaNextImageProcessor.from_pretrained(next_dir)
    for j, q in enumerate(qs):
        img = q.load_image().convert("RGB")
        ref = proc(images=[img], return_tensors="np")
        n = ref["pixel_values"].shape[1]
        np.testing.assert_allclose(rows.pixel_values[j, :n], ref["pixel_values"][0], atol=1e-6)
        assert not rows.pixel_values[j, n:].any()
        assert tuple(rows.image_sizes[j]) == tuple(ref["image_sizes"][0])
        want = ctx.img_cfg.num_image_tokens(*ref["image_sizes"][0])
        assert int((rows.input_ids[j] == model.cfg.image_token_index).sum()) == want
    # and the model takes them as they are (one compiled program for the batch)
    out = model(rows.input_ids, rows.pixel_values, attention_mask=rows.attention_mask, image_sizes=rows.image_sizes)
    assert np.isfinite(np.asarray(out.logits)).all()
