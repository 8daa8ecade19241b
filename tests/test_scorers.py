"""Hand-made cases for every quirk of the official scorers reproduced in ``jaxprune.eval.benchmarks``.

Expected values were worked out from the official code (cited in each module's docstring); the scorers themselves
were also cross-checked offline against the original scripts and LLaVA-1.5-13B's released answer files.
"""

from __future__ import annotations

import pytest

from jaxprune.eval.benchmarks import MissingAnswersError, Question, get_benchmark
from jaxprune.eval.benchmarks.evalai import (
    COMMA_STRIP_VQA,
    CONTRACTIONS,
    evalai_normalize,
    leave_one_out_accuracy,
    process_digit_article,
    process_punctuation,
    textvqa_accuracy,
    vqa_accuracy,
)
from jaxprune.eval.benchmarks.gqa import llava_gqa_prediction
from jaxprune.eval.benchmarks.mmbench_extract import can_infer, can_infer_option, can_infer_text, extract_mcq_answer
from jaxprune.eval.benchmarks.mme import mme_parse, mme_parse_lmms
from jaxprune.eval.benchmarks.pope import llava_pope_parse
from jaxprune.eval.benchmarks.scienceqa import letter_index, parse_sqa_letter
from jaxprune.eval.benchmarks.textvqa import prompt_question

# ---------------------------------------------------------------- EvalAI answer processor (m4c_evaluator.py)


@pytest.mark.parametrize("raw, expected", [
    ("1.5", "1.5"),                 # period followed by a digit is kept
    ("end.", "end"),                # other periods go
    ("3.", "3"),
    ("U.S.A.", "usa"),
    (".5 cups", ".5 cups"),
    ("Two dogs.", "2 dogs"),        # number words
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),           # only zero..ten (+ none) are mapped
    ("a cat", "cat"),               # articles
    ("The End", "end"),
    ("an one", "1"),                # number mapped first, then article test: "1" survives
    ("dont", "don't"),              # contractions: apostrophe-less -> apostrophed
    ("whats up", "what's up"),
    ("what's up", "what 's up"),    # "'s" is split off before anything else
    ("Im here", "im here"),         # capitalised keys "Im"/"Ive" can never match after lowercasing
    ("somebody'd", "somebodyd"),    # odd entry goes the other way
    ("yes, it is?", "yes it is"),   # ',' and '?' removed by word_tokenize
    ("it's 3,000", "it 's 3000"),
    ("hot-dog", "hot dog"),         # '-' touching no space -> replaced by a space
    ("x-ray (film)", "x ray film"),
    ("Yes\tplease\n", "yes please"),
])
def test_evalai_processor(raw, expected):
    assert evalai_normalize(raw) == expected


def test_process_punctuation_input_wide_rules():
    # a punctuation char touching a space anywhere in the *input* is deleted everywhere, else replaced by a space
    assert process_punctuation("a/b / c") == "ab  c"
    assert process_punctuation("a/b") == "a b"
    # a comma between digits anywhere makes every punctuation char deleted (m4c: (?<=\d)(,)+(?=\d))
    assert process_punctuation("1,000 red-white") == "1000 redwhite"
    assert process_punctuation("1,,000 red-white") == "1000 redwhite"
    # the official vqaEval regex (\d)(,)(\d) needs exactly one comma between digits
    assert process_punctuation("1,,000 red-white", COMMA_STRIP_VQA) == "1  000 red white"


def test_period_strip_count_quirk():
    # re.UNICODE (=32) is passed as sub's count: only the first 32 periods are removed
    assert process_punctuation("a." * 40) == "a" * 32 + "a." * 8


def test_contraction_table_size_and_oddities():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["Im"] == "I'm" and CONTRACTIONS["let's"] == "let's" and CONTRACTIONS["twas"] == "'twas"
    assert process_digit_article("the dont") == "don't"   # contraction applied after article removal


# ---------------------------------------------------------------- VQA soft accuracy (vqaEval.py / m4c)


def test_leave_one_out_accuracy():
    gts = ["2"] * 3 + ["3"] * 7
    assert leave_one_out_accuracy("2", gts) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert leave_one_out_accuracy("9", ["9"] + ["x"] * 9) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert leave_one_out_accuracy("x", ["x"] * 10) == 1.0


def test_vqaeval_identical_gt_not_processed():
    gts = ["yes"] * 10
    assert vqa_accuracy("Yes", gts, "vqaeval") == 0.0        # current vqaEval.py: nothing processed when GT agree
    assert vqa_accuracy("Yes", gts, "vqaeval_2015") == 1.0   # old version always processed the prediction
    assert vqa_accuracy("Yes", gts, "lmms_eval") == 1.0
    assert vqa_accuracy(" yes\n", gts, "vqaeval") == 1.0     # but whitespace is always cleaned


def test_vqaeval_mixed_gt_processed_both_sides():
    gts = ["two"] * 5 + ["2"] * 5
    assert vqa_accuracy("2", gts, "vqaeval") == 1.0          # GT "two" -> "2" (digit/article on both sides)
    assert vqa_accuracy("2", gts, "vqaeval_2015") == pytest.approx(1.0)  # GT "two" stays: 5 humans said "2"
    assert vqa_accuracy("two", gts, "vqaeval_2015") == pytest.approx(1.0)  # pred "two" -> "2"
    with pytest.raises(ValueError):
        vqa_accuracy("2", gts, "nope")


def test_vqav2_protocols_and_breakdown():
    b = get_benchmark("vqav2")
    qs = [Question(1, "q", answers=["yes"] * 10, metadata={"answer_type": "yes/no", "question_type": "is"}),
          Question(2, "q", answers=["2"] * 6 + ["two"] * 4, metadata={"answer_type": "number",
                                                                       "question_type": "how many"})]
    ans = {"1": "Yes.", "2": "Two"}
    llava = b.score(qs, ans)   # EvalAI-normalised first: "yes", "2"
    assert llava["accuracy"] == pytest.approx(100.0) and llava["per_answer_type"]["number"] == pytest.approx(100.0)
    raw = b.score(qs, ans, protocol="vqaeval")  # "Yes." vs identical GT -> 0
    assert raw["per_answer_type"]["yes/no"] == 0.0 and raw["accuracy"] == pytest.approx(50.0)
    assert b.score(qs, {"1": "yes"})["n_missing"] == 1
    with pytest.raises(MissingAnswersError):
        b.score(qs, {"1": "yes"}, strict=True)


def test_textvqa_accuracy():
    gts = ["dakota"] * 7 + ["dakota digital"] * 3
    assert textvqa_accuracy("Dakota.", gts) == 1.0
    assert textvqa_accuracy("Dakota Digital", gts) == pytest.approx(0.9)
    assert textvqa_accuracy("kodak", gts) == 0.0
    with pytest.raises(ValueError):
        textvqa_accuracy("x", ["x"] * 9)


def test_textvqa_prompt_processor():
    assert prompt_question("What is it?\nReference OCR token: A, B\nAnswer the question using a single word or phrase."
                           ) == "what is it?"
    assert prompt_question("Reference OCR token: A\nWhat Is It?\nAnswer briefly.") == "what is it?"
    assert prompt_question("What is it?\nAnswer the question using a single word or phrase.") == "what is it?"
    assert prompt_question("OCR tokens: a, b. Question: What\nis it? Short answer:") == "what\nis it?"
    with pytest.raises(ValueError):
        prompt_question("one line only")


# ---------------------------------------------------------------- GQA


def test_gqa_prediction_and_score():
    assert llava_gqa_prediction("Yes..") == "yes"
    assert llava_gqa_prediction("A dog.") == "a dog"     # no article / punctuation removal
    b = get_benchmark("gqa")
    qs = [Question("1", "q", answers=["yes"], metadata={"structural": "verify", "semantic": "attr"}),
          Question("2", "q", answers=["woman"], metadata={"structural": "query", "semantic": "rel"}),
          Question("3", "q", answers=["t-shirt"], metadata={"structural": "query", "semantic": "attr"})]
    r = b.score(qs, {"1": "Yes.", "2": " woman", "3": "T-shirt"})
    assert r["accuracy"] == pytest.approx(200 / 3)           # leading space is not stripped
    assert r["binary"] == 100.0 and r["open"] == 50.0
    assert r["per_semantic_type"] == {"attr": 100.0, "rel": 0.0}
    r2 = b.score(qs, {"1": "Yes!", "2": "woman", "3": "tshirt"}, protocol="lmms_eval")
    assert r2["accuracy"] == 100.0                           # punctuation deleted on both sides, case ignored


# ---------------------------------------------------------------- POPE (eval_pope.py)


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a snowboard in the image.", "yes"),
    ("No.", "no"),
    ("No", "no"),
    ("There is no dog.", "no"),
    ("It is not there", "no"),
    ("Not really", "yes"),              # only "No", "not", "no" count
    ("NO", "yes"),
    ("no\nthere is none", "yes"),       # split on single spaces only
    ("No,there", "yes"),                # commas deleted before splitting
    ("Yes. No, nothing.", "yes"),       # first sentence only
    ("I do not know. Yes", "no"),
    ("", "yes"),
])
def test_pope_parser(text, expected):
    assert llava_pope_parse(text) == expected


def test_pope_metrics_per_split_and_mean_f1():
    b = get_benchmark("pope")
    labels = {"adversarial": ["yes", "yes", "no", "no"], "random": ["yes", "no", "yes", "no"]}
    preds = {"adversarial": ["Yes", "No", "No", "There is no cat."], "random": ["Yes", "Yes", "Yes", "Yes"]}
    qs, ans = [], {}
    for cat, labs in labels.items():
        for i, lab in enumerate(labs):
            q = Question(f"{cat}{i}", "q", answers=[lab], category=cat)
            qs.append(q)
            ans[q.key] = preds[cat][i]
    r = b.score(qs, ans)
    adv, rnd = r["per_category"]["adversarial"], r["per_category"]["random"]
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"]) == (1, 0, 2, 1)
    assert adv["precision"] == 100.0 and adv["recall"] == 50.0 and adv["f1"] == pytest.approx(200 / 3)
    assert adv["accuracy"] == 75.0 and adv["yes_ratio"] == 25.0
    assert rnd["precision"] == 50.0 and rnd["recall"] == 100.0 and rnd["yes_ratio"] == 100.0
    assert r["f1"] == pytest.approx((200 / 3 + 200 / 3) / 2)
    # all-"no" predictions: the official code divides by zero; here precision/F1 are 0
    zero = b.score(qs[:4], {q.key: "No" for q in qs[:4]})
    assert zero["per_category"]["adversarial"]["f1"] == 0.0


def test_pope_lmms_eval_variant():
    b = get_benchmark("pope")
    qs = [Question(i, "q", answers=[lab], category="random") for i, lab in enumerate(["yes", "yes", "no", "no"])]
    r = b.score(qs, {"0": "Yes", "1": "Yes, there is.", "2": "no", "3": "no"}, protocol="lmms_eval")
    assert r["accuracy"] == 75.0          # "yes, there is." is neither yes nor no
    assert r["recall"] == 100.0           # ...and is not a false negative either
    assert r["yes_ratio"] == 50.0         # ground-truth yes ratio (lmms-eval quirk)


# ---------------------------------------------------------------- MME (calculation.py)


@pytest.mark.parametrize("pred, expected", [
    ("Yes", "yes"), ("yes, it is", "yes"), ("No", "no"), ("Not really", "no"), ("none", "no"),
    ("The answer is yes", "other"), ("N", "other"), ("Nyes", "yes"), ("Unknown", "other"), ("yesno", "yes"),
])
def test_mme_parser(pred, expected):
    assert mme_parse(pred) == expected


def test_mme_lmms_parser():
    assert mme_parse_lmms("N") == "no" and mme_parse_lmms("y.") == "yes" and mme_parse_lmms(" Yes. ") == "yes"


def test_mme_acc_plus_pairs_and_totals():
    b = get_benchmark("mme")

    def pair(cat, img, gts):
        return [Question(img, f"q{j}", image=img, answers=[g], category=cat, key=f"{img}#{j}")
                for j, g in enumerate(gts)]

    qs = (pair("existence", "e1", ["Yes", "No"]) + pair("existence", "e2", ["No", "Yes"])
          + pair("code_reasoning", "c1", ["Yes", "No"]))
    ans = {"e1#0": "Yes", "e1#1": "No", "e2#0": "No", "e2#1": "The answer is yes",  # e2: one right -> no acc+
           "c1#0": "yes", "c1#1": "no"}
    r = b.score(qs, ans)
    ex = r["per_subtask"]["existence"]
    assert ex["acc"] == 75.0 and ex["acc_plus"] == 50.0 and ex["score"] == 125.0
    assert r["per_subtask"]["code_reasoning"]["score"] == 200.0
    assert r["perception"] == 125.0 and r["cognition"] == 200.0 and r["total"] == 325.0
    assert r["n_other"] == 1 and "OCR" in r["missing_subtasks"]
    with pytest.raises(ValueError, match="exactly 2"):
        b.score(qs[:3], ans)


# ---------------------------------------------------------------- ScienceQA (eval_science_qa.py)


@pytest.mark.parametrize("pred, expected", [
    ("A", "A"), ("E", "E"), ("a", "FAILED"), ("A.", "FAILED"),          # "A." is too short for the "X. " rule
    ("B. mushroom", "B"), ("C.mushroom", "FAILED"), ("F. x", "FAILED"),
    ("The answer is B.", "B"), ("The answer is Bob", "B"),                # '.' in the regex matches any char
    ("The answer is A. The answer is B.", "FAILED"), ("The answer is F.", "F"), ("the answer is B.", "FAILED"),
    ("B is the run-on sentence.", "FAILED"), ("", "FAILED"),
])
def test_sqa_letter_parser(pred, expected):
    assert parse_sqa_letter(pred) == expected


def test_sqa_letter_index_and_img_accuracy():
    assert letter_index("E", 4) == -1 and letter_index("F", 5) == -1 and letter_index("FAILED", 2) == -1
    assert letter_index("B", 2) == 1
    b = get_benchmark("scienceqa")

    def q(pid, ans_idx, n, image):
        prompt = ("<image>\n" if image else "") + "Q?"
        return Question(pid, "Q?", image="x.png" if image else None, answers=["ABCDE"[ans_idx]], category="s",
                        metadata={"answer_index": ans_idx, "n_choices": n}, answer_file_prompt=prompt)

    qs = [q("1", 0, 2, True), q("2", 3, 4, True), q("3", 1, 2, False), q("4", 4, 4, True), q("5", 0, 2, True)]
    ans = {"1": "A", "2": "The answer is D.", "3": "A", "4": "E"}  # "4": E beyond 4 choices; "5": no prediction
    r = b.score(qs, ans)
    assert r["n"] == 5 and r["accuracy"] == 40.0
    assert r["n_img"] == 3 and r["img_accuracy"] == pytest.approx(200 / 3)   # missing "5" drops out of IMG
    assert r["n_missing"] == 1


# ---------------------------------------------------------------- MMBench (lmms-eval rules + CircularEval)


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("The answer is B", "B"), ("B. green", "B"), ("(C)", "C"), ("(C).", "C"), ("Answer:D", ""),
    ("A cat is on the mat", ""),     # bare "A" in a >3-token answer is taken for an article
    ("A cat", "A"),                  # ...but not in a short one
    ("A or B", ""), ("A. or B.", ""), ("I pick :C.", "C"), ("E", "E"),
    ("Failed to obtain answer via API B", ""),
])
def test_mmbench_can_infer_option(answer, expected):
    assert can_infer_option(answer) == expected


def test_mmbench_can_infer_text_and_static_fallback():
    choices = {"A": "red", "B": "green", "C": "blue"}
    assert can_infer_text("It is Green", choices) == "B"
    assert can_infer_text("green or blue", choices) == ""
    assert can_infer("It is green", choices) == "B" and can_infer("Option (A)", choices) == "A"
    assert extract_mcq_answer("The correct answer is (B).", ["A", "B", "C"]) == "B"
    assert extract_mcq_answer("I think it's C", ["A", "B", "C"]) == "C"
    assert extract_mcq_answer("", ["A"]) == ""


def _mmbench_rows(answers_by_index):
    qs = []
    for idx, (gt, cat) in answers_by_index.items():
        qs.append(Question(idx, "q", answers=[gt], category=cat, options={"A": "red", "B": "green"},
                           metadata={"choices": {"A": "red", "B": "green", "C": "blue"}, "category": cat,
                                     "l2-category": "perception"}))
    return qs


def test_mmbench_circular_eval_one_rotation_fails():
    b = get_benchmark("mmbench")
    qs = _mmbench_rows({0: ("A", "color"), 1_000_000: ("C", "color"), 2_000_000: ("B", "color"),
                        7: ("B", "count"), 1_000_007: ("A", "count")})
    ans = {"0": "A", "1000000": "C", "2000000": "B",     # group 0: every rotation right -> 1
           "7": "B", "1000007": "B"}                      # group 7: second rotation wrong -> 0
    r = b.score(qs, ans)
    assert r["circular_accuracy"] == 50.0 and r["single_accuracy"] == 100.0
    assert r["per_category"] == {"color": 100.0, "count": 0.0} and r["per_l2_category"] == {"perception": 50.0}
    assert r["n_questions"] == 2 and r["n_rows"] == 5
    # unresolved answers: "none" counts them wrong, "static" tries lmms-eval's extractor
    ans2 = dict(ans, **{"7": "Option B!", "1000007": "probably A..."})
    assert b.score(qs, ans2, fallback="none")["per_category"]["count"] == 0.0
    r_static = b.score(qs, ans2, fallback="static")
    assert r_static["n_unresolved"] == 2 and r_static["per_category"]["count"] == 100.0
    with pytest.raises(NotImplementedError):
        b.score(qs, ans, fallback="gpt")


# ---------------------------------------------------------------- SEED (convert_seed_for_submission.py)


def test_seed_exact_match_per_type():
    b = get_benchmark("seed")

    def q(qid, ans, tid, name, dtype):
        return Question(qid, "q", answers=[ans], category=name, split=dtype, metadata={"question_type_id": tid})

    qs = [q(1, "A", 5, "Instances Counting", "image"), q(2, "B", 5, "Instances Counting", "image"),
          q(3, "C", 4, "Instance Location", "image"), q(4, "D", 10, "Action Recognition", "video")]
    ans = {"1": "A", "2": "B.", "3": " C", "4": "D"}
    r = b.score(qs, ans)
    assert r["accuracy"] == 50.0 and r["image"] == pytest.approx(100 / 3) and r["video"] == 100.0
    assert r["per_question_type"] == {"Instance Location": 0.0, "Instances Counting": 50.0,
                                      "Action Recognition": 100.0}
    r2 = b.score(qs, ans, protocol="lmms_eval")   # strip, first character, case-insensitive
    assert r2["accuracy"] == 100.0
    assert b.score(qs, {"1": "A"})["n_missing"] == 3


# ---------------------------------------------------------------- registry


def test_unknown_benchmark_lists_known_ones():
    from jaxprune.eval.benchmarks import UnknownBenchmarkError, list_benchmarks

    with pytest.raises(UnknownBenchmarkError) as e:
        get_benchmark("imagenet")
    msg = str(e.value)
    assert "'imagenet'" in msg and all(name in msg for name in list_benchmarks())
    assert get_benchmark("SEED-Bench").name == "seed" and get_benchmark("sqa").name == "scienceqa"
