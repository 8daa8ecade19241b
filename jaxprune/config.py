"""Frozen model configs built from a Hugging Face LLaVA ``config.json``.

Every field we read is validated; every field whose value we do not implement (``rope_scaling``,
``attention_bias``, ``mlp_bias``, a list-valued ``vision_feature_layer``, an unknown activation, ...)
is refused with a :class:`ConfigError` that names the field. Fields that are pure metadata
(``architectures``, ``torch_dtype``, generation defaults, ...) are ignored; any *other* field is
unknown and refused, so a config we do not understand never runs silently with wrong numerics.

Both the transformers 4.x layout (``rope_theta``, ``rope_scaling``) and the 5.x layout
(``rope_parameters``) are accepted.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from jaxprune.errors import JaxpruneError


class ConfigError(JaxpruneError, ValueError):
    """A config field we cannot honour. The message names the field."""


# Keys that carry no numerics: HF PretrainedConfig bookkeeping, generation defaults, and training-only
# settings (dropouts are inactive at inference). Ignored wherever they appear.
METADATA_KEYS = frozenset(
    """architectures _name_or_path transformers_version torch_dtype dtype id2label label2id
    output_hidden_states output_attentions return_dict chunk_size_feed_forward is_encoder_decoder
    problem_type initializer_range initializer_factor use_cache torchscript use_bfloat16 pruned_heads
    tie_encoder_decoder is_decoder add_cross_attention cross_attention_hidden_size tf_legacy_loss
    finetuning_task prefix task_specific_params tokenizer_class bad_words_ids begin_suppress_tokens
    suppress_tokens decoder_start_token_id sep_token_id diversity_penalty do_sample early_stopping
    encoder_no_repeat_ngram_size exponential_decay_length_penalty forced_bos_token_id forced_eos_token_id
    length_penalty max_length min_length no_repeat_ngram_size num_beam_groups num_beams
    num_return_sequences output_scores remove_invalid_values repetition_penalty return_dict_in_generate
    temperature top_k top_p typical_p attention_dropout dropout hidden_dropout projection_dim
    pretraining_tp ignore_index model_type max_position_embeddings _attn_implementation_autoset
    _attn_implementation embd_pdrop resid_pdrop layerdrop""".split()
)

_CLIP_ACTS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")
_PROJ_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu")


def _check_keys(d: Mapping[str, Any], used: set[str], where: str) -> None:
    unknown = sorted(k for k in d if k not in used and k not in METADATA_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {', '.join(where + k for k in unknown)}: jaxprune refuses fields it "
            "does not implement rather than ignore them"
        )


def _require(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"config field {where}{key} is missing")
    return d[key]


def _int(d: Mapping[str, Any], key: str, where: str, default: int | None = None, lo: int = 1) -> int:
    v = d.get(key, default)
    if v is None:
        raise ConfigError(f"config field {where}{key} is missing")
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"config field {where}{key} must be an integer, got {v!r}")
    if v < lo:
        raise ConfigError(f"config field {where}{key} must be >= {lo}, got {v}")
    return v


def _equal_or_refuse(d: Mapping[str, Any], key: str, where: str, allowed: tuple) -> Any:
    v = d.get(key, allowed[0])
    if v not in allowed:
        raise ConfigError(f"config field {where}{key}={v!r} is not implemented (supported: {allowed!r})")
    return v


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT vision tower: CLIP (``kind="clip"``: pre-LN transformer, class token, learned absolute positions,
    ``pre_layrnorm``) or SigLIP (``kind="siglip"``: no class token, a biased patch conv, no pre-norm; the conv
    covers ``image_size // patch_size`` patches per side, 384 / 14 -> 27, the last pixels unused)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    kind: str = "clip"

    def __post_init__(self):
        if self.kind not in ("clip", "siglip"):
            raise ConfigError(f"vision tower kind {self.kind!r} is not implemented (clip, siglip)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config.hidden_size={self.hidden_size} is not divisible by "
                f"vision_config.num_attention_heads={self.num_attention_heads}"
            )
        if self.kind == "clip" and self.image_size % self.patch_size:
            raise ConfigError(
                f"vision_config.image_size={self.image_size} is not divisible by "
                f"vision_config.patch_size={self.patch_size}"
            )
        if self.hidden_act not in _CLIP_ACTS:
            raise ConfigError(f"config field vision_config.hidden_act={self.hidden_act!r} is not implemented")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_positions(self) -> int:
        """Rows of the position embedding: the patches, plus the class token on CLIP."""
        return self.num_patches + (1 if self.kind == "clip" else 0)

    @property
    def has_cls(self) -> bool:
        return self.kind == "clip"

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "vision_config.") -> "VisionConfig":
        mt = d.get("model_type", "clip_vision_model")
        if mt not in ("clip_vision_model", "clip", "siglip_vision_model"):
            raise ConfigError(f"config field {where}model_type={mt!r} is not implemented (CLIP or SigLIP)")
        used = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "image_size", "patch_size", "hidden_act", "layer_norm_eps"}
        if mt == "siglip_vision_model":
            used |= {"vision_use_head"}
            _equal_or_refuse(d, "vision_use_head", where, (False,))  # the pooling head: LLaVA never runs it
            for k in ("image_size", "patch_size"):
                if isinstance(d.get(k), (list, tuple)):
                    raise ConfigError(f"config field {where}{k}={d[k]!r}: non-square sizes are not implemented")
            _check_keys(d, used, where)
            return cls(
                hidden_size=_int(d, "hidden_size", where, 768),
                intermediate_size=_int(d, "intermediate_size", where, 3072),
                num_hidden_layers=_int(d, "num_hidden_layers", where, 12),
                num_attention_heads=_int(d, "num_attention_heads", where, 12),
                num_channels=_int(d, "num_channels", where, 3),
                image_size=_int(d, "image_size", where, 224),
                patch_size=_int(d, "patch_size", where, 16),
                hidden_act=str(d.get("hidden_act", "gelu_pytorch_tanh")),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
                kind="siglip",
            )
        _check_keys(d, used, where)
        dflt = cls()
        return cls(
            hidden_size=_int(d, "hidden_size", where, dflt.hidden_size),
            intermediate_size=_int(d, "intermediate_size", where, dflt.intermediate_size),
            num_hidden_layers=_int(d, "num_hidden_layers", where, dflt.num_hidden_layers),
            num_attention_heads=_int(d, "num_attention_heads", where, dflt.num_attention_heads),
            num_channels=_int(d, "num_channels", where, dflt.num_channels),
            image_size=_int(d, "image_size", where, dflt.image_size),
            patch_size=_int(d, "patch_size", where, dflt.patch_size),
            hidden_act=str(d.get("hidden_act", dflt.hidden_act)),
            layer_norm_eps=float(d.get("layer_norm_eps", dflt.layer_norm_eps)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        kind = d.pop("kind")
        if kind == "siglip":
            return {"model_type": "siglip_vision_model", "vision_use_head": False, **d}
        return {"model_type": "clip_vision_model", **d}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Llama decoder (RMSNorm, RoPE in HF's rotate_half layout, GQA, SwiGLU); ``kind="qwen2"``: the same with
    biases on the q / k / v projections (HF ``Qwen2Attention``; full attention only, no sliding window)."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    kind: str = "llama"

    @property
    def qkv_bias(self) -> bool:
        """Biases on the q / k / v projections (Qwen2); never on ``o_proj``."""
        return self.kind == "qwen2"

    def __post_init__(self):
        if self.kind not in ("llama", "qwen2"):
            raise ConfigError(f"decoder kind {self.kind!r} is not implemented (llama, qwen2)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"text_config.num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"text_config.head_dim={self.head_dim} must be even for RoPE")

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "text_config.",
                     tie_default: bool = False) -> "TextConfig":
        mt = d.get("model_type", "llama")
        if mt not in ("llama", "qwen2"):
            raise ConfigError(f"config field {where}model_type={mt!r} is not implemented (llama, qwen2)")
        used = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
                "rope_parameters", "hidden_act", "attention_bias", "mlp_bias", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"}
        if mt == "qwen2":  # sliding-window fields: only meaningful with use_sliding_window (refused)
            used |= {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
            _equal_or_refuse(d, "use_sliding_window", where, (False,))
            lt = d.get("layer_types") or ()
            if any(t != "full_attention" for t in lt):
                raise ConfigError(f"config field {where}layer_types={list(lt)!r}: only 'full_attention' layers are "
                                  "implemented")
        _check_keys(d, used, where)
        _equal_or_refuse(d, "hidden_act", where, ("silu",))
        _equal_or_refuse(d, "attention_bias", where, (False,))
        _equal_or_refuse(d, "mlp_bias", where, (False,))
        _equal_or_refuse(d, "rope_scaling", where, (None,))
        theta = d.get("rope_theta", 10000.0)
        rp = d.get("rope_parameters")
        if rp is not None:
            if not isinstance(rp, Mapping):
                raise ConfigError(f"config field {where}rope_parameters must be a mapping, got {rp!r}")
            extra = sorted(set(rp) - {"rope_theta", "rope_type"})
            if extra:
                raise ConfigError(f"config field {where}rope_parameters.{extra[0]} is not implemented")
            _equal_or_refuse(rp, "rope_type", where + "rope_parameters.", ("default",))
            theta = rp.get("rope_theta", theta)
        hidden = _int(d, "hidden_size", where, 4096)
        heads = _int(d, "num_attention_heads", where, 32)
        kv = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or hidden // heads
        eos = d.get("eos_token_id", 2)
        eos_t = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else ((int(eos),) if eos is not None else ())
        return cls(
            vocab_size=_int(d, "vocab_size", where, 32000),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size", where, 11008),
            num_hidden_layers=_int(d, "num_hidden_layers", where, 32),
            num_attention_heads=heads,
            num_key_value_heads=int(kv),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=_int(d, "max_position_embeddings", where, 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_t,
            pad_token_id=d.get("pad_token_id"),
            kind=mt,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("kind")
        d["eos_token_id"] = list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]
        if self.kind == "qwen2":
            return {"model_type": "qwen2", "hidden_act": "silu", "use_sliding_window": False, **d}
        return {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, **d}


MODEL_TYPES = ("llava", "llava_next", "video_llava", "llava_onevision")
_ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                  "video_llava": "VideoLlavaForConditionalGeneration",
                  "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """LLaVA-1.5 (``llava``), LLaVA-NeXT (``llava_next``) or Video-LLaVA (``video_llava``): CLIP tower(s) +
    2-layer projector + Llama. Video-LLaVA has two CLIP towers of one ``vision`` config (``image_tower``,
    ``video_tower``) and a second placeholder id ``video_token_index``."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    model_type: str = "llava"
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    multimodal_projector_bias: bool = True
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    use_image_newline_parameter: bool = True
    video_token_index: int | None = None   # video_llava / llava_onevision: the video placeholder id (32001 / 151647)
    num_frames: int = 8                    # video_llava: frames per video the processor samples (budgets, eval)
    vision_aspect_ratio: str = "anyres_max_9"  # llava_onevision: the cap on the packed tile grid

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"config field model_type={self.model_type!r} is not implemented")
        n = self.vision.num_hidden_layers
        if not -(n + 1) <= self.vision_feature_layer <= n:
            raise ConfigError(f"config field vision_feature_layer={self.vision_feature_layer} is out of range "
                              f"for a {n}-layer vision tower")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError("config field vision_feature_select_strategy="
                              f"{self.vision_feature_select_strategy!r} is not implemented")
        if self.projector_hidden_act not in _PROJ_ACTS:
            raise ConfigError(f"config field projector_hidden_act={self.projector_hidden_act!r} is not implemented")
        if self.model_type == "video_llava":
            if self.video_token_index is None or self.video_token_index == self.image_token_index:
                raise ConfigError(f"config field video_token_index={self.video_token_index!r} must be set and differ "
                                  f"from image_token_index={self.image_token_index}")
            if self.num_frames < 1:
                raise ConfigError(f"num_frames={self.num_frames} must be >= 1")
        if self.model_type == "llava_onevision":
            self._check_onevision()

    def _check_onevision(self) -> None:
        from jaxprune.models.onevision_pack import max_patches

        if self.vision.kind != "siglip":
            raise ConfigError("config field vision_config.model_type: llava_onevision with a CLIP tower is not "
                              "implemented (every release uses SigLIP)")
        if self.vision_feature_select_strategy != "full":
            raise ConfigError(f"config field vision_feature_select_strategy={self.vision_feature_select_strategy!r}"
                              " is not implemented for llava_onevision (SigLIP has no CLS to drop; HF's packing "
                              "needs the full p x p grid)")
        if self.video_token_index is None or self.video_token_index == self.image_token_index:
            raise ConfigError(f"config field video_token_index={self.video_token_index!r} must be set and differ "
                              f"from image_token_index={self.image_token_index}")
        if not self.image_grid_pinpoints:
            raise ConfigError("config field image_grid_pinpoints is missing for a llava_onevision model")
        try:
            max_patches(self.vision_aspect_ratio)
        except ValueError as e:
            raise ConfigError(f"config field {e}") from None

    @property
    def feature_layer_index(self) -> int:
        """Index into HF's ``hidden_states`` tuple = number of CLIP layers that must run."""
        n = self.vision.num_hidden_layers
        return self.vision_feature_layer if self.vision_feature_layer >= 0 else n + 1 + self.vision_feature_layer

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens one 1.5-style image contributes (576 for CLIP-L/14-336 with 'default')."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" and self.vision.has_cls
                                          else 0)

    @property
    def tokens_per_frame(self) -> int:
        """Video-LLaVA: visual tokens of one video frame (every patch + its CLS: 257 at 224/14)."""
        return self.vision.num_patches + 1

    @property
    def tokens_per_video(self) -> int:
        """Video-LLaVA: visual tokens of one ``num_frames`` video (8 x 257 = 2056)."""
        return self.num_frames * self.tokens_per_frame

    @property
    def max_image_tokens(self) -> int:
        """Placeholder tokens of the largest image: ``tokens_per_image`` (llava); the packed anyres maximum incl.
        newlines (llava_next: 2928 for llava-v1.6's pinpoints at 336/14); video_llava: one video's tokens
        (``num_frames * (P + 1)`` = 2056: budgets count a video's tokens)."""
        if self.model_type == "video_llava":
            return self.tokens_per_video
        if self.model_type == "llava_onevision":
            from jaxprune.models.onevision_pack import max_image_tokens as ov_max, max_patches
            from jaxprune.processing_anyres import check_pinpoints

            S = self.vision.image_size
            return ov_max(check_pinpoints(self.image_grid_pinpoints, S), S, self.vision.grid,
                          max_patches(self.vision_aspect_ratio))
        if self.model_type != "llava_next":
            return self.tokens_per_image
        from jaxprune.processing_anyres import check_pinpoints, max_image_tokens

        S = self.vision.image_size
        return max_image_tokens(check_pinpoints(self.image_grid_pinpoints, S), S, self.vision.patch_size)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "LlavaConfig":
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ConfigError(f"config field model_type={mt!r} is not implemented (expected one of {MODEL_TYPES})")
        used = {"vision_config", "text_config", "model_type", "image_token_index", "image_token_id",
                "projector_hidden_act", "vision_feature_layer", "vision_feature_select_strategy",
                "multimodal_projector_bias", "image_seq_length", "tie_word_embeddings", "vocab_size",
                "pad_token_id"}
        if mt in ("llava", "llava_next"):
            used |= {"image_grid_pinpoints", "use_image_newline_parameter"}
        if mt == "video_llava":  # video_seq_length is processor metadata: it gives num_frames when it divides
            used |= {"video_token_index", "video_token_id", "video_seq_length", "num_frames"}
        if mt == "llava_onevision":
            used |= {"image_grid_pinpoints", "vision_aspect_ratio", "video_token_index", "video_token_id"}
        _check_keys(d, used, "")
        ov = mt == "llava_onevision"  # HF's LlavaOnevisionConfig defaults differ: -1, "full", 151646
        vfl = d.get("vision_feature_layer", -1 if ov else -2)
        if isinstance(vfl, (list, tuple)):
            raise ConfigError(f"config field vision_feature_layer={vfl!r}: a list of layers is not implemented")
        if isinstance(vfl, bool) or not isinstance(vfl, int):
            raise ConfigError(f"config field vision_feature_layer must be an int, got {vfl!r}")
        vision = VisionConfig.from_hf_dict(d.get("vision_config") or {})
        td = dict(d.get("text_config") or {})
        if "vocab_size" in d and "vocab_size" not in td:
            td["vocab_size"] = d["vocab_size"]
        text = TextConfig.from_hf_dict(td, tie_default=bool(d.get("tie_word_embeddings", False)))
        if "tie_word_embeddings" in d and "tie_word_embeddings" not in td:
            text = dataclasses.replace(text, tie_word_embeddings=bool(d["tie_word_embeddings"]))
        if text.pad_token_id is None and d.get("pad_token_id") is not None:
            text = dataclasses.replace(text, pad_token_id=int(d["pad_token_id"]))
        pins = tuple(tuple(int(x) for x in p) for p in (d.get("image_grid_pinpoints") or ()))
        if mt == "llava_next" and not pins:
            raise ConfigError("config field image_grid_pinpoints is missing for a llava_next model")
        cfg = cls(
            vision=vision,
            text=text,
            model_type=mt,
            image_token_index=int(d.get("image_token_index", d.get("image_token_id", 151646 if ov else 32000))),
            projector_hidden_act=str(d.get("projector_hidden_act", "gelu")),
            vision_feature_layer=int(vfl),
            vision_feature_select_strategy=str(d.get("vision_feature_select_strategy", "full" if ov else "default")),
            multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)),
            image_grid_pinpoints=pins,
            use_image_newline_parameter=bool(d.get("use_image_newline_parameter", True)),
            **(_video_fields(d, vision) if mt == "video_llava" else {}),
            **(_onevision_fields(d) if mt == "llava_onevision" else {}),
        )
        # image_seq_length is processor metadata (HF's model never reads it; tiny test configs keep 576).
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": [_ARCHITECTURES[self.model_type]],
            "vision_config": self.vision.to_hf_dict(),
            "text_config": self.text.to_hf_dict(),
            "image_token_index": self.image_token_index,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "tie_word_embeddings": self.text.tie_word_embeddings,
        }
        if self.model_type == "llava":
            d["image_seq_length"] = self.tokens_per_image
        elif self.model_type == "video_llava":
            d.update(image_seq_length=self.tokens_per_image, video_token_index=self.video_token_index,
                     video_seq_length=self.tokens_per_video, num_frames=self.num_frames)
        elif self.model_type == "llava_onevision":
            d.update(image_grid_pinpoints=[list(p) for p in self.image_grid_pinpoints],
                     video_token_index=self.video_token_index, vision_aspect_ratio=self.vision_aspect_ratio)
        else:
            d["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
            d["use_image_newline_parameter"] = self.use_image_newline_parameter
        return d


def _onevision_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """``video_token_index`` (HF default 151647) and ``vision_aspect_ratio`` of a LLaVA-OneVision config."""
    vt = d.get("video_token_index", d.get("video_token_id", 151647))
    if isinstance(vt, bool) or not isinstance(vt, int):
        raise ConfigError(f"config field video_token_index must be an int, got {vt!r}")
    return {"video_token_index": int(vt), "vision_aspect_ratio": str(d.get("vision_aspect_ratio", "anyres_max_9"))}


def _video_fields(d: Mapping[str, Any], vision: VisionConfig) -> dict[str, Any]:
    """``video_token_index`` and ``num_frames`` of a Video-LLaVA config. ``num_frames``: the field if present (our
    own export), else ``video_seq_length / (P + 1)`` when that divides (2056 / 257 = 8), else 8 (HF's model never
    reads ``video_seq_length``: tiny test configs keep 2056 with any tower)."""
    vt = d.get("video_token_index", d.get("video_token_id", 32001))
    if isinstance(vt, bool) or not isinstance(vt, int):
        raise ConfigError(f"config field video_token_index must be an int, got {vt!r}")
    per = vision.num_patches + 1
    if "num_frames" in d:
        nf = _int(d, "num_frames", "")
    else:
        vsl = d.get("video_seq_length", 2056)
        nf = vsl // per if isinstance(vsl, int) and vsl > 0 and vsl % per == 0 else 8
    return {"video_token_index": int(vt), "num_frames": int(nf)}


def load_config(path: str | Path) -> LlavaConfig:
    """Read ``config.json`` (a file or a directory holding one) into a :class:`LlavaConfig`."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no config.json at {p}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from e
    return LlavaConfig.from_hf_dict(d)
