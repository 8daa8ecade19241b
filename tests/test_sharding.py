"""Tensor-parallel x data-parallel placement (jaxprune.sharding) gives the unsharded model's answers.

The multi-device part runs once, in a subprocess with 8 simulated CPU devices (the device count is fixed when
a JAX backend starts), and reports JSON that the tests below check: logits within 1e-5 (relative to the
largest logit), identical greedy tokens, with and without reducers (FastV in the LLM, VisionZip in the tower),
on LLaVA-1.5 (GQA decoder) and LLaVA-NeXT, for meshes data=2 x model=4 and data=4 x model=2; parameters
really split (shard shapes); sharded random init bit-identical to the unsharded one. Errors that need no
devices run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxprune.config import LlavaConfig, TextConfig, VisionConfig

ROOT = Path(__file__).resolve().parents[1]


def gqa_config() -> LlavaConfig:
    """Tiny LLaVA-1.5 with a GQA decoder (8 query / 4 K/V heads) and a 4-head CLIP: splits over 1, 2, 4."""
    return LlavaConfig(vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=42, patch_size=7),
                       text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                                       eos_token_id=(2,), pad_token_id=0),
                       image_token_index=255)


_SCRIPT = r"""
import json, sys
import jax, numpy as np
import jaxprune as jp
from jaxprune import sharding as S
from experiments import bench_next
from experiments.bench_forward import make_inputs
from tests.test_sharding import gqa_config

out = {"devices": jax.device_count()}
cfg = gqa_config()
ref = S.random_model(cfg, None, seed=0)
ids, mask, px = make_inputs(cfg, 4)
mask[1, :3] = 0  # a left-padded row
fastv, vzip = jp.reducers.fastv(layer=2, keep=12), jp.reducers.visionzip.for_budget(12)
NEW = 3

def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))

def runs(m, reducers):
    r = {"full": np.asarray(m(ids, px, mask).logits), "full_tokens": np.asarray(m.generate(ids, px, mask, max_new_tokens=NEW))}
    if reducers:
        r["fastv_tokens"] = np.asarray(m.generate(ids, px, mask, reducer=fastv, max_new_tokens=NEW))
        r["visionzip"] = np.asarray(m(ids, px, mask, reducer=vzip).logits)
    return r

want = runs(ref, True)
# 2 x 4: initialised straight into the shards; 4 x 2: an existing model placed with shard_model
meshes = {"2x4": S.random_model(cfg, S.make_mesh(data=2, model=4), seed=0),
          "4x2": S.shard_model(ref, S.make_mesh(data=4, model=2))}
for name, sm in meshes.items():
    got = runs(sm, name == "2x4")
    res = {"identical_params": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                                   zip(jax.tree.leaves(ref.params), jax.tree.leaves(sm.params))),
           "describe": S.describe(sm), "logits_spec": list(sm(ids, px, mask).logits.sharding.spec)}
    for k, v in got.items():
        res[k] = bool((v == want[k]).all()) if k.endswith("tokens") else rel(want[k], v)
    out[name] = res
# per-shape init (bench_gpu at 7B): same values on a mesh as on one device, same placement as init_params
ps_ref = S.random_model(cfg, None, seed=0, init="per_shape")
ps = S.random_model(cfg, S.make_mesh(data=2, model=4), seed=0, init="per_shape")
out["per_shape"] = {"identical_params": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                                            zip(jax.tree.leaves(ps_ref.params), jax.tree.leaves(ps.params))),
                    "same_describe": S.describe(ps) == out["2x4"]["describe"],
                    "full": rel(ps_ref(ids, px, mask).logits, ps(ids, px, mask).logits)}
try:
    meshes["2x4"](ids[:3], px[:3], mask[:3])
except S.ShardingError as e:
    out["batch_error"] = str(e)

# LLaVA-NeXT (anyres packing, per-crop tower)
ncfg = bench_next.next_config(tiny=True)
nref = S.random_model(ncfg, None, seed=0)
nsm = S.shard_model(nref, S.make_mesh(data=2, model=4))
nids, npx, sizes, _ = bench_next.make_inputs(ncfg, 2)
out["next_full"] = rel(nref(nids, npx, image_sizes=sizes).logits, nsm(nids, npx, image_sizes=sizes).logits)
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight():
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    p = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=1800, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("mesh", ["2x4", "4x2"])
def test_sharded_equals_unsharded(eight, mesh):
    assert eight["devices"] == 8
    res = eight[mesh]
    assert res["full"] < 1e-5 and res["full_tokens"], res
    if mesh == "2x4":  # reducers: FastV (cut inside the sharded decoder), VisionZip (inside the CLIP tower)
        assert res["fastv_tokens"] and res["visionzip"] < 1e-5, res
    assert res["identical_params"]  # sharded jitted init / placement == unsharded values, bit for bit
    assert res["logits_spec"][0] == "data"


@pytest.mark.parametrize("mesh,model", [("2x4", 4), ("4x2", 2)])
def test_params_really_sharded(eight, mesh, model):
    d = {k: (tuple(v[0]), tuple(v[1])) for k, v in eight[mesh]["describe"].items()}
    cfg = gqa_config()
    H, inter, q = cfg.text.hidden_size, cfg.text.intermediate_size, 8 * 8
    col, row = (None, "model"), ("model", None)
    assert d["language.layers.0.self_attn.q_proj.kernel"] == (col, (H, q // model))
    assert d["language.layers.2.self_attn.k_proj.kernel"] == (col, (H, 32 // model))
    assert d["language.layers.1.self_attn.o_proj.kernel"] == (row, (q // model, H))
    assert d["language.layers.2.mlp.down_proj.kernel"] == (row, (inter // model, H))
    assert d["language.embed_tokens.embedding"] == (col, (256, H // model))
    assert d["lm_head.kernel"] == (col, (H, 256 // model))
    assert d["vision.layers.0.mlp.fc1.kernel"] == (col, (32, 64 // model))
    assert d["vision.layers.0.self_attn.q_proj.bias"] == (("model",), (32 // model,))
    assert d["language.norm.scale"] == ((), (H,))


def test_per_shape_init_sharded(eight):
    """bench_gpu's fast-compiling init: bit-identical values sharded and unsharded, same parameter placement."""
    res = eight["per_shape"]
    assert res["identical_params"] and res["same_describe"] and res["full"] < 1e-5, res


def test_other_entry_points(eight):
    assert "3 rows" in eight["batch_error"] and "data axis of size 2" in eight["batch_error"]
    assert eight["next_full"] < 1e-5


def test_divisibility_errors():
    from jaxprune import sharding as S

    cfg = gqa_config()
    with pytest.raises(S.ShardingError, match=r"num_key_value_heads=4 is not divisible by the model axis size 8"):
        S.partition_specs(cfg, 8)
    with pytest.raises(S.ShardingError, match=r"num_key_value_heads=4 is not divisible by the model axis size 3"):
        S.partition_specs(cfg, 3)
    odd = LlavaConfig(vision=VisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                          num_attention_heads=3, image_size=28, patch_size=7),
                      text=TextConfig(vocab_size=100, hidden_size=32, intermediate_size=51, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8),
                      image_token_index=99)
    with pytest.raises(S.ShardingError, match=r"intermediate_size=51 is not divisible by the model axis size 2"):
        S.partition_specs(odd, 2)
    ok = LlavaConfig(vision=odd.vision, text=TextConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                                         num_hidden_layers=1, num_attention_heads=4,
                                                         num_key_value_heads=2, head_dim=8), image_token_index=99)
    specs = S.partition_specs(ok, 2)  # CLIP: 3 heads -> replicated under 'auto'; vocab 100 splits over 2
    assert tuple(specs["vision.layers.0.self_attn.q_proj.kernel"]) == ()
    assert tuple(specs["language.layers.0.self_attn.k_proj.kernel"]) == (None, "model")
    with pytest.raises(S.ShardingError, match=r"vision_config.num_attention_heads=3.*not divisible by 2"):
        S.partition_specs(ok, 2, vision="shard")
    assert tuple(S.partition_specs(ok, 2)["lm_head.kernel"]) == (None, "model")
    assert tuple(S.partition_specs(ok, 2)["vision.layers.0.mlp.fc1.kernel"]) == ()
    with pytest.raises(S.ShardingError, match="vision='bogus'"):
        S.partition_specs(ok, 2, vision="bogus")
    with pytest.raises(S.ShardingError, match="needs 64 devices"):
        S.make_mesh(data=8, model=8)


def test_from_params_places_host_arrays():
    """Checkpoint path: canonical flat host arrays -> shards (one device here; the layout logic is shared)."""
    import jax
    import numpy as np

    import jaxprune as jp
    from jaxprune import sharding as S

    cfg = gqa_config()
    flat = jp.Llava.random(cfg, seed=0).flat_params()
    sm = S.from_params(cfg, flat, S.make_mesh())
    assert isinstance(sm, S.ShardedLlava) and isinstance(sm, jp.Llava)
    got = sm.flat_params()
    assert set(got) == set(flat) and all(np.array_equal(got[k], flat[k]) for k in flat)
    leaf = jax.tree.leaves(sm.params)[0]
    assert tuple(leaf.sharding.mesh.axis_names) == ("data", "model")
    with pytest.raises(ValueError, match="missing"):
        S.from_params(cfg, {k: v for k, v in flat.items() if k != "lm_head.kernel"}, S.make_mesh())
