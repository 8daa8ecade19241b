"""Compile-ahead in the sweep (jaxprune/eval/prefetch.py): the next spec's programs are compiled while the current
run answers, the answers do not change, and nothing compiles in the background when a run times itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jaxprune.eval import ReducerSpec
from jaxprune.eval.benchmarks import get_benchmark
from jaxprune.eval.engine import LOCKS, Compiled
from jaxprune.eval.prefetch import CompileAhead
from jaxprune.eval.runner import RunOptions, run_benchmark

FIX = Path(__file__).resolve().parent / "fixtures" / "benchmarks"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from jaxprune.eval import Context, load_model

    mp = pytest.MonkeyPatch()
    mp.setenv("JAXPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "jaxprune-eval-cache"))
    model, tok, model_id, model_dir = load_model("demo", bucket=256)
    yield Context.create(model, tok, model_id, model_dir=model_dir)
    mp.undo()


def _programs(ctx) -> list[Compiled]:
    return [v for k, v in ctx.cache.items() if k != LOCKS]


def test_next_spec_is_compiled_ahead_and_answers_are_unchanged(ctx, tmp_path):
    bench = get_benchmark("pope")
    qs = bench.load(str(FIX / "pope"))[:4]
    specs = [ReducerSpec.parse(s) for s in ("fastervlm:16", "random:16", "divprune:8")]
    ahead = CompileAhead(ctx, specs, "pope")
    assert ahead.enabled
    waits = []

    def quiet():
        ahead.quiet()
        waits.append(ahead._pending is None)

    opts = RunOptions(batch_size=4, max_new_tokens=3, progress=False, timing_reps=1,
                      first_rows=ahead.first_rows, before_timing=quiet)
    n0 = len(_programs(ctx))
    first = run_benchmark(ctx, bench, qs, specs[0], tmp_path / "a", opts)
    assert ahead.submitted == ["random:16"]
    assert len(_programs(ctx)) == n0 + 2  # fastervlm's program and random's, compiled before random's run starts
    random_prog = _programs(ctx)[-1]
    assert random_prog.decode is not None  # decode compiled ahead too
    second = run_benchmark(ctx, bench, qs, specs[1], tmp_path / "b", opts)
    assert len(_programs(ctx)) == n0 + 3 and ahead.submitted == ["random:16", "divprune:8"]  # random's reused
    run_benchmark(ctx, bench, qs, specs[2], tmp_path / "c", opts)
    ahead.close()
    assert ahead.submitted == ["random:16", "divprune:8"] and all(waits)
    plain = run_benchmark(ctx, bench, qs, specs[1], tmp_path / "d", dataclasses.replace(opts, first_rows=None,
                                                                                        before_timing=None))
    assert (tmp_path / "b" / "answers.jsonl").read_text() == (tmp_path / "d" / "answers.jsonl").read_text()
    assert plain.record["score"] == second.record["score"]
    assert first.record["n_answered"] == 4


def test_errors_ahead_are_left_to_the_run(ctx, tmp_path):
    bench = get_benchmark("pope")
    qs = bench.load(str(FIX / "pope"))[:4]
    specs = [ReducerSpec.parse("random:16"), ReducerSpec.parse("random:100000")]  # budget > tokens
    ahead = CompileAhead(ctx, specs, "pope")
    opts = RunOptions(batch_size=4, max_new_tokens=3, progress=False, timing_reps=1, first_rows=ahead.first_rows,
                      before_timing=ahead.quiet)
    run_benchmark(ctx, bench, qs, specs[0], tmp_path / "a", opts)  # no exception from the bad next spec
    assert ahead.submitted == []
    ahead.close()
