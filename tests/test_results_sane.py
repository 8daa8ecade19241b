"""Every committed benchmark result in ``experiments/results/*.json`` holds only physically possible figures:
no negative or non-finite time, rate, size or speedup (issue 19: a -379 ms/token decode figure and 38x-122x
"realized" speedups were once committed). Fields that are signed by definition are listed in ``SIGNED``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"

# a numeric leaf is a measured quantity when its key path names a time, rate, size or speed-up
MEASURED = re.compile(r"(^|[_/|. -])(ms|s|sec|secs|seconds|time|times|ttft|decode|prefill|per_tok|tok_s|speedup|"
                      r"realized|bytes|mib|gib|flops|gflop|kv|peak|compile|samples|medians?)([_/|. -]|$)",
                      re.IGNORECASE)
# signed by definition: a config's layer index (-2 = second to last), accuracy margins over a baseline, and a
# least-squares intercept (a fitted parameter, reported as fitted; the slope is what is quoted as decode time)
SIGNED = re.compile(r"(vision_feature_layer|margin|intercept|delta|diff|r2)", re.IGNORECASE)


def _leaves(x, path=()):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, path + (str(k),))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, path + (str(i),))
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, float(x)


def _bad(doc) -> list[str]:
    out = []
    for path, v in _leaves(doc):
        key = "/".join(path)
        if SIGNED.search(key):
            continue
        if not math.isfinite(v) and not math.isnan(v):
            out.append(f"{key} = {v}")
        elif v < 0 and MEASURED.search(key):
            out.append(f"{key} = {v}")
    return out


def test_the_checker_finds_what_it_must():
    assert _bad({"rows": [{"hf_decode_s_per_tok": -0.379}]}) == ["rows/0/hf_decode_s_per_tok = -0.379"]
    assert _bad({"forward b8 jax decode ms/tok": {"after": -17.2}})
    assert _bad({"speedup": float("inf")})
    assert not _bad({"config": {"vision_feature_layer": -2}, "decode_fit": {"intercept": -0.01, "slope": 0.02}})


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_no_impossible_figure_in_results(path):
    bad = _bad(json.loads(path.read_text()))
    assert not bad, f"{path.name}: negative or infinite measured figures: {bad[:10]}"
