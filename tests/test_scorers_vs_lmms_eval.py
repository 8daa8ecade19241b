"""``protocol="lmms_eval"`` against lmms-eval itself (the installed package, 0.7.3; skipped without it): its task
functions (``lmms_eval/tasks/<task>/utils.py``: ``doc_to_text``, ``process_results``, aggregations, and
``lmms_eval/api/metrics.py`` ``exact_match_hf_evaluate``) on tricky answers and on the rows of lmms-lab shards, after
the ``res.strip()`` its task pipeline applies to every generation (``lmms_eval/api/task.py``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("pyarrow")

from jaxprune.eval.benchmarks import Question, get_benchmark  # noqa: E402

ANSWERS = ["Yes", "yes.", " no", "No, there is not.", "NO", "yes\n", "There is a dog.", "not", "", "n", "Y",
           "B", "b", " B", "B.", "B. cat", "(B)", "The answer is B.", "A", "a.", "2", "two", "Two dogs",
           "t-shirt", "T shirt", "it's", "dont", "1,000", "3.5", "\tleft side ", "yes\x00"]


def _strip(x: str) -> str:   # task.py: results = [res.strip() ...]
    return x.strip()


def test_pope_equals_lmms_eval():
    from lmms_eval.tasks.pope import utils as pu

    b = get_benchmark("pope")
    gts = ["yes", "no"] * (len(ANSWERS) // 2) + ["yes"] * (len(ANSWERS) % 2)
    qs = [Question(i, "q", answers=[g], category="adversarial") for i, g in enumerate(gts)]
    per = [pu.pope_process_results({"question_id": i, "answer": g}, [_strip(a)])
           for i, (a, g) in enumerate(zip(ANSWERS, gts))]
    got = b.score(qs, {str(i): a for i, a in enumerate(ANSWERS)}, protocol="lmms_eval")
    for ours, theirs in (("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"),
                         ("f1", "f1_score"), ("yes_ratio", "yes_ratio")):
        want = getattr(pu, f"pope_aggregate_{theirs}")([p[f"pope_{theirs}"] for p in per])
        assert got[ours] == pytest.approx(100 * want), ours


def test_mme_parser_equals_lmms_eval():
    from lmms_eval.tasks.mme import utils as mu

    from jaxprune.eval.benchmarks.mme import mme_parse_lmms

    for a in ANSWERS + ["...no", "y.", "N."]:
        assert mme_parse_lmms(a) == mu.parse_pred_ans(_strip(a)), a


def test_scienceqa_equals_lmms_eval():
    from lmms_eval.tasks.scienceqa import utils as su

    b = get_benchmark("scienceqa")
    doc = {"hint": "", "question": "Which?", "choices": ["cat", "dog", "eel"], "answer": 1}
    q = Question("1", "q", answers=["B"], metadata={"n_choices": 3, "answer_index": 1}, image="i.png",
                 answer_file_prompt="<image>\nq")
    for a in ANSWERS:
        want = su.sqa_process_results(doc, [_strip(a)])["exact_match"]
        assert b.score([q], {"1": a}, protocol="lmms_eval")["accuracy"] == 100.0 * want, a


def test_seed_equals_lmms_eval():
    from lmms_eval.tasks.seedbench import utils as eu

    b = get_benchmark("seed")
    q = Question("1", "q", answers=["B"], split="image", metadata={"question_type_id": 5})
    for a in ANSWERS:
        r = eu.seed_process_result({"answer": "B", "data_type": "image", "question_id": "1"}, [_strip(a)])
        want = eu.seed_aggregation_result([r["seed_all"]])
        assert b.score([q], {"1": a}, protocol="lmms_eval")["accuracy"] == 100.0 * want, a


def test_textvqa_and_vqav2_equal_lmms_eval():
    from lmms_eval.tasks.textvqa import utils as tu
    from lmms_eval.tasks.vqav2 import utils as vu

    from jaxprune.eval.benchmarks.evalai import vqa_accuracy
    from jaxprune.eval.benchmarks.textvqa import lmms_textvqa_accuracy

    for gts in (["two"] * 4 + ["2"] * 6, ["t-shirt"] * 3 + ["shirt"] * 7, ["yes"] * 10, ["don't", "dont"] * 5,
                ["1,000"] * 5 + ["1000"] * 5, [" yes"] * 5 + ["yes\n"] * 5):
        for a in ANSWERS:
            want = tu.textvqa_process_results({"answers": list(gts), "question_id": 1}, [_strip(a)])["exact_match"]
            assert lmms_textvqa_accuracy(a, gts) == pytest.approx(want), (a, gts)
            doc = {"answers": [{"answer": g, "answer_confidence": "yes", "answer_id": i + 1} for i, g in enumerate(gts)],
                   "question_id": 1}
            want = vu.vqav2_process_results_val(doc, [_strip(a)])["exact_match"]
            assert vqa_accuracy(a.strip(), gts, "lmms_eval") == pytest.approx(want), (a, gts)


def test_gqa_equals_lmms_eval_exact_match():
    from lmms_eval.api.metrics import exact_match_hf_evaluate

    b = get_benchmark("gqa")
    for target in ("yes", "t-shirt", "Left", "man's hat"):
        for a in ANSWERS + [target + "\n", " " + target.upper() + "."]:
            want = exact_match_hf_evaluate([_strip(a)], [target], ignore_case=True, ignore_punctuation=True)
            r = b.score([Question("1", "q", answers=[target])], {"1": a}, protocol="lmms_eval")
            assert r["accuracy"] == 100.0 * want["exact_match"], (a, target)


def test_lmms_lab_prompts_equal_lmms_eval_doc_to_text(tmp_path):
    """Questions read from lmms-lab shards with protocol="lmms_eval" carry the text lmms-eval's doc_to_text builds
    from the same rows (default lmms_eval_specific_kwargs of each task YAML)."""
    import pyarrow.parquet as pq
    from lmms_eval.tasks.gqa import utils as gu
    from lmms_eval.tasks.mmbench import en_utils as mbu
    from lmms_eval.tasks.mme import utils as mu
    from lmms_eval.tasks.pope import utils as pu
    from lmms_eval.tasks.scienceqa import utils as su
    from lmms_eval.tasks.seedbench import utils as eu
    from lmms_eval.tasks.textvqa import utils as tu
    from lmms_eval.tasks.vqav2 import utils as vu

    from tests.test_lmms_lab_layouts import _all_lmms_lab_roots

    short = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    mc = {"pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}
    builders = {
        "pope": lambda d: pu.pope_doc_to_text(d, short),
        "mme": lambda d: mu.mme_doc_to_text(d, short),
        "scienceqa": lambda d: su.sqa_doc_to_text(d, {**mc, "format": "default"}),
        "seed": eu.seed_doc_to_text,
        "textvqa": lambda d: tu.textvqa_doc_to_text(d, {**short, "ocr": False}),
        "vqav2": lambda d: vu.vqav2_doc_to_text(d, short),
        "gqa": lambda d: gu.gqa_doc_to_text(d, short),
        "mmbench": lambda d: mbu.mmbench_doc_to_text(d, mc),
    }
    roots = _all_lmms_lab_roots(tmp_path)
    for name, root in roots.items():
        sub = root / "testdev_balanced_instructions" if name == "gqa" else root
        rows = [r for f in sorted(sub.rglob("*.parquet")) for r in pq.read_table(f).to_pylist()]
        qs = get_benchmark(name).load(root, protocol="lmms_eval")
        assert [q.text for q in qs] == [builders[name](r) for r in rows], name


# {a} = the right letter, {w} = a wrong one: right and wrong answers in the forms the extractors meet
MMB_PREDICTIONS = ["{a}", "({a})", "{a}. text", "The answer is {a}", "Option {a}", "{a})", "{w}", "I pick {a}.",
                   "{a} {w}", "", "A cat sits on {a}", "answer: {a}", "{a}", "{a}."]


def test_mmbench_static_circular_eval_equals_lmms_eval():
    """``MMBench_Evaluator.eval_result(..., eval_method="static")`` on the fixture TSV's rows (rotations included)."""
    from pathlib import Path

    from lmms_eval.tasks.mmbench import en_utils as mbu

    b = get_benchmark("mmbench")
    qs = b.load(Path(__file__).resolve().parent / "fixtures" / "benchmarks" / "mmbench")
    wrong = {"A": "B", "B": "C", "C": "D", "D": "A"}
    seen = set()
    for shift in range(5):
        preds = {q.key: MMB_PREDICTIONS[(i + 3 * shift) % len(MMB_PREDICTIONS)].format(a=q.answers[0],
                                                                                      w=wrong[q.answers[0]])
                 for i, q in enumerate(qs)}
        results = []
        for q in qs:
            m = q.metadata
            doc = {"index": int(q.question_id), "question": m["question"], "answer": q.answers[0],
                   "hint": m.get("hint") or "nan", "source": m.get("source"), "split": m.get("split"),
                   "category": m.get("category"), "L2-category": m.get("l2-category")}
            doc.update({c: (m.get(c) if m.get(c) is not None else "nan") for c in "ABCDE"})
            results.append(mbu.mmbench_process_results(doc, [preds[q.key]])["gpt_eval_score"])
        overall, per_cat, _ = mbu.mmbench_evaluator.eval_result(results, eval_method="static")
        got = b.score(qs, preds, protocol="lmms_eval")
        assert got["circular_accuracy"] == pytest.approx(100 * overall), shift
        assert got["per_category"] == pytest.approx({k: 100 * v for k, v in per_cat.items() if k != "split"})
        seen.add(got["circular_accuracy"])
    assert len(seen) > 1          # the cases are not all one score


def test_mme_aggregation_equals_lmms_eval():
    from pathlib import Path

    from lmms_eval.tasks.mme import utils as mu

    b = get_benchmark("mme")
    qs = b.load(Path(__file__).resolve().parent / "fixtures" / "benchmarks" / "mme")
    seen = set()
    for k in range(6):
        preds = {q.key: ["Yes", "no.", "Y", "Not sure", "N", " yes"][(i + k) % 6] for i, q in enumerate(qs)}
        per = [mu.mme_process_results({"question_id": q.question_id, "answer": q.answers[0], "category": q.category},
                                      [preds[q.key].strip()]) for q in qs]
        perception = mu.mme_aggregate_results([p["mme_perception_score"] for p in per if "mme_perception_score" in p])
        got = b.score(qs, preds, protocol="lmms_eval")
        assert got["perception"] == pytest.approx(perception), k
        seen.add(got["perception"])
    assert len(seen) > 1
