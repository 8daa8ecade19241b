"""MME: 14 yes/no subtasks, acc + acc+ per image pair, perception / cognition totals.

Official pieces reproduced:

* ``convert_answer_to_mme.py`` from LLaVA's eval.zip (haotian-liu/LLaVA @ 32cebc3809441cc40d8ac7b2855d148308741f2a,
  ``playground/data/eval/MME/``): the ground truth of a ``llava_mme.jsonl`` question is looked up in the official
  ``{category}/[questions_answers_YN/]{image_stem}.txt`` files (lines ``question\\tanswer``) by the prompt with
  ``Answer the question using a single word or phrase.`` removed and stripped, then `` Please answer yes or no.``
  appended, falling back to two spaces before "Please" when that key is absent.
* ``eval_tool/calculation.py`` (MME authors' tool; public copies, e.g. zjunlp/Deco): gt and prediction lowercased;
  prediction -> ``yes``/``no`` if exactly that, else the first 4 characters decide: contains "yes" -> yes, elif
  contains "no" -> no, else "other" (always wrong).  Per subtask ``acc`` = fraction of questions right, ``acc_plus`` =
  fraction of images with both questions right, score = ``(acc + acc_plus) * 100``; Perception = sum of 10 subtasks
  (max 2000), Cognition = sum of 4 (max 800).
* ``protocol="lmms_eval"``: lmms-eval ``mme`` parser (``.lower().strip()``, periods deleted, single ``y``/``n``
  accepted) with the same aggregation (@ 75571cfe).

lmms-lab layout (``lmms-lab/MME``, split ``test``, 2,374 rows): columns ``question_id`` (``"{category}/{image file}"``,
shared by an image's two questions), ``question`` (with `` Please answer yes or no.``), ``answer`` (``Yes``/``No``),
``category``, ``image``.  lmms-eval's prompt (``mme_doc_to_text``): ``question.strip()``, the MME suffix removed,
``"\nAnswer the question using a single word or phrase."`` appended -- LLaVA's prompt but for the strip.  lmms-eval's
aggregation (``mme_aggregate_results``: per image ``acc + acc+`` averaged over images) equals calculation.py's
whenever every image has its two questions; its ground truth also drops ``.``.

Deviations: calculation.py pairs *consecutive lines* of the per-category txt that convert_answer_to_mme.py writes
(answers-file order) and breaks on predictions containing a tab or newline; here the two questions of an image are
grouped by image (same result for well-formed files) and predictions are used whole.  Subtasks absent from the
questions are reported in ``missing_subtasks`` instead of crashing.
"""

from __future__ import annotations

import os
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
    scoring_protocol,
    tag_protocol,
)
from .files import find_file, load_llava_questions

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
LLAVA_QUESTION_FILES = ("llava_mme.jsonl",)
DATA_DIRS = ("MME_Benchmark_release_version",)
MME_SUFFIX = " Please answer yes or no."
_LLAVA_SUFFIX_TEXT = "Answer the question using a single word or phrase."


def mme_parse(pred: str) -> str:
    """calculation.py ``parse_pred_ans`` after lowercasing: ``"yes"``, ``"no"`` or ``"other"``."""
    pred = pred.lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_parse_lmms(pred: str) -> str:
    """lmms-eval ``mme`` ``parse_pred_ans``."""
    pred = pred.lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    prefix = pred[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def read_mme_ground_truth(data_dir: str | Path) -> dict[tuple[str, str, str], tuple[str, str]]:
    """``(category, txt_name, question) -> (answer, image_relpath)`` over an MME release folder (``get_gt``)."""
    data_dir = Path(data_dir)
    gt: dict[tuple[str, str, str], tuple[str, str]] = {}
    for category in sorted(os.listdir(data_dir)):
        cdir = data_dir / category
        if not cdir.is_dir():
            continue
        if (cdir / "images").exists():
            img_dir, qa_dir = cdir / "images", cdir / "questions_answers_YN"
        else:
            img_dir = qa_dir = cdir
        if not qa_dir.is_dir():
            raise BenchmarkFormatError(qa_dir, "MME category folder without its questions_answers_YN folder")
        images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
        for txt in sorted(qa_dir.glob("*.txt")):
            stem = txt.stem
            rel = images[stem].relative_to(data_dir).as_posix() if stem in images else f"{category}/{stem}.jpg"
            with open(txt, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise BenchmarkFormatError(txt, f"expected 'question<TAB>answer', got {len(parts)} field(s)",
                                                   lineno)
                    gt[(category, txt.name, parts[0])] = (parts[1], rel)
    return gt


def llava_prompt_to_mme_question(prompt: str) -> str:
    """convert_answer_to_mme.py: strip LLaVA's suffix and put MME's `` Please answer yes or no.`` back."""
    if _LLAVA_SUFFIX_TEXT in prompt:
        prompt = prompt.replace(_LLAVA_SUFFIX_TEXT, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt = prompt + MME_SUFFIX
    return prompt


def mme_prompt(question: str, protocol: str = "llava") -> str:
    """The prompt of an MME question (`` Please answer yes or no.`` -> LLaVA's short-answer suffix)."""
    if protocol == "lmms_eval":
        return question.strip().replace(MME_SUFFIX, "") + SHORT_ANSWER_SUFFIX
    return question.replace(MME_SUFFIX, SHORT_ANSWER_SUFFIX) if MME_SUFFIX in question else question + SHORT_ANSWER_SUFFIX


def load_lmms_mme(root: str | Path, protocol: str = "llava", *, config: str | None = None, split: str | None = None,
                  check_images: bool = True) -> list[Question]:
    """``lmms-lab/MME`` rows as questions (see the module docstring)."""
    table = hfdata.select_table(root, "lmms-lab/MME", (None,), ("test",), config=config, split=split)
    out: list[Question] = []
    seen: dict = {}
    for path, row, rec in hfdata.read_rows(table, ("question_id", "question", "answer", "category", "image")):
        qid = hfdata.require(path, row, rec, "question_id", str)
        question = hfdata.require(path, row, rec, "question", str)
        hfdata.check_unique(seen, (qid, question), path, row, "(question_id, question)")
        out.append(Question(question_id=qid, text=mme_prompt(question, protocol),
                            answers=[hfdata.require(path, row, rec, "answer", str)],
                            category=hfdata.require(path, row, rec, "category", str),
                            image_blob=hfdata.image_blob(path, row, rec, check=check_images),
                            metadata={"mme_question": question}))
    return assign_keys(out)


class MME(BenchmarkBase):
    """MME (LLaVA-1.5-7B perception: 1510.7)."""

    name = "mme"
    layout = "llava_mme.jsonl + MME_Benchmark_release_version/ (images and ground truth)"
    has_submission = True

    protocols = PROTOCOLS
    layout_lmms = "lmms-lab/MME: parquet shards / datasets cache / save_to_disk (test split)"
    scorers = {"llava": "MME eval_tool/calculation.py (acc + acc+ per subtask)",
               "lmms_eval": "lmms-eval mme (parse_pred_ans, acc + acc+ per subtask)"}

    def load(self, root: str | Path, *, protocol: str = "llava", question_file: str | Path | None = None,
             data_dir: str | Path | None = None, config: str | None = None, split: str | None = None,
             check_images: bool = True, **_: Any) -> list[Question]:
        """LLaVA's layout (:meth:`load_official`) or, where ``root`` holds none of its files, the lmms-lab dataset
        (:func:`load_lmms_mme`); ``protocol`` picks the prompts and the default scorer."""
        check_protocol(self.name, protocol)
        qs = hfdata.load_either(
            root, [question_file or LLAVA_QUESTION_FILES[0], data_dir or DATA_DIRS[0]],
            lambda: self.load_official(root, question_file=question_file, data_dir=data_dir),
            lambda: load_lmms_mme(root, protocol, config=config, split=split, check_images=check_images),
            "lmms-lab/MME")
        if protocol == "lmms_eval":
            for q in qs:
                q.text = mme_prompt(q.metadata.get("mme_question") or llava_prompt_to_mme_question(q.text), protocol)
        return tag_protocol(qs, protocol)

    def load_official(self, root: str | Path, *, question_file: str | Path | None = None,
                      data_dir: str | Path | None = None, **_: Any) -> list[Question]:
        """``llava_mme.jsonl`` with ground truth from ``MME_Benchmark_release_version/`` (also the image root);
        without the LLaVA file the questions are built from the release folder (`` Please answer yes or no.`` replaced
        by LLaVA's short-answer suffix, categories and files in sorted order)."""
        root = Path(root)
        ddir = find_file(root, [data_dir] if data_dir else DATA_DIRS)
        gt = read_mme_ground_truth(ddir) if ddir is not None else None
        qf = find_file(root, [question_file] if question_file else LLAVA_QUESTION_FILES)
        if qf is not None:
            qs = load_llava_questions(qf, ddir if ddir is not None else root / DATA_DIRS[0])
            for lineno, q in enumerate(qs, start=1):
                category = str(q.question_id).split("/")[0]
                q.category = q.category or category
                if gt is None:
                    continue
                txt = str(q.question_id).split("/")[-1].split(".")[0] + ".txt"
                question = llava_prompt_to_mme_question(q.text)
                if (category, txt, question) not in gt:
                    question = question.replace(MME_SUFFIX, "  Please answer yes or no.")
                hit = gt.get((category, txt, question))
                if hit is None:
                    raise BenchmarkFormatError(qf, f"no MME ground truth for {q.question_id!r} / {question!r}", lineno)
                q.answers = [hit[0]]
                q.metadata["mme_question"] = question
            return qs
        if gt is None:
            raise FileNotFoundError(f"mme: neither {LLAVA_QUESTION_FILES[0]} nor {DATA_DIRS[0]}/ under {root}")
        out = []
        for (category, _txt, question), (answer, rel) in gt.items():
            out.append(Question(question_id=rel, text=mme_prompt(question), image=rel, answers=[answer], category=category,
                                image_root=str(ddir), metadata={"mme_question": question}))
        return assign_keys(out)

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], *, protocol: str | None = None,
              strict: bool = False, **_: Any) -> dict[str, Any]:
        """Per-subtask ``acc`` / ``acc_plus`` (percent) and ``score``; ``perception``, ``cognition`` and ``total``
        (``protocol`` defaults to the one the questions were loaded with)."""
        protocol = scoring_protocol(self.name, questions, protocol)
        parse = mme_parse if protocol == "llava" else mme_parse_lmms
        scored = [q for q in questions if q.answers]
        if not scored:
            raise ValueError("mme: no question has a ground-truth answer (load MME_Benchmark_release_version/)")
        texts, n_missing = collect_answers(scored, answers, strict, self.name)
        tasks: dict[str, dict[str, list[bool]]] = {}
        n_other = 0
        for q, text in zip(scored, texts):
            gt = q.answers[0].lower()
            if protocol == "lmms_eval":
                gt = gt.strip().replace(".", "")
            if gt not in ("yes", "no"):
                raise ValueError(f"mme: ground truth of {q.key!r} is {q.answers[0]!r}, not yes/no")
            pred = parse(text)
            n_other += pred == "other"
            tasks.setdefault(q.category or "default", {}).setdefault(str(q.image or q.question_id), []).append(
                pred == gt)
        per: dict[str, Any] = {}
        for task, images in tasks.items():
            bad = [img for img, v in images.items() if len(v) != 2]
            if bad:
                raise ValueError(f"mme: subtask {task!r} image {bad[0]!r} has {len(images[bad[0]])} question(s), "
                                 f"calculation.py needs exactly 2 per image")
            flat = [x for v in images.values() for x in v]
            acc = sum(flat) / len(flat)
            acc_plus = sum(1 for v in images.values() if all(v)) / len(images)
            per[task] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * acc + 100 * acc_plus,
                         "n_images": len(images)}
        perception = sum(per[t]["score"] for t in PERCEPTION if t in per)
        cognition = sum(per[t]["score"] for t in COGNITION if t in per)
        return {"perception": perception, "cognition": cognition, "total": perception + cognition,
                "n": len(scored), "n_missing": n_missing, "n_other": n_other, "protocol": protocol,
                "scorer": self.scorers[protocol],
                "missing_subtasks": [t for t in PERCEPTION + COGNITION if t not in per],
                "per_subtask": per}

    def write_submission(self, questions: Sequence[Question], answers: Mapping[Any, str], path: str | Path,
                         **_: Any) -> Path:
        """The ``eval_tool/answers/<experiment>/`` folder convert_answer_to_mme.py writes (``{category}.txt``, lines
        ``image_txt\\tquestion\\tgt\\tprediction``), for cross-checking with the official calculation.py."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        lines: dict[str, list[str]] = {}
        for q in questions:
            a = lookup_answer(answers, q)
            if a is None or not q.answers:
                continue
            txt = str(q.question_id).split("/")[-1].split(".")[0] + ".txt"
            question = q.metadata.get("mme_question") or llava_prompt_to_mme_question(q.text)
            lines.setdefault(q.category or "default", []).append("\t".join((txt, question, q.answers[0], a)) + "\n")
        for category, ls in lines.items():
            (folder / f"{category}.txt").write_text("".join(ls), encoding="utf-8")
        return folder

