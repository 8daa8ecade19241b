"""Readers and writers for LLaVA's evaluation files, with errors that name the file and line.

* Question files (jsonl, one object a line): ``{"question_id", "image", "text", ...}`` read by
  ``llava/eval/model_vqa_loader.py`` / ``model_vqa.py`` (haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd).
* Answers files (jsonl) as those scripts write them: ``{"question_id", "prompt", "text", "answer_id", "model_id",
  "metadata"}`` (``model_vqa_mmbench.py`` adds ``round_id``, ``options``, ``option_char``).
* Plain JSON and TSV readers used by the raw-format loaders.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import BenchmarkFormatError, Question, assign_keys


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error is reported with the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BenchmarkFormatError(path, f"not UTF-8 text ({e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchmarkFormatError(path, f"invalid JSON: {e.msg} (column {e.colno})", e.lineno) from e


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Parse a jsonl file (blank lines skipped); each line must be a JSON object holding the ``required`` keys."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(path, f"invalid JSON: {e.msg} (column {e.colno})", lineno) from e
            if not isinstance(obj, dict):
                raise BenchmarkFormatError(path, f"expected a JSON object, got {type(obj).__name__}", lineno)
            missing = [k for k in required if k not in obj]
            if missing:
                raise BenchmarkFormatError(path, f"missing key(s) {', '.join(missing)}", lineno)
            rows.append(obj)
    return rows


def read_tsv(path: str | Path, required: Sequence[str] = ()) -> tuple[list[str], list[dict[str, str]]]:
    """Read a tab-separated file with a header row into (header, rows of str); quoting as pandas' ``read_table``.

    Row numbers in errors count the header as line 1.  Cells stay strings; callers apply pandas-like NA rules
    (:func:`is_na`).
    """
    path = Path(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise BenchmarkFormatError(path, "empty file (no header row)") from None
        missing = [k for k in required if k not in header]
        if missing:
            raise BenchmarkFormatError(path, f"header lacks column(s) {', '.join(missing)}", 1)
        rows: list[dict[str, str]] = []
        for row in reader:
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                raise BenchmarkFormatError(path, f"expected {len(header)} tab-separated fields, got {len(row)}",
                                           reader.line_num)
            rows.append(dict(zip(header, row)))
    return header, rows


# pandas' default ``na_values`` (read_csv / read_table): such cells become NaN.
PANDAS_NA_STRINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null",
})


def is_na(value: Any) -> bool:
    """True for what ``pd.read_table`` turns into NaN (plus None)."""
    return value is None or (isinstance(value, str) and value in PANDAS_NA_STRINGS) or (
        isinstance(value, float) and math.isnan(value))


def find_file(root: str | Path, candidates: Iterable[str | Path]) -> Path | None:
    """The first of ``candidates`` (absolute, or relative to ``root``) that exists."""
    root = Path(root)
    for c in candidates:
        p = Path(c)
        p = p if p.is_absolute() else root / p
        if p.exists():
            return p
    return None


def require_file(root: str | Path, candidates: Sequence[str | Path], what: str, benchmark: str) -> Path:
    """Like :func:`find_file` but raises ``FileNotFoundError`` listing everything that was tried."""
    p = find_file(root, candidates)
    if p is None:
        tried = ", ".join(str(Path(root) / c) for c in candidates)
        raise FileNotFoundError(f"{benchmark}: no {what} found (looked for {tried})")
    return p


def load_llava_questions(path: str | Path, image_root: str | Path | None = None,
                         extra_required: Sequence[str] = ()) -> list[Question]:
    """Read a LLaVA question jsonl into :class:`Question` objects (keys assigned, extra fields kept in metadata)."""
    rows = read_jsonl(path, required=("question_id", "text", *extra_required))
    out: list[Question] = []
    for lineno, r in enumerate(rows, start=1):
        if not isinstance(r["text"], str):
            raise BenchmarkFormatError(path, "'text' must be a string", lineno)
        meta = {k: v for k, v in r.items() if k not in ("question_id", "text", "image", "category")}
        out.append(Question(question_id=r["question_id"], text=r["text"], image=r.get("image"),
                            category=r.get("category"), metadata=meta,
                            image_root=str(image_root) if image_root is not None else None))
    return assign_keys(out)


@dataclass
class AnswerRecord:
    """One line of a LLaVA answers jsonl."""

    question_id: int | str
    text: str
    prompt: str | None = None
    answer_id: str | None = None
    model_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def load_answers(path: str | Path) -> list[AnswerRecord]:
    """Read an answers jsonl written by ``model_vqa_loader.py`` & co. (``question_id`` and ``text`` required)."""
    rows = read_jsonl(path, required=("question_id", "text"))
    out = []
    for lineno, r in enumerate(rows, start=1):
        if not isinstance(r["text"], str):
            raise BenchmarkFormatError(path, "'text' must be a string", lineno)
        extra = {k: v for k, v in r.items()
                 if k not in ("question_id", "text", "prompt", "answer_id", "model_id", "metadata")}
        out.append(AnswerRecord(question_id=r["question_id"], text=r["text"], prompt=r.get("prompt"),
                                answer_id=r.get("answer_id"), model_id=r.get("model_id"),
                                metadata=r.get("metadata") or {}, extra=extra))
    return out


def match_answers(questions: Sequence[Question], records: Sequence[AnswerRecord]) -> dict[str, str]:
    """Map answer records onto ``Question.key``.

    Records are matched by ``str(question_id)``.  Where an id is shared by several questions (MME, TextVQA) the record
    whose ``prompt`` equals the question's :attr:`Question.record_prompt` wins, else the next unused record of that id
    in file order.  Records of unknown ids are ignored; a later duplicate of a unique id overrides an earlier one (as
    the ``{question_id: ...}`` dicts of the official scripts do).
    """
    by_id: dict[str, list[AnswerRecord]] = {}
    for r in records:
        by_id.setdefault(str(r.question_id), []).append(r)
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(str(q.question_id), []).append(q)
    out: dict[str, str] = {}
    for qid, qs in groups.items():
        recs = by_id.get(qid, [])
        if not recs:
            continue
        if len(qs) == 1:
            out[qs[0].key] = recs[-1].text
            continue
        used: set[int] = set()
        pending = []
        for q in qs:
            hit = next((i for i, r in enumerate(recs) if i not in used and r.prompt == q.record_prompt), None)
            if hit is None:
                pending.append(q)
            else:
                used.add(hit)
                out[q.key] = recs[hit].text
        free = [i for i in range(len(recs)) if i not in used]
        for q, i in zip(pending, free):
            out[q.key] = recs[i].text
    return out


def answers_from_file(path: str | Path, questions: Sequence[Question]) -> dict[str, str]:
    """``match_answers(questions, load_answers(path))``."""
    return match_answers(questions, load_answers(path))


def write_answers(path: str | Path, questions: Sequence[Question], outputs: Mapping[str, str],
                  model_id: str, extra: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write an answers jsonl in LLaVA's format, in question order, for questions that have an output.

    ``answer_id`` is a random 22-character id (LLaVA uses ``shortuuid``; only its uniqueness matters).  ``extra`` adds
    per-key fields (e.g. MMBench's ``round_id`` / ``options``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for q in questions:
            if q.key not in outputs:
                continue
            rec: dict[str, Any] = {"question_id": q.question_id, "prompt": q.record_prompt, "text": outputs[q.key]}
            if extra and q.key in extra:
                rec.update(extra[q.key])
            rec.update({"answer_id": uuid.uuid4().hex[:22], "model_id": model_id, "metadata": {}})
            f.write(json.dumps(rec) + "\n")
    return path
