"""Open-ended video QA of Video-LLaVA's paper: MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA (Video-ChatGPT layout).

Official pieces reproduced (PKU-YuanGroup/Video-LLaVA @ 984e65b):

* **Data** (``TRAIN_AND_VALIDATE.md``, ``scripts/v1_5/eval/run_qa_*.sh``): ``eval/GPT_Zero_Shot_QA/<Set>/`` holds
  ``test_q.json`` (a JSON list of ``{"video_name", "question_id", "question"}``) and ``test_a.json`` (a list of
  ``{"answer", ...}``, usually with ``question_id`` and ``type``); videos in a per-set folder:

  ========================  ===========================  ===========================
  set (``--data``)           videos                        file of a ``video_name``
  ========================  ===========================  ===========================
  MSVD_Zero_Shot_QA          ``videos/``                   ``{video_name}{ext}``
  MSRVTT_Zero_Shot_QA        ``videos/all/``               ``{video_name}{ext}``
  TGIF_Zero_Shot_QA          ``mp4/``                      ``{video_name}{ext}``
  Activitynet_Zero_Shot_QA   ``all_test/``                 ``v_{video_name}{ext}``
  ========================  ===========================  ===========================

  ``ext``: the first of ``.mp4 .avi .mov .mkv`` that exists (``run_inference_video_qa.py`` /
  ``run_inference_video_qa_act.py``).  ``--data`` may name the set folder or ``GPT_Zero_Shot_QA`` above it.
* **Pairing**: the script takes the answer of the i-th question from the i-th entry of ``test_a.json`` (by
  position, not by id); so do we, and we refuse files of different lengths or, where both files carry
  ``question_id``, ids that differ at the same position (the error names the file and index).
* **Question text**: the question verbatim (no suffix); the prompt is Video-LLaVA's ``USER: <video>\\n{question}
  ASSISTANT:`` (:func:`jaxprune.processing_video.build_prompt`, the ``-hf`` checkpoints' template).  Deviation: the
  original release's script wraps it in its ``llava_v1`` conversation (system prompt first, eight ``<image>``).
  Generation: greedy, ``max_new_tokens`` 1024 (the script's), output stripped.
* **Predictions** (:meth:`VideoQA.write_predictions`, called by the harness for every run): ``merge.jsonl``, one ``{"id", "question", "answer", "pred"}``
  per answered question in question-file order -- what ``run_qa_*.sh`` merges and ``eval_video_qa.py`` reads; a
  question whose video is missing is left out, as the script skips it.  Beside it ``judge_requests.jsonl``: the
  GPT-3.5 judge requests of :mod:`jaxprune.eval.benchmarks.video_qa_judge` (OpenAI Batch API format).

**The official metric is GPT-3.5-judged** (accuracy + average 0-5 score); it needs the judge's replies
(``video_qa_judge.score_file``).  :meth:`VideoQA.score` gives a **proxy that is NOT the official metric**:
``proxy_accuracy_not_official`` = percentage of predictions that contain the ground-truth answer as a whole-word
phrase after normalisation (:func:`normalize`: lower case, punctuation -> spaces, articles a/an/the dropped,
whitespace collapsed); ``proxy_exact_not_official`` = normalised prediction equal to the normalised answer.  Neither
knows synonyms ("puppy" vs "dog") or numbers spelled out, which the GPT judge accepts, and the containment proxy
accepts "not a dog" for "dog".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import BenchmarkBase, BenchmarkFormatError, Question, assign_keys, collect_answers, lookup_answer, pct
from .files import read_json
from .video_qa_judge import write_judge_requests

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv")
QUESTION_FILE = "test_q.json"
ANSWER_FILE = "test_a.json"
JUDGE_REQUESTS = "judge_requests.jsonl"
PREDICTIONS = "merge.jsonl"
OFFICIAL_METRIC = ("GPT-3.5-judged accuracy and average score (Video-LLaVA eval_video_qa.py): submit "
                   f"{JUDGE_REQUESTS} (OpenAI Batch API), then python -m jaxprune.eval.benchmarks.video_qa_judge "
                   "<batch output>")
_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lower case, every non-alphanumeric character -> space, articles dropped, whitespace collapsed."""
    words = re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def proxy_match(pred: str, answer: str) -> tuple[bool, bool]:
    """``(contains, exact)`` of the NOT-official proxy: the normalised answer as a whole-word phrase of the
    normalised prediction, and the two equal.  An answer that normalises to nothing never matches."""
    a, p = normalize(answer), normalize(pred)
    if not a:
        return False, False
    return f" {a} " in f" {p} ", p == a


def _video_file(folder: Path, stem: str) -> tuple[str, list[str]]:
    """(file name relative to ``folder``, every candidate tried): the first existing extension, else ``.mp4``."""
    cands = [f"{stem}{ext}" for ext in VIDEO_EXTS]
    for c in cands:
        if (folder / c).is_file():
            return c, cands
    return cands[0], cands


def read_video_qa(q_path: Path, a_path: Path, video_dir: Path, prefix: str = "") -> list[Question]:
    """Questions of one set from ``test_q.json`` / ``test_a.json`` (module docstring), videos under ``video_dir``."""
    qs, ans = read_json(q_path), read_json(a_path)
    if not isinstance(qs, list):
        raise BenchmarkFormatError(q_path, f"expected a JSON list of questions, got {type(qs).__name__}")
    if not isinstance(ans, list):
        raise BenchmarkFormatError(a_path, f"expected a JSON list of answers, got {type(ans).__name__}")
    if len(qs) != len(ans):
        raise BenchmarkFormatError(a_path, f"{len(ans)} answers for the {len(qs)} questions of {q_path} (answers "
                                           "are paired with questions by position)")
    out = []
    for i, (q, a) in enumerate(zip(qs, ans)):
        if not isinstance(q, dict):
            raise BenchmarkFormatError(q_path, f"question #{i}: expected an object, got {type(q).__name__}")
        missing = [k for k in ("video_name", "question_id", "question") if k not in q]
        if missing:
            raise BenchmarkFormatError(q_path, f"question #{i}: missing field(s) {', '.join(missing)}")
        if not isinstance(q["question"], str) or not isinstance(q["video_name"], (str, int)):
            raise BenchmarkFormatError(q_path, f"question #{i}: 'question' must be a string and 'video_name' a "
                                               "string or integer")
        if not isinstance(a, dict) or "answer" not in a:
            raise BenchmarkFormatError(a_path, f"answer #{i}: expected an object with an 'answer' field")
        if "question_id" in a and str(a["question_id"]) != str(q["question_id"]):
            raise BenchmarkFormatError(a_path, f"answer #{i}: question_id {a['question_id']!r} differs from "
                                               f"{q['question_id']!r} of question #{i} in {q_path}")
        name, cands = _video_file(video_dir, f"{prefix}{q['video_name']}")
        out.append(Question(question_id=q["question_id"], text=q["question"], video=name,
                            answers=[str(a["answer"])], category=None if a.get("type") is None else str(a["type"]),
                            image_root=str(video_dir),
                            metadata={"video_name": q["video_name"], "video_candidates": cands}))
    return assign_keys(out)


class VideoQA(BenchmarkBase):
    """One open-ended video QA set of Video-LLaVA's eval (subclasses fix the folder names)."""

    folder = ""        # the set's folder under GPT_Zero_Shot_QA
    video_dir = ""     # its videos, relative to the set folder
    prefix = ""        # file-name prefix of a video_name (ActivityNet: "v_")
    modality = "video"

    @property
    def layout(self) -> str:  # type: ignore[override]
        return (f"{self.folder}/ (or GPT_Zero_Shot_QA/ above it): {QUESTION_FILE} + {ANSWER_FILE} + "
                f"{self.video_dir}/{self.prefix}<video_name>.mp4|avi|mov|mkv; score = exact-match proxy (NOT the "
                f"official GPT-3.5 judge: writes merge.jsonl + {JUDGE_REQUESTS} for it)")

    def set_root(self, root: str | Path) -> Path:
        """The set folder: ``root`` itself, or ``root/<folder>`` when ``root`` is ``GPT_Zero_Shot_QA``."""
        root = Path(root)
        if not (root / QUESTION_FILE).exists() and (root / self.folder / QUESTION_FILE).exists():
            return root / self.folder
        return root

    def load(self, root: str | Path, **_: Any) -> list[Question]:
        """Questions with answers and video files (module docstring)."""
        base = self.set_root(root)
        q, a = base / QUESTION_FILE, base / ANSWER_FILE
        for p in (q, a):
            if not p.is_file():
                raise FileNotFoundError(f"{self.name}: {p} not found (expected {self.layout})")
        return read_video_qa(q, a, base / self.video_dir, self.prefix)

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], *, strict: bool = False,
              **_: Any) -> dict[str, Any]:
        """The NOT-official exact-match proxies (percent) + where the official GPT-judged score comes from."""
        texts, n_missing = collect_answers(questions, answers, strict, self.name)
        hits = [proxy_match(t, q.answers[0] if q.answers else "") for q, t in zip(questions, texts)]
        return {"proxy_accuracy_not_official": pct(sum(h[0] for h in hits), len(hits)),
                "proxy_exact_not_official": pct(sum(h[1] for h in hits), len(hits)),
                "n": len(hits), "n_missing": n_missing,
                "proxy_definition": "normalised ground-truth answer contained as whole words in the normalised "
                                    "prediction (exact: equal); NOT the official metric",
                "official_metric": OFFICIAL_METRIC}

    def predictions(self, questions: Sequence[Question], answers: Mapping[Any, str]) -> list[dict[str, Any]]:
        """``merge.jsonl`` rows ``{"id", "question", "answer", "pred"}`` of the answered questions, in file order."""
        rows = []
        for q in questions:
            a = lookup_answer(answers, q)
            if a is not None:
                rows.append({"id": q.question_id, "question": q.text, "answer": q.answer, "pred": a})
        return rows

    def write_predictions(self, questions: Sequence[Question], answers: Mapping[Any, str], folder: str | Path
                          ) -> dict[str, str]:
        """``merge.jsonl`` (Video-LLaVA's predictions) and ``judge_requests.jsonl`` (the GPT-3.5 judge's requests,
        OpenAI Batch API) in ``folder``; returns ``{"predictions": path, "judge_requests": path}``."""
        rows = self.predictions(questions, answers)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        merge = folder / PREDICTIONS
        merge.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        req = write_judge_requests(folder / JUDGE_REQUESTS, rows)
        return {"predictions": str(merge), "judge_requests": str(req)}


class MSVDQA(VideoQA):
    """MSVD-QA (Video-LLaVA-7B: 70.7 accuracy / 3.9 score, GPT-3.5 judged)."""

    name, folder, video_dir = "msvd_qa", "MSVD_Zero_Shot_QA", "videos"


class MSRVTTQA(VideoQA):
    """MSRVTT-QA (Video-LLaVA-7B: 59.2 / 3.5)."""

    name, folder, video_dir = "msrvtt_qa", "MSRVTT_Zero_Shot_QA", "videos/all"


class TGIFQA(VideoQA):
    """TGIF-QA (Video-LLaVA-7B: 70.0 / 4.0)."""

    name, folder, video_dir = "tgif_qa", "TGIF_Zero_Shot_QA", "mp4"


class ActivityNetQA(VideoQA):
    """ActivityNet-QA (Video-LLaVA-7B: 45.3 / 3.3); videos are ``v_{video_name}``."""

    name, folder, video_dir, prefix = "activitynet_qa", "Activitynet_Zero_Shot_QA", "all_test", "v_"
