"""Architecture rules of DESIGN.md, checked statically (``ast`` only: nothing of the project is imported).

    "imports flow experiments / checkpoints_convert -> jaxprune, never back, with no cycles inside,
     and a module's _private names stay in its package."

Scope: every ``.py`` file under ``jaxprune/``, ``checkpoints_convert/`` and ``experiments/`` (notebooks and
``tests/`` are not covered). Every analysis function takes the root directory, so each rule is also tested on a
small synthetic tree built in ``tmp_path``.

Rule 1 -- import graph (:func:`import_graph`, :func:`import_cycles`, :func:`direction_violations`)
-------------------------------------------------------------------------------------------------
Nodes are modules (``pkg/__init__.py`` is the node ``pkg``). Every ``import`` / ``from ... import`` statement
anywhere in a file counts -- module level and inside functions, methods, ``if TYPE_CHECKING:`` blocks alike (a lazy
import hides a cycle, it does not remove it) -- as does ``importlib.import_module("<literal>")``. Relative imports
are resolved against the importer's package. ``from P import n`` targets ``P.n`` when ``P/n.py`` or
``P/n/__init__.py`` exists, else ``P`` (``n`` is read from ``P``'s namespace). Imports the analysis cannot see:
``importlib.import_module`` with a computed name (``jaxprune.__getattr__``'s ``_LAZY`` table,
``jaxprune.reducers._discover``, ``jaxprune.eval.benchmarks.base.get_benchmark``).

Package ``__init__`` modules. Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so an import
of ``a.b.c`` is an edge to ``a.b.c`` *and* to the ``__init__`` of each parent package -- except the parent
packages that contain the importer itself. Those were initialised (or are being initialised, further up the
stack) before the importer's first line ran; Python merely finds them in ``sys.modules``, runs nothing and reads
nothing from them. Counting them anyway (the naive rule) turns the ordinary pattern

    pkg/__init__.py:  from pkg.sub import f        (re-export)
    pkg/sub.py:       from pkg import other        (or ``import pkg.other``; ``other`` a submodule)

into a false cycle ``pkg -> pkg.sub -> pkg``: ``pkg.sub`` reaches ``pkg.other`` through the import system, not
through the half-built ``pkg`` namespace. For the same reason ``import pkg`` / ``import pkg.x as y`` naming an
enclosing package as such (only binding it) is no edge to that package's ``__init__``. What stays an edge to an
enclosing package is ``from pkg import name`` where ``name`` is *not* a submodule: that reads ``pkg``'s namespace
at import time, and while ``pkg/__init__`` is still running (it imported us) ``name`` may not exist yet -- the
"partially initialized module" ImportError, or a silent dependence on the order of ``__init__``'s lines.
A parent package outside the importer stays an edge too (its ``__init__`` really runs, and may import back); the
failure message marks such hops "runs its __init__ to import <submodule>".

A cycle is a strongly connected component of more than one module in this graph (self-edges are dropped);
the failure message prints, per component, one shortest cycle hop by hop with ``file:line`` (``lazy`` marks an
import inside a function), and every other edge inside the component.

Direction: nothing in ``jaxprune/`` imports ``checkpoints_convert`` or ``experiments``; nothing in
``checkpoints_convert/`` imports ``experiments`` (any import statement, anywhere in the file).

Rule 2 -- private names stay in their package (:func:`private_violations`, :func:`internals_violations`)
-------------------------------------------------------------------------------------------------------
A name is private when it starts with ``_`` and is neither a dunder nor ``_`` alone. Its *owner* is the directory
of the file that defines it: ``_x`` defined in ``a/b/m.py`` or in ``a/b/__init__.py`` is owned by ``a/b/`` and a
private module or subpackage ``a/b/_m(.py)`` too. A module may use a private name only when the module's own
directory is the owner (a package uses its own private helpers and modules freely:
``jaxprune/reducers/x.py`` -> ``jaxprune.reducers._core`` is fine, ``experiments/x.py`` -> it is not), or when the
module lives inside the private subpackage itself ("same package" = same directory: ``jaxprune/eval/benchmarks/``
may not use ``jaxprune/eval/``'s privates either). Checked uses, for project modules only (third-party privates
such as ``jax._src`` are out of scope):

* ``from a.b import _x`` (private name or private module), ``from a._m import x``, ``import a.b._m``: every
  private component of the module path and every private imported name;
* ``mod._x`` / ``mod._m.y`` where ``mod`` is a name the file binds to a project module by an import anywhere in
  the file (scope-insensitive: a local variable shadowing an imported module's name would be misread).

Attribute access on objects whose type is unknown is not checked in general, but one targeted check covers the
model internals: under ``experiments/``, ``checkpoints_convert/`` and ``jaxprune/eval/`` no code (docstrings and
comments excluded) may access an attribute ``._prefill``, ``._decode``, ``._forward``, ``._reduced_jits``,
``._jitted`` (exact names: ``self._decoder`` is another name), nor spell one in a string (``getattr(m,
"_jitted")``, ``m.__dict__["_reduced_jits"]``, ``"pkg.mod._prefill"``).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOPS = ("jaxprune", "checkpoints_convert", "experiments")
#: top-level package -> top-level packages it must never import
FORBIDDEN = {"jaxprune": {"checkpoints_convert", "experiments"}, "checkpoints_convert": {"experiments"}}
#: directories whose code must not touch model internals, and the internals
INTERNALS_DIRS = ("experiments", "checkpoints_convert", "jaxprune/eval")
INTERNALS = ("_prefill", "_decode", "_forward", "_reduced_jits", "_jitted")


# ------------------------------------------------------------------------------------------------ discovery

def discover(root: Path, tops=TOPS) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under ``root/<top>`` (``pkg/__init__.py`` is ``pkg``)."""
    mods: dict[str, Path] = {}
    for top in tops:
        base = root / top
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root)
            if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def is_private(name: str) -> bool:
    return name.startswith("_") and name != "_" and not (name.startswith("__") and name.endswith("__"))


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@dataclass(frozen=True)
class Imp:
    """One import: ``target`` is the absolute module path named by the statement (``from P import ...``: ``P``);
    ``names`` the imported names for ``from`` imports (``None`` for ``import``)."""
    line: int
    lazy: bool
    target: str
    names: tuple[str, ...] | None
    asnames: tuple[str | None, ...] = ()


def _lazy_nodes(tree: ast.Module) -> set[int]:
    """Ids of the import nodes that sit inside a function or lambda."""
    lazy: set[int] = set()

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom, ast.Call)) and inside:
                lazy.add(id(child))
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return lazy


def _resolve_relative(importer: str, is_pkg: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, tree: ast.Module | None = None) -> list[Imp]:
    """Every import in the file (statements anywhere + ``importlib.import_module`` with a literal name)."""
    tree = tree or _parse(path)
    is_pkg = path.name == "__init__.py"
    lazy = _lazy_nodes(tree)
    out: list[Imp] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append(Imp(node.lineno, id(node) in lazy, a.name, None, (a.asname,)))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(name, is_pkg, node.level, node.module)
            out.append(Imp(node.lineno, id(node) in lazy, target, tuple(a.name for a in node.names),
                           tuple(a.asname for a in node.names)))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if fname == "import_module":
                target = node.args[0].value
                if target.startswith("."):
                    pkg = next((k.value for k in node.keywords if k.arg == "package"
                                and isinstance(k.value, ast.Constant)), None)
                    if pkg is None and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                        pkg = node.args[1].value
                    if not pkg:
                        continue
                    level = len(target) - len(target.lstrip("."))
                    target = _resolve_relative(pkg, True, level, target.lstrip(".") or None)
                out.append(Imp(node.lineno, id(node) in lazy, target, None, (None,)))
    return sorted(out, key=lambda i: i.line)


# ------------------------------------------------------------------------------------------------ rule 1

@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    file: str
    line: int
    lazy: bool
    via: str = ""     # set when the edge is a parent package's __init__, run to import the submodule ``via``

    def __str__(self):
        how = f"; runs its __init__ to import {self.via}" if self.via else ""
        return f"{self.src} -> {self.dst}  ({self.file}:{self.line}{', lazy' if self.lazy else ''}{how})"


def _ancestors(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path, naive: bool = False) -> dict[str, list[Edge]]:
    """Module -> its edges to project modules (see the module docstring for the rule on ``__init__``).

    ``naive=True``: every parent package of every target is an edge, and so is every import naming a package,
    enclosing or not (the rule this file rejects; kept to show the difference)."""
    mods = discover(root)
    graph: dict[str, list[Edge]] = {m: [] for m in mods}
    for src, path in mods.items():
        rel = str(path.relative_to(root))
        own = set(_ancestors(src)) | ({src} if path.name == "__init__.py" else set())
        seen: set[tuple[str, int]] = set()

        def add(dst, imp, via=""):
            if dst in mods and dst != src and (dst, imp.line) not in seen:
                seen.add((dst, imp.line))
                graph[src].append(Edge(src, dst, rel, imp.line, imp.lazy, via))

        for imp in imports_of(src, path):
            # (module run, reads its namespace?) pairs
            targets: list[tuple[str, bool]] = []
            if imp.names is None:
                parts = imp.target.split(".")
                prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
                hit = next((p for p in prefixes if p in mods), None)
                if hit is not None:
                    targets.append((hit, False))
            else:
                for n in imp.names:
                    sub = f"{imp.target}.{n}"
                    targets.append((sub, False) if n != "*" and sub in mods else (imp.target, True))
            for dst, reads in targets:
                if naive or dst not in own or reads:
                    add(dst, imp)
                for parent in _ancestors(dst):
                    if naive or parent not in own:
                        add(parent, imp, via=dst)
    return graph


def _sccs(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted({e.dst for e in graph[start]})))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted({e.dst for e in graph[w]}))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def _shortest_cycle(graph: dict[str, list[Edge]], comp: list[str]) -> list[Edge]:
    members = set(comp)
    best: list[Edge] | None = None
    for start in comp:
        prev: dict[str, Edge] = {}
        queue = deque([start])
        found = None
        while queue and found is None:
            v = queue.popleft()
            for e in sorted(graph[v], key=lambda e: (e.dst, e.line)):
                if e.dst not in members:
                    continue
                if e.dst == start:
                    found = e
                    break
                if e.dst not in prev:
                    prev[e.dst] = e
                    queue.append(e.dst)
        if found is None:
            continue
        path = [found]
        while path[0].src != start:
            path.insert(0, prev[path[0].src])
        if best is None or len(path) < len(best):
            best = path
    return best or []


def import_cycles(root: Path, naive: bool = False) -> list[tuple[list[str], list[Edge], list[Edge]]]:
    """Each import cycle: (its modules, one shortest cycle as edges, every edge inside the component)."""
    graph = import_graph(root, naive=naive)
    out = []
    for comp in _sccs(graph):
        if len(comp) > 1:
            members = set(comp)
            inner = sorted((e for m in comp for e in graph[m] if e.dst in members),
                           key=lambda e: (e.file, e.line, e.dst))
            out.append((comp, _shortest_cycle(graph, comp), inner))
    return sorted(out)


def format_cycles(cycles) -> str:
    lines = []
    for comp, cycle, inner in cycles:
        lines.append(f"cycle among {len(comp)} modules: {', '.join(comp)}")
        lines.append("  shortest: " + " -> ".join([e.src for e in cycle] + [cycle[0].src]))
        lines += [f"    {e}" for e in cycle]
        rest = [e for e in inner if e not in cycle]
        if rest:
            lines.append("  other edges inside:")
            lines += [f"    {e}" for e in rest]
    return "\n".join(lines)


def direction_violations(root: Path) -> list[str]:
    """``file:line: importer imports target`` for every import against the allowed direction."""
    out = []
    for src, path in discover(root).items():
        forbidden = FORBIDDEN.get(src.split(".")[0], set())
        for imp in imports_of(src, path):
            if imp.target.split(".")[0] in forbidden:
                out.append(f"{path.relative_to(root)}:{imp.line}: {src} imports {imp.target}"
                           f"{' (lazy)' if imp.lazy else ''}")
    return sorted(out, key=lambda s: (s.split(":")[0], int(s.split(":")[1]), s))


# ------------------------------------------------------------------------------------------------ rule 2

def private_violations(root: Path) -> list[str]:
    """``file:line: ...`` for every use of another package's private name (see the module docstring)."""
    mods = discover(root)
    out: list[str] = []

    def owner_dir(mod: str) -> Path:
        """Directory owning the names defined in ``mod`` (a package's own directory for its ``__init__``)."""
        return mods[mod].parent

    def allowed(importer: Path, owner: Path, name: str) -> bool:
        return importer.parent == owner or owner / name in importer.parents

    for src, path in mods.items():
        rel = path.relative_to(root)
        tree = _parse(path)
        seen: set[tuple[int, str]] = set()

        def flag(line, what, owner):
            if (line, what) not in seen:
                seen.add((line, what))
                out.append(f"{rel}:{line}: {src} uses {what} (private to {owner.relative_to(root)}/)")

        def check_path(modpath: str, line: int):
            """Each private component of a module path, e.g. ``_core`` in ``jaxprune.reducers._core.x``."""
            parts = modpath.split(".")
            for i in range(1, len(parts)):
                pkg, comp = ".".join(parts[:i]), parts[i]
                if is_private(comp) and pkg in mods and not allowed(path, owner_dir(pkg), comp):
                    flag(line, f"private module {pkg}.{comp}", owner_dir(pkg))

        bound: dict[str, set[str]] = defaultdict(set)   # local name -> project modules it may stand for
        for imp in imports_of(src, path, tree):
            check_path(imp.target, imp.line)
            if imp.names is None:
                asname = imp.asnames[0] if imp.asnames else None
                if asname:
                    if imp.target in mods:
                        bound[asname].add(imp.target)
                else:
                    top = imp.target.split(".")[0]
                    if top in mods:
                        bound[top].add(top)
                continue
            if imp.target not in mods:
                continue
            for n, asname in zip(imp.names, imp.asnames):
                if n == "*":
                    continue
                sub = f"{imp.target}.{n}"
                if sub in mods:
                    bound[asname or n].add(sub)
                if is_private(n) and not allowed(path, owner_dir(imp.target), n):
                    kind = "private module" if sub in mods else "private name"
                    flag(imp.line, f"{kind} {sub}", owner_dir(imp.target))

        def resolve(node) -> set[str]:
            if isinstance(node, ast.Name):
                return bound.get(node.id, set())
            if isinstance(node, ast.Attribute):
                return {f"{m}.{node.attr}" for m in resolve(node.value) if f"{m}.{node.attr}" in mods}
            return set()

        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                for m in resolve(node.value):
                    if not allowed(path, owner_dir(m), node.attr):
                        kind = "private module" if f"{m}.{node.attr}" in mods else "private name"
                        flag(node.lineno, f"{kind} {m}.{node.attr}", owner_dir(m))
    return sorted(out, key=lambda s: (s.split(":")[0], int(s.split(":")[1]), s))


_INTERNALS_RE = re.compile(r"\.(" + "|".join(INTERNALS) + r")\b")


def internals_violations(root: Path, dirs=INTERNALS_DIRS) -> list[str]:
    """``file:line: ...`` for every touch of a model internal (``INTERNALS``) in code under ``dirs``."""
    out = []
    for d in dirs:
        base = root / d
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            tree = _parse(path)
            docstrings = {id(n.value) for n in ast.walk(tree)
                          if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                          and isinstance(n.value.value, str)}
            rel = path.relative_to(root)
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr in INTERNALS:
                    out.append(f"{rel}:{node.lineno}: .{node.attr} ({ast.unparse(node)})")
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                        and (node.value in INTERNALS or _INTERNALS_RE.search(node.value)):
                    out.append(f"{rel}:{node.lineno}: string {node.value!r}")
    return sorted(set(out), key=lambda s: (s.split(":")[0], int(s.split(":")[1]), s))


# ------------------------------------------------------------------------------------------------ synthetic

def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


FAKE = {
    # the re-export pattern: __init__ re-exports from a submodule that imports a sibling through the package
    "jaxprune/__init__.py": "from jaxprune.core import f\nfrom jaxprune.sub import helper_user\n",
    "jaxprune/core.py": "from jaxprune import util\nimport jaxprune.util\nfrom . import util as u\n"
                        "def f():\n    return util.g()\n",
    "jaxprune/util.py": "import jaxprune\ndef g():\n    return 1\n",
    # (a) a cycle hidden behind a lazy import
    "jaxprune/a.py": "def g():\n    from jaxprune.b import h\n    return h()\n",
    "jaxprune/b.py": "from jaxprune.a import g\ndef h():\n    return 2\n",
    # (c) a package using its own private module: allowed
    "jaxprune/sub/__init__.py": "from jaxprune.sub.x import helper_user\n",
    "jaxprune/sub/_impl.py": "def helper():\n    return 3\n_SECRET = 1\n",
    "jaxprune/sub/x.py": "from jaxprune.sub._impl import helper, _SECRET\nfrom . import _impl\n"
                         "def helper_user():\n    return helper() + _impl._SECRET\n",
    # (b) another package's private module
    "experiments/__init__.py": "",
    "experiments/run.py": "import os\nfrom jaxprune.sub._impl import helper\n",
}


def test_synthetic_tree_finds_exactly_the_lazy_cycle_and_the_private_import(tmp_path):
    root = _tree(tmp_path, FAKE)
    cycles = import_cycles(root)
    assert [c[0] for c in cycles] == [["jaxprune.a", "jaxprune.b"]], format_cycles(cycles)
    (_, cycle, _), = cycles
    assert {str(e) for e in cycle} == {"jaxprune.a -> jaxprune.b  (jaxprune/a.py:2, lazy)",
                                       "jaxprune.b -> jaxprune.a  (jaxprune/b.py:1)"}
    assert private_violations(root) == [
        "experiments/run.py:2: experiments.run uses private module jaxprune.sub._impl (private to jaxprune/sub/)"]
    assert direction_violations(root) == []
    assert internals_violations(root) == []


def test_synthetic_naive_rule_reports_the_reexport_pattern(tmp_path):
    """The naive rule (every parent ``__init__`` is an edge) sees the re-export pattern as a cycle."""
    root = _tree(tmp_path, FAKE)
    comps = [c[0] for c in import_cycles(root, naive=True)]
    assert any("jaxprune" in c and "jaxprune.core" in c for c in comps), comps


def test_synthetic_real_init_cycles_are_found(tmp_path):
    """A submodule reading a non-module name from the package whose ``__init__`` imports it is a real cycle;
    so is an outside package's ``__init__`` that imports back (the parent edge is kept outside the package)."""
    root = _tree(tmp_path, {
        "jaxprune/__init__.py": "from jaxprune.m import f\nVALUE = 1\n",
        "jaxprune/m.py": "from jaxprune import VALUE\ndef f():\n    return VALUE\n",
        "jaxprune/p/__init__.py": "from jaxprune.q.z import z\n",
        "jaxprune/q/__init__.py": "from jaxprune.p import x\n",
        "jaxprune/q/z.py": "z = 1\n",
        "jaxprune/p/x.py": "",
    })
    comps = [c[0] for c in import_cycles(root)]
    assert comps == [["jaxprune", "jaxprune.m"], ["jaxprune.p", "jaxprune.q"]], comps


def test_synthetic_private_attribute_access_and_relative_imports(tmp_path):
    root = _tree(tmp_path, {
        "jaxprune/__init__.py": "",
        "jaxprune/sub/__init__.py": "",
        "jaxprune/sub/mod.py": "_x = 1\ndef _f():\n    pass\n",
        "jaxprune/sub/inner/__init__.py": "",
        "jaxprune/sub/inner/leaf.py": "from .. import mod\nfrom ..mod import _f\nmod._x\n",
        "checkpoints_convert/__init__.py": "",
        "checkpoints_convert/c.py": "import jaxprune.sub.mod as m\nimport jaxprune.sub.mod\n"
                                    "def g():\n    return m._f(), jaxprune.sub.mod._x, m.__name__, m.public\n",
        "experiments/__init__.py": "",
        "experiments/e.py": "from jaxprune.sub import mod as mm\nimport os\nos._exit\n"
                            "class A:\n    def g(self):\n        return self._x, mm._x\n",
    })
    assert private_violations(root) == [
        "checkpoints_convert/c.py:4: checkpoints_convert.c uses private name jaxprune.sub.mod._f "
        "(private to jaxprune/sub/)",
        "checkpoints_convert/c.py:4: checkpoints_convert.c uses private name jaxprune.sub.mod._x "
        "(private to jaxprune/sub/)",
        "experiments/e.py:6: experiments.e uses private name jaxprune.sub.mod._x (private to jaxprune/sub/)",
        "jaxprune/sub/inner/leaf.py:2: jaxprune.sub.inner.leaf uses private name jaxprune.sub.mod._f "
        "(private to jaxprune/sub/)",
        "jaxprune/sub/inner/leaf.py:3: jaxprune.sub.inner.leaf uses private name jaxprune.sub.mod._x "
        "(private to jaxprune/sub/)",
    ]


def test_synthetic_direction_and_internals(tmp_path):
    root = _tree(tmp_path, {
        "jaxprune/__init__.py": "",
        "jaxprune/lib.py": "def f():\n    import experiments.tool\n",
        "jaxprune/eval/__init__.py": "",
        "jaxprune/eval/e.py": '"""Calls ``model._prefill``."""\n'
                              "def f(model):\n    # model._decode\n    return model._prefill, model._decoder,"
                              ' getattr(model, "_jitted"), "x._forward"\n',
        "checkpoints_convert/__init__.py": "from experiments import tool\n",
        "experiments/__init__.py": "",
        "experiments/tool.py": "import jaxprune\nimport checkpoints_convert\n",
    })
    assert direction_violations(root) == [
        "checkpoints_convert/__init__.py:1: checkpoints_convert imports experiments",
        "jaxprune/lib.py:2: jaxprune.lib imports experiments.tool (lazy)",
    ]
    assert internals_violations(root) == [
        "jaxprune/eval/e.py:4: ._prefill (model._prefill)",
        "jaxprune/eval/e.py:4: string '_jitted'",
        "jaxprune/eval/e.py:4: string 'x._forward'",
    ]


# ------------------------------------------------------------------------------------------------ real tree

def test_no_import_cycles():
    cycles = import_cycles(REPO)
    if cycles:
        pytest.fail("import cycles (rule: tests/test_architecture.py docstring):\n" + format_cycles(cycles), False)


def test_imports_flow_toward_jaxprune():
    bad = direction_violations(REPO)
    if bad:
        pytest.fail("imports against experiments/checkpoints_convert -> jaxprune:\n" + "\n".join(bad), False)


def test_private_names_stay_in_their_package():
    bad = private_violations(REPO)
    if bad:
        pytest.fail("private names used outside their package:\n" + "\n".join(bad), False)


def test_no_model_internals_outside_the_model():
    bad = internals_violations(REPO)
    if bad:
        pytest.fail(f"model internals used under {', '.join(INTERNALS_DIRS)}:\n" + "\n".join(bad), False)


if __name__ == "__main__":   # python tests/test_architecture.py: the report on the current tree
    print(format_cycles(import_cycles(REPO)) or "no cycles")
    print("--- naive rule:")
    print(format_cycles(import_cycles(REPO, naive=True)) or "no cycles")
    for f in (direction_violations, private_violations, internals_violations):
        print(f"--- {f.__name__}:")
        print("\n".join(f(REPO)) or "none")
