"""Reducer registration: each method file registers itself and the package discovers the files."""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap

import pytest

import jaxprune.reducers as R
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.reducers import registry
from tests.reducer_testlib import E2E_CFG

# ``jaxprune.reducers.__all__`` before registration moved into the method files (commit 26c9b7b).
OLD_ALL = [
    "ADSCCut", "AdaFV", "BudgetError", "Compose", "ConsensusDrop", "DART", "DivPrune", "FastV", "FasterVLM",
    "LLMContext", "LLMReduced", "NextOptions", "next_options", "Pool", "ProjectorContext", "PyramidDropCut",
    "RandomPrune", "Reduced", "Uniform", "VisionContext", "VisionDropCut", "VisionDropVision", "VisionZip", "adafv",
    "adsc", "adsc_plan", "adsc_schedule", "compose", "consensusdrop", "dart", "divprune", "fastervlm", "fastv", "pool",
    "pool2x2", "pyramiddrop", "pyramiddrop_for_average", "random_prune", "uniform", "visiondrop", "visiondrop_llm",
    "visiondrop_released", "visiondrop_schedule", "visiondrop_vision", "visionzip",
    "complement_indices", "cosine_similarity", "gather", "merge_into", "select_topk", "uniform_indices",
]

# 32 decoder layers, 576 visual tokens (LLaVA-1.5-7B's counts on a tiny width).
CFG_32 = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        image_size=336, patch_size=14),
    text=TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=32,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8),
    image_token_index=60)


def _old_table():
    """The central ``_FACTORIES`` table as it was (registry.py @ 26c9b7b), written with the public API."""
    from jaxprune.reducers.adsc import _drop_noops, default_layers
    from jaxprune.reducers.pyramiddrop import AVERAGE_LAYERS, scale_layers

    def depth(c):
        return c.text.num_hidden_layers

    def pdrop_final(b, c):
        layers = scale_layers(AVERAGE_LAYERS, depth(c))
        layers, keeps = _drop_noops(layers, registry.final_keeps(b, c.tokens_per_image, len(layers)),
                                    c.tokens_per_image)
        return R.compose(*(R.PyramidDropCut(layer=l, keep=k) for l, k in zip(layers, keeps)))

    def adsc_final(b, c):
        layers = default_layers(depth(c))
        return R.adsc(*_drop_noops(layers, registry.final_keeps(b, c.tokens_per_image, len(layers)),
                                   c.tokens_per_image))

    return {
        "fastervlm": lambda b, c: R.fastervlm(b),
        "visionzip": lambda b, c: R.visionzip.for_budget(b),
        "visiondrop_vision": lambda b, c: R.VisionDropVision.for_budget(b),
        "adafv": lambda b, c: R.adafv(b),
        "divprune": lambda b, c: R.divprune(b),
        "consensusdrop": lambda b, c: R.consensusdrop(b),
        "consensusdrop_proxy": lambda b, c: R.consensusdrop(b, source="proxy"),
        "random": lambda b, c: R.random_prune(b),
        "uniform": lambda b, c: R.uniform(b),
        "fastv": lambda b, c: R.fastv(layer=2, keep=b),
        "dart": lambda b, c: R.dart(layer=2, keep=b),
        "pyramiddrop": lambda b, c: R.pyramiddrop_for_average(b, num_layers=depth(c), total=c.tokens_per_image),
        "visiondrop": lambda b, c: R.visiondrop_schedule(b, num_layers=depth(c)),
        "adsc": lambda b, c: R.adsc_schedule(b, num_layers=depth(c), total=c.tokens_per_image),
        "pyramiddrop_final": pdrop_final,
        "adsc_final": adsc_final,
        "adsc_grid": lambda b, c: R.adsc_schedule(b, num_layers=depth(c), total=c.tokens_per_image, mode="grid"),
    }


def _outcome(f, *args):
    try:
        return ("ok", f(*args))
    except Exception as e:  # noqa: BLE001 -- the same error is part of "identical"
        return (type(e).__name__, str(e))


# ---------------------------------------------------------------------------------------------------
def test_public_names_are_a_superset_of_the_old_ones():
    missing = sorted(set(OLD_ALL) - set(R.__all__))
    assert not missing, missing
    for name in R.__all__:
        assert getattr(R, name) is not None
    assert callable(R.visionzip) and R.visionzip.for_budget(64) == R.VisionZip(54, 10)  # the function, not the module
    assert inspect.ismodule(R.registry)


@pytest.mark.parametrize("cfg", [E2E_CFG, CFG_32], ids=["4x144", "32x576"])
def test_names_and_specs_identical_to_the_old_table(cfg):
    old = _old_table()
    assert set(old) <= set(registry.names())
    for name, factory in old.items():
        for b in (8, 16, 32, 48, 64, 100, 128, 192):
            assert _outcome(registry.make, name, b, cfg) == _outcome(factory, b, cfg), (name, b)


def test_registry_is_only_the_mechanism():
    tree = ast.parse(inspect.getsource(registry))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("jaxprune")} <= {"jaxprune.reducers.base"}, imported
    with pytest.raises(ValueError, match="unknown reducer 'nope'; known reducers: adafv, adsc"):
        registry.make("nope", 8, E2E_CFG)


def test_decorator_and_call_forms(monkeypatch):
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))

    @registry.register("test_dec")
    def f(b, c):
        return R.fastervlm(b)

    assert f(3, None) == R.fastervlm(3)  # returned unchanged
    registry.register("test_call", lambda b, c: R.uniform(b))
    assert registry.make("test_dec", 5, E2E_CFG) == R.fastervlm(5)
    assert registry.make("test_call", 5, E2E_CFG) == R.uniform(5)
    assert {"test_dec", "test_call"} <= set(registry.names())
    with pytest.raises(TypeError):
        registry.register("bad", 3)


def test_a_new_file_is_discovered(tmp_path, monkeypatch):
    """A module dropped next to the methods registers itself and exports its ``__all__``; no other edit."""
    (tmp_path / "toy_method.py").write_text(textwrap.dedent('''
        import dataclasses
        from jaxprune.reducers.base import ReducerBase
        from jaxprune.reducers.registry import register

        @dataclasses.dataclass(frozen=True)
        class Toy(ReducerBase):
            budget: int

        def toy(budget):
            return Toy(budget)

        register("toy", lambda b, c: toy(b))
        __all__ = ["Toy", "toy"]
    '''))
    (tmp_path / "_toy_helper.py").write_text("raise RuntimeError('private modules are not discovered')\n")
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    monkeypatch.setattr(R, "__path__", [*R.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "jaxprune.reducers.toy_method", raising=False)
    before = dict(vars(R))
    try:
        names = R._discover()
        assert "toy" in registry.names() and registry.make("toy", 7, E2E_CFG).budget == 7
        assert {"Toy", "toy"} <= set(names) and R.toy(3) == R.Toy(3)
        assert set(OLD_ALL) <= set(names)
    finally:
        for k in set(vars(R)) - set(before):
            delattr(R, k)
        sys.modules.pop("jaxprune.reducers.toy_method", None)


def test_two_files_exporting_one_name_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "zz_clash.py").write_text("def fastv():\n    pass\n\n__all__ = ['fastv']\n")
    monkeypatch.setattr(R, "__path__", [*R.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "jaxprune.reducers.zz_clash", raising=False)
    fastv = R.fastv
    try:
        with pytest.raises(ImportError, match="zz_clash exports 'fastv'"):
            R._discover()
    finally:
        R.fastv = fastv
        sys.modules.pop("jaxprune.reducers.zz_clash", None)
        if hasattr(R, "zz_clash"):
            delattr(R, "zz_clash")
