"""SynthVQA: the synthetic VQA set of :mod:`jaxprune.eval.synthvqa` (written by
:func:`jaxprune.eval.synthvqa.export.write_benchmark`), exact-match accuracy overall and per question type.

Files under the data root: ``llava_synthvqa_{split}.jsonl`` (LLaVA question file: ``question_id``, ``image``
relative to ``images/``, ``text`` with the short-answer suffix, ``category`` = question type),
``synthvqa_{split}_answers.jsonl`` (``question_id``, ``answer``) and ``synthvqa_meta.json``.

Scoring (ours; there is no official scorer): prediction and answer are lower-cased, stripped of surrounding
whitespace and trailing periods (as LLaVA's ``convert_gqa_for_eval.py``), then compared exactly. Metrics (percent):
``accuracy``, ``per_type`` (colour / exist / where / count), and the chance levels ``chance_per_type`` (a uniform
guess over each type's answer set, :data:`jaxprune.eval.synthvqa.questions.CHANCE`) and ``chance`` (weighted by the
question mix of the scored questions), plus the stronger blind baseline ``majority`` / ``majority_per_type``: always
answering the most frequent ground-truth answer of each type in the scored set (counts are not uniform: "two" is
about half of the count answers).

Each question whose id names its generated scene also carries ``metadata["reducer_inputs"]["patch_prior"]`` (the
asked object's patches, :mod:`jaxprune.eval.synthvqa.targets`): the input of the ``oracle`` reducer, which runs on
this benchmark only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import BenchmarkBase, BenchmarkFormatError, Question, collect_answers, pct
from .files import find_file, load_llava_questions, read_json, read_jsonl

META_FILE = "synthvqa_meta.json"


def normalise(text: str) -> str:
    """Lower case, no surrounding whitespace, no trailing period(s)."""
    return text.strip().lower().rstrip(".").strip()


def _chance() -> dict[str, float]:
    from jaxprune.eval.synthvqa.questions import CHANCE

    return CHANCE


def _files(root: Path, split: str | None, question_file, answers_file) -> tuple[Path, Path | None]:
    meta_path = root / META_FILE
    meta = read_json(meta_path) if meta_path.is_file() and split is None else None
    if question_file is None:
        if meta is not None and isinstance(meta, dict) and "question_file" in meta:
            question_file = meta["question_file"]
            answers_file = answers_file or meta.get("answers_file")
        elif split is not None:
            question_file = f"llava_synthvqa_{split}.jsonl"
        else:
            found = sorted(root.glob("llava_synthvqa_*.jsonl"))
            if len(found) != 1:
                raise FileNotFoundError(f"synthvqa: expected one llava_synthvqa_<split>.jsonl under {root}, found "
                                        f"{[p.name for p in found] or 'none'} (pass split=...)")
            question_file = found[0].name
    qf = find_file(root, [question_file])
    if qf is None:
        raise FileNotFoundError(f"synthvqa: question file {question_file} not found under {root}")
    if answers_file is None:
        stem = qf.name[len("llava_synthvqa_"):-len(".jsonl")] if qf.name.startswith("llava_synthvqa_") else None
        answers_file = f"synthvqa_{stem}_answers.jsonl" if stem else None
    af = find_file(root, [answers_file]) if answers_file else None
    return qf, af


def _attach_priors(questions: list[Question]) -> None:
    """``metadata["reducer_inputs"] = {"patch_prior": [144]}`` on every question whose id names its scene (the
    ``oracle`` reducer's input: the asked object's patches, regenerated from ``(split, seed, index)``); questions
    of hand-written files get none (the oracle then refuses them by name)."""
    from jaxprune.eval.synthvqa.targets import prior_for_question_id

    for q in questions:
        try:
            q.metadata["reducer_inputs"] = {"patch_prior": prior_for_question_id(q.key)}
        except ValueError:
            continue


class SynthVQA(BenchmarkBase):
    """The synthetic VQA test set (our trained tiny LLaVA's benchmark)."""

    name = "synthvqa"
    layout = ("llava_synthvqa_<split>.jsonl + synthvqa_<split>_answers.jsonl + images/ (written by python -m "
              "jaxprune.eval.synthvqa.export benchmark DIR)")
    has_submission = False

    def load(self, root: str | Path, *, split: str | None = None, question_file: str | Path | None = None,
             answers_file: str | Path | None = None, image_folder: str | Path | None = None,
             **_: Any) -> list[Question]:
        """Questions of ``root`` (files named by ``synthvqa_meta.json``, else the single
        ``llava_synthvqa_<split>.jsonl``) with their answers when the answers file is there."""
        root = Path(root)
        qf, af = _files(root, split, question_file, answers_file)
        qs = load_llava_questions(qf, root / (image_folder or "images"))
        if af is not None:
            gt: dict[str, str] = {}
            for lineno, r in enumerate(read_jsonl(af, required=("question_id", "answer")), start=1):
                if not isinstance(r["answer"], str):
                    raise BenchmarkFormatError(af, "'answer' must be a string", lineno)
                gt[str(r["question_id"])] = r["answer"]
            for q in qs:
                if q.key in gt:
                    q.answers = [gt[q.key]]
        _attach_priors(qs)
        return qs

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], *, strict: bool = False,
              **_: Any) -> dict[str, Any]:
        """Exact-match accuracy after :func:`normalise`; see the module docstring for the metrics."""
        scored = [q for q in questions if q.answers]
        if not scored:
            raise ValueError("synthvqa: no question has a ground-truth answer (synthvqa_<split>_answers.jsonl)")
        texts, n_missing = collect_answers(scored, answers, strict, self.name)
        chance = _chance()
        hits: dict[str, list[bool]] = {}
        truth: dict[str, Counter] = {}
        all_hits: list[bool] = []
        for q, text in zip(scored, texts):
            ok = normalise(text) == normalise(q.answers[0])
            all_hits.append(ok)
            hits.setdefault(str(q.category), []).append(ok)
            truth.setdefault(str(q.category), Counter())[normalise(q.answers[0])] += 1
        order = [t for t in chance if t in hits] + sorted(t for t in hits if t not in chance)
        n_known = sum(len(hits[t]) for t in order if t in chance)
        top = {t: truth[t].most_common(1)[0][1] for t in order}
        return {
            "accuracy": pct(sum(all_hits), len(all_hits)), "n": len(all_hits), "n_missing": n_missing,
            "per_type": {t: pct(sum(hits[t]), len(hits[t])) for t in order},
            "n_per_type": {t: len(hits[t]) for t in order},
            "chance_per_type": {t: 100.0 * chance[t] for t in order if t in chance},
            "chance": pct(sum(chance[t] * len(hits[t]) for t in order if t in chance), n_known),
            "majority_per_type": {t: pct(top[t], len(hits[t])) for t in order},
            "majority": pct(sum(top.values()), len(all_hits)),
        }
