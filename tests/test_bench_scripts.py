"""The efficiency benchmarks run end to end on a tiny config and write their results where --out says.

Both scripts run in one process and share the cached tiny model, so each reducer's prefill compiles
once for the two of them; still, each reducer costs a few XLA compiles (~5-10 s of CPU), so the default
tests cover one reducer per code path and ``test_every_registered_reducer`` (marked slow) runs them all.
Results go to tmp_path: the committed experiments/results files are never touched.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import bench_budgets, bench_reducers, capture
from experiments.bench_common import RESULTS
from experiments.bench_forward import make_inputs
from jaxprune.reducers import registry
from jaxprune.reducers.compose import as_tuple

BUDGET = "192"  # of 576, scaled by --tiny to 48 of its 144 tokens: every reducer can run there


def representatives() -> list[str]:
    """Few registered reducers that together take every code path of the benchmarks: vision, projector and
    LLM stages, a shallow prefill, a compose of several parts (greedy cover, cheapest first: each part
    costs compiles). ``test_every_registered_reducer`` (slow) runs them all."""
    cfg = bench_reducers.tiny_config()
    (budget,) = bench_reducers.scale_budgets(cfg, [int(BUDGET)])
    kinds: dict[str, tuple[set, int]] = {}
    for name in registry.names(cfg.model_type):
        try:
            rs = as_tuple(registry.make(name, budget, cfg))
        except Exception:  # noqa: BLE001, S112 - the slow test reports it
            continue
        k = {r.stage for r in rs} | {"shallow" for r in rs if getattr(r, "shallow_layers", 0)}
        kinds[name] = (k | ({"compose"} if len(rs) > 1 else set()), len(rs))
    todo, chosen = set().union(*(k for k, _ in kinds.values())), []
    while todo:
        name = max(kinds, key=lambda n: (len(kinds[n][0] & todo) / (1 + kinds[n][1]), -registry.names().index(n)))
        chosen.append(name)
        todo -= kinds.pop(name)[0]
    return sorted(chosen)


def run_both(d, names: list[str] | None) -> tuple[dict, dict]:
    """Both scripts' main() with --tiny, results under ``d``; the committed results stay untouched."""
    ours = [RESULTS / f"{s}.{x}" for s in ("reducers_cpu", "budgets_cpu") for x in ("md", "json", "png")]
    before = {p: p.stat().st_mtime_ns for p in ours if p.exists()}
    sel = [] if names is None else ["--reducers", *names]
    red = bench_reducers.main(["--tiny", "--budgets", BUDGET, *sel, "--out", str(d / "reducers_tiny")])
    bud = bench_budgets.main(["--tiny", "--budgets", BUDGET, *sel, "--out", str(d / "budgets_tiny.md")])
    assert {p: p.stat().st_mtime_ns for p in ours if p.exists()} == before, "tests must not touch the committed results"
    return red, bud


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    names = representatives()
    return d, names, *run_both(d, names)


def _table_rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]  # skip the header


def check_reducers_outputs(d, names: list[str]) -> None:
    md, js = d / "reducers_tiny.md", d / "reducers_tiny.json"
    assert md.exists() and js.exists()
    saved = json.loads(js.read_text())
    for key in ("machine", "device", "git", "command", "full_prefill_s"):
        assert saved[key]
    rows = _table_rows(md.read_text())
    assert sorted(r[0] for r in rows) == sorted(names)
    assert sorted(r["reducer"] for r in saved["rows"]) == sorted(names)
    for r in saved["rows"]:
        assert "error" not in r, r
        assert r["prefill_s"] > 0 and r["own_s"] > 0
        assert r["own_s"] == pytest.approx(sum(p["own_s"] for p in r["parts"]))
        assert r["overhead"] == pytest.approx(r["own_s"] / r["prefill_s"])
        assert r["pass"] == (r["overhead"] <= bench_reducers.TARGET_OVERHEAD)
        for p in r["parts"]:
            if p["stage"] == "llm":
                assert "cut_s" in p and p["own_s"] == p["cut_s"]
            if "shallow_s" in p:  # the shallow pass we time is the one the pipeline ran
                assert p["shallow_check_max_abs_diff"] < 1e-5
        assert (r["shallow_s"] is not None) == any("shallow_s" in p for p in r["parts"])


def check_budgets_outputs(d, names: list[str]) -> None:
    md, js, png = d / "budgets_tiny.md", d / "budgets_tiny.json", d / "budgets_tiny.png"
    assert md.exists() and js.exists() and png.exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "budgets_tiny.png" in md.read_text()
    saved = json.loads(js.read_text())
    rows = _table_rows(md.read_text())
    assert [r[0] for r in rows] == ["full"] + sorted(names)
    assert sorted(r["reducer"] for r in saved["rows"]) == sorted(names)
    full = saved["full"]
    assert full["avg_visual_tokens"] == bench_reducers.tiny_config().tokens_per_image
    assert saved["kv_mismatch"] == []
    for r in [full, *saved["rows"]]:
        assert "error" not in r, r
        assert r["kv_agree"] and r["kv_bytes"] == r["kv_bytes_analytic"] > 0  # real cache == analytic
        assert r["flops_total"] > 0 and r["flops_llm_fastv_formula"] > 0
    for r in saved["rows"]:
        assert r["flops_total"] - r["flops_shallow"] < full["flops_total"]
        assert r["kv_bytes"] < full["kv_bytes"]  # every reducer shortens the cached sequence
        assert r["ratio"] == pytest.approx(r["speedup"] / r["flops_speedup"])
        assert r["pass"] == (r["ratio"] >= bench_budgets.TARGET_RATIO)


def test_bench_reducers_writes_a_row_per_reducer(runs):
    d, names, data, _ = runs
    assert len(names) >= 2
    check_reducers_outputs(d, names)
    assert len(data["rows"]) == len(names)


def test_bench_budgets_rows_kv_and_plot(runs):
    d, names, _, data = runs
    check_budgets_outputs(d, names)
    assert len(data["rows"]) == len(names)


def test_bench_budgets_saves_every_row_and_resumes(runs, tmp_path, monkeypatch):
    """A crash mid-sweep keeps the finished rows on disk; --resume reruns only the missing ones."""
    d, names, _, data = runs
    out = tmp_path / "b"
    js = out.with_suffix(".json")
    first, second = names[0], names[1]
    real = bench_budgets.bench_row

    def crash_on_second(model, spec, *args, **kw):
        if spec is not None and spec == registry.make(second, data["budgets"][0], model.cfg):
            raise KeyboardInterrupt("simulated crash")
        return real(model, spec, *args, **kw)

    monkeypatch.setattr(bench_budgets, "bench_row", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        bench_budgets.main(["--tiny", "--budgets", BUDGET, "--reducers", first, second, "--out", str(out)])
    saved = json.loads(js.read_text())
    assert saved["complete"] is False and [r["reducer"] for r in saved["rows"]] == [first]
    calls = []
    monkeypatch.setattr(bench_budgets, "bench_row", lambda m, spec, *a, **k: calls.append(spec) or real(m, spec, *a, **k))
    res = bench_budgets.main(["--tiny", "--budgets", BUDGET, "--reducers", first, second, "--out", str(out), "--resume"])
    assert calls == [registry.make(second, data["budgets"][0], bench_reducers.tiny_config())]  # full + first reused
    assert res["complete"] and [r["reducer"] for r in res["rows"]] == [first, second]
    assert res["rows"][0] == saved["rows"][0] and res["full"] == saved["full"]
    assert "resumed: 1 rows" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="another config"):
        bench_budgets.main(["--tiny", "--budgets", BUDGET, "--repeats", "2", "--reducers", first, "--out", str(out),
                            "--resume"])


@pytest.mark.slow
def test_every_registered_reducer(runs, tmp_path):
    """Every registered reducer runs in both benchmarks (a few compiles each: minutes on 2 busy cores)."""
    run_both(tmp_path, None)
    names = registry.names(bench_reducers.tiny_config().model_type)  # video-only methods (dycoke) left out
    check_reducers_outputs(tmp_path, names)
    check_budgets_outputs(tmp_path, names)


def test_capture_gives_the_context_the_pipeline_used():
    """A projector reducer run on its captured context keeps exactly what the model kept."""
    cfg = bench_reducers.tiny_config()
    model = bench_reducers.load_model(cfg)
    ids, mask, px = make_inputs(cfg, 2)
    spec = registry.make("fastervlm", 48, cfg)
    cap = capture.capture(model, ids, px, spec, mask)
    (r,), (ctx,) = cap.reducers, cap.contexts
    red = capture.reducer_fn(model, r)(model.params, ctx)
    out = model(ids, px, mask, reducer=spec)
    np.testing.assert_array_equal(np.asarray(out.kept), np.where(np.asarray(red.valid), np.asarray(red.index), -1))


def test_out_accepts_a_stem_or_a_path(tmp_path):
    assert bench_reducers.out_base(None, "reducers_cpu", tiny=True) is None
    assert bench_reducers.out_base(None, "reducers_cpu", tiny=False) == RESULTS / "reducers_cpu"
    assert bench_reducers.out_base("reducers_gpu", "reducers_cpu", tiny=False) == RESULTS / "reducers_gpu"
    assert bench_reducers.out_base(str(tmp_path / "x.md"), "reducers_cpu", tiny=True) == tmp_path / "x"
    assert bench_reducers.out_base(str(tmp_path / "x"), "reducers_cpu", tiny=True) == tmp_path / "x"
