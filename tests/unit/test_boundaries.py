"""Import boundaries: producers stay light, and only one module talks to the sandbox SDK."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("sandqueue", "producer", "worker")
SDK = "e2b"
SDK_MODULE = "worker/sandbox/e2b.py"

_PROBE = """
import importlib, json, sys
module = importlib.import_module(sys.argv[1])
print(json.dumps({"file": getattr(module, "__file__", None), "modules": sorted(sys.modules)}))
"""


def _modules_after_import(module: str) -> list[str]:
    """sys.modules of a fresh interpreter after importing `module` from this checkout."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, module], cwd=REPO, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # make sure the checkout's package was imported, not some other one on the path
    assert report["file"] is not None
    assert Path(report["file"]).resolve().is_relative_to(REPO)
    return list(report["modules"])


def _under(modules: list[str], top: str) -> list[str]:
    return [m for m in modules if m == top or m.startswith(f"{top}.")]


@pytest.mark.parametrize("module", ["producer", "producer.cli", "sandqueue.contract"])
def test_producer_side_imports_neither_worker_nor_sdk(module: str) -> None:
    modules = _modules_after_import(module)
    assert module in modules  # the probe did import it
    assert _under(modules, SDK) == []
    assert _under(modules, "worker") == []


def test_contract_needs_only_pydantic_and_the_catalog() -> None:
    modules = _modules_after_import("sandqueue.contract")
    for heavy in ("celery", "kombu", "redis", "cryptography", SDK, "worker", "producer"):
        assert _under(modules, heavy) == [], heavy


class _ModuleLevelImports(ast.NodeVisitor):
    """Top-level modules imported when a file is imported (function bodies excluded)."""

    def __init__(self) -> None:
        self.found: set[str] = set()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        return None  # imported lazily, when called

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        return None

    def visit_Lambda(self, node: ast.Lambda) -> None:
        return None

    def visit_Import(self, node: ast.Import) -> None:
        self.found.update(alias.name.split(".")[0] for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.found.add(node.module.split(".")[0])


def _module_level_imports() -> dict[str, set[str]]:
    imports: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            visitor = _ModuleLevelImports()
            visitor.visit(ast.parse(path.read_text(), filename=str(path)))
            imports[path.relative_to(REPO).as_posix()] = visitor.found
    return imports


def test_only_the_sdk_adapter_imports_the_sdk_at_module_level() -> None:
    importers = sorted(f for f, found in _module_level_imports().items() if SDK in found)
    assert importers == [SDK_MODULE]


def test_producer_and_core_do_not_import_worker_at_module_level() -> None:
    offenders = sorted(
        f for f, found in _module_level_imports().items()
        if f.startswith(("producer/", "sandqueue/")) and "worker" in found
    )
    assert offenders == []


def test_the_scanner_sees_through_blocks_but_not_into_functions() -> None:
    source = (
        "import os\n"
        "try:\n    import alpha.beta\nexcept ImportError:\n    pass\n"
        "if True:\n    from gamma import x\n"
        "class C:\n    import delta\n    def m(self):\n        import epsilon\n"
        "def f():\n    from zeta import y\n"
        "from . import local\n"
    )
    visitor = _ModuleLevelImports()
    visitor.visit(ast.parse(source))
    assert visitor.found == {"os", "alpha", "gamma", "delta"}


def test_every_redis_key_prefix_is_named_in_one_module() -> None:
    """`sq:` key names are spelt only in sandqueue/keys.py (docstrings may mention them)."""
    offenders = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if path == REPO / "sandqueue/keys.py":
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
                          and node.body and isinstance(node.body[0], ast.Expr)}
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and node.value.startswith("sq:") and id(node) not in docstrings):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], offenders


def _worker_modules() -> dict[str, set[str]]:
    """Module -> the worker modules it imports (at module level or in functions)."""
    graph: dict[str, set[str]] = {}
    for path in (REPO / "worker").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found: set[str] = set()
        tree = ast.parse(path.read_text())
        for block in [n for n in tree.body if isinstance(n, ast.If)
                      and ast.unparse(n.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")]:
            tree.body.remove(block)  # imports for type checkers only: no runtime cycle
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = found
    return graph


def test_celery_and_kombu_are_imported_only_in_the_broker_folder() -> None:
    offenders = sorted(m for m, imports in _worker_modules().items()
                       if not m.startswith("worker.broker")
                       and any(i.split(".")[0] in ("celery", "kombu") for i in imports))
    assert offenders == []


def test_worker_imports_have_no_cycle_outside_the_broker() -> None:
    graph = _worker_modules()
    names = set(graph)
    edges = {m: {i for i in imports if i in names and i != m}
             for m, imports in graph.items() if not m.startswith("worker.broker")}
    edges = {m: {i for i in deps if not i.startswith("worker.broker")}
             for m, deps in edges.items()}
    seen: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in edges.get(node, ()):
            if seen.get(nxt) == 1:
                raise AssertionError(" -> ".join([*path, node, nxt]))
            if nxt not in seen:
                visit(nxt, [*path, node])
        seen[node] = 2

    for module in edges:
        if module not in seen:
            visit(module, [])
