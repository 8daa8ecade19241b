"""The evaluation harness end to end with the built-in demo model (small random LLaVA + word-level tokenizer).

One model context is shared by the module, and every run uses the same batch size, length bucket and
``max_new_tokens``, so the compiled programs are reused across tests (a handful of compiles in total).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jaxprune.eval import ConfigError, ItemError, ReducerSpec, SweepConfig, load_sweep_file, run_sweep
from jaxprune.eval.answers import AnswerFile
from jaxprune.eval.config import BenchmarkSpec

FIX = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
FORMATS = ("vqav2", "gqa", "textvqa", "pope", "mme", "scienceqa", "mmbench", "seed", "mmvet")
BATCH, NEW, BUCKET = 4, 3, 256
COMMON_FLAGS = ["--batch-size", str(BATCH), "--max-new-tokens", str(NEW), "--bucket", str(BUCKET), "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Built-in model / benchmark cache shared by the session (the distributed tests use the same folder)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.getbasetemp() / "jaxprune-eval-cache"
    mp.setenv("JAXPRUNE_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def ctx(cache):
    from jaxprune.eval import Context, load_model

    model, tok, model_id, model_dir = load_model("demo", bucket=BUCKET)
    return Context.create(model, tok, model_id, model_dir=model_dir)


@pytest.fixture(scope="module")
def model_dir(cache):
    from jaxprune.eval import builtin

    return builtin.ensure_model()[0]


@pytest.fixture(scope="module")
def shapes(cache):
    from jaxprune.eval import builtin

    return builtin.ensure_benchmark()


def _cfg(out, benchmarks, reducers=(), **kw) -> SweepConfig:
    kw = {"batch_size": BATCH, "max_new_tokens": NEW, "progress": False, "overlay": False, **kw}
    return SweepConfig(model="demo", benchmarks=[BenchmarkSpec(n, str(d)) for n, d in benchmarks],
                       reducers=[ReducerSpec.parse(r) for r in reducers], out=str(out), **kw)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _pope_copy(tmp_path: Path) -> Path:
    d = tmp_path / "pope"
    shutil.copytree(FIX / "pope", d)
    return d


# ---------------------------------------------------------------------------------------------- end to end
def test_every_fixture_format_end_to_end(ctx, tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text("\n".join([
        'model = "demo"', 'out = "out"', f"batch_size = {BATCH}", f"max_new_tokens = {NEW}", "progress = false",
        "[benchmarks]", *[f'{n} = "{FIX / n}"' for n in FORMATS], "[reducers]", "fastervlm = [48]", ""]))
    cfg = load_sweep_file(toml)
    assert cfg.out == str(tmp_path / "out") and [r.label for r in cfg.runs] == ["full", "fastervlm:48"]
    outcome = run_sweep(cfg, context=ctx)
    out = tmp_path / "out"
    assert not outcome.skipped and len(outcome.results) == 2 * len(FORMATS)
    from jaxprune.eval.benchmarks import get_benchmark

    for name in FORMATS:
        qs = get_benchmark(name).load(FIX / name)
        for run in ("full", "fastervlm_48"):
            d = out / name / run
            recs = _lines(d / "answers.jsonl")
            assert [r["key"] for r in recs] == [q.key for q in qs]  # question-file order, once each
            assert set(recs[0]) >= {"question_id", "prompt", "text", "answer_id", "model_id", "metadata", "key"}
            rec = json.loads((d / "run.json").read_text())
            assert rec["n_answered"] == len(qs) and rec["n_skipped"] == 0
            e = rec["efficiency"]
            for k in ("ttft_ms", "decode_ms_per_token", "flops_llm_fastv_formula", "flops_llm_swiglu",
                      "kv_cache_bytes", "peak_memory_bytes", "compile_s_total"):
                assert e[k] is not None and e[k] > 0, (name, run, k)
            assert e["peak_memory_kind"] in ("host_rss", "device_peak_bytes_in_use")
            assert e["visual_tokens"] == (144 if run == "full" else 48)
            if name in ("vqav2", "mmvet"):  # scored by EvalAI / the GPT-4 grader: submission file instead
                assert rec["headline"] is None and rec["score_note"] and Path(rec["submission"]).exists()
            else:
                assert rec["headline"] is not None, name
    fe = json.loads((out / "pope" / "fastervlm_48" / "run.json").read_text())["efficiency"]
    fu = json.loads((out / "pope" / "full" / "run.json").read_text())["efficiency"]
    assert fe["flops_llm_swiglu"] < fu["flops_llm_swiglu"] and fe["kv_cache_bytes"] < fu["kv_cache_bytes"]
    assert fe["xla_flops_per_row"] is None or fe["xla_flops_per_row"] < fu["xla_flops_per_row"]
    md = (out / "report.md").read_text()
    for head in ("## Accuracy", "## Efficiency", "Avg. % of full", "POPE (f1)", "SQA-IMG (img_accuracy)",
                 "LLM FLOPs, FastV formula", "LLM FLOPs, SwiGLU", "XLA prefill FLOPs", "KV cache", "TTFT"):
        assert head in md, head
    rep = json.loads((out / "report.json").read_text())
    assert [s["method"] for s in rep["summary"]] == ["full", "fastervlm:48"]
    assert rep["summary"][0]["avg_pct_of_full"] == pytest.approx(100.0)
    for png in (out / "pareto.png", out / "overlays" / "fastervlm.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_overlay_marks_kept_patches(ctx):
    """The overlay's kept indices are the reducer's: distinct source patches, as many as the budget."""
    import numpy as np

    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval.batching import Batch, build_rows, make_items
    from jaxprune.eval.overlay import kept_tokens
    from jaxprune.eval.runner import make_reducer

    cfg = ctx.model.cfg
    items = make_items(get_benchmark("pope").load(FIX / "pope")[:2], ctx.tokenizer, cfg.tokens_per_image)
    rows = build_rows(Batch(tuple(items), 2, max(i.length for i in items), 1), range(2), ctx.tokenizer,
                      cfg.image_token_index, cfg.tokens_per_image, ctx.img_cfg, cfg.vision.image_size)
    kept, valid = kept_tokens(ctx.model, make_reducer(ReducerSpec("fastervlm", 20), cfg), rows.input_ids,
                              rows.attention_mask, rows.pixel_values)
    assert kept.shape == (2, 20) and valid.all()
    for row in kept:
        assert len(set(row.tolist())) == 20 and row.min() >= 0 and row.max() < cfg.tokens_per_image
        assert (np.diff(row) > 0).all()  # order-preserving selection


# ---------------------------------------------------------------------------------------------- resume
class Crash(RuntimeError):
    pass


def test_kill_mid_run_then_resume_gives_identical_answers(ctx, shapes, tmp_path):
    ref = run_sweep(_cfg(tmp_path / "ref", [("pope", shapes)]), context=ctx)
    ref_file = ref.results[0].run_dir / "answers.jsonl"
    n = len(_lines(ref_file))
    assert n == 16

    def crash_after_two(i):
        if i == 1:
            raise Crash("simulated kill after 2 batches")

    cfg = _cfg(tmp_path / "resumed", [("pope", shapes)])
    with pytest.raises(Crash):
        run_sweep(cfg, context=ctx, after_batch=crash_after_two)
    f = tmp_path / "resumed" / "pope" / "full" / "answers.jsonl"
    assert len(_lines(f)) == 2 * BATCH  # the two finished batches, nothing else
    with open(f, "ab") as h:  # a kill in the middle of the third batch's write
        h.write(b'{"question_id": 3, "prompt": "Is there a')
    seen = []
    out = run_sweep(cfg, context=ctx, after_batch=seen.append)
    assert seen == [0, 1]  # only the two missing batches ran
    assert f.read_bytes() == ref_file.read_bytes()
    assert out.results[0].record["n_answered"] == n
    again = []
    run_sweep(cfg, context=ctx, after_batch=again.append)  # complete: nothing to do, file unchanged
    assert again == [] and f.read_bytes() == ref_file.read_bytes()


def test_answer_file_append_truncate_dedupe(tmp_path):
    f = AnswerFile(tmp_path / "a.jsonl")
    assert f.load() == {}
    f.append([{"key": "a", "text": "1"}, {"key": "b", "text": "2"}])
    f.append([{"key": "a", "text": "dup"}])
    with open(f.path, "ab") as h:
        h.write(b'{"key": "c", "te')
    got = f.load()
    assert {k: r["text"] for k, r in got.items()} == {"a": "1", "b": "2"}
    assert f.path.read_bytes().endswith(b"\n")  # the partial line is gone
    f.finalize(["b", "a"])
    assert [r["key"] for r in _lines(f.path)] == ["b", "a"]
    f.path.write_text('{"key": "a", "text": "1"}\nnot json\n{"key": "b", "text": "2"}\n')
    with pytest.raises(ItemError, match=r"a\.jsonl:2"):
        f.load()


def test_changed_settings_refuse_the_old_run_folder(ctx, shapes, tmp_path):
    run_sweep(_cfg(tmp_path, [("pope", shapes)], limit=4), context=ctx)
    with pytest.raises(ConfigError, match="different settings"):
        run_sweep(_cfg(tmp_path, [("pope", shapes)], limit=4, max_new_tokens=NEW + 1), context=ctx)


# ---------------------------------------------------------------------------------------------- errors
def _break_images(d: Path) -> tuple[str, str]:
    missing, corrupt = "COCO_val2014_000000310196.png", "COCO_val2014_000000210789.png"
    (d / "val2014" / missing).unlink()
    (d / "val2014" / corrupt).write_bytes(b"not a png at all")
    return missing, corrupt


def test_on_error_skip_lists_items_and_answers_the_rest(ctx, tmp_path):
    d = _pope_copy(tmp_path)
    missing, corrupt = _break_images(d)
    from jaxprune.eval.benchmarks import get_benchmark

    qs = get_benchmark("pope").load(d)
    bad = {q.key for q in qs if q.image in (missing, corrupt)}
    assert bad and len(bad) < len(qs)
    outcome = run_sweep(_cfg(tmp_path / "out", [("pope", d)], on_error="skip"), context=ctx)
    rec = outcome.results[0].record
    assert {s["key"] for s in rec["skipped"]} == bad
    msgs = " ".join(s["message"] for s in rec["skipped"])
    assert missing in msgs and corrupt in msgs and "not found" in msgs
    answered = {r["key"] for r in _lines(outcome.results[0].run_dir / "answers.jsonl")}
    assert answered == {q.key for q in qs} - bad
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Skipped items" in md and missing in md and corrupt in md


def test_on_error_stop_names_the_item(ctx, model_dir, tmp_path, capsys):
    from jaxprune.eval.cli import main

    d = _pope_copy(tmp_path)
    missing, corrupt = _break_images(d)
    rc = main(["--model", str(model_dir), "--benchmark", "pope", "--data", str(d), "--out", str(tmp_path / "o"),
               "--on-error", "stop", *COMMON_FLAGS])
    err = capsys.readouterr().err
    assert rc == 1 and missing in err and "question" in err
    shutil.copy(FIX / "pope" / "val2014" / missing, d / "val2014" / missing)  # only the corrupt file is left
    with pytest.raises(ItemError, match=corrupt):  # found while loading a batch (not by the pre-flight check)
        run_sweep(_cfg(tmp_path / "o2", [("pope", d)]), context=ctx)


def test_malformed_question_file(ctx, model_dir, tmp_path, capsys):
    from jaxprune.eval.cli import main

    d = _pope_copy(tmp_path)
    qf = d / "llava_pope_test.jsonl"
    lines = qf.read_text().splitlines()
    qf.write_text("\n".join([lines[0], '{"question_id": 7, "text": ', *lines[2:]]) + "\n")
    rc = main(["--model", str(model_dir), "--benchmark", "pope", "--data", str(d), "--out", str(tmp_path / "o"),
               *COMMON_FLAGS])
    err = capsys.readouterr().err
    assert rc == 1 and f"{qf}:2" in err and "invalid JSON" in err
    outcome = run_sweep(_cfg(tmp_path / "o2", [("pope", d), ("gqa", FIX / "gqa")], on_error="skip"), context=ctx)
    assert [s["item"] for s in outcome.skipped] == ["benchmark pope"]
    assert [r.benchmark for r in outcome.results] == ["gqa"]
    assert f"{qf}:2" in (tmp_path / "o2" / "report.md").read_text()


def test_unknown_names_and_bad_specs(ctx, tmp_path, capsys):
    from jaxprune.eval.cli import main

    base = ["--model", "demo", "--data", str(FIX / "pope"), "--out", str(tmp_path / "o")]
    assert main(base + ["--benchmark", "popee"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'popee'" in err and "pope" in err
    assert main(base + ["--benchmark", "pope", "--reducer", "nosuch:64"]) == 2
    err = capsys.readouterr().err
    assert "unknown reducer 'nosuch'" in err and "fastervlm" in err
    assert main(base + ["--benchmark", "pope", "--reducer", "fastervlm"]) == 2
    assert "NAME:BUDGET" in capsys.readouterr().err
    assert main(base + ["--benchmark", "pope", "--reducer", "fastervlm:x"]) == 2
    assert "not an integer" in capsys.readouterr().err
    sweep = tmp_path / "s.json"
    sweep.write_text(json.dumps({"model": "demo", "benchmarks": {"popee": str(FIX / "pope")},
                                 "reducers": {"fastervlm": [48]}}))
    assert main(["--sweep", str(sweep)]) == 2
    assert "unknown benchmark 'popee'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown key"):
        (tmp_path / "s.toml").write_text('model = "demo"\nbenchmarks = {}\nbatchsize = 3\n')
        load_sweep_file(tmp_path / "s.toml")
    # skip: the unknown reducer is listed, the rest runs; an impossible budget is an item error of its run
    outcome = run_sweep(_cfg(tmp_path / "o2", [("pope", FIX / "pope"), ("nope", FIX / "pope")],
                             reducers=["nosuch:3", "fastervlm:1000"], on_error="skip"), context=ctx)
    items = [s["item"] for s in outcome.skipped]
    assert items == ["benchmark nope", "reducer nosuch:3", "pope/fastervlm:1000"]
    assert "1000" in outcome.skipped[-1]["message"]
    assert [r.label for r in outcome.results] == ["full"]


def test_default_run_cli(cache, tmp_path, capsys):
    """The default-run path of the built-in demo model (its generated benchmark), trimmed to the full model."""
    from jaxprune.eval.cli import main

    rc = main(["--model", "demo", "--reducer", "full", "--limit", "8", "--no-overlay", "--out", str(tmp_path),
               *COMMON_FLAGS])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| full | 144 |" in out and "% of full" in out and "TTFT ms" in out and "KV cache" in out
    assert (tmp_path / "report.md").exists() and (tmp_path / "pope" / "full" / "answers.jsonl").exists()
