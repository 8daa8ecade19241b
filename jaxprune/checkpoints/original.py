"""The original LLaVA checkpoint layout (github.com/haotian-liu/LLaVA, e.g. ``liuhaotian/llava-v1.5-7b``).

An original checkpoint is a ``LlavaLlamaForCausalLM``: a Llama ``config.json`` plus ``mm_*`` fields,
and the tensors

* ``model.embed_tokens.weight``, ``model.layers.N.*``, ``model.norm.weight``, ``lm_head.weight``;
* ``model.mm_projector.0.{weight,bias}`` / ``model.mm_projector.2.{weight,bias}`` (``mlp2x_gelu``:
  Linear, GELU, Linear -> HF ``multi_modal_projector.linear_1`` / ``linear_2``);
* ``model.image_newline`` (LLaVA-1.6 / NeXT only);
* the CLIP tower either inside the checkpoint (``model.vision_tower.vision_tower.vision_model.*``;
  LLaVA-1.6 fine-tunes the tower, so these weights win when present) or, as for LLaVA-1.5, in a
  separate CLIP directory (``--clip-dir``: an HF ``CLIPVisionModel`` or ``CLIPModel`` whose
  ``vision_model.*`` keys (or flattened transformers-5 keys) are used and ``text_model.*``,
  ``text_projection``, ``visual_projection`` and ``logit_scale`` ignored).

Config translation (into an HF-style dict for :meth:`jaxprune.config.LlavaConfig.from_hf_dict`):

* ``model_type`` ``llava_llama`` (LLaVA >= 1.6 code) or ``llava`` with ``mm_*`` fields and no
  ``text_config`` (the 1.5-era code used ``model_type = "llava"``, which clashes with HF's); any other
  ``llava_*`` (``llava_mistral``, ``llava_mpt``, ...) is refused;
* ``mm_vision_select_layer`` -> ``vision_feature_layer``; ``mm_vision_select_feature`` ``patch`` ->
  ``default``, ``cls_patch`` -> ``full``;
* ``mm_projector_type`` must be ``mlp2x_gelu`` (-> exact-erf ``gelu``, biases on);
  ``mm_hidden_size`` must equal the CLIP width;
* ``image_aspect_ratio`` ``pad`` / ``square`` with ``mm_patch_merge_type`` ``flat`` -> ``llava``;
  ``anyres`` with ``spatial_unpad`` -> ``llava_next`` with ``image_grid_pinpoints`` swapped from the
  original's ``(width, height)`` pairs to HF's ``(height, width)``; every other combination is refused;
* the Llama fields become ``text_config``; the vision config comes from the CLIP directory's
  ``config.json`` (possibly nested under ``vision_config``), else from ``mm_vision_tower`` when it is a
  local directory, else from :data:`KNOWN_TOWERS`;
* the image token: the original code splices features at the placeholder id ``-200``
  (``IMAGE_TOKEN_INDEX``) and never embeds it; we use **32000**, as llava-hf does. With the original
  32000-token vocabulary that id is outside the embedding table, so the model must not embed it
  (HF's LLaVA masks it before ``embed_tokens``), and the tokenizer must add ``<image>`` as id 32000.

Fields not listed in :data:`LLAMA_KEYS`, :data:`MM_KEYS`, :data:`BENIGN_KEYS` or the config
metadata keys are refused with an error naming them. The benign keys are the training flags that
``llava/train/train.py`` (``ModelArguments``, ``DataArguments``, ``TrainingArguments``) and
``llava_arch.py`` write into the config, which do not change inference; :data:`REQUIRED_VALUES`
lists the flags that do change inference and the only value we accept for each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from jaxprune.checkpoints.keys import Spelling
from jaxprune.config import METADATA_KEYS, ConfigError

ORIGINAL_IMAGE_TOKEN_INDEX = 32000

LLAMA_KEYS = frozenset(
    """vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads head_dim
    hidden_act max_position_embeddings rms_norm_eps rope_theta rope_scaling rope_parameters attention_bias mlp_bias
    tie_word_embeddings bos_token_id eos_token_id pad_token_id""".split()
)
MM_KEYS = frozenset(
    """mm_vision_tower mm_hidden_size mm_vision_select_layer mm_vision_select_feature mm_projector_type
    image_aspect_ratio mm_patch_merge_type image_grid_pinpoints""".split()
)
#: Training-only flags (any value accepted). ``mm_use_im_patch_token`` only adds an ``<im_patch>``
#: token to the tokenizer (the embedding rows are in the checkpoint); ``image_crop_resolution`` /
#: ``image_split_resolution`` are written by the 1.6 training code but not read at inference.
BENIGN_KEYS = frozenset(
    """tune_mm_mlp_adapter freeze_mm_mlp_adapter freeze_backbone pretrain_mm_mlp_adapter mm_use_im_patch_token
    tokenizer_padding_side tokenizer_model_max_length use_mm_proj mm_projector_lr unfreeze_mm_vision_tower
    mm_vision_tower_lr tune_mm_vision_resampler freeze_mm_vision_resampler image_crop_resolution
    image_split_resolution im_patch_token im_start_token im_end_token""".split()
)
#: Flags that would change inference; only the given value (or absence) is accepted.
REQUIRED_VALUES: dict[str, Any] = {
    "mm_use_im_start_end": False, "use_im_start_end": False, "mm_resampler_type": None, "s2": False,
    "sep_image_conv_front": False,
}

#: Vision configs of the towers LLaVA uses, for checkpoints that embed the tower without its config.
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14,
                                              hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=14,
                                          hidden_act="quick_gelu", layer_norm_eps=1e-5),
}

# Generic PretrainedConfig fields that old CLIPConfig dumps repeat inside vision_config.
_CLIP_GENERIC = frozenset("bos_token_id eos_token_id pad_token_id tie_word_embeddings vocab_size".split())
_CLIP_TOP = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
_CLIP_IGNORED = ("text_model.",)
_CLIP_IGNORED_KEYS = frozenset({"text_projection.weight", "visual_projection.weight", "logit_scale"})


def is_original_config(d: Mapping[str, Any]) -> bool:
    """True for an original-LLaVA ``config.json`` (``llava_*`` model type, or ``llava`` with ``mm_*`` fields)."""
    mt = d.get("model_type")
    if mt == "llava":
        return "text_config" not in d and any(k in d for k in ("mm_vision_tower", "mm_hidden_size",
                                                              "mm_projector_type"))
    return isinstance(mt, str) and mt.startswith("llava_") and mt not in ("llava_next", "llava_onevision")


def clip_vision_dict(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The vision part of a CLIP ``config.json`` (``CLIPVisionConfig`` or ``CLIPConfig.vision_config``)."""
    mt = d.get("model_type", "clip_vision_model")
    if mt == "clip":
        d = d.get("vision_config") or {}
    elif mt != "clip_vision_model":
        raise ConfigError(f"{where}: model_type={mt!r} is not a CLIP vision model")
    out = {k: v for k, v in d.items() if k not in _CLIP_GENERIC}
    out["model_type"] = "clip_vision_model"
    return out


def read_clip_config(clip_dir: str | Path) -> dict[str, Any]:
    """Read ``config.json`` of a CLIP directory into a vision-config dict."""
    p = Path(clip_dir) / "config.json"
    if not p.is_file():
        raise ConfigError(f"no config.json in the CLIP directory {clip_dir}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from None
    return clip_vision_dict(d, str(p))


def local_tower_dir(d: Mapping[str, Any]) -> Path | None:
    """``mm_vision_tower`` when it names an existing local directory with a config (as LLaVA allows)."""
    name = d.get("mm_vision_tower")
    if isinstance(name, str) and name and Path(name).is_dir() and (Path(name) / "config.json").is_file():
        return Path(name)
    return None


def vision_dict_for(d: Mapping[str, Any], clip_dir: str | Path | None) -> dict[str, Any]:
    """Vision config for an original checkpoint: ``clip_dir``, else a local ``mm_vision_tower``, else the table."""
    if clip_dir is not None:
        return read_clip_config(clip_dir)
    local = local_tower_dir(d)
    if local is not None:
        return read_clip_config(local)
    name = d.get("mm_vision_tower")
    if name in KNOWN_TOWERS:
        return {"model_type": "clip_vision_model", **KNOWN_TOWERS[name]}
    raise ConfigError(f"cannot determine the vision config of mm_vision_tower={name!r}: pass --clip-dir with a "
                      "local copy of that CLIP model")


def _pinpoints(v: Any) -> list[list[int]]:
    if (not isinstance(v, (list, tuple)) or not v
            or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in v)):
        raise ConfigError(f"config field image_grid_pinpoints={v!r} is not implemented (expected a list of "
                          "[width, height] pairs)")
    return [[int(p[1]), int(p[0])] for p in v]  # original (W, H) -> HF (H, W)


def original_to_hf_dict(d: Mapping[str, Any], vision: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an original-LLaVA config (plus the CLIP vision dict) into an HF ``llava``/``llava_next`` dict."""
    mt = d.get("model_type")
    if not (mt == "llava_llama" or (mt == "llava" and is_original_config(d))):
        raise ConfigError(f"config field model_type={mt!r} is not implemented (original LLaVA checkpoints: only "
                          "'llava_llama', or the 1.5-era 'llava' with mm_* fields)")
    unknown = sorted(k for k in d if k not in LLAMA_KEYS | MM_KEYS | BENIGN_KEYS | set(REQUIRED_VALUES)
                     and k not in METADATA_KEYS)
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)} in an original LLaVA config: jaxprune "
                          "refuses fields it does not implement rather than ignore them")
    for k, want in REQUIRED_VALUES.items():
        if d.get(k, want) != want:
            raise ConfigError(f"config field {k}={d[k]!r} is not implemented (only {want!r})")
    ptype = d.get("mm_projector_type", "linear")
    if ptype != "mlp2x_gelu":
        raise ConfigError(f"config field mm_projector_type={ptype!r} is not implemented (only 'mlp2x_gelu')")
    feat = d.get("mm_vision_select_feature", "patch")
    strategy = {"patch": "default", "cls_patch": "full"}.get(feat)
    if strategy is None:
        raise ConfigError(f"config field mm_vision_select_feature={feat!r} is not implemented "
                          "(only 'patch' or 'cls_patch')")
    layer = d.get("mm_vision_select_layer", -1)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"config field mm_vision_select_layer={layer!r} is not implemented (a single int)")
    width = vision.get("hidden_size", 1024)
    if d.get("mm_hidden_size", width) != width:
        raise ConfigError(f"config field mm_hidden_size={d['mm_hidden_size']} disagrees with the CLIP tower's "
                          f"hidden_size={width}")
    aspect = d.get("image_aspect_ratio") or "square"
    merge = d.get("mm_patch_merge_type") or "flat"
    if aspect in ("pad", "square") and merge == "flat":
        model_type, extra = "llava", {}
    elif aspect == "anyres" and merge == "spatial_unpad":
        model_type = "llava_next"
        extra = {"image_grid_pinpoints": _pinpoints(d.get("image_grid_pinpoints")),
                 "use_image_newline_parameter": True}
    else:
        raise ConfigError(f"config fields image_aspect_ratio={aspect!r} with mm_patch_merge_type={merge!r} are not "
                          "implemented (supported: 'pad'/'square' with 'flat', 'anyres' with 'spatial_unpad')")
    text = {k: v for k, v in d.items() if k in LLAMA_KEYS or (k in METADATA_KEYS and k != "model_type")}
    text["model_type"] = "llama"
    return {
        "model_type": model_type,
        "vision_config": dict(vision),
        "text_config": text,
        "image_token_index": ORIGINAL_IMAGE_TOKEN_INDEX,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": layer,
        "vision_feature_select_strategy": strategy,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
        **extra,
    }


def processing_hints(d: Mapping[str, Any]) -> dict[str, Any]:
    """Preprocessing facts an HF config cannot carry (recorded in ``jaxprune.json``)."""
    return {"image_aspect_ratio": d.get("image_aspect_ratio") or "square",
            "mm_vision_tower": d.get("mm_vision_tower")}


def normalize_clip_key(key: str) -> str | None:
    """A CLIP-directory key -> normal form (``vision_tower.*``); ``None`` for the text half of a CLIPModel."""
    if key.startswith("vision_model."):
        return "vision_tower." + key[len("vision_model."):]
    if key.startswith(_CLIP_TOP):
        return "vision_tower." + key
    if key.startswith(_CLIP_IGNORED) or key in _CLIP_IGNORED_KEYS:
        return None
    return key


def normalize_original_key(key: str) -> str | None:
    """An original-LLaVA key -> normal form (see :mod:`jaxprune.checkpoints.keys`); unknown keys pass through."""
    tower = "model.vision_tower.vision_tower."
    if key.startswith(tower):
        rest = key[len(tower):]
        return normalize_clip_key(rest) if rest.startswith(("vision_model.",) + _CLIP_TOP) else key
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        idx, _, tail = rest.partition(".")
        lin = {"0": "linear_1", "2": "linear_2"}.get(idx)
        return f"multi_modal_projector.{lin}.{tail}" if lin else key
    if key == "model.image_newline":
        return "image_newline"
    if key.startswith("model.") and not key.startswith("model.vision_tower."):
        return "language_model." + key[len("model."):]
    return key


def _original_spelling(name: str, tower: str) -> Spelling:
    return Spelling(name, (("language_model.", "model."), ("lm_head.", "lm_head."), ("vision_tower.", tower),
                           ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                           ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                           ("image_newline", "model.image_newline")))


#: How an original-LLaVA checkpoint spells normal-form keys (tower with or without ``vision_model.``).
ORIGINAL_SPELLINGS: tuple[Spelling, ...] = (
    _original_spelling("original", "model.vision_tower.vision_tower.vision_model."),
    _original_spelling("original-flat-clip", "model.vision_tower.vision_tower."),
)
#: How a CLIP directory (``--clip-dir``) spells the tower's keys.
CLIP_SPELLINGS: tuple[Spelling, ...] = (
    Spelling("clip", (("vision_tower.", "vision_model."),)),
    Spelling("clip-flat", (("vision_tower.", ""),)),
)
