"""Checkpoint errors users can act on: a missing tensor is named exactly as its file spells it, in every layout.

Tiny checkpoints are written here from random canonical parameters (no downloads, no transformers): the
legacy llava-hf layout, transformers-5 (flattened and nested CLIP), a sharded one, and original LLaVA
(tower inside the checkpoint, or in a separate CLIP directory with nested or flattened keys). Each test
deletes tensors from one file and checks the error's line for each names the file's own key and the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxprune.checkpoints import (ParamMismatchError, export_hf, load_file, read_checkpoint, write_safetensors,
                                  write_sharded)
from jaxprune.config import LlavaConfig
from jaxprune.models.param_spec import param_shapes

VISION = {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 28, "patch_size": 14, "hidden_act": "quick_gelu",
          "layer_norm_eps": 1e-5}
TEXT = {"model_type": "llama", "vocab_size": 128, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "hidden_act": "silu"}
HF_CONFIG = {"model_type": "llava", "image_token_index": 100, "projector_hidden_act": "gelu",
             "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
             "vision_config": VISION, "text_config": TEXT}
ORIGINAL_CONFIG = {"model_type": "llava_llama", **{k: v for k, v in TEXT.items() if k != "model_type"},
                   "mm_hidden_size": 16, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
                   "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
                   "mm_use_im_start_end": False}


@pytest.fixture(scope="module")
def legacy_sd(tmp_path_factory) -> dict[str, np.ndarray]:
    """A random tiny LLaVA-1.5 state dict under legacy llava-hf keys (written by ``export_hf``)."""
    cfg = LlavaConfig.from_hf_dict(HF_CONFIG)
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(cfg).items()}
    out = export_hf(cfg, params, tmp_path_factory.mktemp("ckpt") / "legacy", layout="legacy")
    sd = load_file(out / "model.safetensors")
    assert "language_model.model.layers.0.mlp.up_proj.weight" in sd
    assert "vision_tower.vision_model.post_layernorm.bias" in sd
    return sd


def _rename(sd: dict[str, np.ndarray], prefixes: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Rewrite each key's first matching prefix (written independently of jaxprune.checkpoints.keys)."""
    out = {}
    for k, v in sd.items():
        for old, new in prefixes:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


V5_FLAT = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
           ("vision_tower.vision_model.", "model.vision_tower."),
           ("multi_modal_projector.", "model.multi_modal_projector.")]
V5_NESTED = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
             ("vision_tower.vision_model.", "model.vision_tower.vision_model."),
             ("multi_modal_projector.", "model.multi_modal_projector.")]
LEGACY_FLAT = [("vision_tower.vision_model.", "vision_tower.")]
ORIGINAL = [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
            ("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
            ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
            ("multi_modal_projector.linear_2.", "model.mm_projector.2.")]


def _write(directory: Path, sd: dict[str, np.ndarray], config: dict, drop: list[str], shard_bytes: int | None = None):
    for k in drop:
        assert k in sd, k
    kept = {k: v for k, v in sd.items() if k not in drop}
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    if shard_bytes is None:
        write_safetensors(directory / "model.safetensors", kept)
    else:
        write_sharded(directory, kept, shard_bytes)
    return directory


def _missing_lines(src: Path, clip_dir: Path | None = None) -> dict[str, str]:
    with pytest.raises(ParamMismatchError) as ei:
        read_checkpoint(src, clip_dir=clip_dir)
    msg = str(ei.value)
    lines = {}
    for line in msg.splitlines():
        name = line.strip().split(":", 1)[0]
        if name in ei.value.missing:
            lines[name] = line
    assert set(lines) == set(ei.value.missing), msg
    return lines


def _check(lines: dict[str, str], expected: dict[str, tuple[str, str]]) -> None:
    """``expected``: canonical name -> (key exactly as the file spells it, the file the line must name)."""
    assert set(lines) == set(expected)
    for name, (key, file) in expected.items():
        line = lines[name]
        assert f"{key!r}" in line, (key, line)
        assert line.endswith(f" in {file}"), (file, line)


HF_CASES = {
    # layout: (key prefixes from legacy, deleted keys -> canonical names)
    "legacy": ([], {
        "language_model.model.layers.0.mlp.up_proj.weight": "language.layers.0.mlp.up_proj.kernel",
        "language_model.lm_head.weight": "lm_head.kernel",
        "vision_tower.vision_model.post_layernorm.bias": "vision.post_layernorm.bias",
        "multi_modal_projector.linear_2.bias": "projector.linear_2.bias"}),
    "v5": (V5_FLAT, {
        "model.language_model.layers.1.self_attn.o_proj.weight": "language.layers.1.self_attn.o_proj.kernel",
        "lm_head.weight": "lm_head.kernel",
        "model.vision_tower.encoder.layers.0.mlp.fc1.bias": "vision.layers.0.mlp.fc1.bias",
        "model.multi_modal_projector.linear_1.weight": "projector.linear_1.kernel"}),
    "v5_nested_clip": (V5_NESTED, {
        "model.language_model.norm.weight": "language.norm.scale",
        "model.vision_tower.vision_model.embeddings.patch_embedding.weight": "vision.patch_embedding.kernel"}),
    "legacy_flat_clip": (LEGACY_FLAT, {
        "language_model.model.embed_tokens.weight": "language.embed_tokens.embedding",
        "vision_tower.pre_layrnorm.weight": "vision.pre_layrnorm.scale"}),
}


@pytest.mark.parametrize("layout", sorted(HF_CASES))
def test_missing_tensor_named_as_the_hf_file_spells_it(legacy_sd, tmp_path, layout):
    prefixes, dropped = HF_CASES[layout]
    d = _write(tmp_path / layout, _rename(legacy_sd, prefixes), HF_CONFIG, list(dropped))
    _check(_missing_lines(d), {name: (key, "model.safetensors") for key, name in dropped.items()})


def test_missing_tensor_legacy_never_drops_model_prefix(legacy_sd, tmp_path):
    d = _write(tmp_path / "l", legacy_sd, HF_CONFIG, ["language_model.model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(ParamMismatchError) as ei:
        read_checkpoint(d)
    msg = str(ei.value)
    assert "'language_model.model.layers.0.self_attn.q_proj.weight'" in msg
    assert "'language_model.layers.0" not in msg and "'model.language_model." not in msg


def test_missing_tensor_sharded_names_the_index(legacy_sd, tmp_path):
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    d = _write(tmp_path / "sh", legacy_sd, HF_CONFIG, [key], shard_bytes=20_000)
    assert (d / "model.safetensors.index.json").is_file()
    _check(_missing_lines(d), {"language.layers.1.mlp.down_proj.kernel": (key, "model.safetensors.index.json")})


def test_missing_whole_tower_uses_the_files_generation(legacy_sd, tmp_path):
    """No tower key left to learn its spelling from: the rest of the file decides (here transformers 5)."""
    sd = {k: v for k, v in _rename(legacy_sd, V5_FLAT).items() if not k.startswith("model.vision_tower.")}
    d = _write(tmp_path / "notower", sd, HF_CONFIG, [])
    lines = _missing_lines(d)
    assert all(n.startswith("vision.") for n in lines) and len(lines) > 10
    assert "'model.vision_tower." in lines["vision.post_layernorm.bias"]


def _clip_dir(root: Path, legacy_sd, flat: bool, drop: list[str]) -> Path:
    tower = "" if flat else "vision_model."
    sd = {tower + k[len("vision_tower.vision_model."):]: v for k, v in legacy_sd.items()
          if k.startswith("vision_tower.vision_model.")}
    return _write(root, sd, VISION, drop)


def test_missing_tensor_original_llava(legacy_sd, tmp_path):
    clip = _clip_dir(tmp_path / "clip", legacy_sd, flat=False, drop=[])
    dropped = {"model.mm_projector.0.weight": "projector.linear_1.kernel",
               "model.mm_projector.2.bias": "projector.linear_2.bias",
               "model.layers.1.input_layernorm.weight": "language.layers.1.input_layernorm.scale",
               "lm_head.weight": "lm_head.kernel",
               "model.vision_tower.vision_tower.vision_model.post_layernorm.bias": "vision.post_layernorm.bias"}
    d = _write(tmp_path / "orig", _rename(legacy_sd, ORIGINAL), {**ORIGINAL_CONFIG, "mm_vision_tower": str(clip)},
               list(dropped))
    _check(_missing_lines(d), {name: (key, "model.safetensors") for key, name in dropped.items()})


@pytest.mark.parametrize("flat", [False, True], ids=["clip", "clip_flat"])
def test_missing_tensor_original_llava_separate_clip(legacy_sd, tmp_path, flat):
    tower_key = ("" if flat else "vision_model.") + "encoder.layers.0.mlp.fc1.bias"
    clip = _clip_dir(tmp_path / "clip", legacy_sd, flat=flat, drop=[tower_key])
    llm = {k: v for k, v in _rename(legacy_sd, ORIGINAL).items() if not k.startswith("model.vision_tower.")}
    d = _write(tmp_path / "orig", llm, {**ORIGINAL_CONFIG, "mm_vision_tower": "openai/clip-vit-large-patch14-336"},
               ["model.mm_projector.2.weight"])
    _check(_missing_lines(d, clip_dir=clip), {
        "vision.layers.0.mlp.fc1.bias": (tower_key, str(clip / "model.safetensors")),
        "projector.linear_2.kernel": ("model.mm_projector.2.weight", "model.safetensors")})
