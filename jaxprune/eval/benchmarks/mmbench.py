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

``protocol="lmms_eval"``: lmms-eval ``mmbench_en_dev`` (@ 75571cfe, ``lmms_eval/tasks/mmbench/en_utils.py``) prompt:
``"{hint} {question} There are several options:\nA. ...\nB. ..."`` (hint and a space only when the hint is present and
not ``"nan"``; options = the non-empty ``A``..``E`` cells other than ``"nan"``) + ``"\n"`` + the suffix (which starts
with ``\n``: a blank line before it).  Scoring: lmms-eval's default is its GPT matcher (not offline); the local score
here is its ``static`` evaluation (``mmbench_en_dev_static``), the same rule-based CircularEval as for ``llava``;
LLaVA's own number comes from the OpenCompass server.

lmms-lab layout (``lmms-lab/MMBench``, config ``en``, split ``dev``; ``lmms-lab/MMBench_EN`` without a config): columns
``index``, ``question``, ``hint``, ``A``..``D``, ``answer``, ``category``, ``L2-category`` (upper-case L, the TSV's
``l2-category``), ``source``, ``split``, ``comment``, ``image`` (an image struct, not base64).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import hfdata
from .base import (
    PROTOCOLS,
    MC_LETTER_SUFFIX,
    BenchmarkBase,
    BenchmarkFormatError,
    Question,
    assign_keys,
    check_protocol,
    collect_answers,
    lookup_answer,
    pct,
    scoring_protocol,
    tag_protocol,
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


def lmms_mmbench_prompt(question: str, hint: Any, choices: Mapping[str, Any]) -> str:
    """lmms-eval ``mmbench_doc_to_text`` (``create_options_prompt`` with ``"There are several options:"``)."""
    options = {k: v for k, v in sorted(choices.items()) if k in "ABCDE" and v}
    opts = "There are several options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items()
                                                    if not is_na_float(v) and v != "nan")
    opts = opts.rstrip("\n")
    has_hint = hint is not None and not is_na_float(hint) and hint != "nan"
    query = f"{hint} {question} {opts}" if has_hint else f"{question} {opts}"
    return f"{query}\n{MC_LETTER_SUFFIX}"


def is_na_float(value: Any) -> bool:
    """``pd.isna`` for the values a parquet cell holds (None, float NaN)."""
    return value is None or (isinstance(value, float) and value != value)


_LMMS_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "L2-category", "source",
                 "split", "comment", "E")


def load_lmms_mmbench(root: str | Path, protocol: str = "llava", *, config: str | None = None,
                      split: str | None = None, check_images: bool = True) -> list[Question]:
    """``lmms-lab/MMBench`` (``en``) rows as questions (see the module docstring)."""
    table = hfdata.select_table(root, "lmms-lab/MMBench", ("en", None), ("dev", "test"), config=config, split=split)
    out: list[Question] = []
    seen: dict = {}
    for path, row, rec in hfdata.read_rows(table, ("index", "question", "A", "B", "image"), _LMMS_COLUMNS):
        index = hfdata.require(path, row, rec, "index", int)
        question = hfdata.require(path, row, rec, "question", str)
        hfdata.check_unique(seen, index, path, row, "index")
        cells = {k: (None if is_na_float(v) else v) for k, v in rec.items() if k != "image"}
        if "L2-category" in cells:
            cells["l2-category"] = cells.pop("L2-category")
        options: list[str] = []
        for letter in "ABCD":
            v = cells.get(letter)
            if llava_is_none(v):
                break
            options.append(str(v))
        choices = {c: str(cells[c]) for c in "ABCD" if cells.get(c) is not None}
        hint = cells.get("hint")
        if protocol == "lmms_eval":
            text = lmms_mmbench_prompt(question, hint, {c: cells.get(c) for c in "ABCDE" if c in cells})
            prompt = text[:-len(MC_LETTER_SUFFIX)]
        else:
            prompt = llava_mmbench_prompt(question, hint, options)
            text = prompt + MC_LETTER_SUFFIX
        meta = dict(cells, choices=choices, row=row, source_file=str(path))
        answer = cells.get("answer")
        out.append(Question(question_id=index, text=text, answers=[] if answer is None else [str(answer)],
                            category=cells.get("category"), split=cells.get("split"),
                            options=dict(zip("ABCD", options)), metadata=meta, answer_file_prompt=prompt,
                            image_blob=hfdata.image_blob(path, row, rec, check=check_images)))
    return assign_keys(out)


def openpyxl_available() -> bool:
    """Whether the xlsx submission can be written."""
    return importlib.util.find_spec("openpyxl") is not None


class MMBench(BenchmarkBase):
    """MMBench-EN dev (LLaVA-1.5-7B: 64.3, server CircularEval)."""

    name = "mmbench"
    layout = "mmbench_dev_20230712.tsv (images inside, base64)"
    has_submission = True

    protocols = PROTOCOLS
    layout_lmms = "lmms-lab/MMBench: parquet shards / datasets cache / save_to_disk (en, dev split)"
    scorers = {"llava": "lmms-eval MMBench_Evaluator static CircularEval (LLaVA's number is server-scored)",
               "lmms_eval": "lmms-eval MMBench_Evaluator static CircularEval (mmbench_en_dev_static)"}

    def load(self, root: str | Path, *, protocol: str = "llava", question_file: str | Path | None = None,
             config: str | None = None, split: str | None = None, check_images: bool = True,
             **_: Any) -> list[Question]:
        """LLaVA's TSV (:meth:`load_official`) or, where ``root`` holds no TSV, the lmms-lab dataset
        (:func:`load_lmms_mmbench`); ``protocol`` picks the prompts."""
        check_protocol(self.name, protocol)
        qs = hfdata.load_either(
            root, [question_file or TSV_FILES[0]], lambda: self.load_official(root, question_file=question_file),
            lambda: load_lmms_mmbench(root, protocol, config=config, split=split, check_images=check_images),
            "lmms-lab/MMBench")
        if protocol == "lmms_eval":
            for q in qs:
                if q.image_blob is None:        # the TSV: rebuild lmms-eval's prompt from its cells
                    m = q.metadata
                    cells = {c: m.get(c) for c in "ABCDE" if c in m}
                    q.text = lmms_mmbench_prompt(str(m.get("question")), m.get("hint"), cells)
                    q.answer_file_prompt = q.text[:-len(MC_LETTER_SUFFIX)]
        return tag_protocol(qs, protocol)

    def load_official(self, root: str | Path, *, question_file: str | Path | None = None,
                      **_: Any) -> list[Question]:
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
              protocol: str | None = None, strict: bool = False, **_: Any) -> dict[str, Any]:
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
        protocol = scoring_protocol(self.name, questions, protocol)
        return {"circular_accuracy": acc(list(hits.values())), "protocol": protocol, "scorer": self.scorers[protocol],
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
