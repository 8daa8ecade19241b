"""experiments/bench_video.py on its tiny config: a row per reducer, reduced budgets shrink the LLM sequence and the
KV cache, decode figures come from the timing module's fit (or are refused, never negative)."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # ~1 min on 2 loaded cores: four rows, each compiled and timed in ABBA rounds
def test_bench_video_tiny_rows():
    from experiments.bench_video import main

    data = main(["--tiny", "--repeats", "2"])
    runs = {(r["reducer"], r["budget"]): r for r in data["runs"]}
    assert set(runs) == {("full", 68), ("fastervlm", 32), ("fastv", 32), ("dycoke", 40)}
    assert all("error" not in r for r in runs.values())
    full = runs[("full", 68)]
    assert full["llm_seq"] >= 5 + 68 + 20  # prompt + video (padded to the length bucket)
    for key, r in runs.items():
        assert r["prefill_s"] > 0 and r["kv_bytes"] > 0, key
        assert r["decode_s_per_tok"] is None or r["decode_s_per_tok"] > 0, key
        if key != ("full", 68):
            assert r["kv_bytes"] < full["kv_bytes"] and r["llm_seq"] < full["llm_seq"] and r["speedup"] > 0, key
