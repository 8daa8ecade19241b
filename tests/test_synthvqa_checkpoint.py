"""The shipped synthetic-VQA model loads through jaxprune.checkpoints and reaches its recorded accuracy."""

import json
from pathlib import Path

import pytest

from jaxprune.eval.synthvqa.check import evaluate_slice

CKPT = Path(__file__).resolve().parents[1] / "jaxprune" / "eval" / "synthvqa" / "checkpoint"
RECORD = CKPT / "accuracy.json"


@pytest.mark.skipif(not (CKPT / "config.json").is_file(), reason="no shipped checkpoint")
def test_shipped_checkpoint_reaches_recorded_accuracy():
    rec = json.loads(RECORD.read_text())
    assert rec["accuracy"] >= 90.0, f"the shipped model's recorded accuracy {rec['accuracy']} is below the 90% target"
    acc = evaluate_slice(CKPT, n_questions=rec["n_questions"], seed=rec["seed"], split=rec["split"])
    # Same data, same weights, greedy decoding: only float summation order may differ across machines.
    assert abs(acc - rec["accuracy"]) <= 1.5, (acc, rec)
    assert acc > 2 * rec["chance"], (acc, rec)
