"""VQAv2: LLaVA test-dev question files, raw VQA json, local soft accuracy and the EvalAI upload file.

Official pieces reproduced:

* ``scripts/v1_5/eval/vqav2.sh`` + ``scripts/convert_vqav2_for_submission.py`` (haotian-liu/LLaVA @
  c121f0432da27facab705978f83c4ada465e46fd): upload = JSON list ``[{"question_id": int, "answer": str}]`` over **all**
  questions of ``llava_vqav2_mscoco_test2015.jsonl`` in file order, answer = ``EvalAIAnswerProcessor()(text)``, ``""``
  when the model produced nothing for a question (test-dev is a subset of test2015).
* Local accuracy (val): ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (GT-Vision-Lab/VQA @ a013f00) via
  :func:`jaxprune.eval.benchmarks.evalai.vqa_accuracy`, with overall / per answer type / per question type averages.

Protocols of :meth:`VQAv2.score`:

* ``"llava"`` (default): what the EvalAI server computes for LLaVA's upload: prediction = EvalAI-normalised text,
  then vqaEval.py (current version);
* ``"vqaeval"``: vqaEval.py on the raw text; ``"vqaeval_2015"``: the pre-2021 vqaEval.py;
* ``"lmms_eval"``: lmms-eval ``vqav2_val`` (raw text, punctuation + digit/article processing on both sides).

lmms-lab layout (``lmms-lab/VQAv2``, splits ``validation`` (214,354 rows; what lmms-eval ``vqav2_val`` scores),
``testdev``, ``test``): columns ``question_id``, ``question``, ``image_id``, ``image``, and on validation ``answers``
(10 structs ``{answer, answer_confidence, answer_id}``), ``answer_type``, ``question_type``,
``multiple_choice_answer``.  The prompt (``vqav2_doc_to_text``) is LLaVA's: question + short-answer suffix.  The split
taken by default is ``validation`` (scored locally), then ``testdev``; ``split=`` picks another.

Deviation: vqaEval.py refuses result files that do not cover every question; here a missing answer scores as ``""``
(``n_missing`` reports them; ``strict=True`` raises).  Averages are not rounded (vqaEval rounds to 2 decimals).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import hfdata
from .base import (
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
from .evalai import evalai_normalize, vqa_accuracy
from .files import find_file, load_llava_questions, read_json

LLAVA_QUESTION_FILES = ("llava_vqav2_mscoco_test-dev2015.jsonl", "llava_vqav2_mscoco_test2015.jsonl",
                        "llava_vqav2_mscoco_val2014.jsonl")
RAW_QUESTION_FILES = ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_OpenEnded_mscoco_test-dev2015_questions.json",
                      "v2_OpenEnded_mscoco_test2015_questions.json")
RAW_ANNOTATION_FILES = ("v2_mscoco_val2014_annotations.json",)
PROTOCOLS = ("llava", "vqaeval", "vqaeval_2015", "lmms_eval")


def load_raw_vqa(question_file: str | Path, annotation_file: str | Path | None = None,
                 image_root: str | Path | None = None) -> list[Question]:
    """Questions from the official ``v2_OpenEnded_mscoco_*_questions.json`` (+ annotations when given).

    The prompt is ``question + "\\nAnswer the question using a single word or phrase."`` (LLaVA's short-answer suffix)
    and the image ``COCO_{subtype}_{image_id:012d}.jpg`` with ``subtype`` = the file's ``data_subtype`` (test-dev2015
    images live in test2015); ``image_root`` defaults to the folder of that name next to the question file.
    """
    data = read_json(question_file)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise BenchmarkFormatError(question_file, "expected an object with a 'questions' list")
    subtype = data.get("data_subtype")
    if not subtype:
        raise BenchmarkFormatError(question_file, "missing 'data_subtype' (e.g. 'val2014'), needed for image names")
    subtype = str(subtype).replace("test-dev", "test")
    if image_root is None:
        image_root = Path(question_file).parent / subtype
    anns = read_vqa_annotations(annotation_file) if annotation_file is not None else {}
    out = []
    for i, q in enumerate(data["questions"]):
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= set(q):
            raise BenchmarkFormatError(question_file, f"question #{i} lacks question_id / image_id / question")
        a = anns.get(q["question_id"])
        meta: dict[str, Any] = {"image_id": q["image_id"], "question": q["question"]}
        answers: list[str] = []
        if a is not None:
            answers = a["answers"]
            meta.update(a["meta"])
        out.append(Question(question_id=q["question_id"], text=q["question"] + SHORT_ANSWER_SUFFIX,
                            image=f"COCO_{subtype}_{int(q['image_id']):012d}.jpg", answers=answers,
                            split=meta.get("answer_type"), metadata=meta,
                            image_root=str(image_root) if image_root is not None else None))
    return assign_keys(out)


def load_lmms_vqav2(root: str | Path, *, config: str | None = None, split: str | None = None,
                    check_images: bool = True) -> list[Question]:
    """``lmms-lab/VQAv2`` rows as questions (see the module docstring)."""
    table = hfdata.select_table(root, "lmms-lab/VQAv2", (None,), ("validation", "testdev", "test"), config=config,
                                split=split)
    out: list[Question] = []
    seen: dict = {}
    for path, row, rec in hfdata.read_rows(table, ("question_id", "question", "image_id", "image"),
                                           ("answers", "answer_type", "question_type", "multiple_choice_answer")):
        qid = hfdata.require(path, row, rec, "question_id", int)
        question = hfdata.require(path, row, rec, "question", str)
        hfdata.check_unique(seen, qid, path, row, "question_id")
        raw = rec.get("answers")
        answers: list[str] = []
        if raw is not None:
            if not isinstance(raw, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str)
                                                    for a in raw):
                raise BenchmarkFormatError(path, f"row {row}, column 'answers': expected a list of "
                                                 f"{{answer, answer_confidence, answer_id}} structs, got {raw!r:.80}")
            answers = [a["answer"] for a in raw]
        meta: dict[str, Any] = {"image_id": rec["image_id"], "question": question,
                                "question_type": rec.get("question_type"), "answer_type": rec.get("answer_type"),
                                "multiple_choice_answer": rec.get("multiple_choice_answer")}
        out.append(Question(question_id=qid, text=question + SHORT_ANSWER_SUFFIX, answers=answers,
                            split=meta["answer_type"], metadata=meta,
                            image_blob=hfdata.image_blob(path, row, rec, check=check_images)))
    return assign_keys(out)


class VQAv2(BenchmarkBase):
    """VQAv2 (LLaVA: test-dev2015 via the EvalAI server; local soft accuracy on val)."""

    name = "vqav2"
    layout = ("llava_vqav2_mscoco_test-dev2015.jsonl + test2015/ (LLaVA's eval layout), or the raw "
              "v2_OpenEnded_mscoco_*_questions.json [+ v2_mscoco_val2014_annotations.json] + val2014/")
    has_submission = True

    layout_lmms = "lmms-lab/VQAv2: parquet shards / datasets cache / save_to_disk (validation / testdev split)"
    protocols = PROTOCOLS
    scorers = {"llava": "EvalAI: LLaVA's EvalAIAnswerProcessor then vqaEval.py @ a013f00",
               "vqaeval": "vqaEval.py @ a013f00 on the raw text",
               "vqaeval_2015": "vqaEval.py @ 458a8b2 on the raw text",
               "lmms_eval": "lmms-eval vqav2_val (vqav2_process_results)"}

    def load(self, root: str | Path, *, protocol: str = "llava", question_file: str | Path | None = None,
             config: str | None = None, split: str | None = None, check_images: bool = True,
             **kw: Any) -> list[Question]:
        """LLaVA's layout / the raw VQA json (:meth:`load_official`) or, where ``root`` holds none of their files, the
        lmms-lab dataset (:func:`load_lmms_vqav2`); ``protocol`` (any of :data:`PROTOCOLS`) is the default scorer
        (every protocol uses the same prompt)."""
        check_protocol(self.name, protocol, PROTOCOLS)
        qs = hfdata.load_either(
            root, [question_file] if question_file else list(LLAVA_QUESTION_FILES + RAW_QUESTION_FILES),
            lambda: self.load_official(root, question_file=question_file, **kw),
            lambda: load_lmms_vqav2(root, config=config, split=split, check_images=check_images),
            "lmms-lab/VQAv2")
        return tag_protocol(qs, protocol)

    def load_official(self, root: str | Path, *, question_file: str | Path | None = None,
                      annotation_file: str | Path | None = None, image_folder: str | Path | None = None,
                      **_: Any) -> list[Question]:
        """LLaVA question jsonl if present (default ``llava_vqav2_mscoco_test-dev2015.jsonl``, images ``test2015/``),
        else the raw ``v2_OpenEnded_mscoco_*_questions.json`` (images ``val2014/`` ...).  ``annotation_file``
        (default ``v2_mscoco_val2014_annotations.json`` when present) attaches the 10 human answers."""
        root = Path(root)
        qf = find_file(root, [question_file] if question_file else LLAVA_QUESTION_FILES + RAW_QUESTION_FILES)
        if qf is None:
            tried = [question_file] if question_file else list(LLAVA_QUESTION_FILES + RAW_QUESTION_FILES)
            raise FileNotFoundError(f"vqav2: no question file under {root} (looked for {', '.join(map(str, tried))})")
        af = find_file(root, [annotation_file] if annotation_file else RAW_ANNOTATION_FILES)
        if annotation_file and af is None:
            raise FileNotFoundError(f"vqav2: annotation file {annotation_file} not found under {root}")
        if qf.suffix == ".jsonl":
            img = root / (image_folder or ("val2014" if "val2014" in qf.name else "test2015"))
            qs = load_llava_questions(qf, img)
            if af is not None:
                anns = read_vqa_annotations(af)
                for q in qs:
                    hit = anns.get(q.question_id)
                    if hit is not None:
                        q.answers = hit["answers"]
                        q.metadata.update(hit["meta"])
                        q.split = hit["meta"]["answer_type"]
            return qs
        return load_raw_vqa(qf, af, root / image_folder if image_folder else None)

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], *, protocol: str | None = None,
              strict: bool = False, **_: Any) -> dict[str, Any]:
        """Soft VQA accuracy (percent): ``accuracy``, ``per_answer_type``, ``per_question_type`` (``protocol``
        defaults to the one the questions were loaded with)."""
        protocol = scoring_protocol(self.name, questions, protocol, PROTOCOLS)
        scored = [q for q in questions if q.answers]
        if not scored:
            raise ValueError("vqav2: no question has ground-truth answers (test-dev is scored by the EvalAI server: "
                             "use write_submission)")
        texts, n_missing = collect_answers(scored, answers, strict, self.name)
        accs, by_atype, by_qtype = [], {}, {}
        for q, text in zip(scored, texts):
            if protocol == "llava":
                acc = vqa_accuracy(evalai_normalize(text), q.answers, "vqaeval")
            elif protocol == "lmms_eval":
                acc = vqa_accuracy(text.strip(), q.answers, protocol)     # task.py strips every generation
            else:
                acc = vqa_accuracy(text, q.answers, protocol)
            accs.append(acc)
            by_atype.setdefault(str(q.metadata.get("answer_type")), []).append(acc)
            by_qtype.setdefault(str(q.metadata.get("question_type")), []).append(acc)
        mean = lambda xs: 100.0 * sum(xs) / len(xs)
        return {"accuracy": mean(accs), "n": len(accs), "n_missing": n_missing,
                "n_without_ground_truth": len(questions) - len(scored), "protocol": protocol,
                "scorer": self.scorers[protocol],
                "per_answer_type": {k: mean(v) for k, v in sorted(by_atype.items())},
                "per_question_type": {k: mean(v) for k, v in sorted(by_qtype.items())}}

    def write_submission(self, questions: Sequence[Question], answers: Mapping[Any, str], path: str | Path,
                         **_: Any) -> Path:
        """EvalAI upload JSON over ``questions`` (pass all of ``llava_vqav2_mscoco_test2015.jsonl``)."""
        out = []
        for q in questions:
            a = lookup_answer(answers, q)
            out.append({"question_id": q.question_id, "answer": "" if a is None else evalai_normalize(a)})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out), encoding="utf-8")
        return path


def read_vqa_annotations(annotation_file: str | Path) -> dict[Any, dict[str, Any]]:
    """``question_id -> {"answers": [10 str], "meta": {question_type, answer_type, ...}}`` from an annotation file."""
    adata = read_json(annotation_file)
    if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
        raise BenchmarkFormatError(annotation_file, "expected an object with an 'annotations' list")
    out: dict[Any, dict[str, Any]] = {}
    for i, a in enumerate(adata["annotations"]):
        if not isinstance(a, dict) or "question_id" not in a or not isinstance(a.get("answers"), list):
            raise BenchmarkFormatError(annotation_file, f"annotation #{i} lacks 'question_id' or 'answers'")
        out[a["question_id"]] = {
            "answers": [str(x["answer"]) for x in a["answers"]],
            "meta": {"question_type": a.get("question_type"), "answer_type": a.get("answer_type"),
                     "multiple_choice_answer": a.get("multiple_choice_answer")}}
    return out
