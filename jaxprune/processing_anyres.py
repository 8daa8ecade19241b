"""Host-side LLaVA-NeXT "anyres" image processing (numpy + PIL) and its token geometry.

One image -> ``1 + gh*gw`` crops of ``S x S``: the whole image squashed to ``S x S`` (the *base* crop) followed
by the ``gh x gw`` tiles (row-major) of the image resized into the best pinpoint and zero-padded to it.
Batches come out as HF does: ``pixel_values [N, max_crops, 3, S, S]`` (crops zero-padded; here to the maximum
the pinpoints allow, so every batch has one shape) and ``image_sizes [N, 2]`` = original ``(height, width)``.
:func:`num_image_tokens` is the number of ``<image>`` ids a prompt needs per image (HF processor's
``_get_number_of_features`` with ``num_additional_image_tokens=1``, ``vision_feature_select_strategy="default"``,
the llava-hf settings), i.e. ``P + r * (c + 1)`` with ``P = (S/patch)^2`` and ``r x c`` the unpadded feature grid.

References (transcribed, not imported):
  * transformers 5.23 ``LlavaNextImageProcessorPil`` (``image_processing_pil_llava_next.py``: ``get_image_patches``,
    ``_resize_for_patching``, ``_pad_for_patching``, ``_get_padding_size``, ``_pad_for_batching``),
    ``image_processing_utils.select_best_resolution`` / ``get_patch_output_size``, ``image_transforms.
    divide_to_patches``, ``LlavaNextProcessor._get_number_of_features`` / ``_get_unpadded_features``,
    ``modeling_llava_next.unpad_image`` / ``get_anyres_image_grid_shape``. Matched bit-exactly (tests).
  * haotian-liu/LLaVA ``llava/mm_utils.py`` (``select_best_resolution``, ``resize_and_pad_image``,
    ``divide_to_patches``, ``process_anyres_image``) and ``llava/model/llava_arch.py`` (``unpad_image``).

HF vs original, and what ``convention=`` switches:
  1. Pinpoint order: HF reads each pinpoint as ``(height, width)``, the original as ``(width, height)``.
     ``convention="hf"`` takes ``pinpoints`` as (h, w); ``"original"`` as (w, h) (what an original
     ``config.json`` lists). ``select_best_resolution`` is the same function in both (it is symmetric under
     swapping both arguments' order), so the llava-v1.6 set (symmetric) selects identical grids either way.
  2. Unpad rounding (token count): HF ``int(round(x, 7))``, original ``int(x)``; they differ only where
     ``x`` falls within float error below an integer (``rounding`` of :func:`unpad_box`; ``convention`` picks it).
  3. Padding: both paste the resized image at ``((T - n) // 2)`` on a black canvas (more padding at the
     bottom/right when odd). transformers < 4.52 padded ``(d // 2, d // 2)``, one pixel short, and then resized
     the short tile back to S (PR #37819 fixed it); 5.23 == original, which is what we implement.
  4. Resampling: HF uses the preprocessor's ``resample`` (3 = BICUBIC for llava-hf); the original calls
     ``image.resize(size)`` with PIL's default, BICUBIC for RGB images in Pillow >= 7 (NEAREST only for
     "1"/"P" modes, which never reach it: images are RGB by then). Same pixels.
  5. The tile and base crops then go through CLIP's resize-shortest-edge (a no-op: they are already S x S) +
     centre crop (no-op) + rescale + normalise in both. We require ``shortest_edge == crop_size`` and pinpoints
     that are multiples of it; other settings are refused (HF and the original disagree on them).
  6. Alpha: ``rgb_conversion`` as in :mod:`jaxprune.processing` ("pil" drops alpha = original and transformers
     4.x; "composite_white" = transformers 5.x). RGB inputs are unaffected.
  7. Crop padding across a batch: HF ``do_pad`` pads to the batch's largest crop count; we pad to the config's
     maximum (``pad_crops="batch"`` gives HF's). Padded crops are zeros (not normalised black), as in HF.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image

from jaxprune.processing import (
    _PIL_FILTERS,
    _RGB_CONVERSIONS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessorConfig,
    to_rgb,
)

LLAVA_V16_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_CONVENTIONS = ("hf", "original")


# ---- geometry (pure python; shared with jaxprune.models.anyres) ----------------------------------------------------
def select_best_resolution(original_size: tuple[int, int], candidates: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The candidate that keeps the most original pixels, then wastes the fewest; first wins exact ties.

    Written in HF's order (``original_size = (h, w)``, candidates ``(h, w)``, returns ``(h, w)``). The original's
    ``(w, h)`` call gives the same pick: the score is symmetric under swapping both orders.
    """
    oh, ow = (int(x) for x in original_size)
    if oh < 1 or ow < 1:
        raise ValueError(f"image size must be positive, got (height, width) = ({oh}, {ow})")
    best, best_eff, best_waste = None, 0, math.inf
    for h, w in candidates:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    if best is None:
        raise ValueError(f"no usable pinpoint among {list(candidates)!r} for image size ({oh}, {ow})")
    return best


def patch_output_size(orig_h: int, orig_w: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Aspect-preserving size inside the target (HF ``get_patch_output_size`` == original ``resize_and_pad``)."""
    scale_w, scale_h = target_w / orig_w, target_h / orig_h
    if scale_w < scale_h:
        return min(math.ceil(orig_h * scale_w), target_h), target_w
    return target_h, min(math.ceil(orig_w * scale_h), target_w)


def unpad_box(orig_h: int, orig_w: int, cur_h: int, cur_w: int, rounding: str = "hf") -> tuple[int, int, int, int]:
    """Rows ``[r0, r1)`` and cols ``[c0, c1)`` of a ``cur_h x cur_w`` feature grid that ``unpad_image`` keeps.

    ``rounding="hf"``: ``int(round(x, 7))`` (transformers model and processor); ``"original"``: ``int(x)``.
    """
    rnd = (lambda x: int(round(x, 7))) if rounding == "hf" else int
    if orig_w / orig_h > cur_w / cur_h:
        new_h = rnd(orig_h * (cur_w / orig_w))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = rnd(orig_w * (cur_h / orig_h))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def check_pinpoints(pinpoints: Sequence[Sequence[int]], crop_size: int) -> tuple[tuple[int, int], ...]:
    pins = tuple(tuple(int(x) for x in p) for p in pinpoints)
    if not pins:
        raise ValueError("image_grid_pinpoints is empty")
    for p in pins:
        if len(p) != 2 or min(p) < crop_size or p[0] % crop_size or p[1] % crop_size:
            raise ValueError(f"image_grid_pinpoints entry {list(p)} is not a pair of positive multiples of the crop "
                             f"size {crop_size}: anyres tiles must be whole crops")
    return pins


def anyres_grid(image_size_hw: Sequence[int], pinpoints_hw: Sequence[Sequence[int]], crop_size: int
                ) -> tuple[int, int]:
    """``(gh, gw)`` tiles for an image of ``(height, width)`` (HF ``get_anyres_image_grid_shape``)."""
    h, w = select_best_resolution(image_size_hw, pinpoints_hw)
    return h // crop_size, w // crop_size


def num_image_tokens(image_size_hw: Sequence[int], pinpoints_hw: Sequence[Sequence[int]], crop_size: int,
                     patch_size: int, rounding: str = "hf") -> int:
    """Visual tokens of one image: ``p*p`` base + ``r * (c + 1)`` unpadded grid with one newline per row."""
    p = crop_size // patch_size
    gh, gw = anyres_grid(image_size_hw, pinpoints_hw, crop_size)
    r0, r1, c0, c1 = unpad_box(int(image_size_hw[0]), int(image_size_hw[1]), gh * p, gw * p, rounding)
    return p * p + (r1 - r0) * (c1 - c0 + 1)


def max_image_tokens(pinpoints_hw: Sequence[Sequence[int]], crop_size: int, patch_size: int) -> int:
    """Upper bound of :func:`num_image_tokens` over all image sizes (no unpadding): 2928 for llava-v1.6."""
    p = crop_size // patch_size
    return p * p + max((h // crop_size * p) * (w // crop_size * p + 1) for h, w in pinpoints_hw)


def max_crops(pinpoints_hw: Sequence[Sequence[int]], crop_size: int) -> int:
    """``1 + max(gh * gw)``: 5 for llava-v1.6."""
    return 1 + max((h // crop_size) * (w // crop_size) for h, w in pinpoints_hw)


# ---- config -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AnyresProcessorConfig:
    """LLaVA-NeXT preprocessing. ``pinpoints`` in the order ``convention`` says (module docstring, item 1)."""

    pinpoints: tuple[tuple[int, int], ...] = LLAVA_V16_PINPOINTS
    crop_size: int = 336
    patch_size: int = 14  # the vision tower's, for token counts
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3
    rescale_factor: float = 1 / 255
    convention: str = "hf"  # "hf": pinpoints (h, w), round(x, 7) unpad | "original": (w, h), int(x)
    rgb_conversion: str = "pil"

    def __post_init__(self) -> None:
        if self.convention not in _CONVENTIONS:
            raise ValueError(f"AnyresProcessorConfig.convention must be one of {_CONVENTIONS}, got {self.convention!r}")
        if self.rgb_conversion not in _RGB_CONVERSIONS:
            raise ValueError(f"AnyresProcessorConfig.rgb_conversion must be one of {_RGB_CONVERSIONS}")
        if self.resample not in _PIL_FILTERS:
            raise ValueError(f"AnyresProcessorConfig.resample must be a PIL filter id {_PIL_FILTERS}")
        for name in ("crop_size", "patch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AnyresProcessorConfig.{name} must be a positive int, got {v!r}")
        if self.crop_size % self.patch_size:
            raise ValueError(f"crop_size {self.crop_size} is not a multiple of patch_size {self.patch_size}")
        object.__setattr__(self, "pinpoints", check_pinpoints(self.pinpoints, self.crop_size))
        # validates mean/std/rescale_factor the same way as the 1.5 processor
        object.__setattr__(self, "mean", self._clip().mean)
        object.__setattr__(self, "std", self._clip().std)

    def _clip(self) -> ImageProcessorConfig:
        """The per-crop CLIP preprocessing (resize + centre crop are no-ops on S x S crops)."""
        return ImageProcessorConfig(image_size=self.crop_size, shortest_edge=self.crop_size, mean=self.mean,
                                    std=self.std, resample=self.resample, rescale_factor=self.rescale_factor,
                                    mode="crop", rgb_conversion=self.rgb_conversion)

    @property
    def pinpoints_hw(self) -> tuple[tuple[int, int], ...]:
        return self.pinpoints if self.convention == "hf" else tuple((w, h) for h, w in self.pinpoints)

    @property
    def rounding(self) -> str:
        return self.convention

    @property
    def max_crops(self) -> int:
        return max_crops(self.pinpoints_hw, self.crop_size)

    @property
    def max_tokens(self) -> int:
        return max_image_tokens(self.pinpoints_hw, self.crop_size, self.patch_size)

    def num_image_tokens(self, height: int, width: int) -> int:
        return num_image_tokens((height, width), self.pinpoints_hw, self.crop_size, self.patch_size, self.rounding)

    @classmethod
    def from_model_config(cls, cfg: Any, **kw) -> AnyresProcessorConfig:
        """From a :class:`jaxprune.config.LlavaConfig` (``llava_next``; its pinpoints are HF's (h, w))."""
        pins = cfg.image_grid_pinpoints
        if kw.get("convention") == "original":
            pins = tuple((w, h) for h, w in pins)
        return cls(pinpoints=pins, crop_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size, **kw)

    @classmethod
    def from_hf_preprocessor_config(cls, d: Mapping[str, Any], patch_size: int = 14,
                                    rgb_conversion: str = "pil") -> AnyresProcessorConfig:
        """From a HF ``LlavaNextImageProcessor`` ``preprocessor_config.json`` dict (unknown keys refused)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"preprocessor config must be a dict, got {type(d).__name__}")
        if d.get("do_pad") is not None and not isinstance(d["do_pad"], bool):
            raise ValueError(f"preprocessor config key 'do_pad'={d['do_pad']!r}: must be a bool")
        if d.get("aspect_ratio_setting", "anyres") != "anyres":
            raise ValueError(f"preprocessor config key 'aspect_ratio_setting'={d['aspect_ratio_setting']!r}: "
                             "only 'anyres' is supported")
        own = ("image_grid_pinpoints", "do_pad", "aspect_ratio_setting")
        base = ImageProcessorConfig.from_hf_preprocessor_config(
            {k: v for k, v in d.items() if k not in own}, mode="crop", rgb_conversion=rgb_conversion)
        if base.shortest_edge != base.image_size:
            raise ValueError(f"preprocessor config: size.shortest_edge={base.shortest_edge} != crop_size="
                             f"{base.image_size} is not supported for anyres")
        pins = d.get("image_grid_pinpoints") or LLAVA_V16_PINPOINTS
        return cls(pinpoints=tuple(tuple(p) for p in pins), crop_size=base.image_size, patch_size=patch_size,
                   mean=base.mean, std=base.std, resample=base.resample, rescale_factor=base.rescale_factor,
                   rgb_conversion=rgb_conversion)


# ---- images -------------------------------------------------------------------------------------------------------
def resize_and_pad(img: PIL.Image.Image, target_hw: tuple[int, int], resample: int) -> np.ndarray:
    """Resize into ``target_hw`` keeping the aspect ratio, paste at ``(T - n) // 2`` on black: uint8 [th, tw, 3]."""
    th, tw = target_hw
    nh, nw = patch_output_size(img.height, img.width, th, tw)
    resized = np.asarray(img.resize((nw, nh), resample=resample), dtype=np.uint8)  # [nh, nw, 3]
    canvas = np.zeros((th, tw, 3), dtype=np.uint8)  # [th, tw, 3]
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas[top:top + nh, left:left + nw] = resized
    return canvas


def divide_to_patches(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """Row-major ``size x size`` tiles of ``arr [H, W, C]`` (H, W multiples of size)."""
    return [arr[i:i + size, j:j + size] for i in range(0, arr.shape[0], size) for j in range(0, arr.shape[1], size)]


def anyres_crops(image: PIL.Image.Image | np.ndarray, cfg: AnyresProcessorConfig, idx: int = 0
                 ) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 crops ``[1 + gh*gw, S, S, 3]`` (base first, then tiles row-major) and the RGB image's (h, w)."""
    img = to_rgb(image, cfg._clip(), idx)
    S = cfg.crop_size
    best = select_best_resolution((img.height, img.width), cfg.pinpoints_hw)
    tiles = divide_to_patches(resize_and_pad(img, best, cfg.resample), S)
    base = np.asarray(img.resize((S, S), resample=cfg.resample), dtype=np.uint8)  # [S, S, 3] squashed
    return np.stack([base] + tiles), (img.height, img.width)


def _normalize(crops: np.ndarray, cfg: AnyresProcessorConfig) -> np.ndarray:
    """uint8 ``[n, S, S, 3]`` -> float32 ``[n, 3, S, S]`` (transformers rescale in float64, normalise in float32)."""
    x = (crops.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess_anyres_image(image: PIL.Image.Image | np.ndarray, cfg: AnyresProcessorConfig = AnyresProcessorConfig(),
                            idx: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> (``[1 + gh*gw, 3, S, S]`` float32, original (height, width))."""
    crops, hw = anyres_crops(image, cfg, idx)
    return _normalize(crops, cfg), hw


@dataclasses.dataclass(frozen=True)
class AnyresBatch:
    pixel_values: np.ndarray      # [N, C, 3, S, S] float32, crops beyond num_crops[i] are zeros
    image_sizes: np.ndarray       # [N, 2] int64 (height, width), HF's convention
    num_crops: np.ndarray         # [N] int64, 1 + gh*gw
    num_image_tokens: np.ndarray  # [N] int64, <image> ids each image needs in input_ids


def preprocess_anyres_images(images: Sequence[PIL.Image.Image | np.ndarray],
                             cfg: AnyresProcessorConfig = AnyresProcessorConfig(),
                             pad_crops: str = "config") -> AnyresBatch:
    """A batch. ``pad_crops="config"`` (default): ``C = cfg.max_crops`` for every batch (one compiled shape);
    ``"batch"``: ``C = max(num_crops)``, as HF ``do_pad=True``."""
    if isinstance(images, (PIL.Image.Image, np.ndarray)) or not isinstance(images, Sequence) \
            or isinstance(images, (str, bytes)):
        raise ValueError(f"images must be a list of PIL images / arrays, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is an empty list")
    if pad_crops not in ("config", "batch"):
        raise ValueError(f"pad_crops must be 'config' or 'batch', got {pad_crops!r}")
    out = [preprocess_anyres_image(im, cfg, i) for i, im in enumerate(images)]
    n = np.array([px.shape[0] for px, _ in out], np.int64)
    C = cfg.max_crops if pad_crops == "config" else int(n.max())
    S = cfg.crop_size
    pv = np.zeros((len(out), C, 3, S, S), np.float32)  # [N, C, 3, S, S]
    for i, (px, _) in enumerate(out):
        pv[i, : px.shape[0]] = px
    sizes = np.array([hw for _, hw in out], np.int64)  # [N, 2]
    tokens = np.array([cfg.num_image_tokens(h, w) for h, w in sizes], np.int64)
    return AnyresBatch(pixel_values=pv, image_sizes=sizes, num_crops=n, num_image_tokens=tokens)


def expand_image_tokens_anyres(prompt: str, num_tokens: Sequence[int], image_token: str = "<image>") -> str:
    """Replace the i-th ``image_token`` of ``prompt`` by ``num_tokens[i]`` copies (HF ``LlavaNextProcessor``)."""
    parts = prompt.split(image_token)
    if len(parts) - 1 != len(num_tokens):
        raise ValueError(f"prompt has {len(parts) - 1} {image_token!r} placeholders but {len(num_tokens)} token "
                         "counts were given")
    out = parts[0]
    for n, rest in zip(num_tokens, parts[1:]):
        if n < 1:
            raise ValueError(f"token counts must be >= 1, got {n}")
        out += image_token * int(n) + rest
    return out
