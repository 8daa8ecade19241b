"""Video-MME (multiple choice, four options, answer letter), scored locally with the official extraction rule.

Official pieces reproduced:

* **Layout**: the official results template (BradyFU/Video-MME @ 5a90af9, ``evaluation/output_test_template.json``):
  a JSON list of videos ``{"video_id", "duration_category", "video_category", "video_subcategory", "questions":
  [{"question_id", "task_type", "question", "choices": ["A. ...", ...], "answer": "A"}]}``, read from
  ``videomme.json`` (or ``output_test_template.json``) under ``--data``; or the HF dataset's rows (lmms-lab/Video-MME:
  ``videoID, duration, domain, sub_category, question_id, task_type, question, options, answer``) as ``videomme.jsonl``
  or ``videomme/test-*.parquet`` (parquet needs pyarrow).  A video is ``data/{videoID}.mp4`` (``.MP4`` / ``.mkv``
  too, as lmms-eval's ``videomme_doc_to_visual``); a template record without ``videoID`` uses its ``video_id``.
* **Prompt** (Video-MME README, "without subtitles"; lmms-eval ``videomme_doc_to_text`` uses the same lines)::

      Select the best answer to the following multiple-choice question based on the video. Respond with only the letter (A, B, C, or D) of the correct option.
      {question}
      A. ...
      B. ...
      C. ...
      D. ...
      The best answer is:

  (our ``Question.text``; the model then sees ``USER: <video>\\n{text} ASSISTANT:``).
* **Extraction** (:func:`extract_characters_regex`, ``evaluation/eval_your_results.py`` @ 4e7566d): strip; remove
  each answer prefix -- the list as written there, where two missing commas join ``"The best option isThe correct
  option is"`` and ``"Best answer:Best option:"`` into single prefixes; more than 10 words and no A-D letter -> "";
  else the first of ``A B C D`` anywhere in the text (case-sensitive), or "".
* **Score**: ``accuracy`` = the official script's overall: correct / answered where *answered* counts only the
  responses whose extraction is not empty (an unparsable response drops out of the denominator);
  ``accuracy_all`` = lmms-eval's ``videomme_aggregate_results`` (every question counts, "" is wrong); per duration
  (short / medium / long), per domain and per task type (official rule).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import BenchmarkBase, BenchmarkFormatError, Question, assign_keys, collect_answers, pct
from .files import find_file, read_json, read_jsonl

PROMPT_HEAD = ("Select the best answer to the following multiple-choice question based on the video. Respond with "
               "only the letter (A, B, C, or D) of the correct option.")
PROMPT_TAIL = "The best answer is:"
_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
             "The best option is" "The correct option is", "Best answer:" "Best option:"]  # noqa: ISC001 - official
TEMPLATE_FILES = ("videomme.json", "output_test_template.json")
JSONL_FILES = ("videomme.jsonl",)
VIDEO_EXTS = (".mp4", ".MP4", ".mkv")


def extract_characters_regex(s: str) -> str:
    """The official answer extraction (module docstring): a letter A-D or ""."""
    s = s.strip()
    for p in _PREFIXES:
        s = s.replace(p, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    m = re.search(r"[ABCD]", s)
    return "" if m is None else m[0]


def build_prompt(question: str, options: Sequence[str]) -> str:
    """The Video-MME prompt without subtitles (module docstring); ``options`` are ``"A. ..."`` lines."""
    return "\n".join([PROMPT_HEAD, question, *options, PROMPT_TAIL])


def _video(folder: Path, vid: str) -> str:
    for ext in VIDEO_EXTS:
        if (folder / f"{vid}{ext}").is_file():
            return f"{vid}{ext}"
    return f"{vid}.mp4"


def _question(path: Path, where: str, q: Mapping[str, Any], video_id: str, duration: Any, domain: Any,
              sub: Any, video_root: Path) -> Question:
    opts = q.get("choices", q.get("options"))
    missing = [k for k in ("question_id", "question", "answer") if k not in q] + ([] if opts is not None else
                                                                                  ["choices/options"])
    if missing:
        raise BenchmarkFormatError(path, f"{where}: missing field(s) {', '.join(missing)}")
    if isinstance(opts, str):  # a parquet / jsonl row may hold the list as its repr
        try:
            opts = json.loads(opts.replace("'", '"'))
        except json.JSONDecodeError:
            opts = None
    if not isinstance(opts, list) or len(opts) != 4 or not all(isinstance(o, str) for o in opts):
        raise BenchmarkFormatError(path, f"{where}: expected four option strings 'A. ...' .. 'D. ...', got {opts!r}")
    if str(q["answer"]) not in ("A", "B", "C", "D"):
        raise BenchmarkFormatError(path, f"{where}: answer must be a letter A-D, got {q['answer']!r}")
    letters = {o.split(".", 1)[0].strip(): o.split(".", 1)[1].strip() if "." in o else o for o in opts}
    return Question(question_id=q["question_id"], text=build_prompt(str(q["question"]), opts),
                    video=_video(video_root, video_id), answers=[str(q["answer"])],
                    category=None if q.get("task_type") is None else str(q["task_type"]),
                    split=None if duration is None else str(duration), options=letters, image_root=str(video_root),
                    metadata={"videoID": video_id, "domain": domain, "sub_category": sub,
                              "question": q["question"], "choices": opts})


def read_template(path: Path, video_root: Path) -> list[Question]:
    """Questions from the official template layout (a list of videos with their questions)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise BenchmarkFormatError(path, f"expected a JSON list of videos, got {type(data).__name__}")
    out = []
    for i, v in enumerate(data):
        if not isinstance(v, dict) or not isinstance(v.get("questions"), list):
            raise BenchmarkFormatError(path, f"video #{i}: expected an object with a 'questions' list")
        vid = v.get("videoID", v.get("video_id"))
        if vid is None:
            raise BenchmarkFormatError(path, f"video #{i}: missing field videoID / video_id")
        for j, q in enumerate(v["questions"]):
            if not isinstance(q, dict):
                raise BenchmarkFormatError(path, f"video #{i} question #{j}: expected an object")
            out.append(_question(path, f"video #{i} ({vid}) question #{j}", q, str(vid),
                                 v.get("duration_category", v.get("duration")), v.get("video_category"),
                                 v.get("video_subcategory"), video_root))
    return out


def read_rows(path: Path, rows: Sequence[Mapping[str, Any]], video_root: Path) -> list[Question]:
    """Questions from HF dataset rows (one question per row, ``videoID`` naming its video)."""
    out = []
    for i, r in enumerate(rows):
        if "videoID" not in r:
            raise BenchmarkFormatError(path, f"row {i}: missing field videoID", i + 1)
        out.append(_question(path, f"row {i}", r, str(r["videoID"]), r.get("duration"), r.get("domain"),
                             r.get("sub_category"), video_root))
    return out


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchmarkFormatError(path, "reading parquet needs pyarrow (pip install pyarrow), or convert the rows "
                                         "to videomme.jsonl") from None
    rows = pq.read_table(path).to_pylist()
    for r in rows:  # list columns arrive as lists already
        if "options" in r and not isinstance(r["options"], (list, str)):
            r["options"] = list(r["options"])
    return rows


class VideoMME(BenchmarkBase):
    """Video-MME without subtitles, 2,700 questions over 900 videos (official extraction, local score)."""

    name = "videomme"
    modality = "video"
    layout = ("videomme.json (official template: videos with questions, choices, answer letter) or videomme.jsonl / "
              "videomme/test-*.parquet (HF rows) + data/<videoID>.mp4; official prompt and letter extraction")

    def load(self, root: str | Path, **_: Any) -> list[Question]:
        """Questions (module docstring); videos under ``root/data``."""
        root = Path(root)
        videos = root / "data"
        tf = find_file(root, TEMPLATE_FILES)
        if tf is not None:
            return assign_keys(read_template(tf, videos))
        jf = find_file(root, JSONL_FILES)
        if jf is not None:
            return assign_keys(read_rows(jf, read_jsonl(jf), videos))
        pqs = sorted((root / "videomme").glob("test-*.parquet")) + sorted(root.glob("test-*.parquet"))
        if pqs:
            return assign_keys([q for p in pqs for q in read_rows(p, _read_parquet(p), videos)])
        raise FileNotFoundError(f"videomme: none of {', '.join(TEMPLATE_FILES + JSONL_FILES)} or "
                                f"videomme/test-*.parquet under {root}")

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], *, strict: bool = False,
              **_: Any) -> dict[str, Any]:
        """Accuracy (percent): official (over extracted answers) and lmms-eval's (over all), with breakdowns."""
        texts, n_missing = collect_answers(questions, answers, strict, self.name)
        groups: dict[str, dict[str, list[int]]] = {"duration": {}, "domain": {}, "task_type": {}}
        correct = answered = 0
        for q, t in zip(questions, texts):
            e = extract_characters_regex(t)
            ok = int(e == q.answers[0])
            correct += ok
            if e == "":
                continue
            answered += 1
            for g, k in (("duration", q.split), ("domain", q.metadata.get("domain")), ("task_type", q.category)):
                c = groups[g].setdefault(str(k), [0, 0])
                c[0] += ok
                c[1] += 1
        out: dict[str, Any] = {"accuracy": pct(correct, answered), "accuracy_all": pct(correct, len(questions)),
                               "n": len(questions), "n_answered": answered, "n_missing": n_missing}
        for g, d in groups.items():
            out[f"per_{g}"] = {k: pct(c, n) for k, (c, n) in sorted(d.items())}
        return out
