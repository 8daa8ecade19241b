"""The per-budget reading (best method vs random, paired bootstrap CI) and its line in jaxprune-eval's output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxprune.eval.benchmarks import get_benchmark
from jaxprune.eval.reading import paired_margin, question_hits, reading_lines
from jaxprune.eval.synthvqa.export import write_benchmark


def test_paired_margin_is_the_mean_difference_with_a_bootstrap_interval():
    assert paired_margin(np.ones(10), np.zeros(10)) == (100.0, 100.0, 100.0)
    rng = np.random.default_rng(0)
    a, b = rng.random(300) < 0.7, rng.random(300) < 0.5
    d, lo, hi = paired_margin(a, b)
    assert abs(d - 100 * (a.mean() - b.mean())) < 1e-9 and lo < d < hi
    se = 100 * (a.astype(float) - b).std() / np.sqrt(300)
    assert abs((hi - lo) - 2 * 1.96 * se) < 0.25 * (hi - lo)  # about the normal interval
    assert paired_margin(a, b) == (d, lo, hi)  # fixed seed
    with pytest.raises(ValueError, match="paired hits"):
        paired_margin(np.ones(3), np.ones(4))


def test_reading_lines_pick_the_best_method_and_quote_the_oracle():
    keys = [f"q{i}" for i in range(20)]
    mk = lambda n: {k: i < n for i, k in enumerate(keys)}  # noqa: E731 - the first n questions right
    runs = [{"run": "full", "reducer": None, "budget": None},
            {"run": "random:16", "reducer": "random", "budget": 16}, {"run": "fastv:16", "reducer": "fastv", "budget": 16},
            {"run": "adafv:16", "reducer": "adafv", "budget": 16}, {"run": "dart:16", "reducer": "dart", "budget": 16},
            {"run": "oracle:16", "reducer": "oracle", "budget": 16}, {"run": "fastv:48", "reducer": "fastv", "budget": 48}]
    hits = {"random:16": mk(10), "fastv:16": mk(15), "adafv:16": mk(12), "dart:16": mk(15), "oracle:16": mk(20),
            "fastv:48": mk(18)}
    (line,) = reading_lines(runs, hits)  # no random at 48: no line there
    assert line.startswith("16 tokens: best dart 75.0%, +25.0 pts over random (50.0%), 95% CI [")  # tie: dart < fastv
    assert "20 questions" in line and line.endswith("upper bound for pre-LLM selection: oracle 100.0%")
    hits["oracle:16"] = mk(8)  # below random: quoted, but not called a bound
    (line,) = reading_lines(runs, hits)
    assert "upper bound" not in line
    assert line.endswith("; oracle 40.0% scores below random: not a ceiling on this model")


def test_question_hits_score_each_answer_alone(tmp_path):
    d = write_benchmark(tmp_path / "b", "test", 0, n_images=None, n_questions=4)
    bench = get_benchmark("synthvqa")
    qs = bench.load(d)
    f = tmp_path / "answers.jsonl"
    f.write_text("".join(json.dumps({"key": q.key, "text": (q.answers[0].upper() + "." if i % 2 else "wrong")}) + "\n"
                         for i, q in enumerate(qs)))
    assert question_hits(bench, qs, f) == {q.key: bool(i % 2) for i, q in enumerate(qs)}


def test_cli_prints_the_reading(tmp_path, capsys):
    from jaxprune.eval.cli import main
    from jaxprune.eval.synthvqa.export import write_standin_checkpoint

    ck = write_standin_checkpoint(tmp_path / "ck")
    data = write_benchmark(tmp_path / "b", "test", 0, n_images=None, n_questions=8)
    rc = main(["--model", str(ck), "--benchmark", "synthvqa", "--data", str(data), "--reducer", "random:8",
               "--reducer", "fastervlm:8", "--reducer", "oracle:8", "--no-overlay", "--no-progress",
               "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "Reading (best method per budget vs random pruning):" in out
    assert "8 tokens: best fastervlm" in out and "(paired bootstrap, 8 questions); " in out
    assert "upper bound for pre-LLM selection: oracle" in out or "scores below random: not a ceiling" in out
