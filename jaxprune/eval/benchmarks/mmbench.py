"""MMBench (dev 20230712 TSV): LLaVA prompts, rule-based CircularEval, submission sheet.

Official pieces reproduced:

* ``llava/eval/model_vqa_mmbench.py --single-pred-prompt`` (haotian-liu/LLaVA @
  c121f0432da27facab705978f83c4ada465e46fd): one model call per TSV row (rotated copies included); options ``A``..``D``
  up to the first missing one (NaN, or the strings ``nan`` / ``none`` in any case); ``question = hint + "\\n" +
  question`` when the hint is present; ``"\\n{L}. {option}"`` per option; suffix ``\\nAnswer with the option's letter
  from the given choices directly.``; the recorded ``prompt`` has no suffix.  Cells are read as ``pd.read_table``
  would (its default NA strings become missing).
* ``scripts/convert_mmbench_for_submission.py``: the TSV without ``hint, category, source, image, comment,
  l2-category``, a ``prediction`` column inserted at position 6, rows in TSV order; xlsx (openpyxl) for the
  OpenCompass server.  openpyxl is optional here: without it a ``.tsv`` with the same columns is written.
* Local CircularEval = lmms-eval ``MMBench_Evaluator.eval_result`` (@ 75571cfe): rows with ``index >= 1e6`` are
  rotations of question ``index % 1e6``; a question scores 1 only if every row of its group yields the right letter
  (:func:`jaxprune.eval.benchmarks.mmbench_extract.can_infer`; unresolved rows go to ``fallback``: ``"static"`` =
  lmms-eval's static extractor, ``"none"`` = wrong; the GPT matcher the server uses is not available offline).
  Accuracy overall / per ``category`` / per ``l2-category`` over main rows.  ``single_accuracy`` = main rows only
  (no circular requirement), for reference.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import (
    MC_LETTER_SUFFIX,
    BenchmarkBase,
    BenchmarkFormatError,
    Question,
    assign_keys,
    collect_answers,
    lookup_answer,
    pct,
)
from .files import find_file, is_na, read_tsv
from .mmbench_extract import can_infer, extract_mcq_answer

TSV_FILES = ("mmbench_dev_20230712.tsv",)
CIRCULAR_BASE = 1_000_000
DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
PREDICTION_COLUMN_POSITION = 6


def llava_is_none(value: Any) -> bool:
    """``model_vqa_mmbench.is_none`` applied to a pandas-read cell."""
    return is_na(value) or (isinstance(value, str) and value.lower() in ("nan", "none"))


def llava_mmbench_prompt(question: str, hint: Any, options: Sequence[str]) -> str:
    """The ``cur_prompt`` of model_vqa_mmbench.py (no ``<image>``, no suffix)."""
    if not llava_is_none(hint):
        question = hint + "\n" + question
    for letter, option in zip("ABCD", options):
        question = question + "\n" + letter + ". " + option
    return question


def openpyxl_available() -> bool:
    """Whether the xlsx submission can be written."""
    return importlib.util.find_spec("openpyxl") is not None


class MMBench(BenchmarkBase):
    """MMBench-EN dev (LLaVA-1.5-7B: 64.3, server CircularEval)."""

    name = "mmbench"
    layout = "mmbench_dev_20230712.tsv (images inside, base64)"
    has_submission = True

    def load(self, root: str | Path, *, question_file: str | Path | None = None, **_: Any) -> list[Question]:
        """Rows of ``mmbench_dev_20230712.tsv`` (base64 images inside) as questions keyed by ``str(index)``."""
        root = Path(root)
        tsv = find_file(root, [question_file] if question_file else TSV_FILES)
        if tsv is None:
            raise FileNotFoundError(f"mmbench: no {question_file or TSV_FILES[0]} under {root}")
        header, rows = read_tsv(tsv, required=("index", "question", "A", "B", "image"))
        images_by_index = {r["index"]: r["image"] for r in rows}
        out = []
        for rowno, r in enumerate(rows, start=2):
            try:
                index = int(r["index"])
            except ValueError:
                raise BenchmarkFormatError(tsv, f"'index' is not an integer: {r['index']!r}", rowno) from None
            options: list[str] = []
            for letter in "ABCD":
                v = r.get(letter)
                if llava_is_none(v):
                    break
                options.append(v)
            choices = {c: r[c] for c in "ABCD" if c in r and not is_na(r[c])}
            image = r["image"]
            if len(image) <= 64 and image in images_by_index and image != r["index"]:
                image = images_by_index[image]  # VLMEvalKit-style reference to another row's image
            prompt = llava_mmbench_prompt(r["question"], None if is_na(r.get("hint")) else r.get("hint"), options)
            answer = r.get("answer")
            meta = {k: (None if is_na(v) else v) for k, v in r.items() if k != "image"}
            meta["choices"] = choices
            meta["row"] = rowno
            out.append(Question(question_id=index, text=prompt + MC_LETTER_SUFFIX, answers=[] if is_na(answer) else
                                [answer], category=meta.get("category"), split=meta.get("split"),
                                options=dict(zip("ABCD", options)), metadata=meta, image_b64=image,
                                answer_file_prompt=prompt))
        out = assign_keys(out)
        for q in out:
            q.metadata["tsv_header"] = header
        return out

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], *, fallback: str = "static",
              strict: bool = False, **_: Any) -> dict[str, Any]:
        """CircularEval accuracy (percent) overall, per category and per l2-category."""
        if fallback == "gpt":
            raise NotImplementedError("mmbench: the GPT answer matcher is not available offline; use 'static' or "
                                      "'none', or upload write_submission's file to the OpenCompass server")
        if fallback not in ("static", "none"):
            raise ValueError(f"mmbench: unknown fallback {fallback!r} (static, none)")
        if any(not q.answers for q in questions):
            raise ValueError("mmbench: some rows have no 'answer' (test split?): use write_submission")
        texts, n_missing = collect_answers(questions, answers, strict, self.name)
        correct: dict[int, bool] = {}
        n_unresolved = 0
        for q, text in zip(questions, texts):
            choices = dict(q.metadata.get("choices") or q.options)
            pred = can_infer(text, choices)
            if not pred:
                n_unresolved += 1
                if fallback == "static":
                    pred = extract_mcq_answer(text, sorted(choices))
            correct[int(q.question_id)] = bool(pred) and pred == q.answers[0]
        groups: dict[int, list[int]] = {}
        for idx in correct:
            groups.setdefault(idx % CIRCULAR_BASE, []).append(idx)
        mains = {int(q.question_id): q for q in questions if int(q.question_id) < CIRCULAR_BASE}
        if not mains:
            raise ValueError("mmbench: no main rows (index < 1e6)")
        hits = {idx: all(correct[i] for i in groups[idx]) for idx in sorted(mains)}
        by_cat: dict[str, list[bool]] = {}
        by_l2: dict[str, list[bool]] = {}
        for idx, hit in hits.items():
            meta = mains[idx].metadata
            by_cat.setdefault(str(meta.get("category") or "uncategorized"), []).append(hit)
            if "l2-category" in meta:
                by_l2.setdefault(str(meta.get("l2-category") or "uncategorized"), []).append(hit)
        acc = lambda xs: pct(sum(xs), len(xs))
        return {"circular_accuracy": acc(list(hits.values())),
                "single_accuracy": acc([correct[i] for i in sorted(mains)]),
                "n_questions": len(mains), "n_rows": len(questions), "n_missing": n_missing,
                "n_unresolved": n_unresolved, "fallback": fallback,
                "per_category": {k: acc(v) for k, v in sorted(by_cat.items())},
                "per_l2_category": {k: acc(v) for k, v in sorted(by_l2.items())}}

    def write_submission(self, questions: Sequence[Question], answers: Mapping[Any, str], path: str | Path, *,
                         fmt: str = "auto", **_: Any) -> Path:
        """The convert_mmbench_for_submission.py sheet: xlsx when openpyxl is installed (``fmt="auto"``), else tsv."""
        path = Path(path)
        if fmt == "auto":
            fmt = "xlsx" if openpyxl_available() else "tsv"
        if fmt not in ("xlsx", "tsv"):
            raise ValueError(f"mmbench: unknown submission format {fmt!r} (auto, xlsx, tsv)")
        if fmt == "xlsx" and not openpyxl_available():
            raise ModuleNotFoundError("mmbench: writing xlsx needs openpyxl (pip install openpyxl) or use fmt='tsv'")
        if path.suffix.lower() != f".{fmt}":
            if path.suffix:
                warnings.warn(f"mmbench: writing {fmt} submission to {path.with_suffix('.' + fmt)}", stacklevel=2)
            path = path.with_suffix(f".{fmt}")
        header = questions[0].metadata.get("tsv_header") if questions else None
        cols = [c for c in (header or ["index", "question", "A", "B", "C", "D", "answer"]) if c not in DROPPED_COLUMNS]
        cols.insert(min(PREDICTION_COLUMN_POSITION, len(cols)), "prediction")
        table: list[list[Any]] = []
        for q in questions:
            row = []
            for c in cols:
                if c == "prediction":
                    row.append(lookup_answer(answers, q))
                elif c == "index":
                    row.append(int(q.question_id))
                else:
                    row.append(q.metadata.get(c))
            table.append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "xlsx":
            import openpyxl

            wb = openpyxl.Workbook()
            ws = wb.active
            ws.append(cols)
            for row in table:
                ws.append(row)
            wb.save(path)
        else:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write("\t".join(cols) + "\n")
                for row in table:
                    f.write("\t".join("" if v is None else _tsv_cell(str(v)) for v in row) + "\n")
        return path


def _tsv_cell(s: str) -> str:
    if any(ch in s for ch in '\t\n\r"'):
        return '"' + s.replace('"', '""') + '"'
    return s
