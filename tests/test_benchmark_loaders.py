"""Loaders, answer matching and submission writers on the tiny fixtures of ``tests/fixtures/benchmarks/<name>/``.

The fixtures mimic LLaVA's ``playground/data/eval`` layouts and the raw official formats (regenerate them with
``python tests/fixtures/benchmarks/make_fixtures.py``).  Where both exist, the prompts built from the raw format
must equal the LLaVA question file's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jaxprune.eval.benchmarks import (
    MC_LETTER_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    BenchmarkFormatError,
    answers_from_file,
    get_benchmark,
    load_answers,
    load_llava_questions,
    match_answers,
    write_answers,
)
from jaxprune.eval.benchmarks.files import read_json, read_jsonl, read_tsv

FIX = Path(__file__).resolve().parent / "fixtures" / "benchmarks"


def _images_ok(questions):
    for q in questions:
        if q.image is None and q.image_b64 is None:
            continue
        img = q.load_image()
        assert img.size == (8, 8), q.key


# ---------------------------------------------------------------- VQAv2


def test_vqav2_llava_file_and_submission(tmp_path):
    b = get_benchmark("vqav2")
    qs = b.load(FIX / "vqav2")
    assert [q.question_id for q in qs] == [262144000, 262144001, 262144002]
    assert all(q.text.endswith(SHORT_ANSWER_SUFFIX) and not q.answers for q in qs)
    _images_ok(qs)
    with pytest.raises(ValueError, match="EvalAI"):
        b.score(qs, {})
    answers = answers_from_file(FIX / "vqav2" / "answers.jsonl", qs)
    full = load_llava_questions(FIX / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl")
    out = b.write_submission(full, answers, tmp_path / "upload.json")
    sub = json.loads(out.read_text())
    assert sub == [{"question_id": 262144000, "answer": "dog"}, {"question_id": 262144001, "answer": "2"},
                   {"question_id": 262144002, "answer": ""}, {"question_id": 262145999, "answer": ""}]


def test_vqav2_raw_val_and_score():
    b = get_benchmark("vqav2")
    qs = b.load(FIX / "vqav2", question_file="v2_OpenEnded_mscoco_val2014_questions.json")
    assert [q.question_id for q in qs] == [42000, 42001, 7000]
    assert qs[0].text == "How many dogs are there?" + SHORT_ANSWER_SUFFIX
    assert qs[0].image_path == FIX / "vqav2" / "val2014" / "COCO_val2014_000000000042.jpg"
    assert len(qs[0].answers) == 10 and qs[0].metadata["answer_type"] == "number"
    r = b.score(qs, {42000: "Two", 42001: "A frisbee.", 7000: "Yes"})
    # 42000: "two"->"2", 8 humans agree -> 1; 42001: "frisbee" said by 4 after processing -> 1; 7000: 1
    assert r["accuracy"] == pytest.approx(100.0)
    r = b.score(qs, {42000: "3", 42001: "disc", 7000: "no"})
    assert r["per_answer_type"] == {"number": pytest.approx(30.0), "other": pytest.approx(100.0), "yes/no": 0.0}


# ---------------------------------------------------------------- GQA


def test_gqa_llava_file_with_ground_truth(tmp_path):
    b = get_benchmark("gqa")
    qs = b.load(FIX / "gqa")
    assert [q.key for q in qs] == ["201307251", "201640614", "202225914"]
    assert qs[1].answers == ["woman"] and qs[1].metadata["structural"] == "query"
    _images_ok(qs)
    answers = answers_from_file(FIX / "gqa" / "answers.jsonl", qs)
    r = b.score(qs, answers)
    assert r["accuracy"] == 100.0 and r["open"] == 100.0 and r["binary"] == 100.0
    out = b.write_submission(qs, answers, tmp_path / "testdev_balanced_predictions.json")
    assert json.loads(out.read_text())[0] == {"questionId": "201307251", "prediction": "no"}


def test_gqa_raw_prompts_match_llava_file():
    b = get_benchmark("gqa")
    llava = b.load(FIX / "gqa")
    raw = b.load(FIX / "gqa", question_file="does-not-exist.jsonl")
    assert [(q.question_id, q.text, q.image, q.answers) for q in raw] == \
        [(q.question_id, q.text, q.image.replace(".png", ".jpg"), q.answers) for q in llava]


# ---------------------------------------------------------------- TextVQA


def test_textvqa_repeated_ids_and_ocr_prompts():
    b = get_benchmark("textvqa")
    qs = b.load(FIX / "textvqa")
    assert [q.key for q in qs] == ["003a8ae2ef43b901", "181f00d3ee2b2076#0", "181f00d3ee2b2076#1"]
    assert qs[1].text == ("What time is it?\nReference OCR token: " + SHORT_ANSWER_SUFFIX)  # empty OCR line kept
    assert qs[2].answers[-1] == "audemars piguet" and qs[2].metadata["textvqa_question_id"] == 34604
    _images_ok(qs)
    answers = answers_from_file(FIX / "textvqa" / "answers.jsonl", qs)
    assert answers == {"003a8ae2ef43b901": "Dakota", "181f00d3ee2b2076#0": "5:25",
                       "181f00d3ee2b2076#1": "Audemars Piguet"}
    r = b.score(qs, answers)
    # dakota: 1; "5:25": 4 humans -> 1; "audemars piguet": 1 human -> 0.3
    assert r["accuracy"] == pytest.approx(100 * (1 + 1 + 0.3) / 3)
    assert r["ocr_in_prompt"] == 100.0
    # the raw builder reproduces the LLaVA file, and ocr=False gives the 2-line prompt
    raw = b.load(FIX / "textvqa", question_file="missing.jsonl")
    assert [(q.key, q.text) for q in raw] == [(q.key, q.text) for q in qs]
    no_ocr = b.load(FIX / "textvqa", question_file="missing.jsonl", ocr=False)
    assert no_ocr[0].text == "What is the brand of this camera?" + SHORT_ANSWER_SUFFIX
    assert b.score(no_ocr, answers)["ocr_in_prompt"] == 0.0


def test_match_answers_disambiguates_by_prompt():
    qs = get_benchmark("textvqa").load(FIX / "textvqa")
    recs = load_answers(FIX / "textvqa" / "answers.jsonl")
    swapped = [recs[0], recs[2], recs[1]]            # same id, reversed order: prompts decide
    assert match_answers(qs, swapped)["181f00d3ee2b2076#1"] == "Audemars Piguet"
    for r in swapped:
        r.prompt = None                               # no prompts: file order decides
    assert match_answers(qs, swapped)["181f00d3ee2b2076#0"] == "Audemars Piguet"


# ---------------------------------------------------------------- POPE


def test_pope_labels_by_order_and_score():
    b = get_benchmark("pope")
    qs = b.load(FIX / "pope")
    assert len(qs) == 6 and [q.category for q in qs[:2]] == ["adversarial"] * 2
    assert [q.answers[0] for q in qs] == ["yes", "no", "no", "yes", "yes", "no"]
    _images_ok(qs)
    answers = answers_from_file(FIX / "pope" / "answers.jsonl", qs)
    r = b.score(qs, answers)
    per = r["per_category"]
    # adversarial: "Yes, there is..."->yes(yes) "No."->no(no); random: "There is no dog."->no(no) "Yes"->yes(yes)
    # popular: "Not sure. No."->yes(yes: first sentence, "Not" is not a no-word) "no"->no(no)
    assert all(m["accuracy"] == 100.0 for m in per.values()) and r["f1"] == 100.0
    raw = b.load(FIX / "pope", question_file="missing.jsonl")
    assert [(q.question_id, q.text, q.image, q.answers) for q in raw] == \
        [(q.question_id, q.text, q.image, q.answers) for q in qs]


def test_pope_misaligned_labels_raise(tmp_path):
    root = tmp_path / "pope"
    shutil.copytree(FIX / "pope", root)
    lines = (root / "coco" / "coco_pope_random.json").read_text().splitlines(keepends=True)
    (root / "coco" / "coco_pope_random.json").write_text("".join(lines[::-1]))
    with pytest.raises(BenchmarkFormatError, match=r"coco_pope_random\.json:1: .*pairs them by order"):
        get_benchmark("pope").load(root)
    qs = get_benchmark("pope").load(root, check_alignment=False)   # the official zip, blindly
    assert [q.answers[0] for q in qs if q.category == "random"] == ["yes", "no"]


# ---------------------------------------------------------------- MME


def test_mme_ground_truth_lookup_and_score(tmp_path):
    b = get_benchmark("mme")
    qs = b.load(FIX / "mme")
    assert [q.key for q in qs[:2]] == ["existence/000000006040.png#0", "existence/000000006040.png#1"]
    assert [q.answers[0] for q in qs] == ["Yes", "No", "No", "Yes", "Yes", "No"]
    # two-space fallback of convert_answer_to_mme.py
    assert qs[3].metadata["mme_question"] == "Is there a person in this image?  Please answer yes or no."
    _images_ok(qs)
    answers = answers_from_file(FIX / "mme" / "answers.jsonl", qs)
    r = b.score(qs, answers)
    assert r["per_subtask"]["existence"]["score"] == 200.0
    assert r["per_subtask"]["artwork"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "n_images": 1}
    assert r["perception"] == 250.0 and r["cognition"] == 0.0
    folder = b.write_submission(qs, answers, tmp_path / "eval_tool_answers")
    lines = (folder / "existence.txt").read_text().splitlines()
    assert lines[0] == "000000006040.txt\tIs there a train in this image? Please answer yes or no.\tYes\tYes"
    assert len(lines) == 4


def test_mme_raw_release_folder_matches_llava_file():
    b = get_benchmark("mme")
    llava = {(q.question_id, q.text, q.answers[0]) for q in b.load(FIX / "mme")}
    raw = b.load(FIX / "mme", question_file="missing.jsonl")
    assert {(q.question_id, q.text, q.answers[0]) for q in raw} == llava
    assert len({q.key for q in raw}) == 6


def test_mme_unknown_question_raises(tmp_path):
    root = tmp_path / "mme"
    shutil.copytree(FIX / "mme", root)
    rows = read_jsonl(root / "llava_mme.jsonl")
    rows[2]["text"] = "Is there a horse in this image?" + SHORT_ANSWER_SUFFIX
    (root / "llava_mme.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BenchmarkFormatError, match=r"llava_mme\.jsonl:3: no MME ground truth"):
        get_benchmark("mme").load(root)


# ---------------------------------------------------------------- ScienceQA


def test_scienceqa_prompts_and_ground_truth():
    b = get_benchmark("scienceqa")
    qs = b.load(FIX / "scienceqa")
    assert [q.key for q in qs] == ["5", "15", "512", "11"]                 # pid_splits order
    q5 = qs[0]
    assert q5.text == ("Context: A parachute test.\nWhich of the following could Gordon's test show?\n"
                       "A. if the spacecraft was damaged\nB. how steady a parachute was\nC. whether it would swing"
                       + MC_LETTER_SUFFIX)
    assert q5.record_prompt == "<image>\n" + q5.text and qs[1].record_prompt == qs[1].text
    assert qs[2].metadata["n_choices"] == 2 and qs[2].answers == ["A"]
    _images_ok(qs)
    assert [q.key for q in b.load(FIX / "scienceqa", image_only=True)] == ["5", "11"]
    r = b.score(qs, {"5": "B", "15": "A", "512": "A.", "11": "The answer is B."})
    assert r["accuracy"] == 75.0 and r["img_accuracy"] == 100.0 and r["n_failed_parse"] == 1


def test_scienceqa_llava_only_and_raw_only_agree(tmp_path):
    b = get_benchmark("scienceqa")
    full = b.load(FIX / "scienceqa")
    only_llava = tmp_path / "llava"
    only_llava.mkdir()
    shutil.copy(FIX / "scienceqa" / "llava_test_CQM-A.json", only_llava)
    a = b.load(only_llava)   # answer letter from the gpt turn, choices from the option lines (multi-line option!)
    assert [(q.key, q.text, q.answers, q.metadata["n_choices"]) for q in a] == \
        [(q.key, q.text, q.answers, q.metadata["n_choices"]) for q in full]
    raw = b.load(FIX / "scienceqa", question_file="missing.json")
    assert [(q.key, q.text, q.record_prompt, q.image) for q in raw] == \
        [(q.key, q.text, q.record_prompt, q.image) for q in full]


# ---------------------------------------------------------------- MMBench


def test_mmbench_tsv_prompts_and_circular_score(tmp_path):
    b = get_benchmark("mmbench")
    qs = b.load(FIX / "mmbench")
    assert [q.question_id for q in qs] == [0, 1000000, 2000000, 3000000, 5, 1000005, 2000005]
    assert qs[0].record_prompt == ("Look at the image.\nWhat color is the square?\nA. red\nB. green\nC. blue\n"
                                   "D. yellow")
    assert qs[0].text == qs[0].record_prompt + MC_LETTER_SUFFIX
    assert qs[4].record_prompt == "How many dots?\nA. one\nB. two\nC. three"   # hint "nan" dropped, D empty
    assert qs[4].options == {"A": "one", "B": "two", "C": "three"}
    _images_ok(qs)
    answers = {"0": "C", "1000000": "B", "2000000": "A", "3000000": "D", "5": "A", "1000005": "C",
               "2000005": "The answer is C"}
    r = b.score(qs, answers)
    assert r["circular_accuracy"] == 50.0 and r["single_accuracy"] == 100.0
    assert r["per_category"] == {"attribute_recognition": 100.0, "object_localization": 0.0}
    out = b.write_submission(qs, answers, tmp_path / "upload")   # xlsx if openpyxl is installed, else tsv
    if out.suffix == ".tsv":
        header, rows = read_tsv(out)
        assert header == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
        assert rows[0]["prediction"] == "C" and rows[4]["D"] == "" and rows[6]["prediction"] == "The answer is C"
    else:  # openpyxl installed
        import openpyxl

        ws = openpyxl.load_workbook(out).active
        assert [c.value for c in ws[1]] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]


def test_mmbench_tsv_submission_without_openpyxl(tmp_path, monkeypatch):
    from jaxprune.eval.benchmarks import mmbench

    monkeypatch.setattr(mmbench, "openpyxl_available", lambda: False)
    b = get_benchmark("mmbench")
    qs = b.load(FIX / "mmbench")
    with pytest.warns(UserWarning, match="tsv"):
        out = b.write_submission(qs, {"0": "C"}, tmp_path / "upload.xlsx")
    assert out.suffix == ".tsv"
    _, rows = read_tsv(out)
    assert rows[0]["prediction"] == "C" and rows[1]["prediction"] == ""
    with pytest.raises(ModuleNotFoundError):
        b.write_submission(qs, {}, tmp_path / "x.xlsx", fmt="xlsx")


# ---------------------------------------------------------------- SEED


def test_seed_llava_file_and_raw(tmp_path):
    b = get_benchmark("seed")
    qs = b.load(FIX / "seed")
    assert [q.question_id for q in qs] == [101669, 104933, 1234]
    assert qs[0].answers == ["A"] and qs[0].category == "Instances Counting" and qs[2].split == "video"
    _images_ok(qs)
    raw = b.load(FIX / "seed", question_file="missing.jsonl")
    assert [(str(q.question_id), q.text, q.image) for q in raw] == [(str(q.question_id), q.text, q.image) for q in qs]
    assert [q.key for q in b.load(FIX / "seed", data_type="image")] == ["101669", "104933"]
    answers = answers_from_file(FIX / "seed" / "answers.jsonl", qs)
    r = b.score(qs, answers)
    assert r["image"] == 50.0 and r["video"] == 100.0 and r["per_question_type"]["Instance Location"] == 0.0
    out = b.write_submission(qs, answers, tmp_path / "seed.jsonl")
    assert out.read_text().splitlines()[1] == '{"question_id": "104933", "prediction": "C."}'
    with pytest.raises(KeyError):
        b.write_submission(qs, {}, tmp_path / "x.jsonl")


# ---------------------------------------------------------------- MM-Vet


def test_mmvet_submission(tmp_path):
    b = get_benchmark("mmvet")
    qs = b.load(FIX / "mmvet")
    raw = b.load(FIX / "mmvet", question_file="missing.jsonl")
    assert [(q.question_id, q.text, q.image) for q in qs] == [(q.question_id, q.text, q.image) for q in raw]
    _images_ok(qs)
    answers = answers_from_file(FIX / "mmvet" / "answers.jsonl", qs)
    out = b.write_submission(qs, answers, tmp_path / "mmvet.json")
    assert out.read_text() == json.dumps({"v1_0": "x = -1 or x = -5"}, indent=2)
    with pytest.raises(NotImplementedError, match="GPT-4"):
        b.score(qs, answers)


# ---------------------------------------------------------------- generic files, errors


def test_write_answers_round_trip(tmp_path):
    qs = get_benchmark("mme").load(FIX / "mme")
    outputs = {q.key: f"out{i}" for i, q in enumerate(qs)}
    path = write_answers(tmp_path / "a.jsonl", qs, outputs, model_id="tiny")
    rec = json.loads(path.read_text().splitlines()[0])
    assert set(rec) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert rec["question_id"] == "existence/000000006040.png" and rec["prompt"] == qs[0].text
    assert answers_from_file(path, qs) == outputs


@pytest.mark.parametrize("name, pattern", [
    ("bad_json_line.jsonl", r"bad_json_line\.jsonl:3: invalid JSON"),
    ("missing_key.jsonl", r"missing_key\.jsonl:2: missing key\(s\) question_id"),
    ("not_object.jsonl", r"not_object\.jsonl:2: expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(name, pattern):
    with pytest.raises(BenchmarkFormatError, match=pattern):
        load_llava_questions(FIX / "malformed" / name)


def test_malformed_json_tsv_and_answers():
    with pytest.raises(BenchmarkFormatError, match=r"bad\.json:2: invalid JSON") as e:
        read_json(FIX / "malformed" / "bad.json")
    assert e.value.line == 2
    with pytest.raises(BenchmarkFormatError, match=r"bad_fields\.tsv:3: expected 5 tab-separated fields, got 3"):
        read_tsv(FIX / "malformed" / "bad_fields.tsv")
    with pytest.raises(BenchmarkFormatError, match=r"answers_bad\.jsonl:2: missing key\(s\) text"):
        load_answers(FIX / "malformed" / "answers_bad.jsonl")


def test_benchmark_load_reports_malformed_question_file(tmp_path):
    root = tmp_path / "pope"
    root.mkdir()
    shutil.copy(FIX / "malformed" / "bad_json_line.jsonl", root / "llava_pope_test.jsonl")
    with pytest.raises(BenchmarkFormatError, match=r"llava_pope_test\.jsonl:3"):
        get_benchmark("pope").load(root)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="llava_gqa_testdev_balanced.jsonl"):
        get_benchmark("gqa").load(tmp_path)
    with pytest.raises(FileNotFoundError, match="mmbench_dev_20230712.tsv"):
        get_benchmark("mmbench").load(tmp_path)


def test_every_registered_benchmark_follows_the_protocol():
    from jaxprune.eval.benchmarks import Benchmark, list_benchmarks

    for name in list_benchmarks():
        b = get_benchmark(name)
        assert isinstance(b, Benchmark) and b.name == name
        assert b.has_submission == (name in {"vqav2", "gqa", "mme", "mmbench", "seed", "mmvet"})
    with pytest.raises(NotImplementedError, match="scored locally"):
        get_benchmark("pope").write_submission([], {}, "x.json")
