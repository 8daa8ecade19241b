"""Model-level properties of a synthetic-VQA LLaVA (issue #16): does it behave like real LLaVA under token reduction?

    python -m experiments.synthvqa.properties [--model synthvqa] [--n-questions 1000] [--seeds 0 1 2] [--style S]
        [--out experiments/results/synthvqa_properties]

Measured before any reducer comparison, on the first ``--n-questions`` questions of the test split (each
seed of ``--seeds``, scene style ``--style``: default the model's, from its ``synthvqa.json``), with the evaluation
harness' own prompts, preprocessing (its batching functions), greedy decoding and scorer:

1. **accuracy**: full model overall >= 92 % and every question type >= 85 %;
2. **robustness**: ``random`` at 48 of 144 tokens keeps >= 85 % of the full accuracy; the ``oracle`` at 16 keeps
   >= 95 % of the full accuracy on colour and on exist questions;
3. **no degenerate generations**: at 8 tokens (``--stop-reducers``, default random / fastervlm / oracle) every
   answer ends with the stop token within the answer length (the longest ground-truth answer, 2 words, + ``</s>``);
4. **text-to-visual alignment**: the similarity AdaFV reads, ``cos(e_w, v_j)`` between the LLM input embedding of a
   colour / shape word of the question and each projected visual token, ranks the patches that have that colour /
   shape above the other patches with ROC-AUC >= 0.8 (mean over the words of the test questions, colour words and
   shape words apart). Also reported, not a criterion: the AUC of AdaFV's whole text score ``s_j = max_t
   softmax_j(100 cos)`` for the asked object's patches (the oracle's ``patch_prior``) per question type.

Writes ``OUT.json`` (every figure) and ``OUT.md`` (the table, pass / fail per property). The thresholds are the
issue's; nothing here tunes anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: the issue's thresholds
FULL_MIN, TYPE_MIN, RANDOM48_MIN, ORACLE16_MIN, AUC_MIN = 92.0, 85.0, 85.0, 95.0, 0.8
STOP_BUDGET = 8
DEFAULT_STOP_REDUCERS = ("random", "fastervlm", "oracle")


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC-AUC of ``scores [n]`` for the boolean labels ``positive [n]`` (ties count one half: the Mann-Whitney
    statistic); None when one class is empty."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), np.float64)
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties (1-based)
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class Runner:
    """A model with the harness' tokenizer, image preprocessing and batching, generating on synthvqa questions."""

    def __init__(self, model: str, batch_size: int = 32):
        from jaxprune.eval.runner import image_processor
        from jaxprune.eval.sweep import load_model

        self.model, self.tok, self.model_id, path = load_model(model)
        self.img_cfg = image_processor(self.model.cfg, path)
        self.batch_size = batch_size
        self.eos, self.pad = self.model.stop_ids()

    def generate(self, questions: list, reducer: Any, max_new_tokens: int) -> np.ndarray:
        """Greedy tokens ``[n, max_new_tokens]`` in question order (reducer inputs from the questions' metadata)."""
        from jaxprune.eval.batching import build_rows, make_items, plan_batches

        cfg = self.model.cfg
        P = cfg.tokens_per_image
        items = make_items(questions, self.tok, P, self.img_cfg)
        out = np.zeros((len(questions), max_new_tokens), np.int32)
        for b in plan_batches(items, self.batch_size):
            rows = build_rows(b, range(b.size), self.tok, cfg.image_token_index, P, self.img_cfg, cfg.vision.image_size)
            toks = np.asarray(self.model.generate(rows.input_ids, rows.pixel_values, rows.attention_mask,
                                                  reducer=reducer, max_new_tokens=max_new_tokens,
                                                  reducer_inputs=rows.reducer_inputs))
            for j, it in enumerate(b.items):
                out[it.index] = toks[j]
        return out

    def score(self, questions: list, tokens: np.ndarray) -> dict:
        """The synthvqa scorer's dict for generated ``tokens``."""
        from jaxprune.eval.benchmarks.synthvqa import SynthVQA
        from jaxprune.eval.runner import decode_answer

        answers = {q.key: decode_answer(self.tok, t, self.eos) for q, t in zip(questions, tokens)}
        return SynthVQA().score(questions, answers)

    def reducer(self, name: str | None, budget: int):
        from jaxprune.reducers import registry

        return None if name is None else registry.make(name, budget, self.model.cfg)


def load_questions(root: Path, n: int, seed: int, split: str = "test", style: str = "grid") -> list:
    """The first ``n`` questions of ``(split, seed, style)``, written under ``root`` and read back by the synthvqa
    loader (patch priors attached)."""
    from jaxprune.eval.benchmarks.synthvqa import SynthVQA
    from jaxprune.eval.synthvqa.export import write_benchmark

    return SynthVQA().load(write_benchmark(root / "bench", split, seed, n_images=None, n_questions=n, style=style))


def stopped_within(tokens: np.ndarray, eos: tuple[int, ...], limit: int) -> np.ndarray:
    """``[n]`` bool: the row emits a stop token among its first ``limit`` tokens."""
    return np.isin(tokens[:, :limit], np.asarray(eos)).any(1)


def alignment(runner: Runner, questions: list) -> dict:
    """Text-to-patch ROC-AUCs (module docstring, property 4) on the questions' images."""
    import jax
    import jax.numpy as jnp

    from jaxprune.eval.batching import load_pixels
    from jaxprune.eval.synthvqa.scene import COLOUR_NAMES, SHAPES
    from jaxprune.eval.synthvqa.targets import prior_for_question_id
    from jaxprune.reducers import cosine_similarity, masked_softmax

    m = runner.model.module
    V = runner.model.cfg.text.vocab_size
    emb = np.asarray(m.embed_text(jnp.arange(V, dtype=jnp.int32)[None]))[0]  # [V, H] LLM input embeddings
    project = jax.jit(lambda px: m.projector(m.vision_features(px)[0]))  # [N, 3, S, S] -> [N, P, H]
    by_word: dict[str, list[float]] = {"colour": [], "shape": []}
    by_type: dict[str, list[float]] = {}
    cache: dict[str, tuple[np.ndarray, Any]] = {}
    for q in questions:
        image_key = q.key.rsplit("_", 1)[0]
        if image_key not in cache:
            px = np.asarray(load_pixels(q, runner.img_cfg))[None]  # [1, 3, S, S]
            vis = project(jnp.asarray(px))[0]  # [P, H]
            maps = _maps(q.key)
            cache = {image_key: (np.asarray(vis), maps)}
        vis, (colour_map, shape_map) = cache[image_key]
        words = q.text.split("\n")[0].lower().rstrip("?").split()
        for w in words:
            kind, labels = (("colour", colour_map == COLOUR_NAMES.index(w) + 1) if w in COLOUR_NAMES else
                            ("shape", shape_map == SHAPES.index(w) + 1) if w in SHAPES else (None, None))
            if kind is None:
                continue
            e = emb[runner.tok.convert_tokens_to_ids(w)]
            cos = np.asarray(cosine_similarity(jnp.asarray(e[None, None]), jnp.asarray(vis[None])))[0, 0]  # [P]
            auc = roc_auc(cos, labels.reshape(-1))
            if auc is not None:
                by_word[kind].append(auc)
        prior = prior_for_question_id(q.key)
        if prior.sum() > 0:  # AdaFV's whole score over the text after the image (question, suffix, ASSISTANT:)
            ids = runner.tok(q.text + " ASSISTANT:", add_special_tokens=False)["input_ids"]
            te = emb[np.asarray(ids)]  # [T, H]
            cos = cosine_similarity(jnp.asarray(te[None]), jnp.asarray(vis[None]))  # [1, T, P]
            s = np.asarray(masked_softmax(100.0 * cos, jnp.ones((1, 1, vis.shape[0]), bool), axis=-1)).max(1)[0]
            auc = roc_auc(s, prior > 0)
            if auc is not None:
                by_type.setdefault(str(q.category), []).append(auc)
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return {"word_auc": {k: mean(v) for k, v in by_word.items()}, "word_n": {k: len(v) for k, v in by_word.items()},
            "adafv_score_auc_per_type": {k: mean(v) for k, v in by_type.items()},
            "adafv_score_n_per_type": {k: len(v) for k, v in by_type.items()}}


def _maps(question_id: str):
    """``(colour_map, shape_map)`` of the generated scene a question id names."""
    import re

    from jaxprune.eval.synthvqa.dataset import make_item
    from jaxprune.eval.synthvqa.scene import render

    mt = re.match(r"^(train|val|test)_(\d+)_(\d+)(?:_([a-z]+))?_[a-z]+$", question_id)
    if mt is None:
        raise ValueError(f"{question_id!r} is not a synthvqa question id")
    rd = render(make_item(mt.group(1), int(mt.group(2)), int(mt.group(3)), style=mt.group(4) or "grid").scene)
    return rd.colour_map, rd.shape_map


def measure(model: str = "synthvqa", n_questions: int = 1000, seed: int = 0, style: str = "grid",
            stop_reducers: tuple[str, ...] = DEFAULT_STOP_REDUCERS, batch_size: int = 32,
            n_alignment: int | None = None) -> dict:
    """Every property of the module docstring for ``model`` (a directory or a built-in name)."""
    with tempfile.TemporaryDirectory(prefix="synthvqa-props-") as d:
        return _measure(Path(d), model, n_questions, seed, style, stop_reducers, batch_size, n_alignment)


def _measure(tmp: Path, model: str, n_questions: int, seed: int, style: str, stop_reducers: tuple[str, ...],
             batch_size: int, n_alignment: int | None) -> dict:
    t0 = time.time()
    r = Runner(model, batch_size)
    qs = load_questions(tmp, n_questions, seed, style=style)
    max_new = 4
    runs: dict[str, dict] = {}
    timing: dict[str, float] = {}

    def run(label: str, name: str | None, budget: int) -> np.ndarray:
        t = time.time()
        toks = r.generate(qs, r.reducer(name, budget), max_new)
        runs[label] = r.score(qs, toks)
        timing[label] = round(time.time() - t, 1)
        return toks

    run("full", None, 0)
    run("random_48", "random", 48)
    run("oracle_16", "oracle", 16)
    stop_limit = 3  # the longest answer ("bottom right": 2 words) + </s>
    stops = {}
    for name in stop_reducers:
        toks = run(f"{name}_{STOP_BUDGET}", name, STOP_BUDGET)
        ok = stopped_within(toks, r.eos, stop_limit)
        stops[name] = {"stopped": int(ok.sum()), "n": len(ok),
                       "examples_not_stopped": [r.tok.decode(t.tolist()) for t in toks[~ok][:5]]}
    align = alignment(r, qs[:n_alignment] if n_alignment else qs)
    props = evaluate_properties(runs, stops, align)
    return {"model": model, "model_id": r.model_id, "split": "test", "seed": seed, "style": style,
            "n_questions": len(qs), "runs": runs, "stop_at_8": stops, "stop_limit_tokens": stop_limit,
            "alignment": align, "properties": props, "seconds": timing,
            "total_seconds": round(time.time() - t0, 1)}


def evaluate_properties(runs: dict, stops: dict, align: dict) -> list[dict]:
    """``[{name, value, threshold, pass}]`` from the measured figures (the issue's criteria)."""
    full = runs["full"]
    out = [{"name": "full accuracy (%)", "value": round(full["accuracy"], 1), "threshold": f">= {FULL_MIN}",
            "pass": full["accuracy"] >= FULL_MIN}]
    for t, v in full["per_type"].items():
        out.append({"name": f"full accuracy, {t} (%)", "value": round(v, 1), "threshold": f">= {TYPE_MIN}",
                    "pass": v >= TYPE_MIN})
    rel = 100.0 * runs["random_48"]["accuracy"] / max(full["accuracy"], 1e-9)
    out.append({"name": "random@48: % of full", "value": round(rel, 1), "threshold": f">= {RANDOM48_MIN}",
                "pass": rel >= RANDOM48_MIN})
    for t in ("colour", "exist"):
        if t in full["per_type"]:
            rel = 100.0 * runs["oracle_16"]["per_type"][t] / max(full["per_type"][t], 1e-9)
            out.append({"name": f"oracle@16: % of full, {t}", "value": round(rel, 1),
                        "threshold": f">= {ORACLE16_MIN}", "pass": rel >= ORACLE16_MIN})
    for name, s in stops.items():
        out.append({"name": f"{name}@{STOP_BUDGET}: answers ending with </s> in time", "value": f"{s['stopped']}/{s['n']}",
                    "threshold": "all", "pass": s["stopped"] == s["n"]})
    for kind, v in align["word_auc"].items():
        out.append({"name": f"AdaFV similarity ROC-AUC, {kind} words", "value": None if v is None else round(v, 3),
                    "threshold": f">= {AUC_MIN}", "pass": v is not None and v >= AUC_MIN})
    return out


def _run_lines(result: dict) -> list[str]:
    """Markdown of one :func:`measure` result's details: its runs per question type, AdaFV's whole-score AUCs, and
    examples of answers that did not stop in time."""
    types = list(result["runs"]["full"]["per_type"])
    lines = ["| run | accuracy | " + " | ".join(types) + " |", "|---|---|" + "---|" * len(types)]
    for label, sc in result["runs"].items():
        lines.append(f"| {label} | {sc['accuracy']:.1f} | " + " | ".join(f"{v:.1f}" for v in sc["per_type"].values())
                     + " |")
    a = result["alignment"]
    lines += ["", "AdaFV's whole text score (max over the question's words) for the asked object's patches, ROC-AUC "
              "per question type (not a criterion): " + ", ".join(
                  f"{k} {v:.3f} (n={a['adafv_score_n_per_type'][k]})" for k, v in a["adafv_score_auc_per_type"].items()
                  if v is not None) + "."]
    for name, st in result["stop_at_8"].items():
        if st["examples_not_stopped"]:
            lines.append(f"- {name}@{STOP_BUDGET}, answers without `</s>` in {result['stop_limit_tokens']} tokens, "
                         "e.g.: " + "; ".join(f"`{e}`" for e in st["examples_not_stopped"]))
    return lines


def combine(results: list[dict]) -> dict:
    """One result over several data seeds (``results`` from :func:`measure`, one per seed): each property with its
    value per seed, passing only if it passes on every seed (the issue's "3 data seeds")."""
    if not results:
        raise ValueError("combine: no per-seed results")
    names = [p["name"] for p in results[0]["properties"]]
    props = []
    for name in names:
        per = [next(p for p in r["properties"] if p["name"] == name) for r in results]
        props.append({"name": name, "values": [p["value"] for p in per], "threshold": per[0]["threshold"],
                      "pass": all(p["pass"] for p in per)})
    first = results[0]
    return {"model": first["model"], "model_id": first["model_id"], "split": first["split"], "style": first["style"],
            "seeds": [r["seed"] for r in results], "n_questions": first["n_questions"], "properties": props,
            "per_seed": results, "total_seconds": round(sum(r["total_seconds"] for r in results), 1)}


def write_seeds(combined: dict, out: Path, command: str) -> tuple[Path, Path]:
    """``out.json`` / ``out.md`` of :func:`combine`: the property table over the seeds, then each seed's runs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = out.with_suffix(".json"), out.with_suffix(".md")
    js.write_text(json.dumps(combined, indent=1) + "\n")
    seeds = combined["seeds"]
    lines = [f"# Model-level properties: {combined['model']} ({combined['model_id']})", "",
             f"Test split, data seeds {', '.join(map(str, seeds))} (first {combined['n_questions']} questions of each), "
             f"scene style {combined['style']}; `{command}` ({combined['total_seconds']} s on 2 CPU cores). "
             "Thresholds from issue #16; a property passes only if it passes on every seed.", "",
             "| property | " + " | ".join(f"seed {k}" for k in seeds) + " | threshold | pass |",
             "|---|" + "---|" * len(seeds) + "---|---|"]
    for p in combined["properties"]:
        lines.append(f"| {p['name']} | " + " | ".join(str(v) for v in p["values"]) + f" | {p['threshold']} | "
                     + ("yes" if p["pass"] else "**no**") + " |")
    for r in combined["per_seed"]:
        lines += ["", f"Seed {r['seed']}:", "", *_run_lines(r)]
    md.write_text("\n".join(lines) + "\n")
    return js, md


def write(result: dict, out: Path) -> tuple[Path, Path]:
    """``out.json`` and ``out.md``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = out.with_suffix(".json"), out.with_suffix(".md")
    js.write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Model-level properties: {result['model']} ({result['model_id']})", "",
             f"Test split, seed {result['seed']}, style {result['style']}, first {result['n_questions']} questions; "
             f"`python -m experiments.synthvqa.properties` ({result['total_seconds']} s). Thresholds from issue #16.",
             "", "| property | value | threshold | pass |", "|---|---|---|---|"]
    for p in result["properties"]:
        lines.append(f"| {p['name']} | {p['value']} | {p['threshold']} | {'yes' if p['pass'] else '**no**'} |")
    lines += ["", *_run_lines(result)]
    md.write_text("\n".join(lines) + "\n")
    return js, md


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="synthvqa", help="model directory or built-in name (default: the shipped one)")
    ap.add_argument("--n-questions", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="test-data seeds (each measured "
                    "apart; a property passes only on all)")
    ap.add_argument("--style", default=None, help="scene style of the test images (default: the model's, from its "
                    "synthvqa.json; grid without one)")
    ap.add_argument("--stop-reducers", nargs="+", default=list(DEFAULT_STOP_REDUCERS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-alignment", type=int, default=None, help="questions for the AUCs (default: all)")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/synthvqa_properties"))
    a = ap.parse_args(argv)
    from jaxprune.eval.builtin import model_style

    style = a.style or model_style(a.model)
    per_seed = [measure(a.model, a.n_questions, seed, style, tuple(a.stop_reducers), a.batch_size, a.n_alignment)
                for seed in a.seeds]
    res = combine(per_seed)
    command = "python -m experiments.synthvqa.properties " + " ".join(argv if argv is not None else sys.argv[1:])
    js, md = write_seeds(res, a.out, command.strip())
    print(md.read_text())
    return res


if __name__ == "__main__":
    main()
