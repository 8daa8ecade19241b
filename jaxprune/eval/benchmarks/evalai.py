"""VQA answer normalisation and soft accuracy, reproducing the official code quirk for quirk.

Reproduces (own code, same behaviour):

* ``EvalAIAnswerProcessor`` of ``llava/eval/m4c_evaluator.py`` (haotian-liu/LLaVA @
  c121f0432da27facab705978f83c4ada465e46fd; copied there from MMF), identical to lmms-eval's
  ``lmms_eval/tasks/_task_utils/vqa_eval_metric.py`` (@ 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3):
  lowercase, drop ``,`` and ``?``, ``'s`` -> `` 's``, then punctuation, periods, number words, articles, contractions.
* ``processPunctuation`` / ``processDigitArticle`` of the official VQA evaluation
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (GT-Vision-Lab/VQA @ a013f0043c1e2cdc995922dfe257f7149aa9af06),
  whose only difference is the comma-between-digits test (``(\\d)(\\,)(\\d)`` instead of ``(?<=\\d)(\\,)+(?=\\d)``).
* ``TextVQAAccuracyEvaluator._compute_answer_scores`` (m4c_evaluator.py) and the ``evaluate`` loop of vqaEval.py.

Quirks kept on purpose:

* punctuation test is made on the *input* string while replacements accumulate on the output: a character is deleted
  when it touches a space anywhere in the input (or when the input has a comma between digits), else replaced by a
  space;
* the period regex ``(?!<=\\d)(\\.)(?!\\d)`` has a typo (``(?!<=`` is a look-ahead for the literal ``<=``, which can
  never hold where a ``.`` matches), so it means "a period not followed by a digit"; and ``re.UNICODE`` (= 32) is
  passed as ``sub``'s ``count``: at most 32 periods are removed;
* number words ``none``..``ten`` are mapped *before* articles are dropped; the contraction table is applied last and
  holds entries that can never match (``Im``, ``Ive`` after lowercasing) or that go the odd way
  (``somebody'd`` -> ``somebodyd``);
* ``'s`` splitting happens before everything else, so ``what's`` becomes ``what 's`` while ``whats`` becomes
  ``what's``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Retyped from the VQA contraction table (same 120 entries as m4c_evaluator.py / vqaEval.py, oddities included).
_CONTRACTIONS_SRC = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's
Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll
let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've
mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at
'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've|somethingll something'll
thats that's|thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's
theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's
whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've
who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't
wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll
y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS: dict[str, str] = dict(
    pair.split(" ") for line in _CONTRACTIONS_SRC.strip().splitlines() for pair in line.strip().split("|"))

NUMBER_MAP: dict[str, str] = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
NUMBER_MAP["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
# Equivalent to the official r"(?!<=\d)(\.)(?!\d)" (see module docstring); applied with count=32 (= re.UNICODE).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)
COMMA_STRIP_M4C = re.compile(r"(?<=\d)(,)+(?=\d)")  # m4c_evaluator / lmms-eval
COMMA_STRIP_VQA = re.compile(r"(\d)(,)(\d)")  # vqaEval.py


def process_punctuation(text: str, comma_strip: re.Pattern[str] = COMMA_STRIP_M4C) -> str:
    """``process_punctuation`` / ``processPunctuation``: per-character delete-or-space rule, then periods."""
    out = text
    digit_comma = comma_strip.search(text) is not None
    for p in PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """``process_digit_article`` / ``processDigitArticle``: number words -> digits, drop articles, contractions."""
    words = []
    for w in text.lower().split():
        w = NUMBER_MAP.get(w, w)
        if w not in ARTICLES:
            words.append(w)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def evalai_normalize(answer: str) -> str:
    """``EvalAIAnswerProcessor.__call__`` (what LLaVA applies before a VQAv2 upload and in TextVQA scoring)."""
    s = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(s))


def leave_one_out_accuracy(pred: str, gts: Sequence[str]) -> float:
    """Mean over the 10 "leave one human out" subsets of ``min(1, #remaining humans who said pred / 3)``."""
    if not gts:
        return 0.0
    total = 0.0
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        total += min(1.0, matches / 3.0)
    return total / len(gts)


def textvqa_accuracy(pred: str, gt_answers: Sequence[str]) -> float:
    """m4c ``TextVQAAccuracyEvaluator`` per-question score: both sides EvalAI-normalised, leave-one-out soft score.

    The official code asserts exactly 10 answers; so does this (ValueError).
    """
    if len(gt_answers) != 10:
        raise ValueError(f"TextVQA scoring needs 10 human answers, got {len(gt_answers)}")
    gts = [evalai_normalize(a) for a in gt_answers]
    p = evalai_normalize(pred)
    return leave_one_out_accuracy(p, gts) if p in gts else 0.0


def _clean(s: str) -> str:
    return s.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(pred: str, gt_answers: Sequence[str], protocol: str = "vqaeval") -> float:
    """Per-question VQA accuracy (fraction) under one of the official variants.

    * ``"vqaeval"``: vqaEval.py @ a013f00 (current; "Fixed processing answers bug", 2021): ``\\n``/``\\t`` -> space and
      strip on both sides; **only if the GT answers are not all identical**, GT and prediction both go through
      ``processPunctuation`` + ``processDigitArticle``; otherwise neither is processed.
    * ``"vqaeval_2015"``: vqaEval.py @ 458a8b2 (before that fix; the version eval.md describes): only the
      prediction gets ``\\n``/``\\t`` -> space and strip, then it is always processed; the GT answers are used as
      annotated (no whitespace cleaning) and get ``processPunctuation`` only, and only when not all identical.
    * ``"lmms_eval"``: lmms-eval ``vqav2_process_results``: both sides always get the m4c punctuation + digit/article
      processing.
    """
    res = _clean(pred)
    if protocol == "vqaeval_2015":
        gts = list(gt_answers)        # 458a8b2 cleans whitespace in the prediction only
        res = process_digit_article(process_punctuation(res, COMMA_STRIP_VQA))
        if len(set(gts)) > 1:
            gts = [process_punctuation(g, COMMA_STRIP_VQA) for g in gts]
        return leave_one_out_accuracy(res, gts)
    gts = [_clean(g) for g in gt_answers]
    if protocol == "vqaeval":
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(g, COMMA_STRIP_VQA)) for g in gts]
            res = process_digit_article(process_punctuation(res, COMMA_STRIP_VQA))
    elif protocol == "lmms_eval":
        gts = [process_digit_article(process_punctuation(g)) for g in gts]
        res = process_digit_article(process_punctuation(res))
    else:
        raise ValueError(f"unknown VQA accuracy protocol {protocol!r} (vqaeval, vqaeval_2015, lmms_eval)")
    return leave_one_out_accuracy(res, gts)
