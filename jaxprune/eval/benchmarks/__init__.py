"""Benchmarks of the LLaVA evaluation suite: loaders, official-equivalent scorers, submission writers.

Usage::

    from jaxprune.eval.benchmarks import get_benchmark, answers_from_file

    bench = get_benchmark("pope")
    questions = bench.load("playground/data/eval/pope")          # LLaVA layout, or the raw official files
    answers = answers_from_file("answers/llava-v1.5-7b.jsonl", questions)   # or {q.key: model_output}
    print(bench.score(questions, answers)["f1"])

Registered: vqav2, gqa, textvqa, pope, mme, scienceqa, mmbench, seed, mmvet, and synthvqa (our synthetic set,
:mod:`jaxprune.eval.synthvqa`).  Each module's docstring names the official file and commit it reproduces and its
deviations.  Pure Python (PIL only to open images).
"""

from .base import (
    MC_LETTER_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    Benchmark,
    BenchmarkBase,
    BenchmarkFormatError,
    MissingAnswersError,
    Question,
    UnknownBenchmarkError,
    get_benchmark,
    list_benchmarks,
)
from .files import AnswerRecord, answers_from_file, load_answers, load_llava_questions, match_answers, write_answers

__all__ = [
    "MC_LETTER_SUFFIX",
    "SHORT_ANSWER_SUFFIX",
    "AnswerRecord",
    "Benchmark",
    "BenchmarkBase",
    "BenchmarkFormatError",
    "MissingAnswersError",
    "Question",
    "UnknownBenchmarkError",
    "answers_from_file",
    "get_benchmark",
    "list_benchmarks",
    "load_answers",
    "load_llava_questions",
    "match_answers",
    "write_answers",
]
