"""experiments/bench_onevision.py: the full-size config's token counts (HF's formula, budgets), and the tiny mode's
rows -- reduced budgets shrink the LLM sequence and the KV cache, paired speedups stay within a sane bound, the
FLOPs / KV counts agree with ``jaxprune.flops``, the results files carry the table. No wall-clock assertion."""

from __future__ import annotations

import json

import pytest

from experiments import bench_onevision as bo


def test_full_size_token_counts_and_rows():
    cfg = bo.onevision_config()
    c = bo.token_counts(cfg, bo.IMAGE_HW, bo.FRAMES)
    assert (c["grid"], c["crops"], c["patches_per_crop"]) == ([2, 2], 5, 729)
    assert c["image_tokens"] == 729 + 40 * (54 + 1) == 2929  # base + unpadded 40 x 54 tile grid + 40 newlines
    assert c["image_tokens_hf"] in (None, 2929)
    assert c["video_tokens"] == 8 * 14 * 14 + 1 == 1569
    assert len(cfg.image_grid_pinpoints) == 36 and cfg.text.num_key_value_heads < cfg.text.num_attention_heads
    rows = bo.rows_for(c, bo.IMAGE_REDUCERS, bo.VIDEO_REDUCERS, bo.IMAGE_FRACTIONS, bo.VIDEO_FRACTIONS)
    assert [(r.kind, r.name, r.budget) for r in rows if r.name in ("full", "fastv")] == [
        ("image", "full", 2929), ("image", "fastv", 732), ("image", "fastv", 325), ("video", "full", 1569),
        ("video", "fastv", 392)]
    assert len(rows) == 1 + 4 * 2 + 1 + 3


def test_tiny_dry_run_spans_and_flops_limits():
    """--dry-run (no compile): image rows run the bucketed span (113 tokens -> 128 slots, not the config's 160), the
    budget's crop slots (5 crops -> 6), and every reducer row costs fewer FLOPs than the full model."""
    out = bo.main(["--tiny", "--dry-run"])
    rows = out["rows"]
    assert out["tokens"]["max_image_tokens"] == 160 and len(rows) == 9
    for r in rows:
        if r["reducer"] == "full":
            assert r["flops_limit"] == 1.0
            continue
        assert r["flops_limit"] > 1.1, r
        if r["kind"] == "image":
            assert r["span_full_slots"] == 128 and r["crops_run"] == 6, r


@pytest.mark.slow  # ~1-2 min on 2 loaded cores: nine rows, each compiled and timed in ABBA rounds
def test_bench_onevision_tiny_rows(tmp_path):
    out = tmp_path / "ov"
    data = bo.main(["--tiny", "--repeats", "2", "--out", str(out)])
    c = data["tokens"]
    assert c["image_tokens"] == 113 and c["video_tokens"] == 4 * 9 + 1
    runs = {(r["kind"], r["reducer"], r["budget"]): r for r in data["runs"]}
    want = {("image", "full", 113), ("video", "full", 37)} | {("image", n, 28) for n in bo.IMAGE_REDUCERS} | {
        ("video", n, 9) for n in bo.VIDEO_REDUCERS}
    assert set(runs) == want
    assert all("error" not in r for r in runs.values()), [r.get("error") for r in runs.values()]
    for key, r in runs.items():
        full = runs[(key[0], "full", c[f"{key[0]}_tokens"])]
        assert r["prefill_s"] > 0 and r["prefill_compile_s"] > 0 and r["flops_total"] > 0, key
        assert r["decode_s_per_tok"] is None or r["decode_s_per_tok"] > 0, key
        assert r["kv_agree"], key  # the caches' bytes == flops.kv_cache_bytes of the counted segments
        if r["reducer"] == "full":
            assert r["visual_valid_last"] == c[f"{key[0]}_tokens"] and "speedup" not in r
            continue
        assert 1 <= r["visual_valid_last"] <= r["budget"], key
        assert r["kv_bytes"] < full["kv_bytes"] and r["llm_seq"] < full["llm_seq"], key
        assert 0 < r["speedup"] < 50, key  # a paired ratio of two positive times; no wall-clock bound
    fastv = runs[("image", "fastv", 28)]
    full_seq = runs[("image", "full", 113)]["llm_seq"]
    assert full_seq <= fastv["llm_seq_first"] <= 1.5 * full_seq  # layers 0-1 run the bucketed span (128 >= 113)
    assert fastv["segments"][0][0] == 2 and runs[("image", "consensusdrop", 28)]["flops_shallow"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| kind | reducer |" in md and "- machine:" in md and "- load" in md and "113 placeholders" in md
    assert md.count("| image |") == 5 and md.count("| video |") == 4
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["runs"]) == 9 and saved["load"]["before"] is not None
