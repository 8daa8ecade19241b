"""SEED-Bench v1: LLaVA question file / raw ``SEED-Bench.json``, exact-match letter accuracy, upload jsonl.

Official pieces reproduced:

* ``scripts/convert_seed_for_submission.py`` (haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd):
  accuracy per ``question_type_id`` with **exact string equality** ``text == answer`` (no letter extraction, so
  ``"A."`` or ``" A"`` are wrong); a question without a result counts as wrong; totals over all questions and over
  ``data_type == "image"`` / ``"video"``; upload file = jsonl ``{"question_id", "prediction"}`` over the annotation's
  questions (the script raises ``KeyError`` for a question without a result: so does :meth:`write_submission`).
  Result ids are matched as ``int(question_id)`` with a string fallback, i.e. regardless of type (as here).
* ``protocol="lmms_eval"``: lmms-eval ``seedbench`` (@ 75571cfe): prediction stripped, cut to its first character,
  compared case-insensitively.
* Prompt (``seed_doc_to_text`` of lmms-eval; LLaVA docs' multiple-choice layout):
  ``{question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer with the option's letter from the given choices directly.``
  Images: ``SEED-Bench-image/{data_id}`` (SEED-Bench's own loader joins ``data_id`` as is); video questions use the
  middle frame ``SEED-Bench-video-image/{question_type_id}_{question_id}.png`` (layout of ``llava-seed-bench.jsonl`` as
  seen in third-party copies; UNVERIFIED against the file itself).

lmms-lab layout (``lmms-lab/SEED-Bench``, split ``test``): columns ``question_id``, ``question``, ``choice_a`` ..
``choice_d``, ``answer``, ``data_type``, ``question_type_id``, ``data_id``, ``image`` (a *list* of images:
``seed_doc_to_visual`` passes them all).  A row with several images (video questions) gives LLaVA its middle one
(LLaVA's own SEED files hold the video's middle frame; that the two coincide is UNVERIFIED).  Question type names
come from :data:`SEED_QUESTION_TYPES` (SEED-Bench v1's ``question_type`` table).  The lmms-eval prompt is LLaVA's.
"""

from __future__ import annotations

import json
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
from .files import find_file, load_llava_questions, read_json

LLAVA_QUESTION_FILES = ("llava-seed-bench.jsonl",)
ANNOTATION_FILES = ("SEED-Bench.json",)
_REQUIRED = ("question_id", "question", "answer", "choice_a", "choice_b", "choice_c", "choice_d", "data_type",
             "question_type_id")


#: SEED-Bench v1 ``question_type`` (``SEED-Bench.json``): name of each ``question_type_id``.
SEED_QUESTION_TYPES = {1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes",
                       4: "Instance Location", 5: "Instances Counting", 6: "Spatial Relation",
                       7: "Instance Interaction", 8: "Visual Reasoning", 9: "Text Understanding",
                       10: "Action Recognition", 11: "Action Prediction", 12: "Procedure Understanding"}


def load_lmms_seed(root: str | Path, protocol: str = "llava", *, config: str | None = None, split: str | None = None,
                   check_images: bool = True, names: Mapping[int, str] | None = None) -> list[Question]:
    """``lmms-lab/SEED-Bench`` rows as questions (see the module docstring)."""
    table = hfdata.select_table(root, "lmms-lab/SEED-Bench", (None,), ("test",), config=config, split=split)
    names = SEED_QUESTION_TYPES if names is None else names
    out: list[Question] = []
    seen: dict = {}
    for path, row, rec in hfdata.read_rows(table, _REQUIRED + ("image",), ("data_id",)):
        for col in ("question", "answer", "choice_a", "choice_b", "choice_c", "choice_d", "data_type"):
            hfdata.require(path, row, rec, col, str)
        qid = hfdata.require(path, row, rec, "question_id", (str, int))
        hfdata.require(path, row, rec, "question_type_id", (int, str))
        hfdata.check_unique(seen, str(qid), path, row, "question_id")
        q = Question(question_id=qid, text=build_prompt(rec),
                     image_blob=hfdata.image_blob(path, row, rec, check=check_images))
        _attach(q, rec, names)
        out.append(q)
    return assign_keys(out)


def read_seed_annotations(path: str | Path) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """``(questions, {question_type_id: name})`` from ``SEED-Bench.json``."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise BenchmarkFormatError(path, "expected an object with a 'questions' list")
    for i, q in enumerate(data["questions"]):
        if not isinstance(q, dict) or not set(_REQUIRED) <= set(q):
            missing = [k for k in _REQUIRED if not isinstance(q, dict) or k not in q]
            raise BenchmarkFormatError(path, f"question #{i} lacks {', '.join(missing)}")
    names = {int(v): str(k) for k, v in (data.get("question_type") or {}).items()}
    return data["questions"], names


def build_prompt(q: Mapping[str, Any]) -> str:
    """LLaVA / lmms-eval SEED prompt for an annotation record."""
    return (f"{q['question']}\nA. {q['choice_a']}\nB. {q['choice_b']}\nC. {q['choice_c']}\nD. {q['choice_d']}"
            + MC_LETTER_SUFFIX)


def _attach(q: Question, a: Mapping[str, Any], names: Mapping[int, str]) -> None:
    q.answers = [str(a["answer"])]
    tid = int(a["question_type_id"])
    q.options = {"A": a["choice_a"], "B": a["choice_b"], "C": a["choice_c"], "D": a["choice_d"]}
    q.split = str(a["data_type"])
    q.category = names.get(tid, str(tid))
    q.metadata.update(question_type_id=tid, data_type=a["data_type"], data_id=a.get("data_id"),
                      annotation_question_id=a["question_id"])


class SEEDBench(BenchmarkBase):
    """SEED-Bench v1 (LLaVA-1.5 "SEED" = all; LLaVA-1.6 "SEED-IMG" = image part)."""

    name = "seed"
    layout = "llava-seed-bench.jsonl (image paths relative to the root) + SEED-Bench.json (ground truth)"
    has_submission = True

    protocols = PROTOCOLS
    layout_lmms = "lmms-lab/SEED-Bench: parquet shards / datasets cache / save_to_disk (test split)"
    scorers = {"llava": "LLaVA convert_seed_for_submission.py (exact string match)",
               "lmms_eval": "lmms-eval seedbench (first character, case-insensitive)"}

    def load(self, root: str | Path, *, protocol: str = "llava", question_file: str | Path | None = None,
             annotation_file: str | Path | None = None, data_type: str | None = None, config: str | None = None,
             split: str | None = None, check_images: bool = True, **kw: Any) -> list[Question]:
        """LLaVA's layout (:meth:`load_official`) or, where ``root`` holds none of its files, the lmms-lab dataset
        (:func:`load_lmms_seed`); ``protocol`` picks the default scorer (both use the same prompt)."""
        check_protocol(self.name, protocol)
        qs = hfdata.load_either(
            root, [question_file or LLAVA_QUESTION_FILES[0], annotation_file or ANNOTATION_FILES[0]],
            lambda: self.load_official(root, question_file=question_file, annotation_file=annotation_file, **kw),
            lambda: load_lmms_seed(root, protocol, config=config, split=split, check_images=check_images),
            "lmms-lab/SEED-Bench")
        if data_type is not None:
            qs = [q for q in qs if q.split == data_type]
        return tag_protocol(qs, protocol)

    def load_official(self, root: str | Path, *, question_file: str | Path | None = None,
                      annotation_file: str | Path | None = None, image_folder: str | Path | None = None,
                      data_type: str | None = None, **_: Any) -> list[Question]:
        """``llava-seed-bench.jsonl`` (image paths relative to ``root``) with ground truth from ``SEED-Bench.json``;
        without the LLaVA file, questions built from the annotation.  ``data_type`` ("image"/"video") filters."""
        root = Path(root)
        img = root / image_folder if image_folder else root
        af = find_file(root, [annotation_file] if annotation_file else ANNOTATION_FILES)
        if annotation_file and af is None:
            raise FileNotFoundError(f"seed: annotation file {annotation_file} not found under {root}")
        anns, names = read_seed_annotations(af) if af is not None else (None, {})
        qf = find_file(root, [question_file] if question_file else LLAVA_QUESTION_FILES)
        if qf is not None:
            qs = load_llava_questions(qf, img)
            if anns is not None:
                by_id = {str(a["question_id"]): a for a in anns}
                for q in qs:
                    a = by_id.get(str(q.question_id))
                    if a is not None:
                        _attach(q, a, names)
        elif anns is not None:
            qs = []
            for a in anns:
                if a["data_type"] == "image":
                    image = f"SEED-Bench-image/{a.get('data_id')}"
                else:
                    image = f"SEED-Bench-video-image/{a['question_type_id']}_{a['question_id']}.png"
                q = Question(question_id=a["question_id"], text=build_prompt(a), image=image, image_root=str(img))
                _attach(q, a, names)
                qs.append(q)
            qs = assign_keys(qs)
        else:
            raise FileNotFoundError(f"seed: neither {LLAVA_QUESTION_FILES[0]} nor {ANNOTATION_FILES[0]} under {root}")
        if data_type is not None:
            qs = [q for q in qs if q.split == data_type]
        return qs

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], *, protocol: str | None = None,
              strict: bool = False, **_: Any) -> dict[str, Any]:
        """Accuracy (percent): ``accuracy`` (all), ``image``, ``video``, ``per_question_type`` (``protocol`` defaults
        to the one the questions were loaded with)."""
        protocol = scoring_protocol(self.name, questions, protocol)
        scored = [q for q in questions if q.answers]
        if not scored:
            raise ValueError("seed: no question has a ground-truth answer (load SEED-Bench.json)")
        texts, n_missing = collect_answers(scored, answers, strict, self.name)
        per_type: dict[int, list[bool]] = {}
        per_split: dict[str, list[bool]] = {}
        names: dict[int, str] = {}
        for q, text in zip(scored, texts):
            if protocol == "llava":
                ok = text == q.answers[0]
            else:
                pred = text.strip()
                pred = pred[0] if len(pred) > 1 else pred
                ok = pred.lower().strip() == q.answers[0].lower().strip()
            tid = int(q.metadata.get("question_type_id", 0))
            names[tid] = q.category or str(tid)
            per_type.setdefault(tid, []).append(ok)
            per_split.setdefault(str(q.split), []).append(ok)
        acc = lambda xs: pct(sum(xs), len(xs))
        flat = [x for v in per_type.values() for x in v]
        out: dict[str, Any] = {"accuracy": acc(flat), "n": len(flat), "n_missing": n_missing, "protocol": protocol,
                               "scorer": self.scorers[protocol]}
        for split in ("image", "video"):
            if split in per_split:
                out[split] = acc(per_split[split])
        out["per_question_type"] = {names[t]: acc(per_type[t]) for t in sorted(per_type)}
        return out

    def write_submission(self, questions: Sequence[Question], answers: Mapping[Any, str], path: str | Path,
                         **_: Any) -> Path:
        """Upload jsonl ``{"question_id", "prediction"}`` per question (KeyError if one has no answer, as official)."""
        lines = []
        for q in questions:
            a = lookup_answer(answers, q)
            if a is None:
                raise KeyError(f"seed: no answer for question {q.question_id!r} (convert_seed_for_submission.py needs "
                               f"every question)")
            qid = q.metadata.get("annotation_question_id", q.question_id)
            lines.append(json.dumps({"question_id": qid, "prediction": a}) + "\n")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines), encoding="utf-8")
        return path
