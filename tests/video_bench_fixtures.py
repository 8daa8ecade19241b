"""Tiny generated video benchmarks for the tests: PyAV clips, Video-ChatGPT ``test_q.json`` / ``test_a.json`` sets
and a Video-MME template, plus a tiny random Video-LLaVA HF checkpoint (transformers) with a word tokenizer that
knows ``<image>`` and ``<video>``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMG_TOK, VID_TOK, VOCAB = 127, 128, 129
WORDS = ("user assistant what is the man doing in video how many people are there color of car select best answer "
         "to following multiple choice question based on respond with only letter a b c or d correct option").split()


def write_clip(path: Path, n_frames: int = 10, size: int = 32, seed: int = 0) -> Path:
    """A small mpeg4 clip whose frames differ (a moving square over a per-clip colour)."""
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(30, 220, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    c = av.open(str(path), mode="w")
    s = c.add_stream("mpeg4", rate=10)
    s.width = s.height = size
    s.pix_fmt = "yuv420p"
    for i in range(n_frames):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = base
        x = (3 * i) % (size - 8)
        img[4:12, x:x + 8] = (250, 20, 20)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def write_msvd(root: Path, n: int = 6) -> Path:
    """``MSVD_Zero_Shot_QA/`` with ``n`` questions over ``n // 2`` clips (two questions per clip)."""
    d = root / "MSVD_Zero_Shot_QA"
    qs, ans = [], []
    for i in range(n):
        name = f"clip{i // 2}"
        if i % 2 == 0:
            write_clip(d / "videos" / f"{name}.avi" if i == 2 else d / "videos" / f"{name}.mp4", seed=i)
        qs.append({"video_name": name, "question_id": i, "question": ["what is the man doing?",
                                                                     "how many people are there?"][i % 2]})
        ans.append({"answer": ["cooking", "two"][i % 2], "question_id": i, "type": "what"})
    d.mkdir(parents=True, exist_ok=True)
    (d / "test_q.json").write_text(json.dumps(qs))
    (d / "test_a.json").write_text(json.dumps(ans))
    return d


def write_videomme(root: Path) -> Path:
    """A two-video Video-MME template (``videomme.json`` + ``data/<videoID>.mp4``)."""
    vids = []
    for v in range(2):
        write_clip(root / "data" / f"yt{v}.mp4", seed=10 + v)
        vids.append({"video_id": f"00{v}", "videoID": f"yt{v}", "duration_category": "short",
                     "video_category": "Knowledge", "video_subcategory": "Humanity & History",
                     "questions": [{"question_id": f"00{v}-{j}", "task_type": "Counting Problem",
                                    "question": "how many people are there?",
                                    "choices": ["A. One.", "B. Two.", "C. Three.", "D. Four."],
                                    "answer": "ABCD"[(v + j) % 4]} for j in range(2)]})
    (root / "videomme.json").write_text(json.dumps(vids))
    return root


def write_tiny_video_llava(dst: Path, frames: int = 4) -> Path:
    """A tiny random ``VideoLlavaForConditionalGeneration`` (28 px CLIP, patch 7: 17 tokens per frame) saved with
    a word tokenizer (``<image>`` = 127, ``<video>`` = 128) and ``num_frames`` in its config."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    from jaxprune.eval.wordtok import save_word_tokenizer, word_tokenizer
    from tests.conftest import perturb_

    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=VOCAB, eos_token_id=2, pad_token_id=0, bos_token_id=1,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7)
    cfg = VideoLlavaConfig(text_config=tc, vision_config=vc, image_token_index=IMG_TOK, video_token_index=VID_TOK,
                           image_seq_length=16, video_seq_length=frames * 17, vision_feature_layer=-2,
                           vision_feature_select_strategy="default")
    torch.manual_seed(0)
    hf = perturb_(VideoLlavaForConditionalGeneration(cfg).eval())
    hf.save_pretrained(dst)
    c = json.loads((dst / "config.json").read_text())
    c["num_frames"] = frames
    (dst / "config.json").write_text(json.dumps(c))
    tok = word_tokenizer(WORDS, VOCAB - 1, IMG_TOK)
    tok.add_special_tokens(["<video>"])
    save_word_tokenizer(tok, dst)
    return dst
