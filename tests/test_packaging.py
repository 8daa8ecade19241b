"""What ``pip install .`` ships: the library packages only (never ``experiments``), the trained synthvqa model as
package data (the default job's model), the console script, and a core install without torch / optax /
matplotlib (those are extras; the library imports them lazily)."""

from __future__ import annotations

import ast
import email
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "jaxprune"
CKPT = PKG / "eval" / "synthvqa" / "checkpoint"
OPTIONAL = ("torch", "optax", "matplotlib")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_packages_script_and_extras():
    p = _pyproject()
    assert p["tool"]["setuptools"]["packages"]["find"]["include"] == ["jaxprune*", "checkpoints_convert*"]
    assert p["project"]["scripts"] == {"jaxprune-eval": "jaxprune.eval.cli:main"}
    core = " ".join(p["project"]["dependencies"])
    assert not any(name in core for name in OPTIONAL), core
    extras = p["project"]["optional-dependencies"]
    assert extras["train"] == ["optax>=0.2.5"] and extras["plot"] == ["matplotlib>=3.7"]
    assert "torch==2.13.0" in extras["test"] and not [d for d in extras["test"] if d.startswith("torch") and
                                                       d != "torch==2.13.0"]
    assert any(d.startswith("jaxprune[") and "train" in d and "plot" in d for d in extras["test"])


def test_library_never_imports_experiments_and_optional_deps_lazily():
    """Imports flow experiments -> jaxprune; torch / optax / matplotlib only inside functions (optional)."""
    back, eager = [], []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if any(n.split(".")[0] == "experiments" for n in names):
                back.append(where)
            if id(node) in top and any(n.split(".")[0] in OPTIONAL for n in names):
                eager.append(where)
    assert not back, back
    assert not eager, eager


def test_checkpoint_is_package_data():
    globs = _pyproject()["tool"]["setuptools"]["package-data"]["jaxprune.eval.synthvqa"]
    shipped = {p for g in globs for p in (PKG / "eval" / "synthvqa").glob(g)}
    files = {p for p in CKPT.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert (CKPT / "config.json") in files and (CKPT / "model.safetensors") in files
    assert files == shipped, sorted(map(str, files - shipped))


def test_wheel_contents(tmp_path):
    """Build the wheel from a copy of the sources (nothing is written into the checkout)."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("jaxprune", "checkpoints_convert", "experiments"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp_path / "dist").glob("jaxprune-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        assert {n.split("/")[0] for n in names if not n.startswith("jaxprune-")} == {"jaxprune",
                                                                                      "checkpoints_convert"}
        for f in CKPT.iterdir():
            if f.is_file():
                assert z.read(f"jaxprune/eval/synthvqa/checkpoint/{f.name}") == f.read_bytes(), f.name
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(z.read(info))
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "jaxprune-eval = jaxprune.eval.cli:main" in entry
    core = [d for d in meta.get_all("Requires-Dist") if "extra ==" not in d]
    assert core and not [d for d in core if d.split()[0].split(">")[0].split("=")[0] in OPTIONAL], core
