"""Host-side LLaVA-OneVision preprocessing (numpy + PIL): anyres images, multi-image rows, video frames, the prompt.

* **An image alone in its prompt** (HF ``batch_num_images == 1``): ``1 + gh*gw`` crops of ``S x S`` (384): the
  whole image squashed to ``S x S`` (base), then the tiles (row-major) of the image resized into the best pinpoint
  (aspect kept) and zero-padded to it -- :mod:`jaxprune.processing_anyres`'s geometry, with SigLIP's ``S`` (384 is no
  multiple of the patch 14: the token geometry is :mod:`jaxprune.models.onevision_pack`'s, ``p = S // patch``).
* **Images of a multi-image prompt**: padded to a square with the mean colour ``int(255 * mean)`` per channel
  (image centred), squashed to ``S x S``: one crop each.
* Every crop: rescale ``1/255`` (float64 -> float32), normalise with the OpenAI CLIP mean / std; BICUBIC.
  Bit-exact with ``LlavaOnevisionImageProcessorPil`` (transformers 5.25; the default ``LlavaOnevisionImageProcessor``
  runs the same steps on torchvision, not loadable beside the pinned CPU torch here) -- tested.
* **Video frames** (:func:`preprocess_frames`): each frame squashed to ``S x S`` (BICUBIC), rescaled, normalised:
  ``LlavaOnevisionVideoProcessor``'s settings (size 384 x 384, no crop) through the same PIL steps as one image
  crop. The HF video processor itself resizes with torchvision's bicubic (antialiased) kernel: pixels may differ
  from it by interpolation rounding (not testable here: no torchvision); frame sampling is the caller's
  (``do_sample_frames=False`` is the HF default too).
* **Prompt** (:func:`build_prompt`): the Qwen2 chat template of the llava-hf OneVision model cards
  (``convert_llava_onevision_weights_to_hf.py``): ``<|im_start|>user\\n`` + ``<image>\\n`` per image +
  ``<video>\\n`` per video + the text + ``<|im_end|>\\n<|im_start|>assistant\\n``; :func:`expand_tokens` repeats
  each placeholder as ``LlavaOnevisionProcessor`` does (:func:`num_image_tokens`, :func:`num_video_tokens`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import PIL.Image

from jaxprune.models.onevision_pack import image_tokens, max_patches, pooled_side
from jaxprune.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessorConfig, expand2square, to_rgb
from jaxprune.processing_anyres import check_pinpoints, divide_to_patches, resize_and_pad, select_best_resolution

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"


@dataclasses.dataclass(frozen=True)
class OnevisionProcessorConfig:
    """LLaVA-OneVision preprocessing (HF ``LlavaOnevisionImageProcessor`` defaults; pinpoints ``(h, w)``)."""

    pinpoints: tuple[tuple[int, int], ...]
    crop_size: int = 384
    patch_size: int = 14
    vision_aspect_ratio: str = "anyres_max_9"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3
    rescale_factor: float = 1 / 255
    rgb_conversion: str = "pil"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pinpoints", check_pinpoints(self.pinpoints, self.crop_size))
        max_patches(self.vision_aspect_ratio)
        self._rgb()

    def _rgb(self) -> ImageProcessorConfig:
        return ImageProcessorConfig(image_size=self.crop_size, shortest_edge=self.crop_size, mean=self.mean,
                                    std=self.std, resample=self.resample, rescale_factor=self.rescale_factor,
                                    mode="crop", rgb_conversion=self.rgb_conversion)

    @property
    def grid(self) -> int:
        return self.crop_size // self.patch_size

    # the anyres interface the eval harness plans with (:class:`~jaxprune.processing_anyres.AnyresProcessorConfig`'s)
    @property
    def pinpoints_hw(self) -> tuple[tuple[int, int], ...]:
        return self.pinpoints

    @property
    def max_crops(self) -> int:
        return max(1 + (h // self.crop_size) * (w // self.crop_size) for h, w in self.pinpoints)

    def num_image_tokens(self, height: int, width: int) -> int:
        """``<image>`` ids of an image alone in its prompt."""
        return num_image_tokens(height, width, self)

    def prompt(self, question: str, with_image: bool = True) -> str:
        """The chat-template prompt of one question (:func:`build_prompt`)."""
        return build_prompt(question, images=int(with_image))

    def preprocess(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """One image alone in its prompt -> (crops ``[n, 3, S, S]``, (height, width))."""
        return image_crops(image, self)

    @classmethod
    def from_model_config(cls, cfg: Any, **kw) -> "OnevisionProcessorConfig":
        """From a ``llava_onevision`` :class:`jaxprune.config.LlavaConfig`."""
        return cls(pinpoints=cfg.image_grid_pinpoints, crop_size=cfg.vision.image_size,
                   patch_size=cfg.vision.patch_size, vision_aspect_ratio=cfg.vision_aspect_ratio, **kw)


def num_image_tokens(height: int, width: int, cfg: OnevisionProcessorConfig, multi: bool = False) -> int:
    """``<image>`` ids one image needs: the anyres count alone, ``P + 1`` in a multi-image prompt."""
    g = cfg.grid
    if multi:
        return g * g + 1
    return image_tokens(height, width, cfg.pinpoints, cfg.crop_size, g, max_patches(cfg.vision_aspect_ratio))


def num_video_tokens(frames: int, cfg: OnevisionProcessorConfig) -> int:
    """``<video>`` ids of a ``frames``-frame video: ``frames * ceil(p/2)^2 + 1``."""
    return frames * pooled_side(cfg.grid) ** 2 + 1


def _normalize(crops: np.ndarray, cfg: OnevisionProcessorConfig) -> np.ndarray:
    """uint8 ``[n, S, S, 3]`` -> float32 ``[n, 3, S, S]`` (rescale in float64, normalise in float32, as HF)."""
    x = (crops.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def image_crops(image: PIL.Image.Image | np.ndarray, cfg: OnevisionProcessorConfig, multi: bool = False,
                idx: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> (float32 crops ``[n, 3, S, S]``, original ``(height, width)``)."""
    img = to_rgb(image, cfg._rgb(), idx)
    S = cfg.crop_size
    if multi:
        bg = tuple(int(m * 255) for m in cfg.mean)
        sq = expand2square(img, bg)
        crops = np.asarray(sq.resize((S, S), resample=cfg.resample), dtype=np.uint8)[None]
    else:
        best = select_best_resolution((img.height, img.width), cfg.pinpoints)
        tiles = divide_to_patches(resize_and_pad(img, best, cfg.resample), S)
        base = np.asarray(img.resize((S, S), resample=cfg.resample), dtype=np.uint8)
        crops = np.stack([base] + tiles)
    return _normalize(crops, cfg), (img.height, img.width)


@dataclasses.dataclass(frozen=True)
class OnevisionBatch:
    pixel_values: np.ndarray      # [N, C, 3, S, S] float32 (crops padded with zeros to the batch's maximum, HF do_pad)
    image_sizes: np.ndarray       # [N, 2] int64 (height, width)
    batch_num_images: np.ndarray  # [prompts] int64
    num_image_tokens: np.ndarray  # [N] int64


def preprocess_images(images: Sequence[PIL.Image.Image | np.ndarray] | Sequence[Sequence[PIL.Image.Image | np.ndarray]],
                      cfg: OnevisionProcessorConfig) -> OnevisionBatch:
    """A flat list (one image per prompt) or a list of per-prompt lists (HF's nesting: a prompt with several
    images takes the multi-image path)."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of images (or of per-prompt lists of images)")
    nested = isinstance(images[0], (list, tuple))
    groups = [list(g) for g in images if g] if nested else [[im] for im in images]
    out = []
    for g in groups:
        for im in g:
            out.append(image_crops(im, cfg, multi=len(g) > 1, idx=len(out)))
    multi = [len(g) > 1 for g in groups for _ in g]
    C = max(px.shape[0] for px, _ in out)
    S = cfg.crop_size
    pv = np.zeros((len(out), C, 3, S, S), np.float32)
    for i, (px, _) in enumerate(out):
        pv[i, : px.shape[0]] = px
    sizes = np.array([hw for _, hw in out], np.int64)
    toks = np.array([num_image_tokens(int(h), int(w), cfg, m) for (h, w), m in zip(sizes, multi)], np.int64)
    return OnevisionBatch(pixel_values=pv, image_sizes=sizes, batch_num_images=np.array([len(g) for g in groups]),
                          num_image_tokens=toks)


def preprocess_frames(frames: np.ndarray | Sequence[np.ndarray], cfg: OnevisionProcessorConfig) -> np.ndarray:
    """RGB frames ``uint8 [F, H, W, 3]`` -> ``[F, 3, S, S]`` float32 (module docstring)."""
    S = cfg.crop_size
    arr = [np.asarray(PIL.Image.fromarray(np.asarray(f, np.uint8)).convert("RGB").resize((S, S), resample=cfg.resample),
                      dtype=np.uint8) for f in frames]
    if not arr:
        raise ValueError("no frames given")
    return _normalize(np.stack(arr), cfg)


def build_prompt(question: str, images: int = 1, videos: int = 0) -> str:
    """One user turn in the OneVision Qwen2 chat template, with the generation prompt."""
    return ("<|im_start|>user\n" + f"{IMAGE_TOKEN}\n" * images + f"{VIDEO_TOKEN}\n" * videos + question
            + "<|im_end|>\n<|im_start|>assistant\n")


def expand_tokens(prompt: str, image_counts: Sequence[int] = (), video_counts: Sequence[int] = ()) -> str:
    """Replace the i-th ``<image>`` / ``<video>`` by ``image_counts[i]`` / ``video_counts[i]`` copies."""
    for tok, counts in ((IMAGE_TOKEN, image_counts), (VIDEO_TOKEN, video_counts)):
        parts = prompt.split(tok)
        if len(parts) - 1 != len(counts):
            raise ValueError(f"prompt has {len(parts) - 1} {tok!r} placeholders but {len(counts)} counts were given")
        prompt = parts[0] + "".join(tok * int(n) + rest for n, rest in zip(counts, parts[1:]))
    return prompt
