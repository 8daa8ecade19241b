"""jaxprune-eval on Video-LLaVA: a tiny random HF checkpoint (transformers) and tiny generated video benchmarks
(PyAV clips) through the CLI -- full + reducers, interrupted and resumed == a straight run; the harness' video rows
equal the HF processor's input; the errors for a missing video and a video benchmark on a LLaVA-1.5 model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.video_bench_fixtures import VID_TOK, write_clip, write_msvd, write_tiny_video_llava, write_videomme

torch = pytest.importorskip("torch")
pytest.importorskip("av")
pytestmark = pytest.mark.torch

FRAMES = 4
FLAGS = ["--batch-size", "2", "--max-new-tokens", "3", "--no-progress", "--on-error", "stop", "--no-overlay"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_video_llava(tmp_path_factory.mktemp("tiny-video-llava"), frames=FRAMES)


@pytest.fixture(scope="module")
def msvd(tmp_path_factory):
    return write_msvd(tmp_path_factory.mktemp("gpt_zero_shot_qa"))


def _runs(out: Path, bench: str) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / bench).glob("*/run.json")}


def _answers(out: Path, bench: str, run: str) -> dict[str, str]:
    lines = (out / bench / run / "answers.jsonl").read_text().splitlines()
    return {json.loads(x)["key"]: json.loads(x)["text"] for x in lines}


@pytest.mark.slow  # ~15-20 s on 2 loaded cores: three programs, then two compiled again (resumed)
def test_msvd_end_to_end_resumed_equals_straight(model_dir, msvd, tmp_path):
    from jaxprune.eval import SweepConfig, run_sweep
    from jaxprune.eval.cli import main
    from jaxprune.eval.config import BenchmarkSpec, ReducerSpec

    straight = tmp_path / "straight"
    args = ["--model", str(model_dir), "--benchmark", "msvd_qa", "--data", str(msvd.parent), "--reducer",
            "dycoke:40", "--reducer", "fastv:40", "--out", str(straight)] + FLAGS
    assert main(args) in (0, None)
    runs = _runs(straight, "msvd_qa")
    assert set(runs) == {"full", "dycoke_40", "fastv_40"}
    for label, rec in runs.items():
        assert rec["n_answered"] == 6 and rec["n_skipped"] == 0, label
        assert rec["headline_metric"] == "proxy_accuracy_not_official"
        assert rec["headline"] is not None and "GPT-3.5" in rec["score"]["official_metric"]
        e = rec["efficiency"]
        assert e["ttft_ms"] > 0 and e["kv_cache_bytes"] > 0
        merge = [json.loads(x) for x in Path(rec["outputs"]["predictions"]).read_text().splitlines()]
        assert [m["id"] for m in merge] == list(range(6)) and set(merge[0]) == {"id", "question", "answer", "pred"}
        reqs = Path(rec["outputs"]["judge_requests"]).read_text().splitlines()
        assert len(reqs) == 6 and json.loads(reqs[0])["body"]["model"] == "gpt-3.5-turbo"
    full, dy = runs["full"]["efficiency"], runs["dycoke_40"]["efficiency"]
    assert full["visual_tokens_full"] == FRAMES * 17 and dy["visual_tokens"] < full["visual_tokens"]
    report = (straight / "report.md").read_text()
    assert "proxy_accuracy_not_official" in report and "NOT the official metric" in report

    # interrupted after the first batch, then resumed: the same answers as the straight run
    resumed = tmp_path / "resumed"
    cfg = SweepConfig(model=str(model_dir), benchmarks=[BenchmarkSpec("msvd_qa", str(msvd))],
                      reducers=[ReducerSpec("dycoke", 40)], out=str(resumed), batch_size=2, max_new_tokens=3,
                      progress=False, overlay=False)

    class Stop(Exception):
        pass

    def boom(i):
        if i == 0:
            raise Stop

    with pytest.raises(Stop):
        run_sweep(cfg, after_batch=boom)
    partial = _answers(resumed, "msvd_qa", "full")
    assert 0 < len(partial) < 6
    run_sweep(cfg)
    for run in ("full", "dycoke_40"):
        assert _answers(resumed, "msvd_qa", run) == _answers(straight, "msvd_qa", run), run
        assert ((resumed / "msvd_qa" / run / "merge.jsonl").read_text()
                == (straight / "msvd_qa" / run / "merge.jsonl").read_text())


def test_video_rows_equal_the_hf_processor_input(model_dir, msvd):
    """The harness' row for an MSVD question: the VideoLlavaProcessor-style expansion of the prompt and the
    frames sampled and preprocessed by jaxprune.processing_video; the model's greedy tokens equal HF's on it."""
    from transformers import VideoLlavaForConditionalGeneration

    from jaxprune.eval import Context, load_model
    from jaxprune.eval.batching import build_rows, make_items, plan_batches
    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval.runner import max_image_tokens
    from jaxprune.processing_video import build_prompt, expand_video_tokens, preprocess_frames, read_video

    model, tok, model_id, path = load_model(str(model_dir))
    ctx = Context.create(model, tok, model_id, model_dir=path)
    qs = get_benchmark("msvd_qa").load(msvd)[:2]
    items = make_items(qs, tok, max_image_tokens(ctx), ctx.img_cfg)
    batch = plan_batches(items, 2)[0]
    rows = build_rows(batch, range(2), tok, model.cfg.image_token_index, max_image_tokens(ctx), ctx.img_cfg,
                      model.cfg.vision.image_size)
    assert rows.pixel_values is None and rows.pixel_values_videos.shape == (2, FRAMES, 3, 28, 28)
    for j, it in enumerate(batch.items):
        q = it.question
        want_ids = tok(expand_video_tokens(build_prompt(q.text), FRAMES * 17))["input_ids"]
        got = rows.input_ids[j][rows.attention_mask[j] == 1]
        np.testing.assert_array_equal(got, want_ids)
        assert int((got == VID_TOK).sum()) == FRAMES * 17
        from jaxprune.processing_video import FRAME_CFG
        import dataclasses

        cfg = dataclasses.replace(FRAME_CFG, image_size=28, shortest_edge=28)
        np.testing.assert_array_equal(rows.pixel_values_videos[j], preprocess_frames(read_video(q.video_path, FRAMES),
                                                                                    cfg))
    hf = VideoLlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    ids = torch.tensor(rows.input_ids, dtype=torch.long)
    mask = torch.tensor(rows.attention_mask, dtype=torch.long)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.tensor(
            rows.pixel_values_videos), max_new_tokens=3, do_sample=False)[:, ids.shape[1]:].numpy()
    got = np.asarray(model.generate(rows.input_ids, attention_mask=rows.attention_mask,
                                    pixel_values_videos=rows.pixel_values_videos, max_new_tokens=3))
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)


def test_missing_and_corrupt_video_named(model_dir, tmp_path, capsys):
    from jaxprune.eval.cli import main

    d = write_msvd(tmp_path / "data", n=4)
    (d / "videos" / "clip1.avi").unlink()  # question 2's video (the one .avi of the set)
    code = main(["--model", str(model_dir), "--benchmark", "msvd_qa", "--data", str(d), "--out",
                 str(tmp_path / "o1")] + FLAGS)
    err = capsys.readouterr().err
    assert code == 1 and "question '2'" in err and "clip1.mp4" in err and "not found" in err
    assert "also tried clip1.avi, clip1.mov, clip1.mkv" in err
    # --on-error skip: the others are answered; the prediction file leaves it out, as Video-LLaVA's script does
    code = main(["--model", str(model_dir), "--benchmark", "msvd_qa", "--data", str(d), "--out",
                 str(tmp_path / "o0"), "--on-error", "skip"] + FLAGS[:-3] + ["--no-overlay"])
    capsys.readouterr()
    rec = _runs(tmp_path / "o0", "msvd_qa")["full"]
    assert code == 0 and rec["n_answered"] == 2 and rec["skipped"][0]["key"] == "2"
    assert [json.loads(x)["id"] for x in Path(rec["outputs"]["predictions"]).read_text().splitlines()] == [0, 1]
    (d / "videos" / "clip1.avi").write_bytes(b"not a video at all")
    code = main(["--model", str(model_dir), "--benchmark", "msvd_qa", "--data", str(d), "--out",
                 str(tmp_path / "o2")] + FLAGS)
    err = capsys.readouterr().err
    assert code == 1 and "question '2'" in err and "clip1.avi" in err and "unreadable" in err
    # too few frames for the model's num_frames
    write_clip(d / "videos" / "clip1.avi", n_frames=2)
    code = main(["--model", str(model_dir), "--benchmark", "msvd_qa", "--data", str(d), "--out",
                 str(tmp_path / "o3")] + FLAGS)
    err = capsys.readouterr().err
    assert code == 1 and "question '2'" in err and "fewer than the 4" in err


def test_video_benchmark_on_llava15_refused_before_loading(msvd, tmp_path, capsys):
    from jaxprune.eval.cli import main

    code = main(["--model", "demo", "--benchmark", "msvd_qa", "--data", str(msvd), "--out", str(tmp_path)] + FLAGS)
    err = capsys.readouterr().err
    assert code == 2 and "msvd_qa is a video benchmark" in err and "'llava'" in err
    assert not (tmp_path / "msvd_qa").exists()


def test_runner_refuses_mismatched_questions_by_name():
    """Library use (no CLI pre-flight): the runner names the benchmark, the model type and the question."""
    from jaxprune.eval.benchmarks import Question
    from jaxprune.eval.config import ConfigError
    from jaxprune.eval.video import check_questions

    with pytest.raises(ConfigError, match="msvd_qa: question '7' is a video question but the model .*'llava'"):
        check_questions([Question(7, "what?", video="v.mp4")], object(), "llava", "msvd_qa")


def test_help_lists_video_layouts(capsys):
    from jaxprune.eval.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("msvd_qa", "msrvtt_qa", "tgif_qa", "activitynet_qa", "videomme"):
        assert name in out
    assert "test_q.json" in out and "all_test/v_<video_name>" in out and "videomme.json" in out


def test_videomme_end_to_end(model_dir, tmp_path):
    from jaxprune.eval.cli import main

    root = write_videomme(tmp_path / "vmme")
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--benchmark", "videomme", "--data", str(root), "--out", str(out)]
                + FLAGS) in (0, None)
    rec = _runs(out, "videomme")["full"]
    assert rec["n_answered"] == 4 and rec["headline_metric"] == "accuracy"
    assert 0.0 <= rec["score"]["accuracy_all"] <= 100.0
