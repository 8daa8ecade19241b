"""Checkpoint conversion: every HF / original-LLaVA layout -> identical canonical params; round trips; errors.

Tiny random ``transformers`` LLaVA models are built here (no downloads), saved, and rewritten into
each on-disk layout from the same state dict.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from checkpoints_convert.__main__ import main as cli_main  # noqa: E402
from jaxprune.checkpoints import (  # noqa: E402
    CheckpointFileError,
    DestinationExistsError,
    ParamMismatchError,
    convert,
    export_hf,
    load_converted,
    load_params,
    read_checkpoint,
    write_safetensors,
    write_sharded,
)
from jaxprune.checkpoints.keys import LAYOUTS, canonical_to_hf, map_hf_key  # noqa: E402
from jaxprune.checkpoints.original import original_to_hf_dict  # noqa: E402
from jaxprune.checkpoints.safetensors_io import load_file, read_header  # noqa: E402
from jaxprune.config import ConfigError, LlavaConfig, load_config  # noqa: E402
from jaxprune.models.param_spec import param_shapes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                "eos_token_id", "pad_token_id", "tie_word_embeddings", "attention_bias", "mlp_bias",
                "initializer_range", "pretraining_tp", "use_cache", "attention_dropout")


def _tiny_configs():
    from transformers import CLIPVisionConfig, LlamaConfig

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7, projection_dim=16)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)
    return vc, tc


def _save_state(directory: Path, sd: dict[str, np.ndarray], config: dict, shard_bytes: int | None = None) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    if shard_bytes is None:
        write_safetensors(directory / "model.safetensors", sd)
    else:
        write_sharded(directory, sd, shard_bytes)
    return directory


def _read_dir(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def to_legacy(k: str) -> str:
    """transformers-5 LLaVA key -> legacy llava-hf key (written independently of jaxprune.checkpoints.keys)."""
    if k.startswith("model.language_model."):
        return "language_model.model." + k[len("model.language_model."):]
    if k == "lm_head.weight":
        return "language_model.lm_head.weight"
    if k.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + k[len("model.vision_tower."):]
    return k[len("model."):]


def to_original(k: str) -> str:
    """transformers-5 LLaVA key -> original haotian-liu/LLaVA key (tower inside the checkpoint)."""
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    if k.startswith("model.multi_modal_projector."):
        rest = k[len("model.multi_modal_projector."):]
        return "model.mm_projector." + rest.replace("linear_1", "0").replace("linear_2", "2")
    if k.startswith("model.vision_tower."):
        return "model.vision_tower.vision_tower.vision_model." + k[len("model.vision_tower."):]
    return k


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny LLaVA-1.5 saved in every layout, plus its reference canonical params."""
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration
    from transformers import LlavaConfig as HFLlavaConfig

    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    vc, tc = _tiny_configs()
    hf_cfg = HFLlavaConfig(vision_config=vc, text_config=tc, image_token_index=100, image_seq_length=16)
    model = LlavaForConditionalGeneration(hf_cfg).eval()
    saved = root / "saved"
    model.save_pretrained(saved)  # transformers 5.23 writes legacy prefixes with a flattened CLIP tower
    config = json.loads((saved / "config.json").read_text())
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}  # transformers-5 runtime names
    assert any(k.startswith("model.language_model.") for k in sd)
    v5 = _save_state(root / "v5", sd, config)
    (v5 / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    dirs = {"v5": v5, "saved": saved}

    dirs["v5_vision_model"] = _save_state(root / "v5vm", {
        ("model.vision_tower.vision_model." + k[len("model.vision_tower."):] if k.startswith("model.vision_tower.")
         else k): v for k, v in sd.items()}, config)
    legacy_sd = {to_legacy(k): v for k, v in sd.items()}
    dirs["legacy"] = _save_state(root / "legacy", legacy_sd, config)
    dirs["legacy_sharded"] = _save_state(root / "legacy_sharded", legacy_sd, config, shard_bytes=40_000)
    model.save_pretrained(root / "v5_sharded", max_shard_size="50KB")
    dirs["v5_sharded"] = root / "v5_sharded"
    assert (dirs["v5_sharded"] / "model.safetensors.index.json").is_file()

    # Original LLaVA: LLM + projector in the checkpoint, CLIP tower in a separate CLIPVisionModel directory.
    clip = CLIPVisionModel(vc)
    clip.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(root / "clip")
    # ... and as a CLIPModel-style directory: vision_model.* keys, text_model.* keys, nested config.
    clip_sd = {"vision_model." + k[len("model.vision_tower."):]: v for k, v in sd.items()
               if k.startswith("model.vision_tower.")}
    clip_sd.update({"text_model.embeddings.token_embedding.weight": np.ones((5, 4), np.float32),
                    "logit_scale": np.array(2.0, np.float32),
                    "visual_projection.weight": np.ones((16, 32), np.float32)})
    _save_state(root / "clipmodel", clip_sd, {"model_type": "clip", "vision_config": vc.to_dict(),
                                              "text_config": {"hidden_size": 4}})
    llama = {k: config["text_config"][k] for k in LLAMA_FIELDS if k in config["text_config"]}
    orig_cfg = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", **llama,
                "rope_theta": 10000.0, "torch_dtype": "float32", "transformers_version": "4.37.2",
                "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32,
                "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
                "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
                "mm_patch_merge_type": "flat", "image_grid_pinpoints": None, "tune_mm_mlp_adapter": False,
                "freeze_mm_mlp_adapter": False, "use_mm_proj": True, "mm_projector_lr": None,
                "tokenizer_padding_side": "right", "tokenizer_model_max_length": 2048,
                "unfreeze_mm_vision_tower": False, "mm_vision_tower_lr": None, "mm_resampler_type": None,
                "tune_mm_vision_resampler": False, "freeze_mm_vision_resampler": False}
    orig_sd = {to_original(k): v for k, v in sd.items()}
    orig_sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # legacy buffer: skipped
    llm_only = {k: v for k, v in orig_sd.items() if not k.startswith("model.vision_tower.")}
    dirs["original"] = _save_state(root / "original", llm_only, orig_cfg)
    dirs["original_inside"] = _save_state(root / "original_inside", orig_sd,
                                          {**orig_cfg, "mm_vision_tower": str(root / "clip")})
    (root / "original_bin").mkdir()
    (root / "original_bin" / "config.json").write_text(json.dumps({**orig_cfg, "mm_vision_tower": str(root / "clip")}))
    torch.save({k: torch.from_numpy(v.copy()) for k, v in orig_sd.items()}, root / "original_bin" / "pytorch_model.bin")
    dirs["original_bin"] = root / "original_bin"

    cfg, ref = read_checkpoint(v5)
    return {"root": root, "model": model, "sd": sd, "legacy_sd": legacy_sd, "config": config, "dirs": dirs,
            "cfg": cfg, "ref": ref, "orig_cfg": orig_cfg, "clip": root / "clip", "clipmodel": root / "clipmodel"}


def _assert_same(params, ref):
    assert set(params) == set(ref)
    for k in ref:
        assert params[k].dtype == ref[k].dtype, k
        assert np.array_equal(params[k], ref[k]), k


def test_reference_matches_param_spec(world):
    cfg, ref = world["cfg"], world["ref"]
    assert {k: v.shape for k, v in ref.items()} == param_shapes(cfg)
    sd = world["sd"]
    np.testing.assert_array_equal(ref["language.layers.1.self_attn.q_proj.kernel"],
                                  sd["model.language_model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(ref["vision.patch_embedding.kernel"],
                                  sd["model.vision_tower.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(ref["language.embed_tokens.embedding"],
                                  sd["model.language_model.embed_tokens.weight"])
    assert cfg.image_token_index == 100 and cfg.vision.num_hidden_layers == 3


@pytest.mark.parametrize("layout", ["saved", "v5_vision_model", "legacy", "legacy_sharded", "v5_sharded"])
def test_hf_layouts_identical(world, layout):
    cfg, params = read_checkpoint(world["dirs"][layout])
    assert cfg == world["cfg"]
    _assert_same(params, world["ref"])


@pytest.mark.parametrize("layout,clip", [("original", "clip"), ("original", "clipmodel"), ("original_inside", None),
                                         ("original_bin", None)])
def test_original_layouts_identical(world, layout, clip):
    cfg, params = read_checkpoint(world["dirs"][layout], clip_dir=world[clip] if clip else None)
    _assert_same(params, world["ref"])
    ref = world["cfg"]
    assert cfg.vision == ref.vision and cfg.text == ref.text
    assert cfg.image_token_index == 32000 and cfg.model_type == "llava"
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"


def test_original_without_clip_is_refused(world):
    with pytest.raises(Exception, match="clip-dir"):
        read_checkpoint(world["dirs"]["original"])


def test_key_rules_round_trip():
    for mt in ("llava", "llava_next"):
        extra = {"image_grid_pinpoints": [[28, 56]]} if mt == "llava_next" else {}
        cfg = LlavaConfig.from_hf_dict({"model_type": mt, "vision_config": {"num_hidden_layers": 2},
                                        "text_config": {"num_hidden_layers": 2}, **extra})
        for name in param_shapes(cfg):
            for layout in LAYOUTS:
                key, _ = canonical_to_hf(name, layout)
                assert map_hf_key(key).canonical == name, (name, layout, key)
    assert map_hf_key("language_model.model.layers.3.self_attn.rotary_emb.inv_freq").status == "ignored"
    assert map_hf_key("model.vision_tower.vision_model.embeddings.position_ids").status == "ignored"
    assert map_hf_key("model.language_model.layers.0.mlp.gate_proj.bias").status == "unknown"


def test_config_round_trip(world):
    cfg = world["cfg"]
    assert LlavaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert LlavaConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


@pytest.mark.parametrize("layout", ["legacy", "v5"])
def test_hf_round_trip_bit_identical(world, tmp_path, layout):
    out = export_hf(world["cfg"], world["ref"], tmp_path / "out", layout=layout)
    from safetensors.numpy import load_file as np_load

    got = np_load(str(out / "model.safetensors"))
    want = world["sd"] if layout == "v5" else world["legacy_sd"]
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    from safetensors.torch import load_file as torch_load

    tl = torch_load(str(out / "model.safetensors"))
    assert all(torch.equal(tl[k], torch.from_numpy(want[k])) for k in want)
    # transformers loads the export, and the model is the original one.
    from transformers import LlavaForConditionalGeneration

    m2 = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ref_sd = world["model"].state_dict()
    got_sd = m2.state_dict()
    assert set(got_sd) == set(ref_sd)
    assert all(torch.equal(got_sd[k], ref_sd[k]) for k in ref_sd)


def test_sharded_export_round_trip(world, tmp_path):
    out = export_hf(world["cfg"], world["ref"], tmp_path / "sharded", layout="v5", max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    _, params = read_checkpoint(out)
    _assert_same(params, world["ref"])


def test_bf16_conversion(world, tmp_path):
    _, params = read_checkpoint(world["dirs"]["legacy"], dtype="bfloat16")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    for k, v in world["ref"].items():
        assert params[k].dtype == bf16
        assert np.array_equal(params[k], v.astype(bf16)), k
    dst = convert(world["dirs"]["v5"], tmp_path / "bf16", dtype="bfloat16")
    cfg, loaded = load_converted(dst)
    assert json.loads((dst / "jaxprune.json").read_text())["dtype"] == "bfloat16"
    _assert_same(loaded, params)
    _, as_f32 = load_converted(dst, dtype="float32")
    assert all(v.dtype == np.float32 for v in as_f32.values())
    _, recast = load_converted(convert(dst, tmp_path / "f32", dtype="float32"))  # converted -> converted
    _assert_same(recast, as_f32)
    # a bf16 safetensors checkpoint reads back as bf16, bit for bit, and torch sees the same bits
    out = export_hf(cfg, params, tmp_path / "bf16_hf", layout="v5")
    _, again = read_checkpoint(out)
    _assert_same(again, params)
    from safetensors.torch import load_file as torch_load

    tl = torch_load(str(out / "model.safetensors"))
    w = tl["model.language_model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.bfloat16
    np.testing.assert_array_equal(w.view(torch.int16).numpy().T,
                                  params["language.layers.0.mlp.down_proj.kernel"].view(np.int16))


def test_orbax_round_trip_and_overwrite(world, tmp_path):
    dst = tmp_path / "conv"
    assert convert(world["dirs"]["legacy_sharded"], dst) == dst
    cfg, params = load_converted(dst)
    assert cfg == world["cfg"] and load_config(dst) == cfg
    _assert_same(params, world["ref"])
    marker = json.loads((dst / "jaxprune.json").read_text())
    assert marker["format_version"] == 1 and marker["dtype"] == "source"
    cfg2, params2 = load_params(dst)  # detects the converted dir
    _assert_same(params2, world["ref"])
    # the orbax tree is the nested dict of the canonical names
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore((dst / "params").absolute())
    np.testing.assert_array_equal(tree["language"]["layers"]["1"]["mlp"]["up_proj"]["kernel"],
                                  world["ref"]["language.layers.1.mlp.up_proj.kernel"])

    with pytest.raises(DestinationExistsError, match=str(dst)):
        convert(world["dirs"]["v5"], dst)
    convert(world["dirs"]["v5"], dst, force=True)
    assert (dst / "tokenizer_config.json").is_file()  # copied from the v5 source this time
    _, params3 = load_converted(dst)
    _assert_same(params3, world["ref"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


def test_atomic_on_failure(world, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(world["dirs"]["legacy"], bad)
    sd = load_file(bad / "model.safetensors")
    sd["language_model.model.norm.weight"] = np.ones(33, np.float32)
    write_safetensors(bad / "model.safetensors", sd)
    with pytest.raises(ParamMismatchError):
        convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    # a failure while writing: no DST, no temp dir; an existing DST survives a failed --force
    import importlib

    cc = importlib.import_module("jaxprune.checkpoints.converted")  # the module that defines `convert`

    def boom(path, params):
        Path(path).mkdir()
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cc, "save_params", boom)
    with pytest.raises(RuntimeError):
        convert(world["dirs"]["v5"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "x").write_text("old")
    with pytest.raises(RuntimeError):
        convert(world["dirs"]["v5"], tmp_path / "keep", force=True)
    assert (tmp_path / "keep" / "x").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "keep"]


def test_truncated_and_corrupt_files(world, tmp_path):
    src = world["dirs"]["v5"] / "model.safetensors"
    trunc = tmp_path / "trunc"
    shutil.copytree(world["dirs"]["v5"], trunc)
    data = src.read_bytes()
    (trunc / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointFileError, match=r"model\.safetensors.*truncated"):
        read_checkpoint(trunc)
    (trunc / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointFileError, match="truncated"):
        read_checkpoint(trunc)

    (n,) = struct.unpack("<Q", data[:8])
    corrupt = bytearray(data)
    corrupt[8:20] = b"#" * 12
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(CheckpointFileError, match=r"bad\.safetensors.*corrupt header"):
        read_header(bad)
    bad.write_bytes(struct.pack("<Q", 10 ** 12) + data[8:])
    with pytest.raises(CheckpointFileError, match=r"bad\.safetensors"):
        read_header(bad)

    def raw(header: dict, nbytes: int) -> bytes:
        h = json.dumps(header).encode()
        return struct.pack("<Q", len(h)) + h + b"\0" * nbytes

    bad.write_bytes(raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12))
    with pytest.raises(CheckpointFileError, match="overlap"):
        read_header(bad)
    bad.write_bytes(raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8))
    with pytest.raises(CheckpointFileError, match="misaligned"):
        read_header(bad)


def test_index_errors(world, tmp_path):
    d = tmp_path / "sh"
    shutil.copytree(world["dirs"]["legacy_sharded"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-00099-of-00099.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match="model-00099-of-00099.safetensors"):
        read_checkpoint(d)
    index = json.loads((world["dirs"]["legacy_sharded"] / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.model.extra.weight"] = index["weight_map"][key]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match=r"language_model\.model\.extra\.weight"):
        read_checkpoint(d)


def test_mismatch_lists_everything_at_once(world, tmp_path):
    sd = dict(world["legacy_sd"])
    del sd["language_model.model.layers.1.mlp.up_proj.weight"]
    del sd["vision_tower.vision_model.post_layernorm.bias"]
    sd["language_model.model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    sd["multi_modal_projector.linear_2.weight"] = np.ones((32, 33), np.float32)
    d = _save_state(tmp_path / "m", sd, world["config"])
    with pytest.raises(ParamMismatchError) as ei:
        read_checkpoint(d)
    e = ei.value
    assert e.missing == ["vision.post_layernorm.bias", "language.layers.1.mlp.up_proj.kernel"]
    assert e.unexpected == ["language_model.model.layers.0.self_attn.q_norm.weight"]
    assert len(e.mis_shaped) == 1 and "projector.linear_2.kernel" in e.mis_shaped[0]
    for s in ("vision.post_layernorm.bias", "language.layers.1.mlp.up_proj.kernel", "q_norm", "linear_2"):
        assert s in str(e)


def test_unknown_config_fields(world, tmp_path):
    d = tmp_path / "u"
    shutil.copytree(world["dirs"]["legacy"], d)
    (d / "config.json").write_text(json.dumps({**world["config"], "foo_bar_scaling": 2}))
    with pytest.raises(ConfigError, match="foo_bar_scaling"):
        read_checkpoint(d)
    vision = {"model_type": "clip_vision_model", "hidden_size": 32}
    oc = world["orig_cfg"]
    with pytest.raises(ConfigError, match="mm_weird_flag"):
        original_to_hf_dict({**oc, "mm_weird_flag": 1}, vision)
    with pytest.raises(ConfigError, match="mm_projector_type='linear'"):
        original_to_hf_dict({**oc, "mm_projector_type": "linear"}, vision)
    with pytest.raises(ConfigError, match="mm_use_im_start_end"):
        original_to_hf_dict({**oc, "mm_use_im_start_end": True}, vision)
    with pytest.raises(ConfigError, match="llava_mistral"):
        original_to_hf_dict({**oc, "model_type": "llava_mistral"}, vision)
    nxt = original_to_hf_dict({**oc, "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                               "image_grid_pinpoints": [[28, 56], [56, 28]],
                               "mm_vision_select_feature": "cls_patch"}, vision)
    assert nxt["model_type"] == "llava_next" and nxt["image_grid_pinpoints"] == [[56, 28], [28, 56]]
    assert nxt["vision_feature_select_strategy"] == "full"


def test_llava_next_round_trip(tmp_path):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(1)
    vc, tc = _tiny_configs()
    m = LlavaNextForConditionalGeneration(LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=100,
                                                          image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]]))
    m.save_pretrained(tmp_path / "src")
    cfg, params = read_checkpoint(tmp_path / "src")
    assert cfg.model_type == "llava_next" and params["image_newline"].shape == (32,)
    np.testing.assert_array_equal(params["image_newline"], m.model.image_newline.detach().numpy())
    for layout in LAYOUTS:
        out = export_hf(cfg, params, tmp_path / layout, layout=layout)
        _, again = read_checkpoint(out)
        _assert_same(again, params)
        m2 = LlavaNextForConditionalGeneration.from_pretrained(out)
        sd, sd2 = m.state_dict(), m2.state_dict()
        assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    # the original LLaVA-NeXT layout (anyres + spatial_unpad, (width, height) pinpoints, tower inside)
    hf = json.loads((tmp_path / "src" / "config.json").read_text())
    llama = {k: hf["text_config"][k] for k in LLAMA_FIELDS if k in hf["text_config"]}
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    (clip_dir / "config.json").write_text(json.dumps(vc.to_dict()))
    orig_cfg = {"model_type": "llava_llama", **llama, "mm_vision_tower": str(clip_dir), "mm_hidden_size": 32,
                "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
                "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                "image_grid_pinpoints": [[56, 28], [28, 56], [56, 56]], "unfreeze_mm_vision_tower": True,
                "image_crop_resolution": 224, "image_split_resolution": 224, "mm_vision_tower_lr": 2e-6}
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    orig_sd = {to_original(k): v for k, v in sd.items()}
    assert "model.image_newline" in orig_sd
    ocfg, oparams = read_checkpoint(_save_state(tmp_path / "orig", orig_sd, orig_cfg))
    _assert_same(oparams, params)
    assert ocfg.model_type == "llava_next" and ocfg.image_grid_pinpoints == cfg.image_grid_pinpoints


def test_cli(world, tmp_path, capsys):
    assert cli_main([str(world["dirs"]["v5"]), str(tmp_path / "c"), "--dtype", "bfloat16"]) == 0
    assert cli_main([str(world["dirs"]["v5"]), str(tmp_path / "c")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main([str(tmp_path / "c"), str(tmp_path / "hf"), "--export-hf", "--layout", "v5"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert cli_main([str(world["dirs"]["original"]), str(tmp_path / "o")]) == 2
    assert "--clip-dir" in capsys.readouterr().err
    assert cli_main([str(world["dirs"]["original"]), str(tmp_path / "o"), "--clip-dir", str(world["clip"])]) == 0
    _, p = load_params(tmp_path / "o")
    _assert_same(p, world["ref"])
    r = subprocess.run([sys.executable, "-m", "checkpoints_convert", str(tmp_path / "nope"), str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert "error:" in r.stderr and "nope" in r.stderr and "Traceback" not in r.stderr
