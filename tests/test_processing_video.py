"""Video-LLaVA preprocessing (jaxprune.processing_video) on small video files written here with PyAV: the
eval's frame sampling, pixels equal to HF's VideoLlavaImageProcessor on the decoded frames, the prompt, and the
errors for unreadable / truncated files and too few frames."""

from __future__ import annotations

import numpy as np
import pytest

from jaxprune.inputs import InputError
from jaxprune.processing_video import (FRAME_CFG, build_prompt, expand_video_tokens, load_video, preprocess_frames,
                                       read_video, sample_indices)

av = pytest.importorskip("av")


def write_video(path, n_frames=20, h=48, w=64, fps=10):
    """Frame i: a flat grey of level 10 * i + 20 plus a moving square, so a decoded frame tells its index."""
    c = av.open(str(path), mode="w")
    s = c.add_stream("mpeg4", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for i in range(n_frames):
        img = np.full((h, w, 3), 10 * i + 20, np.uint8)
        img[8:20, (2 * i) % (w - 12):(2 * i) % (w - 12) + 12] = (200, 30, 60)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("vid") / "clip.mp4")


def test_sampling_rule():
    np.testing.assert_array_equal(sample_indices(20), [0, 2, 5, 8, 10, 13, 16, 19])  # linspace(0, 19, 8).astype(int)
    np.testing.assert_array_equal(sample_indices(8), np.arange(8))
    with pytest.raises(InputError, match="fewer than the 8"):
        sample_indices(7)


def test_decoded_frames_are_the_sampled_ones(video):
    frames = read_video(video)
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    level = np.round((frames[:, 30:, :, :].mean((1, 2, 3)) - 20) / 10).astype(int)
    np.testing.assert_array_equal(level, sample_indices(20))


def test_pixels_equal_hf_video_llava_image_processor(video):
    from transformers import VideoLlavaImageProcessor

    frames = read_video(video)
    hf = VideoLlavaImageProcessor()
    want = np.asarray(hf(images=list(frames), return_tensors="np", return_legacy_image_output=False)["pixel_values"])
    ours = load_video(video)
    assert ours.shape == (8, 3, 224, 224) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, want)
    np.testing.assert_array_equal(preprocess_frames(frames), want)
    # VideoLlavaVideoProcessor needs torchvision (not installable beside the pinned torch): its class attributes,
    # read from its source, are the same settings
    import importlib.util
    from pathlib import Path

    src = Path(importlib.util.find_spec("transformers.models.video_llava").origin).parent
    text = (src / "video_processing_video_llava.py").read_text()
    for line in ("resample = PILImageResampling.BICUBIC", "image_mean = OPENAI_CLIP_MEAN",
                 "image_std = OPENAI_CLIP_STD", 'size = {"shortest_edge": 224}',
                 'crop_size = {"height": 224, "width": 224}', "do_center_crop = True", "do_rescale = True"):
        assert line in text, line
    assert (FRAME_CFG.shortest_edge, FRAME_CFG.image_size, FRAME_CFG.resample) == (224, 224, int(hf.resample))


def test_prompt():
    p = build_prompt("What is the man doing?")
    assert p == "USER: <video>\nWhat is the man doing? ASSISTANT:"
    assert expand_video_tokens(p, 3) == "USER: <video><video><video>\nWhat is the man doing? ASSISTANT:"
    with pytest.raises(InputError, match="placeholder"):
        expand_video_tokens("USER: hi ASSISTANT:", 3)


def test_errors(tmp_path, video):
    with pytest.raises(InputError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 50)
    with pytest.raises(InputError, match="junk.mp4 is unreadable or truncated"):
        read_video(junk)
    data = video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.mp4 .*truncated"):
        read_video(cut)
    short = write_video(tmp_path / "short.mp4", n_frames=5)
    with pytest.raises(InputError, match="short.mp4: the video has 5 frames, fewer than the 8 sampled"):
        read_video(short)
    assert read_video(short, num_frames=4).shape[0] == 4
