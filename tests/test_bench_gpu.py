"""experiments.bench_gpu: the device-peak table, the 7B configs, cuDNN attention routing, and the whole script
end to end at a tiny size on CPU (jaxprune and transformers workers in subprocesses, LLaVA-1.5 and NeXT)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments import bench_gpu
from jaxprune.models.param_spec import param_shapes


@pytest.mark.parametrize("kind,slug,tflops,tbs", [
    ("NVIDIA H100 80GB HBM3", "h100_sxm", 989.4, 3.35),
    ("NVIDIA H100 PCIe", "h100_pcie", 756, 2.0),
    ("NVIDIA H100 NVL", "h100_nvl", 835, 3.9),
    ("NVIDIA H200", "h200_sxm", 989.4, 4.8),
    ("NVIDIA A100-SXM4-80GB", "a100_sxm_80gb", 312, 2.039),
    ("NVIDIA A100 80GB PCIe", "a100_pcie_80gb", 312, 1.935),
    ("NVIDIA A100-SXM4-40GB", "a100_40gb", 312, 1.555),
])
def test_device_peaks(kind, slug, tflops, tbs):
    p = bench_gpu.device_peaks("gpu", kind)
    assert p["slug"] == slug and p["peak_flops"] == pytest.approx(tflops * 1e12)
    assert p["peak_bw"] == pytest.approx(tbs * 1e12)


def test_unknown_devices_get_no_peaks():
    assert bench_gpu.device_peaks("gpu", "NVIDIA GeForce RTX 4090") == {
        "slug": "nvidia_geforce_rtx_4090", "peak_flops": None, "peak_bw": None}
    assert bench_gpu.device_peaks("cpu", "cpu")["slug"] == "cpu"
    assert bench_gpu.device_peaks("cpu", "cpu")["peak_flops"] is None


def test_7b_configs():
    cfg = bench_gpu.model_config("llava15", "full")
    n = sum(math.prod(s) for s in param_shapes(cfg).values())
    assert 7.0e9 < n < 7.1e9  # llava-1.5-7b-hf: 7.06 B
    assert cfg.tokens_per_image == 576 and cfg.text.num_hidden_layers == 32 and cfg.text.vocab_size == 32064
    nxt = bench_gpu.model_config("next", "full")
    assert nxt.model_type == "llava_next" and nxt.image_grid_pinpoints == bench_gpu.PINPOINTS
    assert bench_gpu.model_config("llava15", "reduced").tokens_per_image == 576
    assert bench_gpu.scaled_budgets("next", nxt, [640, 320, 160]) == [640, 320, 160]
    tiny = bench_gpu.model_config("llava15", "tiny")
    assert bench_gpu.scaled_budgets("llava15", tiny, [192, 64]) == [12, 4]


def test_attention_routing_falls_back_and_matches(monkeypatch):
    """cuDNN refuses CPU / fp32 at trace time: every call falls back to XLA (counted), same logits."""
    from experiments import bench_gpu_jax
    from experiments.bench_forward import make_inputs
    from jaxprune import sharding
    from jaxprune.models import clip, llama

    cfg = bench_gpu.tiny_config()
    ids, mask, px = make_inputs(cfg, 1)
    want = np.asarray(sharding.random_model(cfg, seed=0)(ids, px, mask).logits)
    monkeypatch.setattr(llama, "attention", llama.attention)  # restored after the test
    monkeypatch.setattr(clip, "attention", clip.attention)
    monkeypatch.setitem(bench_gpu_jax._ATTN, "fallbacks", 0)
    bench_gpu_jax.route_attention("cudnn")
    try:
        got = np.asarray(sharding.random_model(cfg, seed=0)(ids, px, mask).logits)
    finally:
        bench_gpu_jax._ATTN["impl"] = None
    n_layers = cfg.text.num_hidden_layers + cfg.feature_layer_index
    assert bench_gpu_jax._ATTN["fallbacks"] == n_layers
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_end_to_end_tiny(tmp_path):
    out = tmp_path / "gpu_tiny"
    data = bench_gpu.main(["--tiny", "--model", "both", "--batch", "2", "--reducers", "fastv", "visionzip",
                           "--budgets", "64", "--next-budgets", "320", "--out", str(out)])
    md = (tmp_path / "gpu_tiny.md").read_text()
    js = json.loads((tmp_path / "gpu_tiny.json").read_text())
    assert all(w["rc"] == 0 for w in data["workers"]), data["workers"]
    # CPU: one paired worker per model (jaxprune + transformers in the same ABBA rounds); the unpaired
    # jax-then-transformers workers (4) are the GPU mode, test_workers_mode_tiny
    assert len(data["workers"]) == 2 and data["settings"]["pairing"] == "process"
    rows = js["rows"]
    assert [(r["model"], r["reducer"]) for r in rows] == [
        ("llava15", "full"), ("llava15", "fastv"), ("llava15", "visionzip"),
        ("next", "full"), ("next", "fastv"), ("next", "visionzip")]
    for r in rows:
        assert "error" not in r, r
        assert r["ttft_s"] > 0 and r["kv_bytes"] > 0 and r["flops_total"] > 0 and r["plan_peak_bytes"] > 0
        assert r["hf_ttft_s"] > 0 and r["ttft_vs_hf"] > 0, r
        assert r["ttft_vs_hf"] == r["ttft_vs_hf_stats"]["median"]  # median of per-round (paired) ratios
        assert r["prefill_compile_s"] > 0 and r["ttft"]["stats"]["n"] == data["settings"]["repeats"]
        assert r["mfu"] is None and r["decode_bw_frac"] is None  # CPU: no peaks
        if r["reducer"] != "full":
            assert r["kv_bytes"] < rows[0 if r["model"] == "llava15" else 3]["kv_bytes"]
            assert r["flops_speedup"] > 1
    assert rows[0]["seq"] > rows[1]["avg_visual_tokens"]
    assert {k.split("|")[2] for k in js["torch"]} >= {"vfull", "v4"}  # visionzip: 4 visual tokens
    assert js["env"]["jax_llava15"]["platform"] == "cpu" and js["env"]["torch_next"]["attn_implementation"] == "sdpa"
    for s in ("## Targets", "## llava15, batch 2", "## next, batch 2", "TTFT <= 0.67 x transformers", "n/a"):
        assert s in md


def test_crashed_row_is_recorded_and_skipped(tmp_path):
    """A worker that died inside a row (its 'start' line without a record) gets that row marked failed; finished
    rows are kept; nothing is re-run when no row is left."""
    a = bench_gpu.parse(["--tiny", "--model", "llava15", "--batch", "1", "--reducers", "fastv", "--budgets", "64"])
    rows = bench_gpu.plan_rows(a)
    assert [r["key"] for r in rows] == ["llava15|b1|full|576", "llava15|b1|fastv|64"]
    (tmp_path / "jax_llava15.jsonl").write_text("\n".join(json.dumps(x) for x in (
        {"start": rows[0]["key"]}, {"key": rows[0]["key"], "ttft_s": 1.0}, {"start": rows[1]["key"]})) + "\n")
    log = [{"worker": "jax:llava15", "rc": -9, "stderr_tail": "Killed"}]
    recs = bench_gpu.run_jax(a, rows, tmp_path, log, "llava15")
    got = {r["key"]: r for r in recs if "key" in r}
    assert got[rows[0]["key"]]["ttft_s"] == 1.0
    assert got[rows[1]["key"]]["error"].startswith("worker crashed in this row: Killed")
    assert len(log) == 1  # no worker was started


def test_workers_mode_tiny(tmp_path):
    """The GPU mode on CPU: a jaxprune worker then a transformers worker, rows and report under --out-dir, decode
    timed on the full rows only (--decode full)."""
    data = bench_gpu.main(["--tiny", "--model", "llava15", "--batch", "1", "--reducers", "fastv", "--budgets", "64",
                           "--pairing", "workers", "--decode", "full", "--out-dir", str(tmp_path)])
    assert [w["worker"] for w in data["workers"]] == ["jax:llava15", "torch:llava15"]
    assert all(w["rc"] == 0 for w in data["workers"]), data["workers"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gpu_cpu_tiny.json", "gpu_cpu_tiny.md", "jax_llava15.jsonl", "torch_llava15.jsonl"]
    full, fastv = data["rows"]
    assert full["decode_lengths"] and full["decode_fit"]["lengths"] == full["decode_lengths"]
    assert fastv["decode_lengths"] == [] and fastv["decode_s_per_tok"] is None
    assert fastv["paired_speedup_stats"]["n"] == data["settings"]["repeats"]
    assert "ttft_vs_hf_stats" not in full and full["ttft_vs_hf"] == pytest.approx(full["ttft_s"] / full["hf_ttft_s"])


def test_deadline_skips_rows(tmp_path):
    """Past --deadline a worker records its reducer rows as skipped (and the report says so) instead of starting
    them; full-model rows (every target needs them) still run."""
    data = bench_gpu.main(["--tiny", "--model", "llava15", "--batch", "1", "--reducers", "fastv", "--budgets", "64",
                           "--pairing", "workers", "--no-torch", "--inprocess", "--deadline", "0", "--decode", "none",
                           "--out-dir", str(tmp_path)])
    full, fastv = data["rows"]
    assert full["ttft_s"] > 0 and "skipped" not in full
    assert "skipped" in fastv and "ttft_s" not in fastv
    assert "skipped: time budget" in (tmp_path / "gpu_cpu_tiny.md").read_text()
