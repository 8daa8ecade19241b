"""MM-Vet: questions and the JSON the official GPT-4 grader reads (no local score).

Official pieces reproduced (haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd):

* ``scripts/v1_5/eval/mmvet.sh``: ``llava/eval/model_vqa.py`` on ``llava-mm-vet.jsonl`` (natural answers, no suffix;
  every item has ``category`` ``"conv"``), images ``mm-vet/images/``.
* ``scripts/convert_mmvet_for_eval.py``: ``{f"v1_{question_id}": text}`` for every answer line, ``indent=2``; this is
  what the MM-Vet grader (yuweihao/MM-Vet, GPT-4 judged 0-1 per sample, total = mean x 100) consumes.

Raw ``mm-vet.json`` (``{"v1_N": {"imagename", "question", "answer", "capability"}}``) is read too: ``question_id`` =
``N``, text = the question as is.  :meth:`MMVet.score` raises: grading needs GPT-4, out of scope offline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import BenchmarkBase, BenchmarkFormatError, Question, assign_keys, lookup_answer
from .files import find_file, load_llava_questions, read_json

LLAVA_QUESTION_FILES = ("llava-mm-vet.jsonl",)
RAW_FILES = ("mm-vet.json", "mm-vet/mm-vet.json")


def read_raw_mmvet(path: str | Path, image_root: str | Path) -> list[Question]:
    """Questions from the official ``mm-vet.json``."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise BenchmarkFormatError(path, "expected a JSON object {'v1_N': record}")
    out = []
    for key, r in data.items():
        if not isinstance(r, dict) or not {"imagename", "question"} <= set(r):
            raise BenchmarkFormatError(path, f"record {key!r} lacks 'imagename' or 'question'")
        try:
            qid: int | str = int(str(key).split("_", 1)[1])
        except (IndexError, ValueError):
            qid = key
        out.append(Question(question_id=qid, text=r["question"], image=r["imagename"],
                            answers=[str(r["answer"])] if "answer" in r else [], category="conv",
                            metadata={"capability": r.get("capability"), "mmvet_key": key},
                            image_root=str(image_root)))
    return assign_keys(out)


class MMVet(BenchmarkBase):
    """MM-Vet, 218 questions, GPT-4 graded (LLaVA-1.5-7B: 31.1)."""

    name = "mmvet"
    layout = "llava-mm-vet.jsonl (or mm-vet.json) + images/; no local score (GPT-4 grader): writes its submission"
    has_submission = True

    def load(self, root: str | Path, *, question_file: str | Path | None = None, image_folder: str | Path | None = None,
             **_: Any) -> list[Question]:
        """``llava-mm-vet.jsonl`` (images ``images/``), else the raw ``mm-vet.json``."""
        root = Path(root)
        img = root / (image_folder or "images")
        qf = find_file(root, [question_file] if question_file else LLAVA_QUESTION_FILES)
        if qf is not None:
            return load_llava_questions(qf, img)
        rf = find_file(root, RAW_FILES)
        if rf is None:
            raise FileNotFoundError(f"mmvet: neither {LLAVA_QUESTION_FILES[0]} nor mm-vet.json under {root}")
        return read_raw_mmvet(rf, img)

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], **_: Any) -> dict[str, Any]:
        """Not available: MM-Vet is graded by GPT-4 with the official grader."""
        raise NotImplementedError("mmvet: scores come from the official GPT-4 grader (yuweihao/MM-Vet); write the "
                                  "input file with write_submission and run the grader")

    def write_submission(self, questions: Sequence[Question], answers: Mapping[Any, str], path: str | Path,
                         **_: Any) -> Path:
        """``{"v1_{question_id}": answer}`` JSON (indent 2) over answered questions, in question order."""
        out = {}
        for q in questions:
            a = lookup_answer(answers, q)
            if a is not None:
                out[f"v1_{q.question_id}"] = a
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2), encoding="utf-8")
        return path
