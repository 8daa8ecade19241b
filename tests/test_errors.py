"""Every error class jaxprune raises is importable from ``jaxprune`` and keeps a sensible base class."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import jaxprune as jp

PKG = Path(jp.__file__).resolve().parent
REPO = PKG.parent

#: Top-level name -> the built-in base it must keep (so ``except ValueError`` keeps working).
BASES = {
    "JaxpruneError": Exception,
    "ConfigError": ValueError,
    "InputError": ValueError,
    "ShardingError": ValueError,
    "LoraError": ValueError,
    "BudgetError": ValueError,
    "CheckpointError": Exception,
    "ConvertError": Exception,
    "CheckpointFileError": Exception,
    "ParamMismatchError": Exception,
    "DestinationExistsError": Exception,
    "EvalError": Exception,
    "ItemError": Exception,
    "EvalConfigError": Exception,
    "BenchmarkFormatError": ValueError,
    "UnknownBenchmarkError": ValueError,
    "MissingAnswersError": ValueError,
}
#: Families: every checkpoint error is a CheckpointError, every harness error an EvalError.
FAMILIES = {
    "CheckpointError": ("ConvertError", "CheckpointFileError", "ParamMismatchError", "DestinationExistsError"),
    "EvalError": ("ItemError", "EvalConfigError"),
}


def _defined_error_classes() -> list[tuple[str, str]]:
    """(module, class) for every ``class ...Error`` / ``...Exception`` defined in the jaxprune package."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and re.search(r"(Error|Exception)$", node.name):
                if not node.name.startswith("_"):
                    found.append((module, node.name))
    return found


def test_every_error_class_is_exported():
    exported = {id(getattr(jp, name)) for name in jp.ERRORS}
    missing = []
    for module, name in _defined_error_classes():
        cls = getattr(importlib.import_module(module), name)
        if id(cls) not in exported:
            missing.append(f"{module}.{name}")
    assert not missing, f"error classes not importable from jaxprune (add them to jaxprune.ERRORS): {missing}"
    assert set(jp.ERRORS) == set(BASES)


@pytest.mark.parametrize("name", sorted(BASES))
def test_error_importable_with_its_base(name):
    mod = importlib.import_module("jaxprune")
    cls = getattr(mod, name)
    assert isinstance(cls, type) and issubclass(cls, BASES[name]), cls.__mro__
    assert name in jp.__all__ and name in dir(jp)
    ns: dict = {}
    exec(f"from jaxprune import {name} as imported", ns)
    assert ns["imported"] is cls


@pytest.mark.parametrize("name", sorted(BASES))
def test_error_is_a_jaxprune_error(name):
    assert issubclass(getattr(jp, name), jp.JaxpruneError)


def test_error_families():
    for base, members in FAMILIES.items():
        for m in members:
            assert issubclass(getattr(jp, m), getattr(jp, base)), m
    assert jp.ConvertError is jp.CheckpointError  # the former name
    import jaxprune.eval

    assert jp.EvalConfigError is jaxprune.eval.ConfigError and jp.EvalError is jaxprune.eval.EvalError
    assert jp.EvalConfigError is not jp.ConfigError  # the eval harness' and the model config's are distinct


def test_jaxprune_never_imports_checkpoints_convert():
    """Imports flow ``checkpoints_convert -> jaxprune`` only (lazy, function-level imports included)."""
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "checkpoints_convert" or n.startswith("checkpoints_convert.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_import_jaxprune_stays_light():
    code = ("import sys, jaxprune, jaxprune.checkpoints; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('checkpoints_convert', 'orbax', 'torch', "
            "'transformers', 'experiments') or m.startswith('jaxprune.eval')]; print(bad); assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
