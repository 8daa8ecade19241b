"""A one-line reading per budget of a sweep on one benchmark: the best method and its margin over random pruning,
with a paired bootstrap confidence interval over the questions (what the default job prints under its table).

* Hits: each question scored alone with the benchmark's own scorer (``accuracy`` of a one-question score: 100 or
  0), from each run's answers file; so it applies to benchmarks whose headline is a per-question mean (synthvqa,
  POPE accuracy, GQA, ...), and :func:`question_hits` refuses others by name.
* Margin: ``mean(hits_best) - mean(hits_random)`` in percentage points over the questions both runs answered; the
  interval is the percentile bootstrap of that paired difference (questions resampled with replacement,
  ``n_boot`` draws, fixed seed: the same files give the same line).
* "Best method": the highest accuracy among the runs at that budget other than ``random`` and upper bounds
  (:data:`UPPER_BOUNDS`: the synthvqa ``oracle``, which reads the answer's location); ties go to the name first in
  alphabetical order. The oracle, when run, is quoted beside it as the ceiling of *which tokens reach the LLM*
  (pre-LLM selection at that count); in-LLM methods (FastV, ADSC, ...) let the first decoder layers see every
  token, so they can score above it. An oracle below ``random`` (also pre-LLM) is not called a bound: the line says
  it scores below random and is not a ceiling on this model (the shipped synthvqa model reads "how many" partly
  from the share of the asked colour's tokens, which the oracle inflates; ``experiments/results/synthvqa_training.md``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: reducers that are bounds, not methods (never "best")
UPPER_BOUNDS: tuple[str, ...] = ("oracle",)


def question_hits(bench: Any, questions: Sequence[Any], answers_file: str | Path) -> dict[str, bool]:
    """``{question key: correct}`` for the questions answered in ``answers_file`` (each scored alone)."""
    by_key = {q.key: q for q in questions if q.answers}
    out: dict[str, bool] = {}
    for line in Path(answers_file).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        q = by_key.get(str(rec.get("key")))
        if q is None:
            continue
        sc = bench.score([q], {q.key: rec.get("text", "")})
        if "accuracy" not in sc:
            raise ValueError(f"{getattr(bench, 'name', bench)}: its score has no per-question 'accuracy'; the reading "
                             "needs a benchmark whose headline is a mean over questions")
        out[q.key] = float(sc["accuracy"]) >= 100.0 - 1e-9
    return out


def paired_margin(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
                  ) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), lo, hi)`` in percentage points for paired 0/1 hits ``a``, ``b`` ``[n]``; ``(lo, hi)``
    the percentile bootstrap interval at ``level``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired hits must be two non-empty [n] arrays, got {a.shape} and {b.shape}")
    d = a - b
    idx = np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))
    boot = d[idx].mean(1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return 100.0 * float(d.mean()), 100.0 * float(lo), 100.0 * float(hi)


def reading_lines(runs: Sequence[Mapping[str, Any]], hits: Mapping[str, Mapping[str, bool]]) -> list[str]:
    """One line per budget that has a ``random`` run: best method, its margin over random (95 % CI), the oracle.
    ``runs``: run records (``reducer``, ``budget``, ``run``); ``hits``: run label -> :func:`question_hits`."""
    by_budget: dict[int, dict[str, str]] = {}
    for r in runs:
        if r.get("reducer") and r.get("budget") is not None and r.get("run") in hits:
            by_budget.setdefault(int(r["budget"]), {})[str(r["reducer"])] = str(r["run"])
    lines = []
    for budget in sorted(by_budget, reverse=True):
        labels = by_budget[budget]
        if "random" not in labels:
            continue
        acc = {n: 100.0 * float(np.mean(list(hits[lab].values()))) for n, lab in labels.items() if hits[lab]}
        methods = sorted((n for n in acc if n != "random" and n not in UPPER_BOUNDS), key=lambda n: (-acc[n], n))
        if not methods:
            continue
        best = methods[0]
        keys = sorted(set(hits[labels[best]]) & set(hits[labels["random"]]))
        diff, lo, hi = paired_margin(np.array([hits[labels[best]][k] for k in keys]),
                                     np.array([hits[labels["random"]][k] for k in keys]))
        line = (f"{budget} tokens: best {best} {acc[best]:.1f}%, {diff:+.1f} pts over random ({acc['random']:.1f}%), "
                f"95% CI [{lo:+.1f}, {hi:+.1f}] (paired bootstrap, {len(keys)} questions)")
        bounds = [f"{n} {acc[n]:.1f}%" for n in UPPER_BOUNDS if n in acc and acc[n] >= acc["random"]]
        broken = [f"{n} {acc[n]:.1f}% scores below random" for n in UPPER_BOUNDS if n in acc and acc[n] < acc["random"]]
        line += f"; upper bound for pre-LLM selection: {', '.join(bounds)}" if bounds else ""
        line += f"; {', '.join(broken)}: not a ceiling on this model" if broken else ""
        lines.append(line)
    return lines
