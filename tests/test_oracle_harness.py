"""The ``oracle`` reducer through the evaluation harness: the synthvqa loader attaches each question's patch prior,
the rows carry it to the model, and every other benchmark refuses the oracle by name."""

from __future__ import annotations

import numpy as np
import pytest

from jaxprune.eval.batching import REDUCER_INPUTS, stack_reducer_inputs
from jaxprune.eval.benchmarks import Question, get_benchmark
from jaxprune.eval.config import BenchmarkSpec, ConfigError, ItemError, ReducerSpec, SweepConfig, check_names
from jaxprune.eval.runner import check_reducer_benchmark
from jaxprune.eval.synthvqa.export import write_benchmark
from jaxprune.eval.synthvqa.targets import prior_for_question_id


def test_synthvqa_questions_carry_their_patch_prior(tmp_path):
    d = write_benchmark(tmp_path / "b", "test", 0, n_images=None, n_questions=9)
    qs = get_benchmark("synthvqa").load(d)
    assert len(qs) == 9
    for q in qs:
        pr = q.metadata[REDUCER_INPUTS]["patch_prior"]
        assert pr.shape == (144,) and pr.dtype == np.float32
        np.testing.assert_array_equal(pr, prior_for_question_id(q.key))
        assert (pr.sum() == 0) == (q.category == "exist" and q.answers == ["no"])
    rows = stack_reducer_inputs(qs[:4])
    assert rows["patch_prior"].shape == (4, 144)
    assert stack_reducer_inputs([Question("x", "t"), Question("y", "t")]) is None
    with pytest.raises(ConfigError, match="has no metadata"):
        stack_reducer_inputs([qs[0], Question("y", "t")])


def test_the_oracle_runs_on_synthvqa_only():
    sweep = lambda benches: SweepConfig(model="m", benchmarks=[BenchmarkSpec(b, "/d") for b in benches],
                                        reducers=[ReducerSpec.parse("oracle:16"), ReducerSpec.parse("random:16")])
    assert check_names(sweep(["synthvqa"])) == []
    cfg = sweep(["synthvqa", "pope"])
    problems = check_names(cfg)
    assert len(problems) == 1 and "runs only on benchmark synthvqa" in problems[0][1] and "pope" in problems[0][1]
    assert [r.name for r in cfg.reducers] == ["random"]
    check_reducer_benchmark(ReducerSpec.parse("oracle:16"), "synthvqa")
    check_reducer_benchmark(ReducerSpec.parse("random:16"), "pope")
    with pytest.raises(ItemError, match="oracle:16 runs only on benchmark synthvqa.*not on pope"):
        check_reducer_benchmark(ReducerSpec.parse("oracle:16"), "pope")
    bad = sweep(["synthvqa"])
    bad.reducers = [ReducerSpec.parse("oracle_typo:16")]
    assert "unknown reducer 'oracle_typo'" in check_names(bad)[0][1]


def test_oracle_slice_through_the_harness(tmp_path):
    """The oracle at 16 tokens answers every question of a slice (random stand-in weights: any accuracy)."""
    from jaxprune.eval.synthvqa.check import evaluate_slice
    from jaxprune.eval.synthvqa.export import write_standin_checkpoint

    ck = write_standin_checkpoint(tmp_path / "ck")
    score = evaluate_slice(ck, n_questions=6, batch_size=4, reducer="oracle:16", return_score=True)
    assert score["n"] == 6 and score["n_missing"] == 0 and 0.0 <= score["accuracy"] <= 100.0


def test_large_style_benchmark_ids_and_priors(tmp_path):
    d = write_benchmark(tmp_path / "b", "test", 0, n_images=None, n_questions=6, style="large")
    qs = get_benchmark("synthvqa").load(d)
    assert all(q.key.startswith("test_0_") and "_large_" in q.key for q in qs)
    for q in qs:
        np.testing.assert_array_equal(q.metadata[REDUCER_INPUTS]["patch_prior"], prior_for_question_id(q.key))
    assert any(q.metadata[REDUCER_INPUTS]["patch_prior"].sum() >= 9 for q in qs)  # 3x3 / 4x4-patch objects
