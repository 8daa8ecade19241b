"""Video benchmarks without a model: the Video-ChatGPT / Video-LLaVA QA layouts and Video-MME (loaders on small
generated files, malformed rows named), the GPT-3.5 judge requests and their scoring against a transcription of
Video-LLaVA's eval_video_qa.py, the NOT-official proxy and Video-MME's answer extraction on tricky strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxprune.eval.benchmarks import BenchmarkFormatError, get_benchmark
from jaxprune.eval.benchmarks.video_qa import normalize, proxy_match
from jaxprune.eval.benchmarks.video_qa_judge import (judge_messages, read_batch_output, score_file,
                                                     score_judgements, write_judge_requests)
from jaxprune.eval.benchmarks.videomme import build_prompt, extract_characters_regex

SETS = {"msvd_qa": ("MSVD_Zero_Shot_QA", "videos", ""), "msrvtt_qa": ("MSRVTT_Zero_Shot_QA", "videos/all", ""),
        "tgif_qa": ("TGIF_Zero_Shot_QA", "mp4", ""), "activitynet_qa": ("Activitynet_Zero_Shot_QA", "all_test", "v_")}


def _write_set(root: Path, name: str, qs=None, ans=None) -> Path:
    folder, vdir, prefix = SETS[name]
    d = root / folder
    (d / vdir).mkdir(parents=True, exist_ok=True)
    qs = qs if qs is not None else [{"video_name": "vid0", "question_id": "q0", "question": "what is he doing?"},
                                    {"video_name": "vid1", "question_id": "q1", "question": "who is there?"}]
    ans = ans if ans is not None else [{"answer": "cooking", "question_id": "q0", "type": 1},
                                       {"answer": "a man", "question_id": "q1", "type": 2}]
    (d / "test_q.json").write_text(json.dumps(qs))
    (d / "test_a.json").write_text(json.dumps(ans))
    (d / vdir / f"{prefix}vid0.mkv").write_bytes(b"x")   # the loader only looks for files (first existing ext)
    return d


@pytest.mark.parametrize("name", list(SETS))
def test_video_qa_layouts(tmp_path, name):
    d = _write_set(tmp_path, name)
    bench = get_benchmark(name)
    for root in (d, tmp_path):  # the set folder, or GPT_Zero_Shot_QA above it
        qs = bench.load(root)
        assert [q.key for q in qs] == ["q0", "q1"] and [q.answer for q in qs] == ["cooking", "a man"]
        assert qs[0].text == "what is he doing?" and qs[0].category == "1"
        prefix = SETS[name][2]
        assert qs[0].video_path == d / SETS[name][1] / f"{prefix}vid0.mkv"  # first existing extension
        assert qs[1].video_path == d / SETS[name][1] / f"{prefix}vid1.mp4"  # none exists: .mp4 (named when missing)
        assert qs[1].metadata["video_candidates"][1:] == [f"{prefix}vid1.avi", f"{prefix}vid1.mov", f"{prefix}vid1.mkv"]


@pytest.mark.parametrize("qs, ans, where, what", [
    ([{"video_name": "v", "question": "q?"}], [{"answer": "a"}], "test_q.json", "question #0: missing field(s) "
                                                                               "question_id"),
    ([{"video_name": "v", "question_id": 0, "question": "q?"}], [{"ans": "a"}], "test_a.json",
     "answer #0: expected an object with an 'answer' field"),
    ([{"video_name": "v", "question_id": 0, "question": "q?"}], [], "test_a.json", "0 answers for the 1 questions"),
    ([{"video_name": "v", "question_id": 0, "question": "q?"}, {"video_name": "v", "question_id": 1, "question": "r"}],
     [{"answer": "a", "question_id": 0}, {"answer": "b", "question_id": 7}], "test_a.json",
     "answer #1: question_id 7 differs from 1"),
    ({"video_name": "v"}, [], "test_q.json", "expected a JSON list of questions"),
    ([{"video_name": None, "question_id": 0, "question": "q?"}], [{"answer": "a"}], "test_q.json",
     "question #0: 'question' must be a string"),
])
def test_video_qa_malformed_rows_named(tmp_path, qs, ans, where, what):
    d = _write_set(tmp_path, "msvd_qa", qs, ans)
    with pytest.raises(BenchmarkFormatError) as e:
        get_benchmark("msvd_qa").load(d)
    assert where in str(e.value) and what in str(e.value)


def test_video_qa_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_q.json not found"):
        get_benchmark("tgif_qa").load(tmp_path)
    d = _write_set(tmp_path, "msvd_qa")
    (d / "test_q.json").write_text("[{\"video_name\": ")
    with pytest.raises(BenchmarkFormatError, match="test_q.json:1: invalid JSON"):
        get_benchmark("msvd_qa").load(d)


# --- the GPT-3.5 judge ----------------------------------------------------------------------------------------

def official_messages(question, answer, pred):
    """Transcription of videollava/eval/video/eval_video_qa.py (@ 984e65b) annotate(): the messages argument of
    openai.ChatCompletion.create, with the script's string literals laid out as it lays them out."""
    return [
        {
            "role": "system",
            "content":
                "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for question-answer pairs. "
                "Your task is to compare the predicted answer with the correct answer and determine if they match meaningfully. Here's how you can accomplish the task:"
                "------"
                "##INSTRUCTIONS: "
                "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
                "- Consider synonyms or paraphrases as valid matches.\n"
                "- Evaluate the correctness of the prediction compared to the answer."
        },
        {
            "role": "user",
            "content":
                "Please evaluate the following video-based question-answer pair:\n\n"
                f"Question: {question}\n"
                f"Correct Answer: {answer}\n"
                f"Predicted Answer: {pred}\n\n"
                "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, with 5 indicating the highest meaningful match. "
                "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
                "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
                "For example, your response should look like this: {'pred': 'yes', 'score': 4.8}."
        }
    ]


def official_aggregate(combined_contents):
    """Transcription of eval_video_qa.py main()'s scoring loop over {id: [response_dict, qa_set]}."""
    score_sum = count = yes_count = no_count = 0
    for key, result in combined_contents.items():
        try:
            count += 1
            score_match = result[0]['score']
            score = int(score_match)
            score_sum += score
            pred = result[0]['pred']
            if "yes" in pred.lower():
                yes_count += 1
            elif "no" in pred.lower():
                no_count += 1
        except Exception:  # noqa: BLE001 - the script's bare except
            pass
    return score_sum / count, yes_count / (yes_count + no_count), yes_count, no_count


TRICKY = [("what is {the} man doing?", "cooking", "He is 'cooking' {pasta}.\nDone"),
          ("how many?", "2", ""), ('quote "x"', "a \\ b", "pred with {{braces}} and %s")]


@pytest.mark.parametrize("q, a, p", TRICKY)
def test_judge_messages_equal_the_official_script(q, a, p):
    assert judge_messages(q, a, p) == official_messages(q, a, p)


def test_judge_request_file_is_batch_api_jsonl(tmp_path):
    rows = [{"id": i, "question": q, "answer": a, "pred": p} for i, (q, a, p) in enumerate(TRICKY)]
    path = write_judge_requests(tmp_path / "req.jsonl", rows)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 3
    for i, (line, (q, a, p)) in enumerate(zip(lines, TRICKY)):
        assert line == {"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "gpt-3.5-turbo", "messages": official_messages(q, a, p)}}
    with pytest.raises(ValueError, match="id '0' repeats"):
        write_judge_requests(tmp_path / "dup.jsonl", rows[:1] * 2)


REPLIES = {"a": "{'pred': 'yes', 'score': 4.8}", "b": "{'pred': 'no', 'score': 1}", "c": "{'pred': 'Yes', 'score': 5}",
           "d": "{'pred': 'not sure', 'score': 2}", "e": "{'pred': 'yes', 'score': '4.5'}",
           "f": "{'pred': 'maybe', 'score': 3}", "g": "{'score': 3}", "h": "Sure! {'pred': 'yes'}"}


def test_judge_scoring_equals_the_official_aggregate(tmp_path):
    import ast

    out = tmp_path / "batch_output.jsonl"
    lines = [{"id": f"batch_req_{k}", "custom_id": k, "response": {"status_code": 200, "request_id": "r",
              "body": {"choices": [{"index": 0, "message": {"role": "assistant", "content": v}}]}}, "error": None}
             for k, v in REPLIES.items()]
    lines.append({"id": "batch_req_x", "custom_id": "x", "response": None,
                  "error": {"code": "server_error", "message": "boom"}})
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    parsed, unparsed = read_batch_output(out)
    assert sorted(unparsed) == ["h", "x"]  # not a Python literal / an errored request: never saved by the script
    combined = {k: [ast.literal_eval(v), {}] for k, v in REPLIES.items() if k != "h"}
    avg, acc, yes, no = official_aggregate(combined)
    s = score_file(out)
    assert (s["average_score"], s["accuracy"], s["yes_count"], s["no_count"]) == (avg, acc, yes, no)
    assert s["accuracy_pct"] == pytest.approx(100 * acc) and s["count"] == 7 and sorted(s["failed"]) == ["e", "g"]
    assert (yes, no) == (2, 2) and avg == pytest.approx((4 + 1 + 5 + 2 + 3 + 3) / 7)
    # 4.8 truncates to 4; "4.5" fails after count += 1; g's score counts before its missing 'pred' fails
    # the official combined results.json reads the same
    res = tmp_path / "results.json"
    res.write_text(json.dumps(combined))
    assert score_file(res)["average_score"] == avg
    assert score_judgements({})["accuracy"] is None


# --- the proxy (NOT the official metric) ----------------------------------------------------------------------

@pytest.mark.parametrize("pred, answer, contains, exact", [
    ("Cooking.", "cooking", True, True),
    ("The man is cooking pasta", "cooking", True, False),
    ("a dog", "dog", True, True),                  # articles dropped
    ("The DOG!", "the dog", True, True),
    ("hotdog", "dog", False, False),               # whole words only
    ("not", "no", False, False),
    ("no, he is not", "no", True, False),
    ("two", "2", False, False),                    # numbers are not spelled out (the GPT judge would accept)
    ("puppy", "dog", False, False),                # no synonyms
    ("not a dog", "dog", True, False),             # containment accepts a negation: a known weakness
    ("", "dog", False, False),
    ("anything", "", False, False),                # an empty answer never matches
    ("ice-cream", "ice cream", True, True),        # punctuation -> spaces
])
def test_proxy_on_tricky_strings(pred, answer, contains, exact):
    assert proxy_match(pred, answer) == (contains, exact)


def test_proxy_score_is_labelled(tmp_path):
    bench = get_benchmark("msvd_qa")
    qs = bench.load(_write_set(tmp_path, "msvd_qa"))
    s = bench.score(qs, {"q0": "He is cooking.", "q1": "nobody"})
    assert s["proxy_accuracy_not_official"] == 50.0 and s["proxy_exact_not_official"] == 0.0
    assert "NOT the official" in s["proxy_definition"] and "GPT-3.5" in s["official_metric"]
    assert normalize("  The  Man's   HAT ") == "man s hat"


def test_predictions_file_is_video_llava_merge_format(tmp_path):
    bench = get_benchmark("activitynet_qa")
    qs = bench.load(_write_set(tmp_path, "activitynet_qa"))
    files = bench.write_predictions(qs, {"q1": "a woman"}, tmp_path / "run")
    assert files["predictions"] == str(tmp_path / "run" / "merge.jsonl")
    assert [json.loads(x) for x in Path(files["predictions"]).read_text().splitlines()] == [
        {"id": "q1", "question": "who is there?", "answer": "a man", "pred": "a woman"}]
    req = json.loads((tmp_path / "run" / "judge_requests.jsonl").read_text())
    assert req["custom_id"] == "q1" and req["body"]["messages"] == official_messages("who is there?", "a man", "a woman")


# --- Video-MME ------------------------------------------------------------------------------------------------

def official_extract(s):
    """Transcription of BradyFU/Video-MME evaluation/eval_your_results.py (@ 4e7566d) extract_characters_regex."""
    import re

    s = s.strip()
    answer_prefixes = [
        "The best answer is",
        "The correct answer is",
        "The answer is",
        "The answer",
        "The best option is"
        "The correct option is",
        "Best answer:"
        "Best option:",
    ]
    for answer_prefix in answer_prefixes:
        s = s.replace(answer_prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    matches = re.search(r'[ABCD]', s)
    if matches is None:
        return ""
    return matches[0]


@pytest.mark.parametrize("text, want", [
    ("A", "A"), (" (B) Two.", "B"), ("The best answer is C", "C"), ("The answer is: d", ""),
    ("Answer: D", "A"),                    # the first capital A-D anywhere ("Answer" starts with A)
    ("Best option: B", "B"),               # "Best option:" alone is not a prefix (joined with "Best answer:")
    ("the video shows a man cooking pasta in a small kitchen with his friends", ""),
    ("the video shows a man cooking pasta in a small kitchen with his friend B", "B"),
    ("", ""), ("I think it is C. Three.", "C"),
])
def test_videomme_extraction_equals_official(text, want):
    assert extract_characters_regex(text) == official_extract(text) == want


def _vmme(root: Path, videos=None) -> Path:
    videos = videos if videos is not None else [
        {"video_id": "001", "videoID": "abc", "duration_category": "short", "video_category": "Knowledge",
         "video_subcategory": "Law", "questions": [
             {"question_id": "001-1", "task_type": "Counting Problem", "question": "How many?",
              "choices": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "B"},
             {"question_id": "001-2", "task_type": "OCR Problems", "question": "What text?",
              "choices": ["A. x.", "B. y.", "C. z.", "D. w."], "answer": "D"}]}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "videomme.json").write_text(json.dumps(videos))
    return root


def test_videomme_template_layout_prompt_and_score(tmp_path):
    root = _vmme(tmp_path / "vm")
    (root / "data").mkdir()
    (root / "data" / "abc.MP4").write_bytes(b"x")
    qs = get_benchmark("videomme").load(root)
    assert [q.key for q in qs] == ["001-1", "001-2"] and qs[0].video_path == root / "data" / "abc.MP4"
    assert qs[0].text == ("Select the best answer to the following multiple-choice question based on the video. "
                          "Respond with only the letter (A, B, C, or D) of the correct option.\nHow many?\nA. One.\n"
                          "B. Two.\nC. Three.\nD. Four.\nThe best answer is:")
    assert qs[0].options == {"A": "One.", "B": "Two.", "C": "Three.", "D": "Four."} and qs[0].split == "short"
    s = get_benchmark("videomme").score(qs, {"001-1": "B", "001-2": "I cannot tell from the video what text is written there"})
    assert s["accuracy"] == 100.0 and s["accuracy_all"] == 50.0 and s["n_answered"] == 1
    assert s["per_duration"] == {"short": 100.0} and s["per_task_type"] == {"Counting Problem": 100.0}


def test_videomme_hf_rows_jsonl_and_parquet(tmp_path):
    row = {"video_id": "001", "duration": "long", "domain": "Knowledge", "sub_category": "Law", "url": "u",
           "videoID": "xyz", "question_id": "001-1", "task_type": "Temporal Reasoning", "question": "When?",
           "options": ["A. a.", "B. b.", "C. c.", "D. d."], "answer": "C"}
    (tmp_path / "videomme.jsonl").write_text(json.dumps(row) + "\n")
    q = get_benchmark("videomme").load(tmp_path)[0]
    assert q.video_path == tmp_path / "data" / "xyz.mp4" and q.answer == "C" and q.split == "long"
    assert q.text == build_prompt("When?", row["options"])
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    (d / "videomme").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row]), d / "videomme" / "test-00000-of-00001.parquet")
    q2 = get_benchmark("videomme").load(d)[0]
    assert q2.text == q.text and q2.metadata["domain"] == "Knowledge"


@pytest.mark.parametrize("mutate, what", [
    (lambda v: v[0]["questions"][0].pop("answer"), "video #0 (abc) question #0: missing field(s) answer"),
    (lambda v: v[0]["questions"][0].update(answer="E"), "answer must be a letter A-D, got 'E'"),
    (lambda v: v[0]["questions"][1].update(choices=["A. x"]), "video #0 (abc) question #1: expected four option"),
    (lambda v: v[0].pop("questions"), "video #0: expected an object with a 'questions' list"),
    (lambda v: (v[0].pop("videoID"), v[0].pop("video_id")), "video #0: missing field videoID / video_id"),
])
def test_videomme_malformed_rows_named(tmp_path, mutate, what):
    videos = json.loads(json.dumps([
        {"video_id": "001", "videoID": "abc", "duration_category": "short", "questions": [
            {"question_id": "001-1", "task_type": "t", "question": "q", "choices": ["A. 1", "B. 2", "C. 3", "D. 4"],
             "answer": "A"},
            {"question_id": "001-2", "task_type": "t", "question": "q", "choices": ["A. 1", "B. 2", "C. 3", "D. 4"],
             "answer": "A"}]}]))
    mutate(videos)
    root = _vmme(tmp_path / "vm", videos)
    with pytest.raises(BenchmarkFormatError) as e:
        get_benchmark("videomme").load(root)
    assert "videomme.json" in str(e.value) and what in str(e.value)
