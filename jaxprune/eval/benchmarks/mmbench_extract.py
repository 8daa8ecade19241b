"""Rule-based option extraction for MMBench answers (no GPT).

Reproduces, in own code, lmms-eval (EvolvingLMMs-Lab/lmms-eval @ 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3):

* ``lmms_eval/tasks/mmbench/mmbench_evals.py::MMBench_Evaluator.can_infer_option`` (candidate letters ``A``-``E``;
  answers containing ``Failed to obtain answer via API`` are rejected; whitespace-split tokens; a bare letter token
  counts only when exactly one of ``A``-``E`` appears bare -- but if the token ``A`` is present in an answer of more
  than 3 tokens it is taken for an article and the bare-letter rule is skipped entirely; then the wrapped forms
  ``X.`` ``X,`` ``X:`` ``X)`` ``X).`` ``(X)`` ``(X).`` ``:X`` ``:X,`` ``:X.`` ``:X)`` ``:X).``, each form on its
  own, must single out one letter), ``can_infer_text`` (exactly one option text, lowercased, is a substring of the
  lowercased answer) and ``can_infer`` (option first, then text);
* ``lmms_eval/tasks/_task_utils/mcq_extract.py::extract_mcq_answer`` (the ``static`` fallback of ``eval_result``:
  candidates in several formats ranked by a fixed priority, later position wins within a format).

These functions return ``""`` where the originals return ``False`` / ``""``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

_WRAPPERS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
             (":", "."), (":", ")"), (":", ")."))


def _count(tokens: Sequence[str], choices: str, prefix: str = "", suffix: str = "") -> int:
    return sum(1 for c in choices if prefix + c + suffix in tokens)


def can_infer_option(answer: str, num_choice: int = 5) -> str:
    """The option letter written explicitly in ``answer`` (``""`` if none or ambiguous)."""
    choices = "ABCDE"[:num_choice]
    if "Failed to obtain answer via API" in answer:
        return ""
    tokens = [t.strip() for t in answer.split()]
    if _count(tokens, choices) == 1 and not ("A" in tokens and len(tokens) > 3):
        for c in choices:
            if c in tokens:
                return c
    for prefix, suffix in _WRAPPERS:
        if _count(tokens, choices, prefix, suffix) == 1:
            for c in choices:
                if prefix + c + suffix in tokens:
                    return c
    return ""


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str:
    """The letter of the only option whose (lowercased) text occurs in the (lowercased) answer, else ``""``."""
    low = answer.lower()
    hits = [k for k, v in choices.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else ""


def can_infer(answer: str, choices: Mapping[str, str]) -> str:
    """``can_infer_option`` then ``can_infer_text``."""
    return can_infer_option(answer) or can_infer_text(answer, choices)


_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is", "best answer is",
    "the correct option is", "correct option is", "the best option is", "best option is", "the choice is",
    "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick", "my answer is",
    "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}


def extract_mcq_answer(response: str, choices: Sequence[str] | None = None) -> str:
    """lmms-eval's static multiple-choice extractor (``""`` when nothing is found)."""
    if not response or not response.strip():
        return ""
    letters = list(choices) if choices else list("ABCDEFGH")
    text = response.strip()
    for ch in (",", ".", "!", "?", ";", ":", "'", '"'):
        text = text.strip(ch)
    text = " " + text + " "
    cands: list[tuple[str, int, str]] = []
    for fmt, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                         ("space", "{} ")):
        for c in letters:
            s = pattern.format(c)
            if s in text:
                cands.append((c, text.rfind(s), fmt))
    low = text.lower()
    for phrase in _ANSWER_PHRASES:
        idx = low.find(phrase)
        if idx != -1:
            after = idx + len(phrase)
            for c in letters:
                pos = text.find(c, after)
                if pos != -1:
                    cands.append((c, pos, "phrase"))
    stripped = text.strip()
    for c in letters:
        if stripped.startswith(c) and (len(stripped) == 1 or not stripped[1].isalpha()):
            cands.append((c, 0, "start"))
    for c in letters:
        if stripped.endswith(c) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            cands.append((c, len(text) - 1, "end"))
    if not cands:
        for c in letters:
            if c in text:
                cands.append((c, text.rfind(c), "fallback"))
    if not cands:
        return ""
    cands.sort(key=lambda x: (_PRIORITY.get(x[2], 0), x[1]), reverse=True)
    return cands[0][0]
