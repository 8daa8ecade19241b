"""LoRA adapters (init / apply / merge / orbax I/O), training through ADSC cuts (label layout, a step lowers the
loss, data parallel) and the drop-ratio curriculum."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from experiments.train import curriculum as cur
from experiments.train.loss import llava_logits, token_xent
from experiments.train.reduced import LoraTrainer, lora_loss, map_labels, reduced_forward
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.lora import (LoraConfig, LoraError, apply_lora, init_lora, load_adapters, merge_lora, save_adapters)
from jaxprune.reducers import adsc
from tests.conftest import make_batch

# 6x6 = 36 visual tokens, 3 decoder layers (cuts after 1 and 2 possible).
CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        image_size=12, patch_size=2),
    text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8),
    image_token_index=60)
P = CFG.tokens_per_image
LCFG = LoraConfig(rank=4, alpha=8.0)
CUT = adsc((1, 2), (12, 4))  # ADSC active: 36 -> 12 -> 4 visual tokens


@functools.lru_cache(maxsize=1)
def model() -> jp.Llava:
    return jp.Llava.random(CFG, seed=0)


def batch(seed: int = 1, n_text=(6, 9, 4, 7)):
    """Right-padded rows ``2 text + 36 image + n text``; labels = the next token on the last 3 text positions of each
    row before its last token (never on an image slot, as in LLaVA data)."""
    ids, mask, px = make_batch(list(n_text), P, CFG.image_token_index, 60, CFG.vision.image_size, padding="right",
                               seed=seed)
    valid = mask.astype(bool)
    labels = np.full(ids.shape, -1, np.int32)
    for b in range(len(n_text)):
        n = int(valid[b].sum())
        labels[b, n - 4:n - 1] = ids[b, n - 3:n]
    return {"input_ids": ids.astype(np.int32), "valid": valid, "labels": labels, "pixel_values": px}


def random_adapters(m, seed: int = 3, scale: float = 0.3):
    """Adapters with non-zero ``b`` (a fresh init is the identity)."""
    ad = init_lora(m, LCFG, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(ad)))
    return {k: {"a": v["a"], "b": scale * jax.random.normal(next(keys), v["b"].shape)} for k, v in ad.items()}


def logits_of(m, params, b):
    """The full model's logits with ``params`` (one compiled program for every params of this shape)."""
    p = m.plan(b["input_ids"], b["pixel_values"], b["valid"])
    return np.asarray(m.programs.forward(params, p.arrays, static=p.static)[0][:, :p.length])


# ---- adapters ---------------------------------------------------------------------------------------------
def test_init_is_identity_and_layout():
    m = model()
    ad = init_lora(m, LCFG, jax.random.key(0))
    assert len(ad) == 3 * 7
    q = ad["language.layers.0.self_attn.q_proj"]
    assert q["a"].shape == (32, 4) and q["b"].shape == (4, 32) and not np.asarray(q["b"]).any()
    assert ad["language.layers.2.mlp.down_proj"]["a"].shape == (48, 4)
    assert np.abs(np.asarray(q["a"])).max() <= 1 / np.sqrt(32)  # kaiming-uniform bound
    b = batch()
    np.testing.assert_array_equal(logits_of(m, apply_lora(m.params, ad, LCFG), b), logits_of(m, m.params, b))
    # the delta is (alpha / rank) a @ b on the [in, out] kernel, nothing else moves
    ad = random_adapters(m)
    new = jp.Llava(CFG, m.graphdef, apply_lora(m.params, ad, LCFG)).flat_params()
    for name, w in m.flat_params().items():
        pre = name.removesuffix(".kernel")
        want = w + 2.0 * np.asarray(ad[pre]["a"]) @ np.asarray(ad[pre]["b"]) if pre in ad else w
        np.testing.assert_allclose(np.asarray(new[name]), want, rtol=1e-6, atol=1e-6)


def test_config_subsets():
    m = model()
    ad = init_lora(m, LoraConfig(rank=2, alpha=2, targets=("q_proj", "v_proj"), layers=(2, 0)), jax.random.key(0))
    assert sorted(ad) == ["language.layers.0.self_attn.q_proj", "language.layers.0.self_attn.v_proj",
                          "language.layers.2.self_attn.q_proj", "language.layers.2.self_attn.v_proj"]


def test_config_and_adapter_errors(tmp_path):
    with pytest.raises(LoraError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(LoraError, match="rank"):
        LoraConfig(rank=-2)
    with pytest.raises(LoraError, match="unknown.*fc1"):
        LoraConfig(targets=("q_proj", "fc1"))
    with pytest.raises(LoraError, match="alpha"):
        LoraConfig(alpha=0)
    with pytest.raises(LoraError, match="dropout"):
        LoraConfig(dropout=0.05)
    m = model()
    with pytest.raises(LoraError, match="out of range"):
        init_lora(m, LoraConfig(layers=(5,)), jax.random.key(0))
    ad = init_lora(m, LCFG, jax.random.key(0))
    missing = dict(ad)
    del missing["language.layers.1.mlp.up_proj"]
    with pytest.raises(LoraError, match="missing adapters.*layers.1.mlp.up_proj"):
        apply_lora(m.params, missing, LCFG)
    with pytest.raises(LoraError, match="mis-shaped"):
        apply_lora(m.params, init_lora(m, LoraConfig(rank=3), jax.random.key(0)), LCFG)
    with pytest.raises(LoraError, match="no layer for"):
        apply_lora(m.params, ad, LoraConfig(rank=4, alpha=8.0, targets=("q_proj",)))
    with pytest.raises(FileNotFoundError, match="no LoRA adapter directory"):
        load_adapters(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraError, match="lora_config.json is missing"):
        load_adapters(tmp_path / "empty")
    with pytest.raises(LoraError, match="rank"):
        save_adapters(tmp_path / "x", ad, LoraConfig(rank=8))


def test_save_load_merge_same_logits(tmp_path):
    m = model()
    ad = random_adapters(m)
    path = save_adapters(tmp_path / "ad", ad, LCFG, metadata={"note": "test"})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    with pytest.raises(FileExistsError):
        save_adapters(path, ad, LCFG)
    loaded, cfg = load_adapters(path)
    assert cfg == LCFG and sorted(loaded) == sorted(ad)
    for k in ad:
        np.testing.assert_array_equal(loaded[k]["a"], np.asarray(ad[k]["a"]))
        np.testing.assert_array_equal(loaded[k]["b"], np.asarray(ad[k]["b"]))
    merged = merge_lora(m, loaded, cfg)
    assert isinstance(merged, jp.Llava) and merged.cfg == m.cfg
    b = batch()
    want = logits_of(m, jax.jit(lambda p, a: apply_lora(p, a, LCFG))(m.params, ad), b)
    got = logits_of(m, merged.params, b)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(want - logits_of(m, m.params, b)).max() > 1e-3  # the adapters do change the model
    # the merged model is a plain model: its own entry point gives the same logits
    np.testing.assert_allclose(np.asarray(merged(b["input_ids"], b["pixel_values"], b["valid"]).logits), got,
                               atol=1e-5, rtol=1e-5)
    # overwrite replaces atomically; a mismatched config file is reported
    save_adapters(path, ad, LCFG, overwrite=True)
    meta = json.loads((path / "lora_config.json").read_text())
    meta["adapters"] = meta["adapters"][:-1]
    (path / "lora_config.json").write_text(json.dumps(meta))
    with pytest.raises(LoraError, match="do not match"):
        load_adapters(path)


# ---- training through the cuts --------------------------------------------------------------------------
def test_map_labels_numpy():
    # row: t0 t1 [v v v v] t6 t7 pad; the cut keeps 2 of the 4 visual tokens
    vin = np.array([[0, 0, 1, 1, 1, 1, 0, 0, 0]], bool)
    vout = np.array([[0, 0, 1, 1, 0, 0, 0]], bool)
    labels = np.array([[-1, 5, -1, -1, -1, -1, 7, 8, -1]], np.int32)
    out = np.asarray(map_labels(jnp.asarray(labels), jnp.asarray(vin), jnp.asarray(vout), 4))
    np.testing.assert_array_equal(out, [[-1, 5, -1, -1, 7, 8, -1]])


def test_reduced_forward_is_the_inference_path_and_labels_follow():
    m = model()
    b = batch()
    mod = m.module
    logits, valid, vin, vout = jax.jit(lambda x: reduced_forward(mod, CUT.reducers, x["input_ids"], x["valid"],
                                                                 x["pixel_values"]))(b)
    ref = m(b["input_ids"], b["pixel_values"], b["valid"], reducer=CUT)
    T = ref.logits.shape[1]
    assert logits.shape[1] == b["input_ids"].shape[1] - P + 4
    np.testing.assert_allclose(np.asarray(logits)[:, :T], np.asarray(ref.logits), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(vout).sum(1), 4)
    # labels through the layout: every mapped label is the token that follows it in the reduced sequence
    labels = np.asarray(map_labels(jnp.asarray(b["labels"]), vin, vout, P))
    ids_out = np.asarray(map_labels(jnp.asarray(b["input_ids"]), vin, vout, P))
    assert (labels >= 0).sum() == (b["labels"] >= 0).sum()
    r, t = np.nonzero(labels >= 0)
    np.testing.assert_array_equal(labels[r, t], ids_out[r, t + 1])
    assert not (labels >= 0)[np.asarray(vout)].any()


def test_identity_schedule_loss_equals_full_model_loss():
    m = model()
    b = batch()
    ad = random_adapters(m)
    f = jax.jit(functools.partial(lora_loss, m.graphdef, LCFG), static_argnames=("reducer",))
    identity = adsc((1,), (P,))  # a cut that keeps every visual token
    got, (n, _) = f(ad, m.params, b, reducer=identity)

    def full(ad, params, b):
        from flax import nnx

        mm = nnx.merge(m.graphdef, apply_lora(params, ad, LCFG))
        pos = jnp.maximum(jnp.cumsum(b["valid"], 1) - 1, 0)
        return token_xent(llava_logits(mm, b["input_ids"], b["pixel_values"], b["valid"], pos), b["labels"])

    want, n_want, _ = jax.jit(full)(ad, m.params, b)
    assert int(n) == int(n_want) == 12
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


WORDS = ("what color is the square circle red blue green yes no there a in image how many where top left "
         "user assistant").split()


def write_instructions(dst: Path, n: int = 8) -> Path:
    """A tiny LLaVA instruction JSON + PNGs (non-square, so 'pad' preprocessing does something)."""
    import PIL.Image

    rng = np.random.default_rng(0)
    (dst / "img").mkdir(parents=True)
    recs = []
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(dst / "img" / f"{i}.png")
        q, a = [("What color is the square?", "red"), ("Is there a circle in the image?", "yes"),
                ("How many blue circle?", "two")][i % 3]
        recs.append({"id": str(i), "image": f"img/{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
    recs.append({"id": "text-only",
                 "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "no"}]})
    (dst / "data.json").write_text(json.dumps(recs))
    return dst / "data.json"


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    from jaxprune.eval.wordtok import word_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(WORDS, 64, CFG.image_token_index), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<unk>")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from experiments.train.adsc_lora import build_dataset
    from experiments.train.batches import read_llava_instructions

    path = write_instructions(tmp_path_factory.mktemp("instr"))
    return build_dataset(read_llava_instructions(path), path.parent, tokenizer(), CFG, 2048, 32)


@functools.lru_cache(maxsize=1)
def trainer():
    """Shared, so the step test and the training-loop test use one compiled step."""
    from experiments.train.adsc_lora import optimizer

    return LoraTrainer(model(), LCFG, optimizer(settings())[0])


def settings():
    from experiments.train.adsc_lora import TrainSettings

    # "final" budget 4 with cuts after (1, 2) of 36 tokens: rho = 1/3 -> keeps (12, 4) == CUT
    return TrainSettings(target=4, curriculum="constant", steps=4, batch_size=4, lr=3e-2, warmup=0.0,
                         budget_kind="final", layers=(1, 2), log_every=1)


def test_lora_adamw_step_lowers_the_loss_with_adsc_active(data):
    from experiments.train.adsc_lora import image_config, load_batch

    assert data.skipped == {"no_image": 1, "too_long": 0} and len(data.ids) == 8 and data.length % 32 == 0
    m = model()
    tr = trainer()
    ad, state = tr.init(init_lora(m, LCFG, jax.random.key(0)))
    raw = load_batch(data, np.arange(4), image_config(None, CFG), 0)
    assert raw["pixel_values"].shape == (4, 3, 12, 12)
    b = tr.shard(raw)
    losses = []
    for _ in range(4):  # the loss reported by a step is the one before its update
        ad, state, met = tr.step(ad, state, b, CUT)
        losses.append(float(met["loss"]))
    assert int(met["tokens"]) == 8  # answer + </s> per row
    assert losses[1] < losses[0] and losses[-1] < losses[0] - 0.05, losses
    assert tr.step_fn._cache_size() == 1  # one compile for the budget
    with pytest.raises(ValueError, match="image tokens per row"):
        raw["input_ids"][0, np.argmax(raw["input_ids"][0] == CFG.image_token_index)] = 1
        tr.shard(raw)


def test_training_loop_with_curriculum(data):
    from experiments.train.adsc_lora import image_config, train

    tr = trainer()
    n = tr.step_fn._cache_size()
    adapters, info = train(model(), tokenizer(), data, image_config(None, CFG), LCFG, settings(), tr,
                           log=lambda m: None)
    # the phase's reducer is CUT: one program in all, whether or not the step test compiled it first (xdist order)
    assert tr.step_fn._cache_size() == max(n, 1)
    assert info["budget_kind"] == "final" and info["phases"] == [
        {"start": 0, "stop": 4, "budget": 4, "layers": [1, 2], "keeps": [12, 4], "average": (36 + 12 + 4) / 3}]
    assert [r["step"] for r in info["steps"]] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in info["steps"])
    assert any(np.abs(v["b"]).max() > 0 for v in adapters.values())


_DP_SCRIPT = r"""
import json, sys
import jax, numpy as np, optax
sys.path.insert(0, sys.argv[1])
from jaxprune.eval import distributed as dist
from experiments.train.reduced import LoraTrainer
from jaxprune.lora import init_lora
from tests.test_lora import CUT, LCFG, batch, model
out = {"devices": jax.device_count()}
for n in (1, 2):
    tr = LoraTrainer(model(), LCFG, optax.adamw(3e-2), mesh=dist.make_mesh(n))
    ad, st = tr.init(init_lora(model(), LCFG, jax.random.key(0)))
    b = tr.shard(batch())
    ad, st, met = tr.step(ad, st, b, CUT)
    out[n] = {"loss": float(met["loss"]), "b": np.asarray(ad["language.layers.1.mlp.up_proj"]["b"]).tolist(),
              "sharding": str(b["input_ids"].sharding.spec)}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_data_parallel_step_matches_one_device():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _DP_SCRIPT, str(root)], capture_output=True, text=True, env=env,
                         cwd=root, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert out["devices"] == 2 and "data" in out["2"]["sharding"]
    np.testing.assert_allclose(out["2"]["loss"], out["1"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["2"]["b"]), np.asarray(out["1"]["b"]), atol=1e-6)


# ---- curriculum ----------------------------------------------------------------------------------------
def test_curriculum_parse_and_bounds():
    ph = cur.parse_curriculum("reverse", target=16)
    assert [(p.fraction, p.budget) for p in ph] == [(0.3, 8), (0.3, 12), (0.4, 16)]
    assert [p.budget for p in cur.parse_curriculum("forward", 8)] == [16, 12, 8]
    assert [p.budget for p in cur.parse_curriculum("0.5:20, 0.5:x1", 10)] == [20, 10]
    bounds = cur.phase_bounds(ph, 100)
    assert bounds == [(0, 30, 8), (30, 60, 12), (60, 100, 16)]
    assert [cur.budget_at(bounds, s) for s in (0, 29, 30, 59, 60, 99)] == [8, 8, 12, 12, 16, 16]
    with pytest.raises(IndexError):
        cur.budget_at(bounds, 100)
    assert cur.phase_bounds(ph, 3) == [(0, 1, 8), (1, 2, 12), (2, 3, 16)]  # every phase gets a step
    for bad, msg in (("0.5:8,0.4:4", "sum to"), ("1:x1", "target"), ("0.5:8;0.5:4", "FRACTION"),
                     ("1:0", "< 1 token"), ("0:8,1:4", "> 0"), ("", "empty")):
        with pytest.raises(ValueError, match=msg):
            cur.parse_curriculum(bad, None if msg == "target" else 8)
    with pytest.raises(ValueError, match="cannot hold"):
        cur.phase_bounds(ph, 2)


def test_budget_kinds():
    # LLaVA-1.5 (32 layers, 576): averages 192..64 are reachable, 32 is not (first cut after layer 2)
    assert cur.resolve_kind("auto", [192, 64], 32, 576) == "average"
    assert cur.resolve_kind("auto", [64, 32], 32, 576) == "final"
    r = cur.adsc_reducer(192, 32, 576, "average")
    assert cur.describe(r, 32, 576) == {"layers": [2, 8, 16], "keeps": [322, 180, 101], "average": 191.875}
    # a 4-layer decoder with 144 tokens (the synthvqa model): cuts after (1, 2); "final" = tokens after the last
    assert cur.resolve_kind("auto", [16, 8], 4, 144) == "final"
    d = cur.describe(cur.adsc_reducer(8, 4, 144, "final"), 4, 144)
    assert d["layers"] == [1, 2] and d["keeps"] == [34, 8] and d["average"] == (144 + 34 + 2 * 8) / 4
    assert cur.final_plan(16, 32, 576) == ((2, 8, 16), (174, 53, 16))  # rho = (16/576) ** (1/3)
    with pytest.raises(ValueError):
        cur.resolve_kind("mean", [8], 4, 144)
