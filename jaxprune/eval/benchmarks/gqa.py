"""GQA testdev-balanced: LLaVA question file / raw GQA questions json, exact-match accuracy.

Official pieces reproduced:

* ``scripts/convert_gqa_for_eval.py`` (haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd): prediction =
  ``text.rstrip('.').lower()``, written as ``[{"questionId", "prediction"}]`` (:meth:`GQA.write_submission`).
* The GQA ``eval.py`` (cs.stanford.edu/people/dorarad/gqa/evaluate.html, with LLaVA's gist patch that tolerates the
  missing scene-graph / choices assets; public copies read for this): over questions with ``isBalanced``,
  ``correct = (prediction == answer)`` with no further normalisation; ``accuracy``, ``binary`` / ``open`` (open iff
  ``types.structural == "query"``) and accuracy per structural and per semantic type, all in percent.  Validity,
  plausibility, consistency, grounding and distribution need assets absent from testdev and are not computed.
* ``protocol="lmms_eval"``: lmms-eval ``gqa`` (@ 75571cfe): the task pipeline strips every generated answer
  (``lmms_eval/api/task.py``, ``ConfigurableTask.process_results``: ``res.strip()``) before the metric, then
  ``exact_match_hf_evaluate`` (``lmms_eval/api/metrics.py``) with ``ignore_case`` and ``ignore_punctuation``:
  lowercase, every ``string.punctuation`` character deleted from both sides (the reference is not stripped), equality
  of NumPy unicode arrays -- which drop trailing NUL characters, so ``"yes\x00"`` equals ``"yes"`` (kept).

lmms-lab layout (``lmms-lab/GQA``): config ``testdev_balanced_instructions`` (split ``testdev``; columns ``id``,
``imageId``, ``question``, ``answer``, ``fullAnswer``, ``isBalanced``, ``types`` {structural, semantic, detailed},
``groups``, ``entailed``, ``equivalent``, ``annotations``, ``semantic``, ``semanticStr``) joined by ``imageId`` to config
``testdev_balanced_images`` (split ``testdev``; columns ``id``, ``image``), as lmms-eval's ``gqa_process_docs`` does.
Both configs must be under ``--data``.  The prompt (``gqa_doc_to_text``) is LLaVA's: question + short-answer suffix.

Deviation: eval.py raises when a balanced question has no prediction; here it scores as ``""`` (``n_missing``).
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import hfdata
from .base import (
    PROTOCOLS,
    SHORT_ANSWER_SUFFIX,
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
from .files import find_file, load_llava_questions, read_json

LLAVA_QUESTION_FILES = ("llava_gqa_testdev_balanced.jsonl",)
RAW_QUESTION_FILES = ("data/testdev_balanced_questions.json", "testdev_balanced_questions.json")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def lmms_exact_match(prediction: str, reference: str) -> bool:
    """lmms-eval ``gqa``: stripped prediction vs reference, case and ``string.punctuation`` ignored (NumPy str
    semantics: trailing NULs do not count)."""
    norm = lambda s: s.lower().translate(_PUNCT_TABLE).rstrip("\x00")
    return norm(prediction.strip()) == norm(reference)


def llava_gqa_prediction(text: str) -> str:
    """``convert_gqa_for_eval.py``: strip trailing periods, lowercase."""
    return text.rstrip(".").lower()


def read_gqa_questions(path: str | Path) -> dict[str, dict[str, Any]]:
    """The official ``{questionId: {imageId, question, answer, isBalanced, types, ...}}`` file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise BenchmarkFormatError(path, "expected a JSON object {questionId: question}")
    for qid, q in data.items():
        if not isinstance(q, dict) or not {"imageId", "question"} <= set(q):
            raise BenchmarkFormatError(path, f"question {qid!r} lacks 'imageId' or 'question'")
    return data


def _attach(q: Question, raw: dict[str, Any]) -> None:
    if "answer" in raw:
        q.answers = [str(raw["answer"])]
    types = raw.get("types") or {}
    q.metadata.update(is_balanced=bool(raw.get("isBalanced", True)), structural=types.get("structural"),
                      semantic=types.get("semantic"), detailed=types.get("detailed"),
                      full_answer=raw.get("fullAnswer"))
    q.category = types.get("semantic") or q.category
    q.split = types.get("structural") or q.split


INSTRUCTIONS_CONFIG = "testdev_balanced_instructions"
IMAGES_CONFIG = "testdev_balanced_images"


def load_lmms_gqa(root: str | Path, *, split: str | None = None, check_images: bool = True) -> list[Question]:
    """``lmms-lab/GQA`` instructions joined to its images by ``imageId`` (see the module docstring)."""
    itable = hfdata.select_table(root, "lmms-lab/GQA", (INSTRUCTIONS_CONFIG,), ("testdev",), config=INSTRUCTIONS_CONFIG,
                                 split=split)
    mtable = hfdata.select_table(root, "lmms-lab/GQA", (IMAGES_CONFIG,), ("testdev",), config=IMAGES_CONFIG,
                                 split=split)
    images: dict[str, Any] = {}
    seen: dict = {}
    for path, row, rec in hfdata.read_rows(mtable, ("id", "image")):
        image_id = hfdata.require(path, row, rec, "id", str)
        hfdata.check_unique(seen, image_id, path, row, "image id")
        images[image_id] = hfdata.image_blob(path, row, rec, check=check_images)
    out: list[Question] = []
    seen = {}
    for path, row, rec in hfdata.read_rows(itable, ("id", "imageId", "question", "answer"),
                                           ("isBalanced", "types", "fullAnswer")):
        qid = hfdata.require(path, row, rec, "id", str)
        image_id = hfdata.require(path, row, rec, "imageId", str)
        question = hfdata.require(path, row, rec, "question", str)
        hfdata.require(path, row, rec, "answer", str)
        hfdata.check_unique(seen, qid, path, row, "question id")
        if image_id not in images:
            raise BenchmarkFormatError(path, f"row {row}, column 'imageId': {image_id!r} is not in the "
                                             f"{IMAGES_CONFIG} table ({mtable.where})")
        types = rec.get("types")
        if types is not None and not isinstance(types, dict):
            raise BenchmarkFormatError(path, f"row {row}, column 'types': expected a struct, got {types!r:.80}")
        q = Question(question_id=qid, text=question + SHORT_ANSWER_SUFFIX, image_blob=images[image_id])
        _attach(q, {**rec, "isBalanced": True if rec.get("isBalanced") is None else rec["isBalanced"]})
        q.metadata["image_id"] = image_id
        out.append(q)
    return assign_keys(out)


class GQA(BenchmarkBase):
    """GQA testdev-balanced (LLaVA-1.5: 62.0 for 7B)."""

    name = "gqa"
    layout = ("llava_gqa_testdev_balanced.jsonl + data/images/, ground truth from "
              "data/testdev_balanced_questions.json")
    has_submission = True

    protocols = PROTOCOLS
    layout_lmms = ("lmms-lab/GQA: parquet shards / datasets cache / save_to_disk of both testdev_balanced_instructions "
                   "and testdev_balanced_images")
    scorers = {"llava": "LLaVA convert_gqa_for_eval.py + GQA eval.py (exact match)",
               "lmms_eval": "lmms-eval gqa (strip, exact_match ignore case + punctuation)"}

    def load(self, root: str | Path, *, protocol: str = "llava", question_file: str | Path | None = None,
             annotation_file: str | Path | None = None, split: str | None = None, check_images: bool = True,
             **kw: Any) -> list[Question]:
        """LLaVA's layout (:meth:`load_official`) or, where ``root`` holds none of its files, the lmms-lab dataset
        (:func:`load_lmms_gqa`); ``protocol`` is the default scorer (both use the same prompt)."""
        check_protocol(self.name, protocol)
        qs = hfdata.load_either(
            root, [question_file or LLAVA_QUESTION_FILES[0], annotation_file, *RAW_QUESTION_FILES],
            lambda: self.load_official(root, question_file=question_file, annotation_file=annotation_file, **kw),
            lambda: load_lmms_gqa(root, split=split, check_images=check_images),
            "lmms-lab/GQA")
        return tag_protocol(qs, protocol)

    def load_official(self, root: str | Path, *, question_file: str | Path | None = None,
                      annotation_file: str | Path | None = None, image_folder: str | Path | None = None,
                      **_: Any) -> list[Question]:
        """``llava_gqa_testdev_balanced.jsonl`` (images ``data/images/``) with ground truth from
        ``data/testdev_balanced_questions.json`` when present; without the LLaVA file the prompts are built from the raw
        questions (``question + short-answer suffix``, image ``{imageId}.jpg``)."""
        root = Path(root)
        img = root / (image_folder or "data/images")
        af = find_file(root, [annotation_file] if annotation_file else RAW_QUESTION_FILES)
        if annotation_file and af is None:
            raise FileNotFoundError(f"gqa: annotation file {annotation_file} not found under {root}")
        qf = find_file(root, [question_file] if question_file else LLAVA_QUESTION_FILES)
        raw = read_gqa_questions(af) if af is not None else None
        if qf is not None:
            qs = load_llava_questions(qf, img)
            if raw is not None:
                for q in qs:
                    hit = raw.get(str(q.question_id))
                    if hit is not None:
                        _attach(q, hit)
            return qs
        if raw is None:
            raise FileNotFoundError(f"gqa: neither {LLAVA_QUESTION_FILES[0]} nor {' / '.join(RAW_QUESTION_FILES)} "
                                    f"found under {root}")
        out = []
        for qid, r in raw.items():
            q = Question(question_id=qid, text=r["question"] + SHORT_ANSWER_SUFFIX, image=f"{r['imageId']}.jpg",
                         image_root=str(img))
            _attach(q, r)
            out.append(q)
        return assign_keys(out)

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], *, protocol: str | None = None,
              strict: bool = False, **_: Any) -> dict[str, Any]:
        """Exact-match accuracy (percent) over balanced questions with ground truth (``protocol`` defaults to the one
        the questions were loaded with)."""
        protocol = scoring_protocol(self.name, questions, protocol)
        scored = [q for q in questions if q.answers and q.metadata.get("is_balanced", True)]
        if not scored:
            raise ValueError("gqa: no question has a ground-truth answer (load testdev_balanced_questions.json)")
        texts, n_missing = collect_answers(scored, answers, strict, self.name)
        hits: list[bool] = []
        groups: dict[str, dict[str, list[bool]]] = {"binary_open": {}, "structural": {}, "semantic": {}}
        for q, text in zip(scored, texts):
            if protocol == "llava":
                ok = llava_gqa_prediction(text) == q.answers[0]
            else:
                ok = lmms_exact_match(text, q.answers[0])
            hits.append(ok)
            st = q.metadata.get("structural")
            if st is not None:
                groups["binary_open"].setdefault("open" if st == "query" else "binary", []).append(ok)
                groups["structural"].setdefault(str(st), []).append(ok)
            if q.metadata.get("semantic") is not None:
                groups["semantic"].setdefault(str(q.metadata["semantic"]), []).append(ok)
        acc = lambda xs: pct(sum(xs), len(xs))
        out: dict[str, Any] = {"accuracy": acc(hits), "n": len(hits), "n_missing": n_missing, "protocol": protocol,
                               "scorer": self.scorers[protocol]}
        for k, v in sorted(groups["binary_open"].items()):
            out[k] = acc(v)
        out["per_structural_type"] = {k: acc(v) for k, v in sorted(groups["structural"].items())}
        out["per_semantic_type"] = {k: acc(v) for k, v in sorted(groups["semantic"].items())}
        return out

    def write_submission(self, questions: Sequence[Question], answers: Mapping[Any, str], path: str | Path,
                         **_: Any) -> Path:
        """``testdev_balanced_predictions.json`` for the official eval.py (answered questions, question order)."""
        out = []
        for q in questions:
            a = lookup_answer(answers, q)
            if a is not None:
                out.append({"questionId": q.question_id, "prediction": llava_gqa_prediction(a)})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out), encoding="utf-8")
        return path
