"""experiments/synthvqa/sweep.py's report: mean and 95 % CI over seeds, per-type tables, the smallest-budget line."""

import math

import pytest

from experiments.synthvqa.sweep import ci95, markdown


def test_ci95_is_the_student_t_half_width():
    assert math.isnan(ci95([50.0]))
    # 3 seeds: t(2) = 4.303, sd = 10, n = 3
    assert ci95([40.0, 50.0, 60.0]) == pytest.approx(4.303 * 10 / 3 ** 0.5)
    assert ci95([50.0, 50.0]) == 0.0


def test_markdown_reports_mean_and_ci_per_budget_and_type():
    types = {"colour": 0.0, "exist": 0.0}

    def row(seed, reducer, budget, acc):
        return {"seed": seed, "reducer": reducer, "budget": budget, "n_questions": 100,
                "score": {"accuracy": acc, "per_type": dict(types, colour=acc), "chance": 30.0}}

    rows = [row(s, "full", None, 90.0 + s) for s in range(3)]
    rows += [row(s, "random", b, 40.0 + s + b) for s in range(3) for b in (48, 8)]
    rows += [row(s, "fastv", b, 60.0 + 2 * s + b) for s in range(3) for b in (48, 8)]
    res = {"model_id": "m", "seeds": [0, 1, 2], "images_per_seed": 25, "style": "large", "budgets": [48, 8],
           "rows": rows, "skipped": [], "command": "python -m experiments.synthvqa.sweep --images 25"}
    text = markdown(res)
    assert "scene style large" in text and "`python -m experiments.synthvqa.sweep --images 25`" in text
    assert f"| fastv | 110.0 ± {ci95([108.0, 110.0, 112.0]):.1f} |" in text  # 48: 60 + 2s + 48
    assert "**91.0 ± 2.5**" in text  # full: 90, 91, 92 -> t(2) * 1 / sqrt(3)
    assert "best reducer **fastv**" in text and "Per question type at 8 tokens" in text
