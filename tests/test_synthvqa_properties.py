"""experiments/synthvqa/properties.py: the AUC, the stop count, the pass/fail rules, and one run on a random model."""

from __future__ import annotations

import json

import numpy as np

from experiments.synthvqa.properties import (combine, evaluate_properties, measure, roc_auc, stopped_within, write,
                                            write_seeds)


def test_roc_auc_is_the_pairwise_probability_with_half_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.integers(0, 6, 40).astype(float)  # many ties
        y = rng.random(40) < 0.3
        pos, neg = s[y], s[~y]
        brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
        assert abs(roc_auc(s, y) - brute) < 1e-12
    assert roc_auc(np.arange(4.0), np.array([0, 0, 1, 1], bool)) == 1.0
    assert roc_auc(np.arange(4.0), np.array([1, 1, 0, 0], bool)) == 0.0
    assert roc_auc(np.arange(3.0), np.zeros(3, bool)) is None


def test_stop_count_and_property_rules():
    toks = np.array([[5, 2, 0, 0], [5, 6, 2, 0], [5, 6, 7, 2], [5, 5, 5, 5]])
    np.testing.assert_array_equal(stopped_within(toks, (2,), 3), [True, True, False, False])
    full = {"accuracy": 93.0, "per_type": {"colour": 100.0, "exist": 98.0, "where": 80.0, "count": 95.0}}
    runs = {"full": full, "random_48": {"accuracy": 78.0, "per_type": {}},
            "oracle_16": {"accuracy": 0.0, "per_type": {"colour": 96.0, "exist": 90.0}}}
    props = {p["name"]: p["pass"] for p in evaluate_properties(
        runs, {"random": {"stopped": 10, "n": 10}, "fastervlm": {"stopped": 9, "n": 10}},
        {"word_auc": {"colour": 0.9, "shape": 0.5}})}
    assert props["full accuracy (%)"] and not props["full accuracy, where (%)"] and props["full accuracy, count (%)"]
    assert not props["random@48: % of full"]  # 78 / 93 = 83.9 % of full < 85 %
    assert props["oracle@16: % of full, colour"] and not props["oracle@16: % of full, exist"]
    assert props["random@8: answers ending with </s> in time"] and not props["fastervlm@8: answers ending with </s> in time"]
    assert props["AdaFV similarity ROC-AUC, colour words"] and not props["AdaFV similarity ROC-AUC, shape words"]


def test_measure_on_a_random_model_writes_every_figure(tmp_path):
    from jaxprune.eval.synthvqa.export import write_standin_checkpoint

    ck = write_standin_checkpoint(tmp_path / "ck")
    res = measure(str(ck), n_questions=8, stop_reducers=("random", "oracle"), batch_size=8, n_alignment=8)
    assert set(res["runs"]) == {"full", "random_48", "oracle_16", "random_8", "oracle_8"}
    assert all(r["n"] == 8 and r["n_missing"] == 0 for r in res["runs"].values())
    assert all(0 <= s["stopped"] <= s["n"] == 8 for s in res["stop_at_8"].values())
    a = res["alignment"]
    assert a["word_n"]["colour"] > 0 and a["word_n"]["shape"] > 0
    assert all(0.0 <= v <= 1.0 for v in a["word_auc"].values())
    assert all(0.0 <= v <= 1.0 for v in a["adafv_score_auc_per_type"].values())
    js, md = write(res, tmp_path / "out" / "props")
    assert json.loads(js.read_text())["n_questions"] == 8
    text = md.read_text()
    assert "| full accuracy (%) |" in text and "AdaFV similarity ROC-AUC, shape words" in text
    # several data seeds: a property passes only if it passes on every seed
    other = json.loads(json.dumps(res))
    other["seed"] = 7
    other["properties"][0] = dict(other["properties"][0], value=99.9, **{"pass": not res["properties"][0]["pass"]})
    both = combine([res, other])
    assert both["seeds"] == [0, 7] and len(both["properties"]) == len(res["properties"])
    assert both["properties"][0]["values"] == [res["properties"][0]["value"], 99.9]
    assert both["properties"][0]["pass"] is False
    assert [p["pass"] for p in both["properties"][1:]] == [p["pass"] for p in res["properties"][1:]]
    js2, md2 = write_seeds(both, tmp_path / "out" / "seeds", "python -m experiments.synthvqa.properties --seeds 0 7")
    text2 = md2.read_text()
    assert "| property | seed 0 | seed 7 | threshold | pass |" in text2 and "Seed 7:" in text2
    assert json.loads(js2.read_text())["per_seed"][1]["seed"] == 7
