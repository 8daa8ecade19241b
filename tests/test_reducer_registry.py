"""Reducer registration: each method file registers itself, the package discovers the files, and every spec
declares how its budget spreads over segments (``per_segment``)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import sys
import textwrap

import pytest

import jaxprune.reducers as R
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.reducers import BudgetError, registry
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
    from jaxprune.reducers.adsc import drop_noops, default_layers
    from jaxprune.reducers.pyramiddrop import AVERAGE_LAYERS, scale_layers

    def depth(c):
        return c.text.num_hidden_layers

    def pdrop_final(b, c):
        layers = scale_layers(AVERAGE_LAYERS, depth(c))
        layers, keeps = drop_noops(layers, registry.final_keeps(b, c.tokens_per_image, len(layers)),
                                    c.tokens_per_image)
        return R.compose(*(R.PyramidDropCut(layer=l, keep=k) for l, k in zip(layers, keeps)))

    def adsc_final(b, c):
        layers = default_layers(depth(c))
        return R.adsc(*drop_noops(layers, registry.final_keeps(b, c.tokens_per_image, len(layers)),
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
        assert R.Toy(8).per_segment(4) == R.Toy(2)  # the default per-segment rule comes with the base class
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


# ---------------------------------------------------------------------------------------------------
# per_segment: the declared rule. Reference: the field-name rule it replaces (``per_crop_spec`` as of 26c9b7b),
# transcribed here so the check survives that function being switched to ``r.per_segment(n)``.
def _per_crop_spec_by_field_names(r, n: int):
    name = type(r).__name__
    fields = {f.name for f in dataclasses.fields(r)} if dataclasses.is_dataclass(r) else set()
    if "window" in fields:
        return r
    if {"dominant", "contextual"} <= fields:
        d, c = r.dominant, r.contextual
        t = (d + c) // n
        if t < 2:
            raise BudgetError(f"{name}: dominant={d} + contextual={c} over {n} crops leaves {t} token(s) per crop; "
                              "a per-crop split needs >= 2 (one dominant incl. CLS + one contextual)")
        c2 = max(1, (2 * c * t + (d + c)) // (2 * (d + c)))
        c2 = min(c2, t - 1)
        return dataclasses.replace(r, dominant=t - c2, contextual=c2)
    if "budget" in fields and r.budget is not None:
        b = r.budget // n
        if b < 1:
            raise BudgetError(f"{name}.budget={r.budget} over {n} crops leaves no token per crop")
        return dataclasses.replace(r, budget=b)
    return r


def _live_per_crop_spec():
    for mod in ("jaxprune.families.llava_next", "jaxprune.reducers.plan_next"):
        try:
            return importlib.import_module(mod).per_crop_spec
        except (ImportError, AttributeError):
            continue
    return None


def _pre_llm_specs():
    """Every registered vision/projector-stage reducer at a few budgets, plus the pooling controls."""
    specs = []
    for name in registry.names():
        for b in (2, 3, 7, 16, 48, 64, 143, 640):
            try:
                r = registry.make(name, b, E2E_CFG)
            except BudgetError:
                continue
            if getattr(r, "stage", None) in ("vision", "projector"):
                specs.append(r)
    specs += [R.pool2x2(), R.pool(3), R.pool2x2(budget=36), R.visionzip(54, 10), R.visionzip(540, 100)]
    return specs


def test_per_segment_equals_the_field_name_rule_for_every_pre_llm_reducer():
    specs = _pre_llm_specs()
    kinds = {type(r).__name__ for r in specs}
    assert {"FasterVLM", "VisionZip", "VisionDropVision", "AdaFV", "DivPrune", "ConsensusDrop", "RandomPrune",
            "Uniform", "Pool"} <= kinds, kinds
    live = _live_per_crop_spec()
    for r in specs:
        for n in (1, 2, 3, 5, 9):
            got = _outcome(r.per_segment, n)
            assert got == _outcome(_per_crop_spec_by_field_names, r, n), (r, n, got)
            if live is not None:
                assert got == _outcome(live, r, n), (r, n, got)
    assert R.visionzip(540, 100).per_segment(5) == R.visionzip(108, 20)
    assert R.fastervlm(640).per_segment(5) == R.fastervlm(128)
    with pytest.raises(BudgetError, match="over 5 crops leaves no token per crop"):
        R.fastervlm(4).per_segment(5)


def test_per_segment_is_declared_not_inferred():
    # a spec without a budget field has no rule unless it declares one (in-LLM cuts count the row's pool)
    with pytest.raises(NotImplementedError, match="FastV declares no per-segment budget rule"):
        R.fastv(layer=2, keep=64).per_segment(2)
    # the pool keeps its fixed per-segment output even though it has a (optional) budget field
    assert R.pool2x2(budget=36).per_segment(4) is not None and R.pool2x2(budget=36).per_segment(4).budget == 36
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive Python int"):
            R.fastervlm(8).per_segment(bad)
