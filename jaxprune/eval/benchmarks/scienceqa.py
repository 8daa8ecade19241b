"""ScienceQA (test split; LLaVA reports the image subset, "IMG-Accuracy"): letter parsing and accuracy.

Official pieces reproduced (haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd):

* ``llava/eval/model_vqa_science.py --single-pred-prompt``: text = human turn with ``<image>`` removed and stripped,
  plus ``\\nAnswer with the option's letter from the given choices directly.``; the recorded ``prompt`` gets a
  ``<image>\\n`` prefix when the item has an image (:attr:`Question.answer_file_prompt`).
* ``llava/eval/eval_science_qa.py``: over every problem of the split, prediction text -> letter: the text itself if
  it is one of ``A``..``E``; else ``X`` when ``len >= 3``, ``X`` in ``A``..``E`` and the next two characters are
  ``". "``; else the regex ``The answer is ([A-Z]).`` (any character after the letter) when it matches exactly once;
  else ``FAILED`` (no random fallback: the ``random.choice`` line is dead code).  The letter's index must be below the
  number of choices (else -1) and equal ``answer``.  ``Accuracy`` is over all problems (missing predictions count as
  wrong); ``IMG-Accuracy`` is over problems whose recorded prompt contains ``<image>`` -- a problem with no prediction
  gets prompt ``"Unknown"`` there and so drops out of the IMG count (kept here).
* Prompt layout of ``llava_test_CQM-A.json`` (eval.zip, checked on the copy in LLaVA's history @ 32cebc38):
  ``<image>\\n`` (image items only) + ``Context: {hint}\\n`` (non-empty hint only) +
  ``{question}\\nA. {c0}\\nB. {c1}...``;
  :func:`build_human_turn` rebuilds it from ``problems.json`` (UNVERIFIED against problems.json itself, which is not
  in the public copies).
* ``protocol="lmms_eval"``: lmms-eval ``scienceqa_img`` (@ 75571cfe, ``lmms_eval/tasks/scienceqa/utils.py``): prompt
  ``{"Context: " + hint + "\n" if hint}{question}\nA. ...\nB. ...`` + the same suffix (no strip; a whitespace-only
  hint still gets its ``Context:`` line); score = mean of ``sqa_process_results`` over the rows: the stripped
  prediction equals the letter case-insensitively, or starts with an upper-case letter followed by ``.`` (``"B."``,
  ``"B.x"``) whose lowercase is the letter.  Differences from eval_science_qa.py: ``"b"`` and ``"B."`` are right there
  (FAILED here), ``"The answer is B."`` is wrong there (right here), ``" B"`` is right there (FAILED here).

lmms-lab layout (``lmms-lab/ScienceQA``, config ``ScienceQA-IMG``, split ``test``, 2,017 rows): columns ``question``,
``choices`` (list), ``answer`` (index), ``hint``, ``image``, and ``subject``, ``topic``, ``category``, ``skill``,
``grade``, ``task``, ``lecture``, ``solution``.  There is no problem id: ``question_id`` is the row's position in the
split (0-based, shard order), so keys differ from the LLaVA file's problem ids (same prompts and answers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import hfdata
from .base import (
    PROTOCOLS,
    MC_LETTER_SUFFIX,
    BenchmarkBase,
    BenchmarkFormatError,
    MissingAnswersError,
    Question,
    assign_keys,
    check_protocol,
    lookup_answer,
    pct,
    scoring_protocol,
    tag_protocol,
)
from .files import find_file, read_json

OPTIONS = ("A", "B", "C", "D", "E")
LLAVA_QUESTION_FILES = ("llava_test_CQM-A.json",)
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_sqa_letter(pred: str) -> str:
    """eval_science_qa.py's letter extraction: ``"A"``..``"E"``, another capital from the regex, or ``"FAILED"``."""
    if pred in OPTIONS:
        return pred
    if len(pred) >= 3 and pred[0] in OPTIONS and pred[1:3] == ". ":
        return pred[0]
    found = _ANSWER_IS.findall(pred)
    return found[0] if len(found) == 1 else "FAILED"


def letter_index(letter: str, n_choices: int) -> int:
    """``get_pred_idx``: index of the letter among the first ``n_choices`` options, else -1."""
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def lmms_sqa_correct(pred: str, letter: str) -> bool:
    """lmms-eval ``sqa_process_results`` (after the pipeline's strip) for the right ``letter``."""
    pred = pred.strip()
    target = letter.strip().lower()
    if pred.lower() == target:
        return True
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return pred[0].lower() == target
    return False


def lmms_sqa_text(problem: Mapping[str, Any]) -> str:
    """lmms-eval ``sqa_doc_to_text`` (format ``default``) for a problem with ``hint``, ``question``, ``choices``."""
    context = problem.get("hint") or ""
    if context:
        context = f"Context: {context}\n"
    choices = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(problem["choices"]))
    return f"{context}{problem['question']}\n{choices}{MC_LETTER_SUFFIX}"


def load_lmms_scienceqa(root: str | Path, protocol: str = "llava", *, config: str | None = None,
                        split: str | None = None, check_images: bool = True) -> list[Question]:
    """``lmms-lab/ScienceQA`` (``ScienceQA-IMG``) rows as questions (see the module docstring)."""
    table = hfdata.select_table(root, "lmms-lab/ScienceQA", ("ScienceQA-IMG", None), ("test",), config=config,
                                split=split)
    out: list[Question] = []
    n = 0
    for path, row, rec in hfdata.read_rows(table, ("question", "choices", "answer", "hint"),
                                           ("image", "subject", "topic", "category", "skill", "grade", "task")):
        hfdata.require(path, row, rec, "question", str)
        choices = hfdata.require(path, row, rec, "choices", list)
        answer = hfdata.require(path, row, rec, "answer", int)
        if not all(isinstance(c, str) for c in choices) or not 0 <= answer < min(len(choices), len(OPTIONS)):
            raise BenchmarkFormatError(path, f"row {row}, column 'answer': {answer!r} is not an index into "
                                             f"{len(choices)} choices")
        blob = hfdata.image_blob(path, row, rec, check=check_images) if rec.get("image") is not None else None
        prob = {"hint": rec.get("hint") or "", "question": rec["question"], "choices": choices}
        meta = {k: rec.get(k) for k in ("subject", "topic", "category", "skill", "grade", "hint")}
        meta["answer_index"] = answer
        q = _question(n, build_human_turn(prob), "embedded" if blob is not None else None, Path("."),
                      OPTIONS[answer], len(choices), dict(zip(OPTIONS, choices)), meta)
        q.image, q.image_root, q.image_blob = None, None, blob
        if protocol == "lmms_eval":
            q.text = lmms_sqa_text(prob)
        out.append(q)
        n += 1
    return assign_keys(out)


def build_human_turn(problem: Mapping[str, Any]) -> str:
    """The ``llava_test_CQM-A.json`` human turn for a ``problems.json`` entry (without ``<image>``)."""
    text = ""
    if str(problem.get("hint") or "").strip():
        text += f"Context: {problem['hint']}\n"
    text += str(problem["question"])
    for letter, choice in zip(OPTIONS, problem["choices"]):
        text += f"\n{letter}. {choice}"
    return text


def _question(pid: str, human: str, image: str | None, image_root: Path, answer: str, n_choices: int,
              options: dict[str, str], meta: dict[str, Any]) -> Question:
    qs = human.replace("<image>", "").strip()
    prompt = ("<image>\n" + qs if image else qs) + MC_LETTER_SUFFIX
    return Question(question_id=pid, text=qs + MC_LETTER_SUFFIX, image=image, answers=[answer],
                    category=meta.get("subject"), split="image" if image else "no_image", options=options,
                    metadata={**meta, "n_choices": n_choices}, image_root=str(image_root), answer_file_prompt=prompt)


def _trailing_options(text: str) -> dict[str, str]:
    """Options of a LLaVA ScienceQA human turn: from the last ``\\nA. `` on, split at ``\\nB. ``, ``\\nC. ``...
    (option texts may span lines, e.g. letter closings)."""
    start = text.rfind("\nA. ")
    if start == -1:
        return {}
    body = text[start + 1:]
    opts: dict[str, str] = {}
    for cur, nxt in zip(OPTIONS, OPTIONS[1:] + ("",)):
        end = body.find(f"\n{nxt}. ") if nxt else -1
        opts[cur] = body[3:end] if end != -1 else body[3:]
        if end == -1:
            break
        body = body[end + 1:]
    return opts


class ScienceQA(BenchmarkBase):
    """ScienceQA test (LLaVA-1.5-7B IMG-Accuracy: 66.8)."""

    name = "scienceqa"
    layout = "llava_test_CQM-A.json and/or problems.json + pid_splits.json (ground truth), images/test/"

    protocols = PROTOCOLS
    layout_lmms = "lmms-lab/ScienceQA: parquet shards / datasets cache / save_to_disk (ScienceQA-IMG, test)"
    scorers = {"llava": "LLaVA eval_science_qa.py (letter parser, IMG accuracy)",
               "lmms_eval": "lmms-eval scienceqa_img (sqa_process_results)"}

    def load(self, root: str | Path, *, protocol: str = "llava", question_file: str | Path | None = None,
             problems_file: str | Path | None = None, config: str | None = None, split: str | None = None,
             check_images: bool = True, **kw: Any) -> list[Question]:
        """LLaVA's layout (:meth:`load_official`) or, where ``root`` holds none of its files, the lmms-lab dataset
        (:func:`load_lmms_scienceqa`); ``protocol`` picks the prompts and the default scorer."""
        check_protocol(self.name, protocol)
        qs = hfdata.load_either(
            root, [question_file or LLAVA_QUESTION_FILES[0], problems_file or "problems.json"],
            lambda: self.load_official(root, question_file=question_file, problems_file=problems_file,
                                       **({"split": split} if split else {}), **kw),
            lambda: load_lmms_scienceqa(root, protocol, config=config, split=split, check_images=check_images),
            "lmms-lab/ScienceQA")
        # official files + lmms_eval: LLaVA's prompt is kept (lmms-eval's but for whitespace around hint / question)
        return tag_protocol(qs, protocol)

    def load_official(self, root: str | Path, *, question_file: str | Path | None = None,
                      problems_file: str | Path | None = None, splits_file: str | Path | None = None,
                      split: str = "test", image_folder: str | Path | None = None, image_only: bool = False,
                      **_: Any) -> list[Question]:
        """``llava_test_CQM-A.json`` (images ``images/test/``) and/or ``problems.json`` + ``pid_splits.json``.

        With ``problems.json`` the question list is the split's problem ids (as eval_science_qa.py iterates them; the
        prompt comes from the LLaVA file when it has the id, else :func:`build_human_turn`) and the ground truth is
        ``answer`` / ``choices``; with only the LLaVA file, the gpt turn is the answer letter and the choices are the
        trailing ``X. ...`` lines.  ``image_only`` keeps the image questions (ScienceQA-IMG).
        """
        root = Path(root)
        img = root / (image_folder or "images/test")
        qf = find_file(root, [question_file] if question_file else LLAVA_QUESTION_FILES)
        pf = find_file(root, [problems_file] if problems_file else ("problems.json",))
        sf = find_file(root, [splits_file] if splits_file else ("pid_splits.json",))
        llava: dict[str, dict[str, Any]] = {}
        if qf is not None:
            items = read_json(qf)
            if not isinstance(items, list):
                raise BenchmarkFormatError(qf, "expected a JSON list of LLaVA conversation items")
            for i, it in enumerate(items):
                convs = it.get("conversations") if isinstance(it, dict) else None
                if not isinstance(convs, list) or len(convs) < 2 or "id" not in it or not all(
                        isinstance(c, dict) and isinstance(c.get("value"), str) for c in convs[:2]):
                    raise BenchmarkFormatError(qf, f"item #{i} is not an {{id, conversations: [human, gpt]}} record")
                llava[str(it["id"])] = it
        out: list[Question] = []
        if pf is not None:
            if sf is None:
                raise FileNotFoundError(f"scienceqa: {pf} found but no pid_splits.json under {root}")
            problems = read_json(pf)
            splits = read_json(sf)
            if not isinstance(splits, dict) or split not in splits:
                raise BenchmarkFormatError(sf, f"no {split!r} split")
            for pid in splits[split]:
                pid = str(pid)
                prob = problems.get(pid) if isinstance(problems, dict) else None
                if not isinstance(prob, dict) or not {"question", "choices", "answer"} <= set(prob):
                    raise BenchmarkFormatError(pf, f"problem {pid!r} missing or lacks question/choices/answer")
                it = llava.get(pid)
                image = it.get("image") if it else (f"{pid}/{prob['image']}" if prob.get("image") else None)
                human = it["conversations"][0]["value"] if it else build_human_turn(prob)
                n = len(prob["choices"])
                meta = {k: prob.get(k) for k in ("subject", "topic", "category", "skill", "grade", "hint")}
                meta["answer_index"] = int(prob["answer"])
                out.append(_question(pid, human, image, img, OPTIONS[int(prob["answer"])], n,
                                     dict(zip(OPTIONS, map(str, prob["choices"]))), meta))
        elif llava:
            for pid, it in llava.items():
                human, gpt = it["conversations"][0]["value"], it["conversations"][1]["value"].strip()
                opts = _trailing_options(human)
                if gpt not in OPTIONS or not opts:
                    raise BenchmarkFormatError(qf, f"item {pid!r}: cannot read answer letter / options")
                out.append(_question(pid, human, it.get("image"), img, gpt, len(opts), opts,
                                     {"answer_index": OPTIONS.index(gpt)}))
        else:
            raise FileNotFoundError(f"scienceqa: neither {LLAVA_QUESTION_FILES[0]} nor problems.json under {root}")
        if image_only:
            out = [q for q in out if q.image]
        return assign_keys(out)

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], *, protocol: str | None = None,
              strict: bool = False, **_: Any) -> dict[str, Any]:
        """``accuracy`` (all loaded problems) and ``img_accuracy`` (LLaVA's SQA number), percent; per subject
        (``protocol`` defaults to the one the questions were loaded with)."""
        protocol = scoring_protocol(self.name, questions, protocol)
        n = correct = n_img = correct_img = n_failed = 0
        per: dict[str, list[int]] = {}
        missing: list[str] = []
        for q in questions:
            pred = lookup_answer(answers, q)
            if pred is None:
                missing.append(q.key)
                letter, multimodal = "FAILED", False  # official: pred 'FAILED', prompt 'Unknown'
            else:
                letter, multimodal = parse_sqa_letter(pred), "<image>" in q.record_prompt
            if protocol == "lmms_eval":
                ok = pred is not None and lmms_sqa_correct(pred, OPTIONS[int(q.metadata["answer_index"])])
                multimodal = q.has_image
            else:
                n_failed += letter == "FAILED"
                ok = letter_index(letter, int(q.metadata["n_choices"])) == int(q.metadata["answer_index"])
            n += 1
            correct += ok
            if multimodal:
                n_img += 1
                correct_img += ok
            per.setdefault(str(q.category), [0, 0])
            per[str(q.category)][0] += ok
            per[str(q.category)][1] += 1
        if strict and missing:
            raise MissingAnswersError(f"scienceqa: {len(missing)} of {n} questions have no answer ({missing[0]} ...)")
        return {"accuracy": pct(correct, n), "img_accuracy": pct(correct_img, n_img), "n": n, "n_img": n_img,
                "n_missing": len(missing), "n_failed_parse": n_failed, "protocol": protocol,
                "scorer": self.scorers[protocol],
                "per_subject": {k: pct(c, t) for k, (c, t) in sorted(per.items())}}
