"""Host-side LLaVA-1.5 input processing: images -> pixel tensors, prompts -> token ids (numpy + PIL only).

References (transcribed, not imported):
  * haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd ``llava/mm_utils.py`` (``expand2square``,
    ``process_images`` with ``image_aspect_ratio="pad"``, ``tokenizer_image_token``), ``llava/conversation.py``.
  * transformers ``CLIPImageProcessor``, slow PIL path (5.x: ``CLIPImageProcessorPil``/``PilBackend``; 4.x:
    ``CLIPImageProcessor``): ``get_resize_output_image_size`` (short edge -> S, long ``int(S * long / short)``),
    PIL resize on uint8, ``center_crop`` (offsets ``(H - S) // 2``, zero pad if smaller), ``rescale`` (float64
    multiply -> float32), ``normalize`` (float32). Matched bit-exactly. NOT matched: the 5.x default
    ``CLIPImageProcessor`` (torchvision "fast" backend, torch resize kernels, not bit-identical to PIL).
  * transformers ``LlavaImageProcessor(do_pad=True)``: the same pad-to-square as the original.

Modes: ``"pad"`` = original LLaVA-1.5: RGB -> expand2square with ``tuple(int(x * 255) for x in mean)`` =
(122, 116, 104) -> CLIP resize + centre crop. ``"crop"`` = ``llava-hf/llava-1.5-*-hf``: resize + centre crop.

Deviations:
  1. RGB conversion always comes first. The original ScienceQA/MMBench scripts (``model_vqa_science.py``,
     ``model_vqa_mmbench.py``) pad in the file's own mode and convert later, so L/P/RGBA files pad slightly
     differently there; ``model_vqa_loader.py`` converts first, as we do.
  2. Alpha: ``rgb_conversion="pil"`` (default) = ``convert("RGB")``, alpha dropped (original, transformers 4.x).
     transformers 5.x composites alpha onto white: ``rgb_conversion="composite_white"`` reproduces it (PIL
     ``alpha_composite``; numpy RGBA: its ``round(a * rgb + (1 - a) * 255)``, after our uint8 conversion).
  3. numpy input must be channels-last ``[H, W(, C)]``, C in (1, 3, 4) (transformers guesses the layout);
     floats must be in [0, 1] -> ``round(x * 255)`` (transformers truncates, then rescales twice); integers in
     [0, 255]. torch tensors are rejected.
  4. Extreme aspect ratios are exact but, as in transformers, not cheap: crop mode resizes 1x1000 to 336x336000
     before cropping. The long edge is clamped to >= 1 px (cannot trigger for shortest-edge resizes).
  5. ``tokenize_prompts`` is the HF way (``<image>`` -> N image tokens, whole string tokenized at once); the
     original splices one -200 id between separately tokenized chunks (``tokenize_original_llava``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN: str = "<image>"
IMAGE_TOKEN_INDEX: int = -200  # original LLaVA placeholder id (llava/constants.py)
VICUNA_V1_SYSTEM: str = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_MODES = ("pad", "crop")
_RGB_CONVERSIONS = ("pil", "composite_white")
_PIL_FILTERS = (0, 1, 2, 3, 4, 5)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
# HF metadata keys (no preprocessing semantics).
_HF_METADATA_KEYS = frozenset(
    {"image_processor_type", "processor_class", "_processor_class", "feature_extractor_type", "image_seq_length"}
)


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """CLIP preprocessing for LLaVA-1.5. ``image_size`` is the (square) crop size."""

    image_size: int = 336
    shortest_edge: int = 336
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    mode: str = "pad"  # "pad" (original LLaVA) | "crop" (llava-hf processor)
    rgb_conversion: str = "pil"  # "pil" (original, alpha dropped) | "composite_white" (transformers 5.x)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"ImageProcessorConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("image_size", "shortest_edge"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "a positive int")
        for name in ("mean", "std"):
            v = tuple(float(x) for x in getattr(self, name))
            check(len(v) == 3 and all(math.isfinite(x) for x in v), name, "3 finite floats")
            object.__setattr__(self, name, v)
        check(all(x > 0 for x in self.std), "std", "> 0")
        check(self.resample in _PIL_FILTERS, "resample", f"a PIL filter id {_PIL_FILTERS}")
        r = self.rescale_factor
        check(isinstance(r, (int, float)) and math.isfinite(r) and r > 0, "rescale_factor", "a positive float")
        check(self.mode in _MODES, "mode", f"one of {_MODES}")
        check(self.rgb_conversion in _RGB_CONVERSIONS, "rgb_conversion", f"one of {_RGB_CONVERSIONS}")

    @property
    def background(self) -> tuple[int, int, int]:
        """expand2square fill: ``tuple(int(x * 255) for x in mean)`` = (122, 116, 104) for CLIP."""
        return tuple(int(x * 255) for x in self.mean)  # type: ignore[return-value]

    @classmethod
    def from_hf_preprocessor_config(cls, cfg: Mapping[str, Any], mode: str | None = None,
                                    rgb_conversion: str = "pil") -> ImageProcessorConfig:
        """Build from a HF ``preprocessor_config.json`` dict (CLIPImageProcessor / LlavaImageProcessor).

        ``mode`` defaults to ``"pad"`` if ``do_pad`` else ``"crop"`` (HF semantics); pass ``mode="pad"`` for the
        original LLaVA behaviour. Unknown keys and unsupported values raise ValueError naming the key; metadata
        keys (``image_processor_type`` ...) and null values are ignored.
        """
        if not isinstance(cfg, Mapping):
            raise ValueError(f"preprocessor config must be a dict, got {type(cfg).__name__}")

        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"preprocessor config key {key!r}={cfg.get(key)!r}: {why}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        kw: dict[str, Any] = {"rgb_conversion": rgb_conversion}
        do_pad = False
        for key, val in cfg.items():
            if key in _HF_METADATA_KEYS or val is None:
                continue
            if key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
                if val is not True:
                    raise bad(key, "only True is supported (LLaVA-1.5 CLIP preprocessing)")
            elif key in ("default_to_square", "use_square_size"):
                if val is not False:
                    raise bad(key, "only False is supported (resize keeps the aspect ratio)")
            elif key == "do_pad":
                if not isinstance(val, bool):
                    raise bad(key, "must be a bool")
                do_pad = val
            elif key == "size":
                if isinstance(val, Mapping) and all(v is None for k, v in val.items() if k != "shortest_edge"):
                    val = val.get("shortest_edge")
                if not is_int(val) or val < 1:
                    raise bad(key, "only a positive int or {'shortest_edge': int} is supported")
                kw["shortest_edge"] = val
            elif key == "crop_size":
                if isinstance(val, Mapping) and set(val) == {"height", "width"} and val["height"] == val["width"]:
                    val = val["height"]
                if not is_int(val) or val < 1:
                    raise bad(key, "only a square crop (int or equal height/width) is supported")
                kw["image_size"] = val
            elif key in ("image_mean", "image_std"):
                ok = isinstance(val, (list, tuple)) and len(val) == 3 and all(
                    isinstance(x, (int, float)) and math.isfinite(x) and (x > 0 or key == "image_mean") for x in val)
                if not ok:
                    raise bad(key, "must be a list of 3 finite floats (std > 0)")
                kw["mean" if key == "image_mean" else "std"] = tuple(float(x) for x in val)
            elif key == "resample":
                if not is_int(val) or val not in _PIL_FILTERS:
                    raise bad(key, f"must be a PIL filter id {_PIL_FILTERS}")
                kw["resample"] = val
            elif key == "rescale_factor":
                if not isinstance(val, (int, float)) or isinstance(val, bool) or not 0 < val < math.inf:
                    raise bad(key, "must be a positive float")
                kw["rescale_factor"] = float(val)
            elif key != "data_format" or val != "channels_first":
                raise bad(key, "unknown/unsupported preprocessor option")
        kw["mode"] = mode if mode is not None else ("pad" if do_pad else "crop")
        return cls(**kw)


# ---- images ----
def expand2square(img: PIL.Image.Image, background: tuple[int, int, int]) -> PIL.Image.Image:
    """Pad to a max(w, h) square, image centred (llava/mm_utils.py, verbatim logic)."""
    width, height = img.size
    if width == height:
        return img
    elif width > height:
        result = PIL.Image.new(img.mode, (width, width), background)
        result.paste(img, (0, (width - height) // 2))
        return result
    else:
        result = PIL.Image.new(img.mode, (height, height), background)
        result.paste(img, ((height - width) // 2, 0))
        return result


def _pil_to_rgb(img: PIL.Image.Image, idx: int, rgb_conversion: str) -> PIL.Image.Image:
    if img.width < 1 or img.height < 1:
        raise ValueError(f"image {idx} is empty (PIL size {img.size})")
    try:
        if rgb_conversion == "composite_white" and (
                "A" in img.getbands() or img.info.get("transparency") is not None):
            # transformers 5.x image_transforms.convert_to_rgb (PIL branch)
            rgba = img.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"image {idx}: cannot convert PIL mode {img.mode!r} to RGB: {e}") from e


def _array_to_rgb(arr: np.ndarray, idx: int, rgb_conversion: str) -> PIL.Image.Image:
    if arr.ndim == 2:
        arr = arr[:, :, None]  # [H, W, 1]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image {idx}: wrong channel count/layout, expected channels-last [H, W(, C)], "
                         f"C in (1, 3, 4), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image {idx} is empty (array shape {arr.shape})")
    kind = arr.dtype.kind
    if kind == "f":
        if np.isnan(arr).any():
            raise ValueError(f"image {idx}: float array contains NaN")
        if not np.isfinite(arr).all():
            raise ValueError(f"image {idx}: float array contains inf")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError(f"image {idx}: float arrays must lie in [0, 1], got [{arr.min()}, {arr.max()}]")
        u8 = np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)  # [H, W, C]
    elif kind in "ui":
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"image {idx}: integer arrays must lie in [0, 255], got [{arr.min()}, {arr.max()}]")
        u8 = arr.astype(np.uint8)  # [H, W, C]
    else:
        raise ValueError(f"image {idx}: unsupported array dtype {arr.dtype} (use uint8 or float in [0, 1])")
    if u8.shape[-1] == 1:
        u8 = np.repeat(u8, 3, axis=-1)  # [H, W, 3], same as PIL L -> RGB
    elif u8.shape[-1] == 4:
        if rgb_conversion == "composite_white":  # transformers 5.x convert_to_rgb (numpy branch)
            alpha = u8[..., 3:4] / 255
            u8 = np.round(alpha * u8[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        else:
            u8 = u8[..., :3]  # == Image.fromarray(rgba).convert("RGB")
    return PIL.Image.fromarray(np.ascontiguousarray(u8))  # uint8 [H, W, 3] -> "RGB"


def to_rgb(image: PIL.Image.Image | np.ndarray, cfg: ImageProcessorConfig, idx: int = 0) -> PIL.Image.Image:
    """Validate one input and convert it to RGB (module docstring, deviations 1-3)."""
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image, idx, cfg.rgb_conversion)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, idx, cfg.rgb_conversion)
    raise ValueError(f"image {idx}: expected PIL.Image.Image or np.ndarray, got {type(image).__name__}")


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers ``get_resize_output_image_size(default_to_square=False)``: returns (new_h, new_w)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, max(1, int(shortest_edge * long / short))
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(img: PIL.Image.Image, size: int) -> np.ndarray:
    """transformers ``image_transforms.center_crop`` on uint8 (zero padding if smaller). -> [size, size, 3]."""
    w, h = img.size
    top, left = (h - size) // 2, (w - size) // 2
    if top >= 0 and left >= 0:  # crop in PIL: avoids materialising huge resized images as numpy
        return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    arr = np.asarray(img, dtype=np.uint8)  # [h, w, 3]
    new_h, new_w = max(size, h), max(size, w)
    canvas = np.zeros((new_h, new_w, 3), dtype=np.uint8)  # [new_h, new_w, 3]
    top_pad, left_pad = (new_h - h + 1) // 2, (new_w - w + 1) // 2  # ceil((new - old) / 2)
    canvas[top_pad:top_pad + h, left_pad:left_pad + w] = arr
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top):min(new_h, top + size), max(0, left):min(new_w, left + size)]


def preprocess_image(image: PIL.Image.Image | np.ndarray, cfg: ImageProcessorConfig, idx: int = 0) -> np.ndarray:
    """One image -> ``[3, S, S]`` float32 (S = cfg.image_size)."""
    img = to_rgb(image, cfg, idx)
    if cfg.mode == "pad":
        img = expand2square(img, cfg.background)
    new_h, new_w = resize_output_size(img.height, img.width, cfg.shortest_edge)
    img = img.resize((new_w, new_h), resample=cfg.resample)  # PIL takes (w, h)
    arr = _center_crop(img, cfg.image_size)  # [S, S, 3] uint8
    x = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)  # transformers rescale
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    x = (x - mean) / std  # [S, S, 3] float32
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # [3, S, S]


def preprocess_images(images: Sequence[PIL.Image.Image | np.ndarray],
                      cfg: ImageProcessorConfig = ImageProcessorConfig()) -> np.ndarray:
    """Batch of images -> ``[N, 3, S, S]`` float32 pixel values (mode per ``cfg.mode``)."""
    if isinstance(images, (PIL.Image.Image, np.ndarray)) or not isinstance(images, Sequence) \
            or isinstance(images, (str, bytes)):
        raise ValueError(f"images must be a list of PIL images / arrays, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is an empty list")
    return np.stack([preprocess_image(im, cfg, i) for i, im in enumerate(images)])  # [N, 3, S, S]


def load_image(path: str | os.PathLike[str]) -> PIL.Image.Image:
    """Open and fully decode an image file (mode kept)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found (or not a regular file): {os.fspath(path)!r}")
    try:
        with PIL.Image.open(path) as img:
            img.load()
            return img.copy()
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot decode image file {os.fspath(path)!r}: {e}") from e


# ---- prompts ----
def build_vicuna_v1_prompt(question: str, with_image: bool = True) -> str:
    """conv_templates["vicuna_v1"] single turn (SeparatorStyle.TWO, sep " "), generation prompt open."""
    image = IMAGE_TOKEN + "\n" if with_image else ""
    return VICUNA_V1_SYSTEM + " USER: " + image + question + " ASSISTANT:"


def expand_image_tokens(prompt: str, num_image_tokens: int, image_token: str = IMAGE_TOKEN) -> str:
    """HF LlavaProcessor: replace each ``image_token`` by ``num_image_tokens`` copies of it."""
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    return prompt.replace(image_token, image_token * num_image_tokens)


def tokenize_prompts(tokenizer: Any, prompts: list[str], image_token_id: int, num_image_tokens: int,
                     padding_side: str = "left", image_token: str = IMAGE_TOKEN) -> dict[str, np.ndarray]:
    """HF-style: expand ``<image>``, tokenize each prompt (special tokens on), pad with ``pad_token_id`` (or 0).

    Returns ``input_ids`` / ``attention_mask`` [B, T] int32. ValueError if a row does not hold exactly
    ``num_image_tokens * prompt.count(image_token)`` ids ``image_token_id`` (e.g. token not registered).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    rows: list[list[int]] = []
    for i, p in enumerate(prompts):
        ids = list(tokenizer(expand_image_tokens(p, num_image_tokens, image_token))["input_ids"])
        want, got = num_image_tokens * p.count(image_token), ids.count(image_token_id)
        if got != want:
            raise ValueError(f"prompt {i}: expected {want} image tokens (id {image_token_id}), got {got}")
        rows.append(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t = max(len(r) for r in rows)
    input_ids = np.full((len(rows), t), pad_id, dtype=np.int32)  # [B, T]
    mask = np.zeros((len(rows), t), dtype=np.int32)  # [B, T]
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if padding_side == "left" else slice(0, len(r))
        input_ids[i, sl] = r
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def tokenize_original_llava(tokenizer: Any, prompt: str, image_token_id: int = IMAGE_TOKEN_INDEX) -> np.ndarray:
    """Transcription of the original ``tokenizer_image_token`` -> ``[T]`` int32.

    Split on ``"<image>"``, tokenize each chunk separately, keep BOS once (the first id of every later chunk is
    stripped, assumed BOS), join chunks with one ``image_token_id`` (-200 originally; replaced by the 576 features
    at embedding time). Unlike ``tokenize_prompts``: one placeholder instead of N ids, and the pieces at chunk
    borders (trailing space of ``"USER: "``, leading ``"\\n"``) can differ from tokenizing the whole string.
    """
    chunks = [list(tokenizer(chunk)["input_ids"]) for chunk in prompt.split(IMAGE_TOKEN)]
    input_ids: list[int] = []
    offset = 0
    if len(chunks) > 0 and len(chunks[0]) > 0 and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    sep = [image_token_id] * (offset + 1)
    interleaved = [ele for sub in zip(chunks, [sep] * len(chunks)) for ele in sub][:-1]  # insert_separator
    for x in interleaved:
        input_ids.extend(x[offset:])
    return np.asarray(input_ids, dtype=np.int32)
