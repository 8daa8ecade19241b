"""lmms-eval's own evaluator runs jaxprune as its model, offline, on a local POPE-like task, and agrees with
``jaxprune-eval`` on the same items: same answers, same scores under either scorer.

The items are the POPE fixture (``tests/fixtures/benchmarks/pope``, LLaVA's layout, read by ``jaxprune-eval``);
the test writes them as a ``datasets`` ``save_to_disk`` folder (question, answer, category, image bytes) and a task
folder whose YAML is lmms-eval's ``pope.yaml`` pointed at it (``load_from_disk``) with lmms-eval's own POPE
``utils`` (prompt, ``process_results``, aggregations). ``lmms-eval --model jaxprune`` runs in a subprocess with
``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``; the model is a tiny random LLaVA-1.5 built with transformers whose
head answers yes / no depending on the input, with the fastv reducer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_lmms_plugin import build_yes_no_llava

pytest.importorskip("lmms_eval")
pytest.importorskip("datasets")
pytestmark = [pytest.mark.torch, pytest.mark.slow]  # ~1 min on 2 cores: two processes, each compiling its programs

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "benchmarks" / "pope"
SUFFIX = "\nAnswer the question using a single word or phrase."
REDUCER = "fastv:5"  # of the tiny model's 16 visual tokens

TASK_YAML = """\
task: jp_pope
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.pope_doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 1
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function utils.pope_aggregate_accuracy
    higher_is_better: true
  - metric: pope_precision
    aggregation: !function utils.pope_aggregate_precision
    higher_is_better: true
  - metric: pope_recall
    aggregation: !function utils.pope_aggregate_recall
    higher_is_better: true
  - metric: pope_f1_score
    aggregation: !function utils.pope_aggregate_f1_score
    higher_is_better: true
  - metric: pope_yes_ratio
    aggregation: !function utils.pope_aggregate_yes_ratio
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{suffix}"
metadata:
  - version: 0.0
"""


def _questions():
    from jaxprune.eval.benchmarks import get_benchmark

    bench = get_benchmark("pope")
    return bench, bench.load(FIX)


def _write_task(root: Path, questions) -> Path:
    """A ``save_to_disk`` dataset of ``questions`` and a task folder using lmms-eval's POPE utils."""
    import datasets

    assert all(q.text.endswith(SUFFIX) for q in questions)
    rows = {"question_id": [q.key for q in questions], "question": [q.text[: -len(SUFFIX)] for q in questions],
            "answer": [q.answer for q in questions], "category": [q.category for q in questions],
            "image": [{"bytes": Path(q.image_path).read_bytes(), "path": None} for q in questions]}
    feats = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                               "answer": datasets.Value("string"), "category": datasets.Value("string"),
                               "image": datasets.Image()})
    data = root / "pope_disk"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(data))
    task = root / "tasks"
    task.mkdir()
    (task / "utils.py").write_text("from lmms_eval.tasks.pope.utils import *  # noqa: F401,F403\n")
    (task / "jp_pope.yaml").write_text(TASK_YAML.format(data=data, suffix=SUFFIX.replace("\n", "\\n")))
    return task


def _calibration(questions, tmp: Path):
    """The harness' rows of ``questions`` (vicuna_v1 prompt, 16 image tokens, padded 28 px image)."""
    from jaxprune.eval import load_tokenizer
    from jaxprune.eval.demo_model import DEMO_CFG, save_demo_tokenizer
    from jaxprune.processing import ImageProcessorConfig, build_vicuna_v1_prompt, preprocess_image, tokenize_prompts

    tok = load_tokenizer(save_demo_tokenizer(tmp / "tok"))
    img = ImageProcessorConfig(image_size=28, shortest_edge=28, mode="pad")
    return [(tokenize_prompts(tok, [build_vicuna_v1_prompt(q.text)], DEMO_CFG.image_token_index, 16)["input_ids"][0],
             preprocess_image(q.load_image(), img)) for q in questions]


def _lmms_pope_metrics(answers: dict[str, str], questions) -> dict[str, float]:
    """lmms-eval's POPE scorer (process_results + aggregations) on ``key -> answer``."""
    from lmms_eval.tasks.pope import utils as pu

    per = [pu.pope_process_results({"question_id": q.key, "answer": q.answer}, [answers[q.key]]) for q in questions]
    return {m: getattr(pu, f"pope_aggregate_{m.removeprefix('pope_')}")([p[m] for p in per])
            for m in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")}


def test_lmms_eval_cli_through_jaxprune_equals_jaxprune_eval(tmp_path):
    from jaxprune.eval.cli import main

    bench, questions = _questions()
    model = build_yes_no_llava(tmp_path / "tiny", calibration=_calibration(questions, tmp_path))
    task_dir = _write_task(tmp_path, questions)

    # ---- jaxprune-eval on LLaVA's POPE files
    out = tmp_path / "jp"
    assert main(["--model", str(model), "--benchmark", "pope", "--data", str(FIX), "--out", str(out), "--reducer",
                 REDUCER, "--no-full", "--batch-size", "4", "--max-new-tokens", "1", "--no-progress",
                 "--no-overlay", "--on-error", "stop"]) in (0, None)
    (run,) = (out / "pope").glob("*/run.json")
    rec = json.loads(run.read_text())
    jp_answers = {json.loads(line)["key"]: json.loads(line)["text"]
                  for line in Path(rec["answers_file"]).read_text().splitlines()}
    assert set(jp_answers) == {q.key for q in questions}

    # ---- lmms-eval's CLI, offline, with jaxprune as its model
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    lm_out = tmp_path / "lmms"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "jaxprune", "--model_args",
           f"pretrained={model},reducer={REDUCER},batch_size=4", "--tasks", "jp_pope", "--include_path",
           str(task_dir), "--output_path", str(lm_out), "--log_samples", "--verbosity", "WARNING"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    found = list(lm_out.rglob("*_results.json"))  # lmms-eval exits 0 after logging an error: look for the results
    assert r.returncode == 0 and len(found) == 1, r.stdout[-4000:] + r.stderr[-8000:]
    (results_file,) = found
    results = json.loads(results_file.read_text())["results"]["jp_pope"]
    (samples_file,) = lm_out.rglob("*_samples_jp_pope.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    lm_answers = {}
    for s in samples:  # the dataset's rows are the questions in order
        resp = s["filtered_resps"]
        resp = resp[0] if isinstance(resp, list) else resp
        lm_answers[questions[s["doc_id"]].key] = (resp[0] if isinstance(resp, list) else resp).strip()

    # ---- same items, same answers, same scores under either scorer
    assert lm_answers == jp_answers
    assert {a.lower() for a in jp_answers.values()} == {"yes", "no"}  # the yes/no head: a non-trivial score
    lm_metrics = {k.split(",")[0]: v for k, v in results.items() if k.startswith("pope_") and "stderr" not in k}
    assert lm_metrics == pytest.approx(_lmms_pope_metrics(jp_answers, questions))
    assert bench.score(questions, lm_answers) == rec["score"]  # jaxprune-eval's scorer (LLaVA's eval_pope)


MC_YAML = """\
task: jp_pope_mc
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.pope_doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_choice: ["yes", "no"]
doc_to_target: "answer"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{suffix}"
metadata:
  - version: 0.0
"""


def test_lmms_eval_multiple_choice_through_jaxprune_picks_the_likeliest_choice(tmp_path):
    """``output_type: multiple_choice`` end to end: lmms-eval 0.7.3 scores each choice with ``loglikelihood`` and
    takes ``argmin`` of what the model returns (its own models return a loss), so jaxprune returns ``-sum(log p)``
    there. The prediction must be the choice with the larger ``log P(" choice" | prompt, image)`` computed by
    jaxprune's backend directly, and lmms-eval's ``acc`` the share of those that equal the answer."""
    from lmms_eval.tasks.pope import utils as pu

    from jaxprune.eval.lmms.model import JaxpruneLMM
    from jaxprune.eval.lmms.requests import LoglikRequest

    _, questions = _questions()
    model = build_yes_no_llava(tmp_path / "tiny", calibration=_calibration(questions, tmp_path))
    task_dir = _write_task(tmp_path, questions)
    (task_dir / "jp_pope.yaml").unlink()
    (task_dir / "jp_pope_mc.yaml").write_text(MC_YAML.format(data=tmp_path / "pope_disk",
                                                            suffix=SUFFIX.replace("\n", "\\n")))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    lm_out = tmp_path / "lmms"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "jaxprune", "--model_args",
           f"pretrained={model},reducer={REDUCER},batch_size=4", "--tasks", "jp_pope_mc", "--include_path",
           str(task_dir), "--output_path", str(lm_out), "--log_samples", "--verbosity", "WARNING"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    found = list(lm_out.rglob("*_results.json"))
    assert r.returncode == 0 and len(found) == 1, r.stdout[-4000:] + r.stderr[-8000:]
    acc = json.loads(found[0].read_text())["results"]["jp_pope_mc"]["acc,none"]
    (samples_file,) = lm_out.rglob("*_samples_jp_pope_mc.jsonl")
    samples = {s["doc_id"]: s for s in map(json.loads, samples_file.read_text().splitlines())}
    assert sorted(samples) == list(range(len(questions)))

    # ---- the same scores from jaxprune's backend, in this process
    lm = JaxpruneLMM.create_from_arg_string(f"pretrained={model},reducer={REDUCER},batch_size=4",
                                            {"batch_size": "1", "device": "cpu", "max_batch_size": None})
    kwargs = {"pre_prompt": "", "post_prompt": SUFFIX}
    picks, golds = [], []
    for i, q in enumerate(questions):
        ctx = pu.pope_doc_to_text({"question": q.text[: -len(SUFFIX)]}, kwargs)
        img = q.load_image().convert("RGB")
        lps = [lp for lp, _ in lm.backend.loglikelihood([LoglikRequest(ctx, f" {c}", (img,)) for c in ("yes", "no")])]
        returned = [float(v[0]) for v in samples[i]["filtered_resps"]]  # what lmms-eval received per choice
        assert returned == pytest.approx([-lp for lp in lps], rel=1e-5, abs=1e-5)
        picks.append(("yes", "no")[max(range(2), key=lambda j: lps[j])])
        golds.append(q.answer.strip().lower())
        assert samples[i]["acc"] == float(picks[-1] == golds[-1])
    assert len(set(picks)) == 2  # the yes/no head: both answers occur, so argmin vs argmax would differ
    assert acc == pytest.approx(sum(p == g for p, g in zip(picks, golds)) / len(golds))
