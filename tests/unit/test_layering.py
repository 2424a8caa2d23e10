"""The house rules, read from the source: which package may import which, no cycles, every import resolves.

Every ``import`` of every module of ``megatron_ral`` (module level, inside functions, under TYPE_CHECKING) is
parsed with ``ast``, never executed. The floors, bottom to top (README "Architecture" shows the same):

    errors < config < platform, logging < models < checkpoint < data < inference < attention < distill < rl
           < train (the loop) < cli < bench, testing;   tiny: above checkpoint and data, below cli

A package imports only packages on floors below it. The command lines (``cli``), the benchmarks (``bench``) and
the test support (``testing``) sit above the product; a product module never imports them, except the module
entry points named in ``MAIN_SHIMS`` (``python -m megatron_ral.train`` / ``-m megatron_ral.config``).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "megatron_ral"

# package -> the packages it may import (its floors below; transitively closed by construction)
_ORDER = ["errors", "config", ("platform", "logging"), "models", "checkpoint", "data", "inference", "attention",
          "distill", "rl", "train"]
ALLOWED: dict[str, set[str]] = {}
_below: set[str] = {"<root>"}
for floor in _ORDER:
    names = floor if isinstance(floor, tuple) else (floor,)
    for n in names:
        ALLOWED[n] = set(_below)
    _below |= set(names)
PRODUCT = set(_below) - {"<root>"}
ALLOWED["tiny"] = {"<root>", "errors", "config", "platform", "logging", "models", "checkpoint", "data"}
ALLOWED["cli"] = PRODUCT | {"<root>", "tiny"}
ALLOWED["bench"] = PRODUCT | {"<root>", "tiny", "cli", "testing"}
ALLOWED["testing"] = PRODUCT | {"<root>", "tiny", "cli"}
ALLOWED["<root>"] = set()  # megatron_ral/__init__.py imports nothing of the project

# module entry points of product packages that call into cli/ (and nothing else may)
MAIN_SHIMS = {
    ("megatron_ral.train", "megatron_ral.cli.train"),
    ("megatron_ral.config.__main__", "megatron_ral.cli.config"),
}
# third-party modules that only exist in some installs: GPU containers, the [bench] extra, optional sinks
OPTIONAL_THIRD_PARTY = ("transformer_engine", "apex", "flash_attn", "trl", "datasets", "wandb", "tensorboard",
                        "torch.utils.tensorboard", "matplotlib", "nvidia.dali.plugin.pytorch")
# names of modules that are commands, benchmarks or test helpers: never inside a product package
NOT_PRODUCT = ("cli", "benchmark", "testing", "trl_", "_cli", "_benchmark")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _package(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "<root>"
    return parts[1]


@lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _imports(module: str):
    """(target module, imported names or None, line) for every import statement of ``module``."""
    base = module if _is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names], node.lineno


def _project_edges(module: str):
    """Project modules ``module`` imports: ``from pkg import sub`` resolves to the submodule ``pkg.sub``."""
    for target, names, line in _imports(module):
        if not target.startswith("megatron_ral"):
            continue
        subs = [f"{target}.{n}" for n in names or [] if f"{target}.{n}" in MODULES]
        if subs:
            yield from ((s, line) for s in subs)
        if not names or len(subs) < len(names):
            yield target, line


def _defined_names(module: str) -> set[str] | None:
    """Top-level names of a module (None: it resolves names dynamically and lists none we can read)."""
    tree = _tree(module)
    names: set[str] = set()
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if node.name == "__getattr__" and node in tree.body:
                dynamic = True
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names.add(n.id)
            # lazily exported names: __all__ = [...] and _EXPORTS = {...}
            if any(getattr(t, "id", None) in ("__all__", "_EXPORTS") for t in node.targets):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                names.update(value)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, (ast.For, ast.With, ast.comprehension)):
            for n in ast.walk(getattr(node, "target", node)):
                if isinstance(n, ast.Name):
                    names.add(n.id)
    if dynamic and not names:
        return None
    return names


def test_every_project_import_resolves():
    """Each ``import megatron_ral...`` names an existing module, each ``from X import name`` a name X defines
    (or a submodule): a lazy import that no test executes cannot point at a module that moved."""
    broken = []
    for module in MODULES:
        for target, names, line in _imports(module):
            if not target.startswith("megatron_ral"):
                continue
            where = f"{MODULES[module].relative_to(ROOT)}:{line}"
            if target not in MODULES:
                broken.append(f"{where}: no module {target}")
                continue
            defined = _defined_names(target)
            for n in names or []:
                if n == "*" or f"{target}.{n}" in MODULES or defined is None:
                    continue
                if n not in defined:
                    broken.append(f"{where}: {target} has no name {n}")
    assert not broken, "\n".join(broken)


def test_third_party_imports_resolve():
    """Every third-party module the package imports exists in this environment (optional GPU/bench ones aside)."""
    missing = []
    seen: set[str] = set()
    for module in MODULES:
        for target, _, line in _imports(module):
            if not target or target.startswith("megatron_ral") or target in seen:
                continue
            seen.add(target)
            if target.startswith(OPTIONAL_THIRD_PARTY) or target.split(".")[0] in sys.builtin_module_names:
                continue
            try:
                found = importlib.util.find_spec(target) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {target}")
    assert not missing, "\n".join(missing)


def test_packages_import_only_lower_floors():
    wrong = []
    for module in MODULES:
        src = _package(module)
        if src not in ALLOWED:
            wrong.append(f"{module}: package {src!r} has no floor (add it to this test and README's Architecture)")
            continue
        for target, line in _project_edges(module):
            dst = _package(target)
            if dst == src or dst in ALLOWED[src]:
                continue
            if (module, target) in MAIN_SHIMS:
                continue
            wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {src} may not import {dst} ({target})")
    assert not wrong, "\n".join(wrong)


def test_main_shims_only_under_main_guard_or_main_module():
    """The allowed product -> cli imports sit in ``if __name__ == "__main__":`` or in a ``__main__`` module."""
    for module, target in MAIN_SHIMS:
        assert module in MODULES, module
        if module.endswith("__main__"):
            continue
        tree = _tree(module)
        guarded = set()
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                for n in ast.walk(node):
                    if isinstance(n, ast.ImportFrom):
                        guarded.add(n.module)
        assert target in guarded, f"{module} imports {target} outside its __main__ guard"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_cycles_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for module in MODULES:
        for target, _ in _project_edges(module):
            if (module, target) in MAIN_SHIMS:
                continue
            a, b = _package(module), _package(target)
            if a != b:
                graph[a].add(b)
    assert not _cycles(graph), _cycles(graph)


def test_no_cycles_between_modules():
    """Inside a package too: two modules never import each other, even lazily (package ``__init__`` files,
    which only re-export, are left out)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module in MODULES:
        if _is_package(module):
            continue
        for target, _ in _project_edges(module):
            if target in MODULES and not _is_package(target) and (module, target) not in MAIN_SHIMS:
                graph[module].add(target)
    assert not _cycles(graph), _cycles(graph)


@pytest.mark.parametrize("package", sorted(PRODUCT - {"errors", "train"}))
def test_no_command_benchmark_or_test_helper_inside_product(package):
    offenders = []
    for module in MODULES:
        if _package(module) != package:
            continue
        leaf = module.rpartition(".")[2]
        if any(leaf == n or leaf.startswith(n) or leaf.endswith(n) for n in NOT_PRODUCT):
            offenders.append(module)
    assert not offenders, offenders


def test_readme_shows_the_floors():
    text = (ROOT / "README.md").read_text()
    assert "## Architecture" in text
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    for name in [n for f in _ORDER for n in (f if isinstance(f, tuple) else (f,))] + ["tiny", "cli", "bench", "testing"]:
        assert name in section, name
