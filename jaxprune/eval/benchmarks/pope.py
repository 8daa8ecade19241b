"""POPE (COCO, adversarial / popular / random): LLaVA's yes/no parser and per-split metrics.

Official pieces reproduced (haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd):

* ``llava/eval/eval_pope.py``: per category (annotation file ``coco_pope_{category}.json``), answers of that category
  are zipped **in order** with the label file; answer text -> keep what precedes the first ``.``, delete ``,``, split
  on single spaces; "no" iff a word is exactly ``No``, ``not`` or ``no`` (so ``NO``, ``Not`` or ``no\\n...`` read as
  yes), else "yes".  Label ``no`` -> 0, anything else -> 1.  Reports TP/FP/TN/FN, accuracy, precision, recall, F1 and
  the ratio of *predicted* yes.
* LLaVA's headline POPE number = mean of the three per-split F1s (LLaVA issue #626).
* Labels: POPE repo (AoiDragon/POPE) @ e3e39262c85a6a83f26cf5094022a782cb0df58d ``output/coco`` (random has 2,910
  lines, 8,910 in all; ``llava_pope_test.jsonl`` is line-for-line aligned with those files, checked).
* ``protocol="lmms_eval"``: lmms-eval ``pope`` (@ 75571cfe): ``pred = text.lower().strip()`` compared to the label,
  no parsing; precision counts predicted "yes", recall's false negatives are predictions exactly "no", and its
  ``yes_ratio`` is the ratio of *ground-truth* yes; accuracy / precision / recall / F1 over *all* rows (not the mean
  of the splits).  Prompt ``question.strip() + "\nAnswer the question using a single word or phrase."``.

lmms-lab layout (``lmms-lab/POPE``, config ``default``, split ``test``, or else config ``Full``, splits ``adversarial``,
``random``, ``popular``; 9,000 rows: random has 3,000 where LLaVA's label files have 2,910): columns ``question_id`` (the label file's per-category id), ``question``, ``answer``,
``category``, ``image`` (``{"bytes", "path"}``), ``image_source`` (COCO file stem), ``id``.  Questions get LLaVA's
ids (category offset + ``question_id``) so answers files and keys agree with ``llava_pope_test.jsonl``.

Labels are attached by order within each category at load time (the official zip); the loader checks that image and
question agree line by line and raises otherwise (``check_alignment=False`` to skip).  Deviations: answers are
matched to questions by id, so an answers file in another order than the question file scores as if it were in order
(the official zip would mis-pair it); metrics are percentages; precision / recall / F1 are 0 where the official code
would divide by zero.
"""

from __future__ import annotations

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
    pct,
    scoring_protocol,
    tag_protocol,
)
from .files import find_file, load_llava_questions, read_jsonl

LLAVA_QUESTION_FILES = ("llava_pope_test.jsonl",)
# question_id offsets used in llava_pope_test.jsonl (adversarial 1.., random 10000001.., popular 20000001..)
QID_OFFSETS = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
LLAVA_CATEGORY_ORDER = ("adversarial", "random", "popular")


def llava_pope_parse(text: str) -> str:
    """``eval_pope.py``'s answer parser: ``"yes"`` or ``"no"``."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def read_label_dir(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``category -> label lines`` for every ``coco_pope_{category}.json`` (jsonl despite the name) in ``folder``."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.glob("coco_pope_*.json")):
        out[p.name[len("coco_pope_"):-len(".json")]] = read_jsonl(p, required=("question_id", "image", "text",
                                                                                 "label"))
    if not out:
        raise FileNotFoundError(f"pope: no coco_pope_*.json label files in {folder}")
    return out


def load_lmms_pope(root: str | Path, protocol: str = "llava", *, config: str | None = None, split: str | None = None,
                   check_images: bool = True) -> list[Question]:
    """``lmms-lab/POPE`` rows as questions (see the module docstring)."""
    try:
        tables = [hfdata.select_table(root, "lmms-lab/POPE", (None,), ("test",), config=config, split=split)]
    except FileNotFoundError as e:
        if config not in (None, "Full") or split is not None:
            raise
        # only the "Full" config: its splits are the categories (read in LLaVA's order)
        try:
            tables = [hfdata.select_table(root, "lmms-lab/POPE", ("Full",), (s,), config="Full", split=s)
                      for s in LLAVA_CATEGORY_ORDER]
        except FileNotFoundError:
            raise FileNotFoundError(f"{e} -- or Full/adversarial, Full/random and Full/popular") from None
    out: list[Question] = []
    seen: dict = {}
    rows = (r for t in tables for r in hfdata.read_rows(t, ("question_id", "question", "answer", "category", "image"),
                                                        ("image_source", "id")))
    for path, row, rec in rows:
        question = hfdata.require(path, row, rec, "question", str)
        answer = hfdata.require(path, row, rec, "answer", str)
        category = hfdata.require(path, row, rec, "category", str)
        raw_id = hfdata.require(path, row, rec, "question_id", (str, int))
        hfdata.check_unique(seen, (category, str(raw_id)), path, row, "(category, question_id)")
        try:
            raw_id = int(raw_id)                    # the label files' int id (a string column in lmms-lab/POPE)
            qid: int | str = QID_OFFSETS[category] + raw_id
        except (KeyError, ValueError):
            qid = f"{category}/{raw_id}"
        text = (question.strip() if protocol == "lmms_eval" else question) + SHORT_ANSWER_SUFFIX
        out.append(Question(question_id=qid, text=text, answers=[answer], category=category,
                            image_blob=hfdata.image_blob(path, row, rec, check=check_images),
                            metadata={"label_question_id": raw_id, "image_source": rec.get("image_source"),
                                      "lmms_id": rec.get("id")}))
    return assign_keys(out)


def _metrics(preds: list[int], labels: list[int]) -> dict[str, Any]:
    tp = sum(1 for p, l in zip(preds, labels) if p == 1 and l == 1)
    fp = sum(1 for p, l in zip(preds, labels) if p == 1 and l == 0)
    tn = sum(1 for p, l in zip(preds, labels) if p == 0 and l == 0)
    fn = sum(1 for p, l in zip(preds, labels) if p == 0 and l == 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": pct(tp + tn, tp + tn + fp + fn), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": pct(preds.count(1), len(preds)), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "n": len(preds)}


def _lmms_metrics(preds: list[str], gts: list[str]) -> dict[str, Any]:
    tp = sum(1 for p, g in zip(preds, gts) if g == "yes" and p == "yes")
    fp = sum(1 for p, g in zip(preds, gts) if g == "no" and p == "yes")
    fn = sum(1 for p, g in zip(preds, gts) if g == "yes" and p == "no")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": pct(sum(1 for p, g in zip(preds, gts) if p == g), len(preds)), "precision": 100 * precision,
            "recall": 100 * recall, "f1": 100 * f1, "yes_ratio": pct(gts.count("yes"), len(gts)), "n": len(preds)}


class POPE(BenchmarkBase):
    """POPE on COCO val2014 (LLaVA-1.5-7B: 85.9 = mean F1 of the three splits)."""

    name = "pope"
    layout = "llava_pope_test.jsonl + coco/coco_pope_{adversarial,popular,random}.json (labels) + val2014/"

    protocols = PROTOCOLS
    layout_lmms = "lmms-lab/POPE: parquet shards / datasets cache / save_to_disk (test split)"

    def load(self, root: str | Path, *, protocol: str = "llava", question_file: str | Path | None = None,
             config: str | None = None, split: str | None = None, check_images: bool = True,
             **kw: Any) -> list[Question]:
        """LLaVA's layout (:meth:`load_official`) or, where ``root`` holds none of its files, the lmms-lab dataset
        (:func:`load_lmms_pope`); ``protocol`` picks the prompts and the default scorer."""
        check_protocol(self.name, protocol)
        qs = hfdata.load_either(
            root, [question_file or LLAVA_QUESTION_FILES[0], kw.get("annotation_dir") or "coco"],
            lambda: self.load_official(root, question_file=question_file, **kw),
            lambda: load_lmms_pope(root, protocol, config=config, split=split, check_images=check_images),
            "lmms-lab/POPE")
        if protocol == "lmms_eval":
            for q in qs:
                if q.text.endswith(SHORT_ANSWER_SUFFIX):
                    q.text = q.text[:-len(SHORT_ANSWER_SUFFIX)].strip() + SHORT_ANSWER_SUFFIX
        return tag_protocol(qs, protocol)

    def load_official(self, root: str | Path, *, question_file: str | Path | None = None,
                      annotation_dir: str | Path | None = None, image_folder: str | Path | None = None,
                      check_alignment: bool = True, **_: Any) -> list[Question]:
        """``llava_pope_test.jsonl`` (images ``val2014/``) with labels from ``coco/coco_pope_*.json`` by order within
        each category; without the LLaVA file the questions are built from the label files (LLaVA's id offsets,
        category order and short-answer suffix)."""
        root = Path(root)
        img = root / (image_folder or "val2014")
        label_dir = find_file(root, [annotation_dir] if annotation_dir else ("coco",))
        labels = read_label_dir(label_dir) if label_dir is not None else None
        qf = find_file(root, [question_file] if question_file else LLAVA_QUESTION_FILES)
        if qf is not None:
            qs = load_llava_questions(qf, img)
            if labels is None:
                return qs
            for cat, rows in labels.items():
                cq = [q for q in qs if q.category == cat]
                if check_alignment and len(cq) != len(rows):
                    raise BenchmarkFormatError(qf, f"{len(cq)} questions of category {cat!r} but {len(rows)} labels in "
                                                   f"coco_pope_{cat}.json")
                for i, (q, r) in enumerate(zip(cq, rows), start=1):
                    if check_alignment and (q.image != r["image"] or q.text.split("\n")[0] != r["text"]):
                        raise BenchmarkFormatError(
                            Path(label_dir) / f"coco_pope_{cat}.json",
                            f"label line does not match question {q.question_id!r} of {qf.name} (image/text differ; "
                            f"eval_pope.py pairs them by order)", i)
                    q.answers = [str(r["label"])]
                    q.metadata["label_question_id"] = r["question_id"]
            return qs
        if labels is None:
            raise FileNotFoundError(f"pope: neither {LLAVA_QUESTION_FILES[0]} nor coco/coco_pope_*.json under {root}")
        order = [c for c in LLAVA_CATEGORY_ORDER if c in labels] + sorted(c for c in labels
                                                                             if c not in LLAVA_CATEGORY_ORDER)
        out = []
        for n, cat in enumerate(order):
            offset = QID_OFFSETS.get(cat, 10_000_000 * (n + 3))
            for r in labels[cat]:
                out.append(Question(question_id=offset + int(r["question_id"]), text=r["text"] + SHORT_ANSWER_SUFFIX,
                                    image=r["image"], answers=[str(r["label"])], category=cat, image_root=str(img),
                                    metadata={"label_question_id": r["question_id"]}))
        return assign_keys(out)

    scorers = {"llava": "LLaVA eval_pope.py (yes/no parser, mean F1 of the splits)",
               "lmms_eval": "lmms-eval pope (exact yes/no, metrics over all rows)"}

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], *, protocol: str | None = None,
              strict: bool = False, **_: Any) -> dict[str, Any]:
        """Per-split accuracy / precision / recall / F1 / yes-ratio (percent); headline ``f1`` = mean split F1
        (``llava``) or F1 over all rows (``lmms_eval``); ``protocol`` defaults to the one the questions were loaded
        with."""
        protocol = scoring_protocol(self.name, questions, protocol)
        scored = [q for q in questions if q.answers]
        if not scored:
            raise ValueError("pope: no question has a label (load the coco/coco_pope_*.json files)")
        texts, n_missing = collect_answers(scored, answers, strict, self.name)
        cats: dict[str, list[int]] = {}
        for i, q in enumerate(scored):
            cats.setdefault(q.category or "default", []).append(i)
        per: dict[str, Any] = {}
        if protocol == "llava":
            for cat, idx in cats.items():
                preds = [0 if llava_pope_parse(texts[i]) == "no" else 1 for i in idx]
                labels = [0 if scored[i].answers[0] == "no" else 1 for i in idx]
                per[cat] = _metrics(preds, labels)
            out = {k: sum(m[k] for m in per.values()) / len(per)
                   for k in ("f1", "accuracy", "precision", "recall", "yes_ratio")}
        else:
            preds_all = [t.lower().strip() for t in texts]
            gts_all = [q.answers[0].lower().strip() for q in scored]
            for cat, idx in cats.items():
                per[cat] = _lmms_metrics([preds_all[i] for i in idx], [gts_all[i] for i in idx])
            out = {k: v for k, v in _lmms_metrics(preds_all, gts_all).items() if k != "n"}
        out.update(n=len(scored), n_missing=n_missing, protocol=protocol, scorer=self.scorers[protocol],
                   per_category=per)
        return out
