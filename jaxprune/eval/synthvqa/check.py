"""Accuracy of a model on the first questions of a synthvqa split, through the evaluation harness (the shipped
model's check; ``tests/test_synthvqa_checkpoint.py``)::

    python -m jaxprune.eval.synthvqa.check MODEL_DIR [--n-questions 200] [--seed 0] [--split test] [--reducer NAME:K]

The same prompts, preprocessing, greedy decoding and scorer as ``jaxprune-eval``. (Its own module: it imports the
harness, and the harness imports :mod:`.export` for the default job's benchmark.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from jaxprune.eval.config import BenchmarkSpec, ReducerSpec, SweepConfig
from jaxprune.eval.sweep import run_sweep
from jaxprune.eval.synthvqa.export import write_benchmark


def evaluate_slice(model_dir: str | Path, n_questions: int = 200, seed: int = 0, split: str = "test",
                   reducer: str | None = None, batch_size: int = 16, max_new_tokens: int = 4,
                   dtype: str = "float32", return_score: bool = False, style: str | None = None) -> Any:
    """Accuracy (percent, 0-100) of the model in ``model_dir`` (HF or converted directory with its tokenizer, or a
    built-in model name such as ``"synthvqa"``) on the first ``n_questions`` questions of ``(split, seed)``, through
    the evaluation harness (same prompts, preprocessing, greedy decoding and scorer as ``jaxprune-eval``).

    ``reducer``: ``"NAME:BUDGET"`` to score a reduced model instead of the full one. ``return_score``: return the
    scorer's whole dict (per-type accuracy, chance levels) instead of the accuracy. ``style``: the scene style of
    the questions (default: the model's training style, :func:`jaxprune.eval.builtin.model_style`)."""
    from jaxprune.eval.builtin import model_style

    style = style or model_style(str(model_dir))
    with tempfile.TemporaryDirectory(prefix="synthvqa-slice-") as d:
        data = write_benchmark(Path(d) / "data", split, seed, n_images=None, n_questions=n_questions,
                              style=style)
        spec = ReducerSpec.parse(reducer) if reducer else None
        cfg = SweepConfig(model=str(model_dir), benchmarks=[BenchmarkSpec("synthvqa", str(data))],
                          reducers=[spec] if spec else [], full=spec is None, out=str(Path(d) / "out"),
                          batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype, overlay=False,
                          progress=False, timing_reps=1)
        outcome = run_sweep(cfg)
        score = outcome.runs[0]["score"]
    return score if return_score else score["accuracy"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxprune.eval.synthvqa.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="HF / converted model directory with its tokenizer, or a built-in name")
    ap.add_argument("--n-questions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test")
    ap.add_argument("--reducer", help="NAME:BUDGET (default: the full model)")
    args = ap.parse_args(argv)
    score = evaluate_slice(args.model, args.n_questions, args.seed, args.split, args.reducer, return_score=True)
    print(json.dumps(score, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
