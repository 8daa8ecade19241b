"""Video-LLaVA preprocessing: PyAV decoding, Video-LLaVA's 8-frame sampling, CLIP resize + centre crop, the prompt.

* **Frame sampling** (:func:`sample_indices`): ``np.linspace(0, n - 1, num_frames, dtype=int)`` over the ``n``
  frames of the file -- the rule of Video-LLaVA's own eval (PKU-YuanGroup/Video-LLaVA @ 984e65b,
  ``videollava/model/multimodal_encoder/languagebind/video/processing_video.py``, ``load_and_transform_video``,
  ``video_decode_backend='decord'``: ``frame_id_list = np.linspace(0, duration-1, num_frames, dtype=int)`` with
  ``duration = len(VideoReader)``; 8 frames). The first and the last frame are always taken. (The transformers
  docstring example samples ``np.arange(0, n, n / 8).astype(int)`` instead; that is not the eval rule.)
* **Decoding** (:func:`read_video`): PyAV (``pip install jaxprune[video]``), every frame of the first video stream
  in decode order, RGB ``uint8 [F, H, W, 3]``. The frame count is the number of frames PyAV decodes (decord's
  ``len()`` counts the index entries: equal on intact files).
* **Pixels** (:func:`preprocess_frames`): per frame, HF ``VideoLlavaImageProcessor``'s PIL path (shortest edge 224,
  bicubic, centre crop 224, rescale 1/255, OpenAI CLIP mean / std) -- :func:`jaxprune.processing.preprocess_image`
  with ``mode="crop"`` at 224, bit-exact with it (tested). ``VideoLlavaVideoProcessor`` has the same settings but
  needs torchvision (its bicubic kernel is torchvision's, not PIL's); the original release resizes with
  pytorchvideo's ``ShortSideScale`` (bilinear on float tensors) after normalising. We follow the HF processors,
  which the ``-hf`` checkpoints are evaluated with in transformers.
* **Prompt** (:func:`build_prompt`): ``"USER: <video>\\n{question} ASSISTANT:"`` (Video-LLaVA's eval template, as
  in the HF model card); :func:`expand_video_tokens` repeats ``<video>`` ``F * (1 + P)`` times (2056), as
  ``VideoLlavaProcessor`` does.

Errors (:class:`jaxprune.InputError`, naming the file): a missing, unreadable or truncated file, a file with no
video stream, and a video with fewer frames than ``num_frames``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxprune.inputs import InputError
from jaxprune.processing import ImageProcessorConfig, preprocess_image

NUM_FRAMES = 8
VIDEO_TOKEN = "<video>"
PROMPT = "USER: <video>\n{question} ASSISTANT:"
#: ``VideoLlavaImageProcessor`` / ``VideoLlavaVideoProcessor`` defaults.
FRAME_CFG = ImageProcessorConfig(image_size=224, shortest_edge=224, mode="crop", rgb_conversion="pil")


def sample_indices(n_frames: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Video-LLaVA's eval rule: ``np.linspace(0, n_frames - 1, num_frames, dtype=int)`` (module docstring)."""
    if n_frames < num_frames:
        raise InputError(f"the video has {n_frames} frames, fewer than the {num_frames} sampled")
    return np.linspace(0, n_frames - 1, num_frames, dtype=int)


def _open(path: Path):
    try:
        import av
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise ImportError("video decoding needs PyAV: pip install 'jaxprune[video]' (or pip install av)") from e
    if not path.is_file():
        raise InputError(f"video file {path} does not exist")
    try:
        container = av.open(str(path))
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types (InvalidDataError, OSError, ...)
        raise InputError(f"video file {path} is unreadable or truncated: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"video file {path} has no video stream")
    return container


def read_video(path: str | os.PathLike[str], num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Decode ``path`` with PyAV and return its ``num_frames`` sampled frames, RGB ``uint8 [F, H, W, 3]``."""
    path = Path(path)
    container = _open(path)
    try:
        frames = []
        try:
            for frame in container.decode(video=0):
                frames.append(frame)
        except Exception as e:  # noqa: BLE001 - a damaged stream mid-file
            raise InputError(f"video file {path} is truncated or corrupt after {len(frames)} frames: "
                             f"{type(e).__name__}: {e}") from None
        declared = container.streams.video[0].frames
    finally:
        container.close()
    if not frames:
        raise InputError(f"video file {path} is unreadable or truncated: no frame could be decoded")
    if declared and len(frames) < declared:
        raise InputError(f"video file {path} is truncated: its header declares {declared} frames, "
                         f"only {len(frames)} decode")
    try:
        idx = sample_indices(len(frames), num_frames)
    except InputError as e:
        raise InputError(f"video file {path}: {e}") from None
    return np.stack([frames[i].to_ndarray(format="rgb24") for i in idx])


def preprocess_frames(frames: np.ndarray | Sequence[np.ndarray], cfg: ImageProcessorConfig = FRAME_CFG) -> np.ndarray:
    """Frames ``[F, H, W, 3]`` uint8 -> ``[F, 3, 224, 224]`` float32 (``VideoLlavaImageProcessor`` per frame)."""
    if len(frames) == 0:
        raise InputError("no frames to preprocess")
    return np.stack([preprocess_image(np.asarray(f), cfg, i) for i, f in enumerate(frames)])


def load_video(path: str | os.PathLike[str], num_frames: int = NUM_FRAMES) -> np.ndarray:
    """``path`` -> ``pixel_values_videos`` of one video, ``[F, 3, 224, 224]`` float32 (stack videos for a batch)."""
    return preprocess_frames(read_video(path, num_frames))


def build_prompt(question: str) -> str:
    """Video-LLaVA's eval prompt: ``USER: <video>\\n{question} ASSISTANT:``."""
    return PROMPT.format(question=question)


def expand_video_tokens(prompt: str, num_video_tokens: int, video_token: str = VIDEO_TOKEN) -> str:
    """Repeat each ``<video>`` ``num_video_tokens`` times (``cfg.num_frames * cfg.tokens_per_frame``), as
    ``VideoLlavaProcessor`` expands it before tokenising."""
    if video_token not in prompt:
        raise InputError(f"the prompt has no {video_token} placeholder")
    return prompt.replace(video_token, video_token * num_video_tokens)


__all__ = ["FRAME_CFG", "NUM_FRAMES", "PROMPT", "build_prompt", "expand_video_tokens", "load_video",
           "preprocess_frames", "read_video", "sample_indices"]
