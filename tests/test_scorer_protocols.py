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


# ---------------------------------------------------------------- lmms-eval task scorers vs LLaVA's, tricky strings


def lmms_pope(results, gts):
    """task.py strip + ``pope_process_results`` + the four aggregations (fractions)."""
    rs = [{"prediction": r.strip().lower().strip(), "ground_truth": g.lower().strip()} for r, g in zip(results, gts)]
    acc = sum(1.0 if r["prediction"] == r["ground_truth"] else 0.0 for r in rs) / len(rs)
    tp = sum(1 for r in rs if r["ground_truth"] == "yes" and r["prediction"] == "yes")
    fp = sum(1 for r in rs if r["ground_truth"] == "no" and r["prediction"] == "yes")
    fn = sum(1 for r in rs if r["ground_truth"] == "yes" and r["prediction"] == "no")
    precision = tp / (tp + fp) if (tp + fp) > 0 else 0
    recall = tp / (tp + fn) if (tp + fn) > 0 else 0
    f1 = 2 * (precision * recall) / (precision + recall) if (precision + recall) > 0 else 0
    yes = sum(1 for r in rs if r["ground_truth"] == "yes")
    return {"accuracy": acc, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes / len(rs)}


POPE_ANSWERS = ["Yes", "yes.", " no", "No, there is not.", "NO", "yes\n", "There is a dog.", "not", "", "n"]


def test_pope_lmms_eval_equals_transcription_and_differs_from_llava():
    b = get_benchmark("pope")
    gts = ["yes", "no", "no", "no", "no", "yes", "yes", "no", "yes", "no"]
    qs = [Question(i, "q", answers=[g], category=("adversarial", "random")[i % 2]) for i, g in enumerate(gts)]
    ans = {str(i): a for i, a in enumerate(POPE_ANSWERS)}
    got = b.score(qs, ans, protocol="lmms_eval")
    want = lmms_pope(POPE_ANSWERS, gts)
    for k, v in want.items():
        assert got[k] == pytest.approx(100 * v), k
    llava = b.score(qs, ans)
    assert llava["f1"] != pytest.approx(got["f1"])       # "yes." / "No, there is not." parse under LLaVA only


def lmms_mme_parse(pred_ans):
    """``mme/utils.py`` ``parse_pred_ans``."""
    pred_ans = pred_ans.lower().strip().replace(".", "")
    if pred_ans in ["yes", "no"]:
        return pred_ans
    if len(pred_ans) == 1:
        return "yes" if pred_ans == "y" else "no" if pred_ans == "n" else "other"
    prefix = pred_ans[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


@pytest.mark.parametrize("pred", ["Yes", "yes.", " No", "Y", "n", "y.", "No.", "not sure", "I think yes", "nope",
                                  "Yes\n", "\nno", "..yes", "", "N.", "a", "know", "Noo"])
def test_mme_lmms_parser_equals_transcription(pred):
    from jaxprune.eval.benchmarks.mme import mme_parse, mme_parse_lmms

    assert mme_parse_lmms(pred) == lmms_mme_parse(pred.strip())
    assert mme_parse(pred) in ("yes", "no", "other")


def test_mme_protocols_differ_on_single_letters_and_periods():
    from jaxprune.eval.benchmarks.mme import mme_parse, mme_parse_lmms

    assert (mme_parse("Y"), mme_parse_lmms("Y")) == ("other", "yes")
    assert (mme_parse(" yes"), mme_parse_lmms(" yes")) == ("yes", "yes")      # the 4-char prefix still holds "yes"
    assert (mme_parse("...no"), mme_parse_lmms("...no")) == ("other", "no")


def lmms_sqa(result, letter):
    """task.py strip + ``sqa_process_results`` (target = the answer's letter)."""
    target = letter.strip().lower()
    pred = result.strip().strip()
    if pred.lower() == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return 1.0 if pred[0].lower() == target else 0.0
    return 0.0


SQA_ANSWERS = ["B", "b", " B", "B.", "B. cat", "B.cat", "(B)", "The answer is B.", "B is right", "b.", "C", "BB", ""]


@pytest.mark.parametrize("pred", SQA_ANSWERS)
def test_scienceqa_lmms_eval_equals_transcription(pred):
    b = get_benchmark("scienceqa")
    q = Question("1", "q", answers=["B"], options={"A": "x", "B": "y", "C": "z"},
                 metadata={"n_choices": 3, "answer_index": 1}, image="i.png", answer_file_prompt="<image>\nq")
    assert b.score([q], {"1": pred}, protocol="lmms_eval")["accuracy"] == 100.0 * lmms_sqa(pred, "B")


def test_scienceqa_protocols_differ_where_documented():
    b = get_benchmark("scienceqa")
    q = Question("1", "q", answers=["B"], metadata={"n_choices": 3, "answer_index": 1}, image="i.png",
                 answer_file_prompt="<image>\nq")
    both = lambda p: (b.score([q], {"1": p})["accuracy"], b.score([q], {"1": p}, protocol="lmms_eval")["accuracy"])
    assert both("b") == (0.0, 100.0) and both("B.") == (0.0, 100.0) and both(" B") == (0.0, 100.0)
    assert both("The answer is B.") == (100.0, 0.0) and both("B. y") == (100.0, 100.0)


def lmms_seed(result, answer):
    """task.py strip + ``seed_process_result`` + ``seed_aggregation_result`` for one row."""
    pred = result.strip().strip()
    if len(pred) > 1:
        pred = pred[0]
    return 1.0 if pred.lower().strip() == answer.lower().strip() else 0.0


@pytest.mark.parametrize("pred", ["A", "a", " A", "A.", "A. One", "(A)", "B", "", "Answer: A", "\nA\n"])
def test_seed_lmms_eval_equals_transcription(pred):
    b = get_benchmark("seed")
    q = Question("1", "q", answers=["A"], split="image", metadata={"question_type_id": 5})
    assert b.score([q], {"1": pred}, protocol="lmms_eval")["accuracy"] == 100.0 * lmms_seed(pred, "A")
    assert b.score([q], {"1": pred})["accuracy"] == (100.0 if pred == "A" else 0.0)   # LLaVA: exact string


def test_textvqa_lmms_eval_equals_m4c_but_takes_any_answer_count():
    from jaxprune.eval.benchmarks.evalai import evalai_normalize, textvqa_accuracy
    from jaxprune.eval.benchmarks.textvqa import lmms_textvqa_accuracy

    def lmms(result, answers):     # textvqa_process_results after the pipeline's strip
        res = evalai_normalize(result.strip())
        gts = [evalai_normalize(a) for a in answers]
        accs = [min(1, float(len([g for j, g in enumerate(gts) if j != i and g == res])) / 3)
                for i in range(len(gts))]
        return statistics.mean(accs)

    gts = ["Dakota"] * 6 + ["dakota digital"] * 3 + ["DAKOTA."]
    for pred in ("Dakota", " dakota.", "Dakota Digital", "kodak", "", "the dakota"):
        assert lmms_textvqa_accuracy(pred, gts) == pytest.approx(lmms(pred, gts))
        assert lmms_textvqa_accuracy(pred, gts) == pytest.approx(textvqa_accuracy(pred, gts))
    assert lmms_textvqa_accuracy("yes", ["yes"] * 4) == pytest.approx(lmms("yes", ["yes"] * 4))
    with pytest.raises(ValueError):
        textvqa_accuracy("yes", ["yes"] * 4)


def test_mmbench_lmms_prompt_equals_transcription():
    from jaxprune.eval.benchmarks.mmbench import lmms_mmbench_prompt

    def lmms(doc, post="\nAnswer with the option's letter from the given choices directly."):
        options = {c: doc[c] for c in sorted(set(doc) & set("ABCDE")) if doc[c]}
        opts = "There are several options:\n"
        for k, v in sorted(options.items()):
            if v is not None and v == v and v != "nan":
                opts += f"{k}. {v}\n"
        opts = opts.rstrip("\n")
        hint = doc["hint"]
        q = f"{hint} {doc['question']} {opts}" if hint is not None and hint == hint and hint != "nan" \
            else f"{doc['question']} {opts}"
        return f"{q}\n{post}"

    for doc in ({"question": "Q?", "hint": None, "A": "a", "B": "b", "C": None, "D": None},
                {"question": "Q?", "hint": "H.", "A": "a", "B": "b", "C": "nan", "D": "d"},
                {"question": "Q?", "hint": "nan", "A": "a", "B": "", "C": "c", "D": float("nan")},
                {"question": "Q?", "hint": "", "A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}):
        cells = {c: doc.get(c) for c in "ABCDE" if c in doc}
        assert lmms_mmbench_prompt(doc["question"], doc["hint"], cells) == lmms(doc)


def test_lmms_prompts_equal_transcriptions():
    from jaxprune.eval.benchmarks.mme import mme_prompt
    from jaxprune.eval.benchmarks.scienceqa import build_human_turn, lmms_sqa_text

    post = "\nAnswer with the option's letter from the given choices directly."

    def sqa_doc_to_text(doc):
        context, question, choices = doc["hint"], doc["question"], doc["choices"]
        options = [chr(ord("A") + i) for i in range(len(choices))]
        choices_str = "\n".join(f"{o}. {c}" for o, c in zip(options, choices))
        if context:
            context = f"Context: {context}\n"
        return f"{context}{question}\n{choices_str}{post}"

    for hint in ("", " ", "The map shows X.", "two\nlines"):
        doc = {"hint": hint, "question": "Which is it? ", "choices": ["cat", "dog", "eel"]}
        assert lmms_sqa_text(doc) == sqa_doc_to_text(doc)
        llava = build_human_turn(doc).strip() + post
        assert (llava == lmms_sqa_text(doc)) == (hint.strip() == hint and hint != " ")   # whitespace differs

    def mme_doc_to_text(question, post_prompt="\nAnswer the question using a single word or phrase."):
        question = question.strip()
        question = question.replace(" Please answer yes or no.", "")
        return f"{question}{post_prompt}"

    for q in ("Is there a cat? Please answer yes or no.", "Is there a cat?  Please answer yes or no.",
              " Is it red? Please answer yes or no. ", "Is it red?"):
        assert mme_prompt(q, "lmms_eval") == mme_doc_to_text(q)
    assert mme_prompt(" Is it red? Please answer yes or no. ") != mme_prompt(" Is it red? Please answer yes or no. ",
                                                                             "lmms_eval")
