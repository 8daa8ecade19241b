"""Canonical jaxprune parameter names and shapes for a :class:`~jaxprune.config.LlavaConfig`.

The names are the dotted paths of the NNX model's flat state (``nnx.to_flat_state``), and the
layouts are JAX's: dense kernels ``[in, out]``, the patch embedding ``[p, p, C, D]`` (kh, kw, in,
out), embeddings ``[rows, D]``. The checkpoint converter maps every HF key onto exactly one of these
names; a test checks that the model's state has exactly these names and shapes.

All CLIP layers (and ``post_layernorm``) are kept as parameters even though LLaVA runs only up to
``vision_feature_layer``: that keeps HF -> jaxprune -> HF round trips lossless.
"""

from __future__ import annotations

from jaxprune.config import LlavaConfig


def towers(cfg: LlavaConfig) -> tuple[str, ...]:
    """The CLIP towers' parameter prefixes: ``("vision",)``; Video-LLaVA: ``("image_tower", "video_tower")``."""
    return ("image_tower", "video_tower") if cfg.model_type == "video_llava" else ("vision",)


def param_shapes(cfg: LlavaConfig) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for tower in towers(cfg):
        _clip_shapes(cfg, tower, out)
    D = cfg.vision.hidden_size
    _text_shapes(cfg, D, out)
    return out


def _clip_shapes(cfg: LlavaConfig, tower: str, out: dict) -> None:
    """CLIP or SigLIP (no class embedding / pre-norm, a biased patch conv, one position per patch)."""
    v = cfg.vision
    D, p, C = v.hidden_size, v.patch_size, v.num_channels
    if v.has_cls:
        out[f"{tower}.class_embedding"] = (D,)
    out[f"{tower}.patch_embedding.kernel"] = (p, p, C, D)
    if not v.has_cls:
        out[f"{tower}.patch_embedding.bias"] = (D,)
    out[f"{tower}.position_embedding.embedding"] = (v.num_positions, D)
    for n in ("pre_layrnorm", "post_layernorm") if v.has_cls else ("post_layernorm",):
        out[f"{tower}.{n}.scale"] = (D,)
        out[f"{tower}.{n}.bias"] = (D,)
    for i in range(v.num_hidden_layers):
        pre = f"{tower}.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            out[pre + n + ".scale"] = (D,)
            out[pre + n + ".bias"] = (D,)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[pre + f"self_attn.{n}.kernel"] = (D, D)
            out[pre + f"self_attn.{n}.bias"] = (D,)
        out[pre + "mlp.fc1.kernel"] = (D, v.intermediate_size)
        out[pre + "mlp.fc1.bias"] = (v.intermediate_size,)
        out[pre + "mlp.fc2.kernel"] = (v.intermediate_size, D)
        out[pre + "mlp.fc2.bias"] = (D,)


def _text_shapes(cfg: LlavaConfig, D: int, out: dict) -> None:
    t = cfg.text
    H = t.hidden_size
    out["projector.linear_1.kernel"] = (D, H)
    out["projector.linear_2.kernel"] = (H, H)
    if cfg.multimodal_projector_bias:
        out["projector.linear_1.bias"] = (H,)
        out["projector.linear_2.bias"] = (H,)

    out["language.embed_tokens.embedding"] = (t.vocab_size, H)
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    for i in range(t.num_hidden_layers):
        pre = f"language.layers.{i}."
        out[pre + "input_layernorm.scale"] = (H,)
        out[pre + "post_attention_layernorm.scale"] = (H,)
        out[pre + "self_attn.q_proj.kernel"] = (H, q)
        out[pre + "self_attn.k_proj.kernel"] = (H, kv)
        out[pre + "self_attn.v_proj.kernel"] = (H, kv)
        out[pre + "self_attn.o_proj.kernel"] = (q, H)
        if t.qkv_bias:
            out[pre + "self_attn.q_proj.bias"] = (q,)
            out[pre + "self_attn.k_proj.bias"] = (kv,)
            out[pre + "self_attn.v_proj.bias"] = (kv,)
        out[pre + "mlp.gate_proj.kernel"] = (H, t.intermediate_size)
        out[pre + "mlp.up_proj.kernel"] = (H, t.intermediate_size)
        out[pre + "mlp.down_proj.kernel"] = (t.intermediate_size, H)
    out["language.norm.scale"] = (H,)
    if not t.tie_word_embeddings:
        out["lm_head.kernel"] = (H, t.vocab_size)
    if cfg.model_type in ("llava_next", "llava_onevision"):
        out["image_newline"] = (H,)
