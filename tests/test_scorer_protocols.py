"""Each scoring protocol against a transcription of the code it names, on tricky answer strings.

Transcriptions (re-typed in Python 3 from the sources, control flow kept line for line):

* ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` ``VQAEval.evaluate`` of GT-Vision-Lab/VQA @ 458a8b2 (2015-2020,
  ``vqaeval_2015``) and @ a013f0043c1e2cdc995922dfe257f7149aa9af06 ("Fixed processing answers bug", ``vqaeval``);
* lmms-eval @ 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3: ``lmms_eval/api/task.py`` ``ConfigurableTask.process_results``
  (``res.strip()`` of every generation) + ``lmms_eval/api/metrics.py`` ``exact_match_hf_evaluate`` (``gqa``:
  ``ignore_case``, ``ignore_punctuation``); ``lmms_eval/tasks/vqav2/utils.py`` ``vqav2_process_results``;
  ``lmms_eval/tasks/scienceqa/utils.py`` ``sqa_process_results``; ``lmms_eval/tasks/pope/utils.py``;
  ``lmms_eval/tasks/mme/utils.py`` ``parse_pred_ans``; ``lmms_eval/tasks/seedbench/utils.py``.
"""

from __future__ import annotations

import re
import statistics
import string

import numpy as np
import pytest

from jaxprune.eval.benchmarks import Question, get_benchmark
from jaxprune.eval.benchmarks.evalai import CONTRACTIONS, vqa_accuracy
from jaxprune.eval.benchmarks.gqa import lmms_exact_match

# ---------------------------------------------------------------- vqaEval.py (GT-Vision-Lab/VQA)

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
               "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ["a", "an", "the"]


def _process_punctuation(in_text):
    out_text = in_text
    for p in _PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(_COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    out_text = _PERIOD_STRIP.sub("", out_text, re.UNICODE)
    return out_text


def _process_digit_article(in_text):
    out_text = []
    for word in in_text.lower().split():
        word = _MANUAL_MAP.setdefault(word, word)
        if word not in _ARTICLES:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in CONTRACTIONS:
            out_text[word_id] = CONTRACTIONS[word]
    return " ".join(out_text)


def _answers(gts):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(gts)]


def vqaeval_458a8b2(res_ans, gt_answers):
    """``evaluate``'s per-question body @ 458a8b2."""
    answers = _answers(gt_answers)
    res_ans = res_ans.replace("\n", " ")
    res_ans = res_ans.replace("\t", " ")
    res_ans = res_ans.strip()
    res_ans = _process_punctuation(res_ans)
    res_ans = _process_digit_article(res_ans)
    gt_acc = []
    gts = [ans["answer"] for ans in answers]
    if len(set(gts)) > 1:
        for ans_dic in answers:
            ans_dic["answer"] = _process_punctuation(ans_dic["answer"])
    for gt_datum in answers:
        other = [item for item in answers if item != gt_datum]
        matching = [item for item in other if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


def vqaeval_a013f00(res_ans, gt_answers):
    """``evaluate``'s per-question body @ a013f00."""
    answers = _answers(gt_answers)
    for ans_dic in answers:
        ans_dic["answer"] = ans_dic["answer"].replace("\n", " ")
        ans_dic["answer"] = ans_dic["answer"].replace("\t", " ")
        ans_dic["answer"] = ans_dic["answer"].strip()
    res_ans = res_ans.replace("\n", " ")
    res_ans = res_ans.replace("\t", " ")
    res_ans = res_ans.strip()
    gt_acc = []
    gts = [ans["answer"] for ans in answers]
    if len(set(gts)) > 1:
        for ans_dic in answers:
            ans_dic["answer"] = _process_punctuation(ans_dic["answer"])
            ans_dic["answer"] = _process_digit_article(ans_dic["answer"])
        res_ans = _process_punctuation(res_ans)
        res_ans = _process_digit_article(res_ans)
    for gt_datum in answers:
        other = [item for item in answers if item != gt_datum]
        matching = [item for item in other if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


# ---------------------------------------------------------------- lmms-eval


_M4C_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _m4c_punctuation(in_text):
    out_text = in_text
    for p in _PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(_M4C_COMMA, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _PERIOD_STRIP.sub("", out_text, re.UNICODE)


def lmms_vqav2(result, gt_answers):
    """task.py strip + ``vqav2_process_results``."""
    res_ans = result.strip()
    answers = _answers(gt_answers)
    for a in answers:
        a["answer"] = a["answer"].replace("\n", " ").replace("\t", " ").strip()
    res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
    for a in answers:
        a["answer"] = _process_digit_article(_m4c_punctuation(a["answer"]))
    res_ans = _process_digit_article(_m4c_punctuation(res_ans))
    gt_acc = []
    for gt_datum in answers:
        other = [item for item in answers if item != gt_datum]
        matching = [item for item in other if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching)) / 3))
    return statistics.mean(gt_acc)


def lmms_gqa(result, target):
    """task.py strip + ``exact_match_hf_evaluate(ignore_case=True, ignore_punctuation=True)``."""
    predictions = np.asarray([result.strip()])
    references = np.asarray([target])
    predictions = np.char.lower(predictions)
    references = np.char.lower(references)
    table = string.punctuation.maketrans("", "", string.punctuation)
    predictions = np.char.translate(predictions, table=table)
    references = np.char.translate(references, table=table)
    return float(np.mean(predictions == references))


TRICKY = ["yes", "Yes.", " yes", "yes\n", "\tyes ", "Two", "2", "two dogs", "a dog", "The dog.", "dog.\n",
          "t-shirt", "t - shirt", "1,000", "1000", "it's", "its", "dont", "don't", "none", "", " ", "yes\x00",
          "3.5", "3.", "left side", "Left, side", "(a)", "no\n\nyes", "A", "cant", "x/y", "on the  table",
          "2:30", "Yes! ", "$5"]
GT_SETS = [["yes"] * 10, [" yes"] * 5 + ["yes"] * 5, ["yes\n"] * 10, ["two"] * 4 + ["2"] * 6,
           ["t-shirt"] * 3 + ["shirt"] * 7, ["1,000"] * 5 + ["1000"] * 5, ["dog", "a dog", "the dog", "dogs", "dog.",
           "dog", "puppy", "dog ", "Dog", "dog"], ["on the table"] * 9 + [" on the table"],
           ["2:30", "2:30", "230", "2 30", "two thirty", "2:30", "2:30 ", "2.30", "2:30", "half past 2"],
           ["don't", "dont", "do not"] * 3 + ["dont"], ["none"] * 10, ["yes", "no"] * 5]


@pytest.mark.parametrize("gts", GT_SETS, ids=[f"gt{i}" for i in range(len(GT_SETS))])
def test_vqa_protocols_equal_their_transcriptions(gts):
    for pred in TRICKY:
        assert vqa_accuracy(pred, gts, "vqaeval_2015") == pytest.approx(vqaeval_458a8b2(pred, gts)), pred
        assert vqa_accuracy(pred, gts, "vqaeval") == pytest.approx(vqaeval_a013f00(pred, gts)), pred
        assert vqa_accuracy(pred.strip(), gts, "lmms_eval") == pytest.approx(lmms_vqav2(pred, gts)), pred


def test_vqaeval_2015_cleans_whitespace_in_the_prediction_only():
    gts = [" yes"] * 5 + ["yes"] * 5       # GT whitespace kept by 458a8b2: only 5 humans match "yes"
    assert vqa_accuracy("yes", gts, "vqaeval_2015") == pytest.approx(vqaeval_458a8b2("yes", gts)) == 1.0
    gts = [" yes"] * 7 + ["yes"] * 3
    assert vqaeval_458a8b2("yes", gts) == pytest.approx(0.9)
    assert vqa_accuracy("yes", gts, "vqaeval_2015") == pytest.approx(0.9)
    assert vqa_accuracy("yes", gts, "vqaeval") == 1.0     # a013f00 strips the GT too
    assert vqa_accuracy(" yes\n", ["yes\n"] * 10, "vqaeval_2015") == 0.0   # identical GT: never cleaned


@pytest.mark.parametrize("target", ["yes", "no", "t-shirt", "T-shirt", "man's hat", "left", "Yes", " yes"])
def test_gqa_lmms_eval_equals_transcription(target):
    b = get_benchmark("gqa")
    for pred in TRICKY + [target, target + "\n", "\n" + target + " ", target.upper() + "."]:
        expected = lmms_gqa(pred, target)
        assert float(lmms_exact_match(pred, target)) == expected, (pred, target)
        r = b.score([Question("1", "q", answers=[target])], {"1": pred}, protocol="lmms_eval")
        assert r["accuracy"] == 100.0 * expected, (pred, target)


def test_gqa_lmms_eval_strips_before_the_metric():
    b = get_benchmark("gqa")
    qs = [Question("1", "q", answers=["yes"]), Question("2", "q", answers=["woman"])]
    r = b.score(qs, {"1": "\nYes\n", "2": "  woman."}, protocol="lmms_eval")
    assert r["accuracy"] == 100.0
    assert b.score(qs, {"1": "\nYes\n", "2": "  woman."})["accuracy"] == 0.0   # LLaVA: rstrip('.') only
