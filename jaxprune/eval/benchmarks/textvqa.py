"""TextVQA val (LLaVA protocol: prompt carries OCR tokens), m4c soft accuracy.

Official pieces reproduced (haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd):

* ``llava/eval/eval_textvqa.py``: ``prompt_processor`` recovers the question from the prompt (legacy
  ``OCR tokens: ... Question: ... Short answer:`` form; 3-line ``Reference OCR token:`` form, question on line 1, or
  line 2 when the OCR line comes first; 2-line form without OCR; anything else is an error) and lowercases it; answers
  are joined to ``TextVQA_0.5.1_val.json['data']`` by ``(image_id, question.lower())`` (the LLaVA file's
  ``question_id`` **is the image id**; on duplicate keys the last annotation wins, as the official dict does).
* ``llava/eval/m4c_evaluator.py::TextVQAAccuracyEvaluator``: see :func:`jaxprune.eval.benchmarks.evalai.textvqa_accuracy`.

Prompt built from raw data (``llava_textvqa_val_v051_ocr.jsonl`` layout, checked against the file in LLaVA's
eval.zip): ``{question.capitalize()}\\nReference OCR token: {", ".join(ocr_tokens)}\\nAnswer the question using a
single word or phrase.`` (the OCR line is kept even when empty).  Where LLaVA took the tokens from is not documented;
the TextVQA Rosetta OCR file (``TextVQA_Rosetta_OCR_v0.2_val.json``) or an ``ocr_tokens`` field of the data items
is used here (UNVERIFIED that this matches token for token).  ``ocr=False`` gives the 2-line prompt.  lmms-eval
``textvqa_val`` scores the same way but omits OCR by default: every score reports ``ocr_in_prompt``.

``protocol="lmms_eval"``: lmms-eval ``textvqa_val`` (@ 75571cfe, ``lmms_eval/tasks/textvqa/utils.py``): prompt
``question.capitalize()`` + the suffix, **without** the OCR line (its default ``ocr: false``; ``ocr=True`` adds it in
LLaVA's format; for LLaVA's question file the OCR line is removed); score = the same EvalAI processing and leave-one-out
soft accuracy, without m4c's assertion of exactly 10 answers.

lmms-lab layout (``lmms-lab/textvqa``, split ``validation``): columns ``question_id``, ``question``, ``image_id``,
``answers`` (list of 10 str), ``ocr_tokens`` (list of str), ``image``, plus ``question_tokens``, ``image_classes``,
``set_name``, sizes and Flickr URLs.  As in LLaVA's file, ``question_id`` is the image id (the TextVQA question id is
kept in ``metadata["textvqa_question_id"]``).

Deviation: eval_textvqa.py raises (KeyError) for an answer whose question is not in the annotation file; here such
questions are left unscored and counted in ``n_without_ground_truth``.
"""

from __future__ import annotations

import re
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
    scoring_protocol,
    tag_protocol,
)
from .evalai import evalai_normalize, leave_one_out_accuracy, textvqa_accuracy
from .files import find_file, load_llava_questions, read_json

LLAVA_QUESTION_FILES = ("llava_textvqa_val_v051_ocr.jsonl",)
ANNOTATION_FILES = ("TextVQA_0.5.1_val.json",)
OCR_FILES = ("TextVQA_Rosetta_OCR_v0.2_val.json",)
OCR_MARKER = "Reference OCR token: "
_LEGACY = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def prompt_question(prompt: str) -> str:
    """``eval_textvqa.prompt_processor``: the lowercased question inside a LLaVA TextVQA prompt (ValueError if none)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = _LEGACY.search(prompt)
        if m is None:
            raise ValueError("legacy TextVQA prompt without 'Question: ... Short answer:'")
        question = m.group(1)
    elif OCR_MARKER in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"unrecognised TextVQA prompt layout ({len(lines)} lines)")
    return question.lower()


def build_prompt(question: str, ocr_tokens: Sequence[str] | None) -> str:
    """LLaVA's TextVQA prompt for a raw question (``ocr_tokens=None``: no OCR line)."""
    text = question.capitalize()
    if ocr_tokens is not None:
        text += "\n" + OCR_MARKER + ", ".join(ocr_tokens)
    return text + SHORT_ANSWER_SUFFIX


def read_annotations(path: str | Path) -> list[dict[str, Any]]:
    """``TextVQA_0.5.1_val.json['data']`` (each item needs image_id, question, answers)."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BenchmarkFormatError(path, "expected an object with a 'data' list")
    for i, a in enumerate(data["data"]):
        if not isinstance(a, dict) or not {"image_id", "question", "answers"} <= set(a):
            raise BenchmarkFormatError(path, f"data item #{i} lacks image_id / question / answers")
    return data["data"]


def read_ocr(path: str | Path) -> dict[str, list[str]]:
    """``image_id -> ocr_tokens`` from a Rosetta OCR file (``{"data": [{"image_id", "ocr_tokens"}]}``)."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BenchmarkFormatError(path, "expected an object with a 'data' list")
    out = {}
    for i, a in enumerate(data["data"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("ocr_tokens"), list):
            raise BenchmarkFormatError(path, f"data item #{i} lacks image_id / ocr_tokens")
        out[str(a["image_id"])] = [str(t) for t in a["ocr_tokens"]]
    return out


def lmms_textvqa_accuracy(pred: str, gt_answers: Sequence[str]) -> float:
    """lmms-eval ``textvqa_process_results``: EvalAI-normalised prediction and answers, leave-one-out soft score."""
    gts = [evalai_normalize(a) for a in gt_answers]
    return leave_one_out_accuracy(evalai_normalize(pred.strip()), gts)


def drop_ocr_line(text: str) -> str:
    """A LLaVA TextVQA prompt without its ``Reference OCR token:`` line."""
    return "\n".join(line for line in text.split("\n") if not line.startswith(OCR_MARKER.strip()))


def load_lmms_textvqa(root: str | Path, protocol: str = "llava", *, ocr: bool = True, config: str | None = None,
                      split: str | None = None, check_images: bool = True) -> list[Question]:
    """``lmms-lab/textvqa`` rows as questions (see the module docstring)."""
    table = hfdata.select_table(root, "lmms-lab/textvqa", (None,), ("validation", "test", "train"), config=config,
                                split=split)
    out: list[Question] = []
    seen: dict = {}
    for path, row, rec in hfdata.read_rows(table, ("question_id", "question", "image_id", "image"),
                                           ("answers", "ocr_tokens")):
        question = hfdata.require(path, row, rec, "question", str)
        image_id = hfdata.require(path, row, rec, "image_id", (str, int))
        hfdata.check_unique(seen, rec["question_id"], path, row, "question_id")
        tokens = None
        if ocr:
            tokens = rec.get("ocr_tokens")
            if not isinstance(tokens, list):
                raise BenchmarkFormatError(path, f"row {row}, column 'ocr_tokens': expected a list of str, got "
                                                 f"{tokens!r:.80} (ocr=False builds prompts without OCR)")
        answers = rec.get("answers")
        if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
            raise BenchmarkFormatError(path, f"row {row}, column 'answers': expected a list of str, got "
                                             f"{answers!r:.80}")
        out.append(Question(question_id=image_id, text=build_prompt(question, tokens), answers=list(answers or []),
                            image_blob=hfdata.image_blob(path, row, rec, check=check_images),
                            metadata={"question": question.lower(), "textvqa_question_id": rec["question_id"]}))
    return assign_keys(out)


class TextVQA(BenchmarkBase):
    """TextVQA val, 5,000 questions (LLaVA-1.5-7B: 58.2 with OCR tokens in the prompt)."""

    name = "textvqa"
    layout = "llava_textvqa_val_v051_ocr.jsonl + TextVQA_0.5.1_val.json (ground truth) + train_images/"

    protocols = PROTOCOLS
    layout_lmms = "lmms-lab/textvqa: parquet shards / datasets cache / save_to_disk (validation split)"
    scorers = {"llava": "LLaVA m4c_evaluator.py TextVQAAccuracyEvaluator",
               "lmms_eval": "lmms-eval textvqa_val (EvalAI processor, leave-one-out)"}

    def load(self, root: str | Path, *, protocol: str = "llava", question_file: str | Path | None = None,
             annotation_file: str | Path | None = None, ocr: bool | None = None, config: str | None = None,
             split: str | None = None, check_images: bool = True, **kw: Any) -> list[Question]:
        """LLaVA's layout (:meth:`load_official`) or, where ``root`` holds none of its files, the lmms-lab dataset
        (:func:`load_lmms_textvqa`); ``protocol`` picks the prompts (``ocr`` defaults to True for ``llava``, False
        for ``lmms_eval``) and the default scorer."""
        check_protocol(self.name, protocol)
        use_ocr = (protocol == "llava") if ocr is None else bool(ocr)
        qs = hfdata.load_either(
            root, [question_file or LLAVA_QUESTION_FILES[0], annotation_file or ANNOTATION_FILES[0]],
            lambda: self.load_official(root, question_file=question_file, annotation_file=annotation_file,
                                       ocr=use_ocr, **kw),
            lambda: load_lmms_textvqa(root, protocol, ocr=use_ocr, config=config, split=split,
                                      check_images=check_images),
            "lmms-lab/textvqa")
        if not use_ocr:
            for q in qs:
                q.text = drop_ocr_line(q.text)
        return tag_protocol(qs, protocol)

    def load_official(self, root: str | Path, *, question_file: str | Path | None = None,
                      annotation_file: str | Path | None = None, ocr_file: str | Path | None = None,
                      image_folder: str | Path | None = None, ocr: bool = True, **_: Any) -> list[Question]:
        """LLaVA question file (images ``train_images/``) joined to ``TextVQA_0.5.1_val.json`` as eval_textvqa.py does;
        without the LLaVA file the prompts are built from the annotation file (+ OCR file when ``ocr``)."""
        root = Path(root)
        img = root / (image_folder or "train_images")
        af = find_file(root, [annotation_file] if annotation_file else ANNOTATION_FILES)
        if annotation_file and af is None:
            raise FileNotFoundError(f"textvqa: annotation file {annotation_file} not found under {root}")
        qf = find_file(root, [question_file] if question_file else LLAVA_QUESTION_FILES)
        anns = read_annotations(af) if af is not None else None
        if qf is not None:
            qs = load_llava_questions(qf, img)
            index = {(str(a["image_id"]), str(a["question"]).lower()): a for a in anns} if anns is not None else {}
            for lineno, q in enumerate(qs, start=1):
                try:
                    question = prompt_question(q.text)
                except ValueError as e:
                    raise BenchmarkFormatError(qf, str(e), lineno) from None
                q.metadata["question"] = question
                a = index.get((str(q.question_id), question))
                if a is not None:
                    q.answers = [str(x) for x in a["answers"]]
                    q.metadata["textvqa_question_id"] = a.get("question_id")
            return qs
        if anns is None:
            raise FileNotFoundError(
                f"textvqa: neither {LLAVA_QUESTION_FILES[0]} nor {ANNOTATION_FILES[0]} under {root}")
        ocr_map: dict[str, list[str]] = {}
        if ocr:
            of = find_file(root, [ocr_file] if ocr_file else OCR_FILES)
            if of is not None:
                ocr_map = read_ocr(of)
            elif not all("ocr_tokens" in a for a in anns):
                raise FileNotFoundError(f"textvqa: ocr=True needs {OCR_FILES[0]} under {root} or 'ocr_tokens' in the "
                                        f"annotation items (pass ocr=False for prompts without OCR)")
        out = []
        for a in anns:
            tokens = None
            if ocr:
                tokens = ocr_map.get(str(a["image_id"]), [str(t) for t in a.get("ocr_tokens", [])])
            out.append(Question(question_id=a["image_id"], text=build_prompt(str(a["question"]), tokens),
                                image=f"{a['image_id']}.jpg",
                                answers=[str(x) for x in a["answers"]], image_root=str(img),
                                metadata={"question": str(a["question"]).lower(),
                                          "textvqa_question_id": a.get("question_id")}))
        return assign_keys(out)

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], *, protocol: str | None = None,
              strict: bool = False, **_: Any) -> dict[str, Any]:
        """m4c (``llava``) or lmms-eval soft accuracy (percent) over questions with ground truth; ``ocr_in_prompt`` =
        % of prompts with OCR (``protocol`` defaults to the one the questions were loaded with)."""
        protocol = scoring_protocol(self.name, questions, protocol)
        scored = [q for q in questions if q.answers]
        if not scored:
            raise ValueError("textvqa: no question has ground-truth answers (load TextVQA_0.5.1_val.json)")
        texts, n_missing = collect_answers(scored, answers, strict, self.name)
        fn = textvqa_accuracy if protocol == "llava" else lmms_textvqa_accuracy
        accs = [fn(t, q.answers) for q, t in zip(scored, texts)]
        n_ocr = sum(1 for q in scored if OCR_MARKER in q.text)
        return {"accuracy": 100.0 * sum(accs) / len(accs), "n": len(accs), "n_missing": n_missing,
                "n_without_ground_truth": len(questions) - len(scored), "ocr_in_prompt": 100.0 * n_ocr / len(scored),
                "protocol": protocol, "scorer": self.scorers[protocol]}
