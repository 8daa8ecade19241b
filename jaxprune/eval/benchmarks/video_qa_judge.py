"""The GPT-3.5 judge of Video-LLaVA's open-ended video QA: request files to submit offline, and the scorer of the
responses.

Official pieces reproduced (PKU-YuanGroup/Video-LLaVA @ 984e65b, ``videollava/eval/video/eval_video_qa.py``, run by
``scripts/v1_5/eval/eval_qa_{msvd,msrvtt,tgif,activitynet}.sh``; inherited from Video-ChatGPT):

* **Request** (:func:`judge_messages`): one ``openai.ChatCompletion.create(model="gpt-3.5-turbo", messages=[system,
  user])`` per prediction, no other parameter (temperature etc. at the API defaults); the system and user texts are
  the script's, character for character (its adjacent string literals join without separators, e.g.
  ``"...accomplish the task:------##INSTRUCTIONS: - Focus..."``); the user text embeds ``question``, ``answer`` and
  ``pred`` of the merged prediction line (``merge.jsonl``).
* **Parse** (:func:`parse_judgement`): ``ast.literal_eval`` of the reply's content; a reply that does not parse is
  not saved by the script (it retries that id until one does): here it is reported in ``unparsed`` and left out,
  as a never-completed id would be.
* **Aggregate** (:func:`score_judgements`): over every saved result, ``count += 1``; ``score = int(result['score'])``
  (a float 4.8 truncates to 4; a string such as ``"4.8"`` raises: the script prints it and moves on, with ``count``
  already incremented and no yes/no counted); ``score_sum += score``; then ``"yes" in pred.lower()`` -> yes, elif
  ``"no" in pred.lower()`` -> no (substring tests, as the script: ``"not sure"`` counts as no).  ``average_score =
  score_sum / count``, ``accuracy = yes / (yes + no)`` (we also give it x 100, as Video-LLaVA's tables print it).

**Offline submission format** (our choice, stated): the OpenAI Batch API input -- JSONL, one line per question
``{"custom_id": <question key>, "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-3.5-turbo",
"messages": [...]}}``.  Submit it with ``openai batches create`` (or post each ``body`` yourself); the batch's output
JSONL (``{"custom_id", "response": {"status_code", "body": {"choices": [{"message": {"content"}}]}}, "error"}``) is
what :func:`read_batch_output` reads.  The official script's combined ``results.json`` (``{id: [response_dict,
qa_set]}``) is read as well (:func:`read_official_results`).  ``python -m jaxprune.eval.benchmarks.video_qa_judge
RESPONSES`` prints the scores.
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .base import BenchmarkFormatError

JUDGE_MODEL = "gpt-3.5-turbo"
BATCH_URL = "/v1/chat/completions"

SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for question-answer "
    "pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match meaningfully. "
    "Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)

USER_TEMPLATE = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {pred}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, with 5 "
    "indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', where value "
    "of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)


def judge_messages(question: str, answer: str, pred: str) -> list[dict[str, str]]:
    """The ``messages`` of the official judge call for one prediction (system + user)."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(question=question, answer=answer, pred=pred)}]


def judge_request(custom_id: str, question: str, answer: str, pred: str) -> dict[str, Any]:
    """One OpenAI Batch API input line (a dict) for one prediction."""
    return {"custom_id": str(custom_id), "method": "POST", "url": BATCH_URL,
            "body": {"model": JUDGE_MODEL, "messages": judge_messages(question, answer, pred)}}


def write_judge_requests(path: str | Path, predictions: Iterable[Mapping[str, Any]]) -> Path:
    """Write one request per prediction line ``{"id", "question", "answer", "pred"}`` (``merge.jsonl`` rows) as
    Batch API JSONL; ``custom_id`` = ``str(id)``.  Ids must be unique (the official script keeps one result per id)."""
    lines, seen = [], set()
    for row in predictions:
        cid = str(row["id"])
        if cid in seen:
            raise ValueError(f"judge requests: id {cid!r} repeats (the official judge keeps one result per id)")
        seen.add(cid)
        lines.append(json.dumps(judge_request(cid, row["question"], row["answer"], row["pred"])) + "\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def parse_judgement(content: str) -> Any | None:
    """``ast.literal_eval`` of a judge reply (None when it does not parse: the official script would retry)."""
    try:
        return ast.literal_eval(content)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def read_batch_output(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """``({custom_id: parsed reply}, [custom_ids without a usable reply])`` from a Batch API output JSONL."""
    path = Path(path)
    results: dict[str, Any] = {}
    unparsed: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(path, f"invalid JSON: {e.msg}", lineno) from None
            if not isinstance(row, dict) or "custom_id" not in row:
                raise BenchmarkFormatError(path, "not a Batch API output line (no 'custom_id')", lineno)
            cid = str(row["custom_id"])
            try:
                content = row["response"]["body"]["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                unparsed.append(cid)  # an errored request: no saved result, as a failed call in the script
                continue
            parsed = parse_judgement(content) if isinstance(content, str) else None
            if parsed is None:
                unparsed.append(cid)
            else:
                results[cid] = parsed
    return results, unparsed


def read_official_results(path: str | Path) -> dict[str, Any]:
    """``{id: response_dict}`` from the official combined ``results.json`` (``{id: [response_dict, qa_set]}``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkFormatError(path, f"invalid JSON: {e.msg}", e.lineno) from None
    if not isinstance(data, dict):
        raise BenchmarkFormatError(path, "expected an object {id: [response_dict, qa_set]}")
    out = {}
    for k, v in data.items():
        if not isinstance(v, list) or not v:
            raise BenchmarkFormatError(path, f"entry {k!r}: expected [response_dict, qa_set]")
        out[str(k)] = v[0]
    return out


def score_judgements(results: Mapping[str, Any]) -> dict[str, Any]:
    """``eval_video_qa.py``'s aggregate over ``{id: response_dict}`` (module docstring): accuracy (fraction and
    percent), average score, yes / no counts, and the ids whose result the script could not use."""
    count = score_sum = yes = no = 0
    failed = []
    for key, result in results.items():
        try:
            count += 1
            score = int(result["score"])
            score_sum += score
            pred = result["pred"]
            if "yes" in pred.lower():
                yes += 1
            elif "no" in pred.lower():
                no += 1
        except Exception:  # noqa: BLE001 - the script's bare except: it prints the result and goes on
            failed.append(str(key))
    acc = yes / (yes + no) if yes + no else None
    return {"accuracy": acc, "accuracy_pct": 100.0 * acc if acc is not None else None,
            "average_score": score_sum / count if count else None, "yes_count": yes, "no_count": no,
            "count": count, "failed": failed}


def score_file(path: str | Path) -> dict[str, Any]:
    """Score a Batch API output JSONL or an official ``results.json`` (chosen by the file's first character)."""
    path = Path(path)
    head = path.read_text(encoding="utf-8").lstrip()[:1]
    if head == "{" and path.suffix == ".json":
        results, unparsed = read_official_results(path), []
    else:
        results, unparsed = read_batch_output(path)
    out = score_judgements(results)
    out["unparsed"] = unparsed
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxprune.eval.benchmarks.video_qa_judge RESPONSES...``: print each file's official scores."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m jaxprune.eval.benchmarks.video_qa_judge BATCH_OUTPUT.jsonl|results.json ...",
              file=sys.stderr)
        return 2
    for a in args:
        s = score_file(a)
        acc = "n/a" if s["accuracy_pct"] is None else f"{s['accuracy_pct']:.1f}%"
        avg = "n/a" if s["average_score"] is None else f"{s['average_score']:.2f}"
        print(f"{a}: accuracy {acc} (yes {s['yes_count']}, no {s['no_count']}), average score {avg} over "
              f"{s['count']} results; {len(s['unparsed'])} without a parsable reply, {len(s['failed'])} unusable")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
