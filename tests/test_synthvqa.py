"""The synthetic VQA set: generator determinism, well-defined questions, the benchmark files and scorer, the
instruction data, and the built-in default model / benchmark (on a random-weight stand-in checkpoint until the
trained one is shipped)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxprune.eval.synthvqa.dataset import make_item, make_items
from jaxprune.eval.synthvqa.questions import (
    CHANCE,
    NUMBERS,
    QTYPES,
    SHORT_ANSWER_SUFFIX,
    vocabulary,
)
from jaxprune.eval.synthvqa.scene import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, render


def _png_bytes(item) -> bytes:
    return render(item.scene).image.tobytes()


# ---------------------------------------------------------------------------------------------- generator
def test_images_are_a_pure_function_of_split_seed_index():
    a, b = make_item("test", 0, 3), make_item("test", 0, 3)
    assert a == b and _png_bytes(a) == _png_bytes(b)
    assert _png_bytes(make_item("test", 1, 3)) != _png_bytes(a)       # another seed
    assert _png_bytes(make_item("train", 0, 3)) != _png_bytes(a)      # another split
    assert _png_bytes(make_item("test", 0, 4)) != _png_bytes(a)       # another index
    # a slice is a prefix of a longer one, and ``start`` picks up where it left off
    assert make_items("val", 2, 4) == make_items("val", 2, 7)[:4]
    assert make_items("val", 2, 3, start=4) == make_items("val", 2, 7)[4:]
    with pytest.raises(ValueError):
        make_item("dev", 0, 0)


def test_questions_are_consistent_with_the_scene():
    vocab = set(vocabulary())
    seen_types, seen_answers = set(), {t: set() for t in QTYPES}
    for item in make_items("train", 5, 150):
        sc = item.scene
        img = render(sc).image
        assert img.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img.dtype == np.uint8
        assert 3 <= len(sc.objects) <= 5 and len({o.cell for o in sc.objects}) == len(sc.objects)
        for o in sc.objects:  # every object is drawn in its colour at its centre, inside its cell
            assert tuple(img[o.cy, o.cx]) == COLOURS[o.colour]
            assert (o.cy // 32) * 3 + o.cx // 32 == o.cell
        types = [qa.qtype for qa in item.qas]
        assert len(types) == len(set(types)) and set(types) <= set(QTYPES)
        assert {"exist", "count"} <= set(types)                           # always well defined
        for qa in item.qas:
            seen_types.add(qa.qtype)
            seen_answers[qa.qtype].add(qa.answer)
            assert qa.text == qa.question + SHORT_ANSWER_SUFFIX
            words = qa.question.lower().replace("?", " ?").split() + qa.answer.split()
            assert set(words) <= vocab, set(words) - vocab
            if qa.qtype == "colour":
                shape = qa.question.removeprefix("What color is the ").removesuffix("?")
                objs = sc.with_shape(shape)
                assert len(objs) == 1 and qa.answer == objs[0].colour
            elif qa.qtype == "exist":
                colour, shape = qa.question.removeprefix("Is there a ").removesuffix(" in the image?").split()
                assert qa.answer == ("yes" if sc.has(colour, shape) else "no")
            elif qa.qtype == "where":
                colour, shape = qa.question.removeprefix("Where is the ").removesuffix("?").split()
                objs = [o for o in sc.objects if (o.colour, o.shape) == (colour, shape)]
                assert len(objs) == 1 and qa.answer == POSITIONS[objs[0].cell]
            else:
                colour = qa.question.removeprefix("How many ").removesuffix(" objects are there?")
                assert sc.count(colour) >= 1 and qa.answer == NUMBERS[sc.count(colour)]
        if all(len(sc.with_shape(s)) != 1 for s in SHAPES):
            assert "colour" not in types
    assert seen_types == set(QTYPES)
    assert seen_answers["exist"] == {"yes", "no"} and seen_answers["colour"] <= set(COLOURS)
    assert seen_answers["where"] <= set(POSITIONS) and len(seen_answers["where"]) >= 8
    assert {"one", "two", "three"} <= seen_answers["count"]


# ---------------------------------------------------------------------------------------------- files
def test_benchmark_files_round_trip_through_the_loader(tmp_path):

    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval.synthvqa.export import META_FILE, collect, write_benchmark

    dst = write_benchmark(tmp_path / "b", "test", seed=1, n_images=5)
    meta = json.loads((dst / META_FILE).read_text())
    items = [it for it, _ in collect("test", 1, n_images=5)]
    qs = get_benchmark("synthvqa").load(dst)
    assert len(qs) == meta["n_questions"] == sum(len(it.qas) for it in items) and meta["n_images"] == 5
    expected = [(it, qa) for it in items for qa in it.qas]
    for q, (it, qa) in zip(qs, expected):
        assert q.text == qa.text and q.answers == [qa.answer] and q.category == qa.qtype
        assert q.image == f"{it.image_id}.png" and q.key == str(q.question_id)
        assert np.array_equal(np.asarray(q.load_image()), render(it.scene).image)  # PNG is lossless
    assert abs(meta["chance"] - 100 * np.mean([CHANCE[q.category] for q in qs])) < 1e-9
    # same bytes on a second write; refuses to clobber unless asked; n_questions truncates the question list
    again = write_benchmark(tmp_path / "c", "test", seed=1, n_images=5)
    for name in ("llava_synthvqa_test.jsonl", "synthvqa_test_answers.jsonl", f"images/{items[0].image_id}.png"):
        assert (dst / name).read_bytes() == (again / name).read_bytes()
    with pytest.raises(FileExistsError):
        write_benchmark(dst, "test", seed=1, n_images=2)
    write_benchmark(dst, "test", seed=1, n_images=None, n_questions=7, overwrite=True)
    short = get_benchmark("synthvqa").load(dst)
    assert [q.key for q in short] == [q.key for q in qs[:7]]
    assert not list(tmp_path.glob(".*"))  # no temp folders left behind


def test_scorer_normalises_and_reports_types_and_chance():
    from jaxprune.eval.benchmarks import Question, get_benchmark

    qs = [Question(f"q{i}", "t", answers=[a], category=c) for i, (a, c) in enumerate(
        [("red", "colour"), ("blue", "colour"), ("yes", "exist"), ("no", "exist"), ("top left", "where"),
         ("two", "count")])]
    preds = {"q0": "  Red. ", "q1": "green", "q2": "Yes", "q3": "no.", "q4": "Top Left"}  # q5 unanswered
    s = get_benchmark("synthvqa").score(qs, preds)
    assert s["accuracy"] == pytest.approx(100 * 4 / 6) and s["n"] == 6 and s["n_missing"] == 1
    assert s["per_type"] == {"colour": 50.0, "exist": 100.0, "where": 100.0, "count": 0.0}
    assert s["n_per_type"] == {"colour": 2, "exist": 2, "where": 1, "count": 1}
    assert s["chance_per_type"]["exist"] == 50.0 and s["chance_per_type"]["where"] == pytest.approx(100 / 9)
    mix = (2 * CHANCE["colour"] + 2 * CHANCE["exist"] + CHANCE["where"] + CHANCE["count"]) / 6
    assert s["chance"] == pytest.approx(100 * mix)
    assert s["majority_per_type"] == {"colour": 50.0, "exist": 50.0, "where": 100.0, "count": 100.0}
    assert s["majority"] == pytest.approx(100 * 4 / 6)
    assert get_benchmark("synthvqa").score(qs, {"q0": "red, not blue"})["accuracy"] == 0.0
    with pytest.raises(ValueError, match="ground-truth"):
        get_benchmark("synthvqa").score([Question("x", "t")], {})


def test_instructions_are_readable_and_tokenize_without_unknown_words(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from jaxprune.eval.synthvqa.export import (
        standin_config,
        standin_words,
        write_instructions,
    )
    from experiments.train.batches import encode, read_llava_instructions
    from jaxprune.eval.wordtok import word_tokenizer

    path = write_instructions(tmp_path / "i", "train", seed=0, n_images=3)
    items = make_items("train", 0, 3)
    convs = read_llava_instructions(path)
    raw = json.loads(path.read_text())
    assert len(convs) == len(raw) == sum(len(it.qas) for it in items)
    assert raw[0]["id"] == f"{items[0].image_id}_{items[0].qas[0].qtype}"
    assert convs[0].turns == ((f"<image>\n{items[0].qas[0].text}", items[0].qas[0].answer),)
    assert all((path.parent / c.image).is_file() for c in convs)
    multi = read_llava_instructions(write_instructions(tmp_path / "m", "train", 0, 3, multi_turn=True))
    assert [len(c.turns) for c in multi] == [len(it.qas) for it in items]
    assert sum("<image>" in h for c in multi for h, _ in c.turns) == 3
    cfg = standin_config()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(standin_words(), cfg.text.vocab_size,
                                                                  cfg.image_token_index),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    for c in multi:
        ids, labels = encode(tok, c.turns, cfg.image_token_index, cfg.tokens_per_image)
        assert 0 not in ids.tolist()                                        # no <unk>: the vocabulary covers it
        assert (labels >= 0).sum() == sum(len(a.split()) + 1 for _, a in c.turns)  # answers + </s>


# ---------------------------------------------------------------------------------------------- built-ins
@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A random-weight checkpoint shaped like the shipped one, used as the 'synthvqa' built-in model."""
    from jaxprune.eval.synthvqa.export import write_standin_checkpoint

    return write_standin_checkpoint(tmp_path_factory.mktemp("standin") / "checkpoint")


@pytest.fixture()
def cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "synthvqa-cache"
    monkeypatch.setenv("JAXPRUNE_CACHE", str(root))
    return root


def test_builtin_benchmark_and_default_switch(cache, standin, tmp_path, monkeypatch):
    from jaxprune.eval import builtin
    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval.config import ConfigError

    path = builtin.ensure_benchmark("synthvqa")
    assert path.parent == cache and builtin.ensure_benchmark("synthvqa") == path
    qs = get_benchmark("synthvqa").load(path)
    style = builtin.synthvqa_style()
    first = make_item("test", 0, 0, style=style)
    assert len(qs) == builtin.SYNTHVQA_QUESTIONS and qs[0].key == first.image_id + "_" + first.qas[0].qtype
    monkeypatch.setenv(builtin.CHECKPOINT_ENV, str(tmp_path / "nothing"))
    # a missing checkpoint is an error naming it, never a silent switch to the random demo model (issue 14)
    assert builtin.default_model() == "synthvqa"
    with pytest.raises(ConfigError, match="no checkpoint"):
        builtin.default_sweep(tmp_path)
    monkeypatch.setenv(builtin.CHECKPOINT_ENV, str(standin))
    assert builtin.default_model() == "synthvqa"
    cfg = builtin.default_sweep(tmp_path, batch_size=4)
    assert cfg.model == "synthvqa" and cfg.batch_size == 4 and cfg.benchmarks[0].name == "synthvqa"
    # the benchmark follows the checkpoint's scene style (the stand-in has no synthvqa.json: grid)
    assert cfg.benchmarks[0].data == str(builtin.ensure_benchmark("synthvqa")) and cfg.runs[0].is_full
    assert {r.name for r in cfg.reducers} == {r.split(":")[0] for r in builtin.DEFAULT_RUNS["synthvqa"].reducers}
    # issue 16: the four seed methods, FastV, VisionZip, random and the oracle, each at 48 and 16 of 144 tokens
    assert {r.label for r in cfg.reducers} == {f"{n}:{b}" for n in ("consensusdrop", "visiondrop", "adafv",
                                                                    "adsc_final", "fastv", "visionzip", "random",
                                                                    "oracle") for b in (48, 16)}


def test_builtin_benchmark_follows_the_checkpoints_scene_style(cache, standin, tmp_path, monkeypatch):
    """The checkpoint's synthvqa.json names its training scene style; the built-in benchmark is generated in it
    (no file: grid); a bad file is an error naming it."""
    import shutil

    from jaxprune.eval import builtin
    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval.config import ConfigError

    ck = tmp_path / "ck"
    shutil.copytree(standin, ck)
    (ck / builtin.STYLE_FILE).unlink(missing_ok=True)
    monkeypatch.setenv(builtin.CHECKPOINT_ENV, str(ck))
    assert builtin.synthvqa_style() == "grid" and builtin.model_style(str(ck)) == "grid"
    (ck / builtin.STYLE_FILE).write_text('{"scene_style": "large"}')
    assert builtin.synthvqa_style() == "large" and builtin.model_style("synthvqa") == "large"
    qs = get_benchmark("synthvqa").load(builtin.ensure_benchmark("synthvqa"))
    assert len(qs) == builtin.SYNTHVQA_QUESTIONS and all("_large_" in q.key for q in qs)
    for bad, msg in (('{"scene_style": "huge"}', "huge"), ("not json", "JSON")):
        (ck / builtin.STYLE_FILE).write_text(bad)
        with pytest.raises(ConfigError, match=msg) as e:
            builtin.synthvqa_style()
        assert builtin.STYLE_FILE in str(e.value)


def test_builtin_model_is_keyed_by_the_checkpoint_bytes(cache, standin, tmp_path, monkeypatch):
    import shutil

    from jaxprune.eval import builtin
    from jaxprune.eval.config import ConfigError

    monkeypatch.setenv(builtin.CHECKPOINT_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no checkpoint"):
        builtin.ensure_model("synthvqa")
    monkeypatch.setenv(builtin.CHECKPOINT_ENV, str(standin))
    d, model_id = builtin.ensure_model("synthvqa")
    assert (d / "tokenizer.json").is_file() and model_id.startswith("jaxprune-synthvqa-")
    assert builtin.ensure_model()[0] == d                                   # the default when present
    other = tmp_path / "ckpt2"
    shutil.copytree(standin, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["_note"] = "changed"
    (other / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv(builtin.CHECKPOINT_ENV, str(other))
    key2, id2 = builtin._synthvqa_key(), builtin._synthvqa_id()
    monkeypatch.setenv(builtin.CHECKPOINT_ENV, str(standin))
    assert key2 != builtin._synthvqa_key() and id2 != model_id


def test_default_run_and_slice_on_the_standin(cache, standin, tmp_path, monkeypatch, capsys):
    """``jaxprune-eval --model synthvqa`` (trimmed to the full model on 8 questions) and evaluate_slice."""
    from jaxprune.eval import builtin
    from jaxprune.eval.cli import main
    from jaxprune.eval.synthvqa.check import evaluate_slice

    monkeypatch.setenv(builtin.CHECKPOINT_ENV, str(standin))
    rc = main(["--model", "synthvqa", "--reducer", "full", "--limit", "8", "--no-overlay", "--no-progress",
               "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "| full | 144 |" in out and "% of full" in out and "Score (accuracy)" in out
    assert "Blind baselines on these 8 questions: chance" in out
    run = json.loads((tmp_path / "o" / "synthvqa" / "full" / "run.json").read_text())
    assert run["n_answered"] == 8 and set(run["score"]["per_type"]) <= set(QTYPES) and "chance" in run["score"]
    acc = evaluate_slice(standin, n_questions=8, batch_size=16)
    assert 0.0 <= acc <= 100.0
