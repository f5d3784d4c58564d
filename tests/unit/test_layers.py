"""One-way layers: serve_app's imports follow the request path (issue 13).

The test reads every module under serve_app/ with `ast` (imports inside functions and
`if TYPE_CHECKING:` blocks count too: a deferred import is still an arrow) and fails on

* an import loop between serve_app modules, and
* an upward import: a module importing one whose rank is above its own.

Ranks, low to high (a module may import its own rank or any lower one; at rank 1, adapters/
never imports the engine, so the adapter pipeline gets the engine's parse as callables; the
engine may read adapters/' torch-free rules, e.g. peft_files.py):

    0  leaves    errors.py, metrics.py, api/*            (wire types, schemas, error bodies)
    1  bottom    engine/*, adapters/*                    (adapters -> engine: never),
                 demo.py                                 (builds the demo assets; imports
                                                          nothing of serve_app)
    2  settings  config.py (AppConfig), router/config.py (the router's settings),
                 deployments/config.py (the engine deployments' settings)
    3  replicas  deployments/*
    4  router    router/*
    5  app       app.py                                  (the one builder)

`config.py` for the app sits just below the deployments: it only gathers each part's settings
(engine/config.py, adapters/config.py, router/config.py, deployments/config.py), one import
arrow down, and builds each deployment's config object, which app.py binds. The router's
settings live in router/config.py so that the app config does not reach up into the router's
auth, limits and policy code; the engine deployments' in deployments/config.py likewise.

A second check runs `import serve_app.router.ingress` in a fresh interpreter and fails if
'torch' ends up in sys.modules: the router process needs no torch.

Run this file as a script to print the graph (module -> module, one line per arrow):

    PYTHONPATH=. python tests/unit/test_layers.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = "serve_app"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

LEAF, BOTTOM, SETTINGS, REPLICAS, ROUTER, APP = range(6)

# Checked in order; the first prefix that matches gives the rank.
RANKS: list[tuple[str, int]] = [
    ("serve_app.errors", LEAF),
    ("serve_app.metrics", LEAF),
    ("serve_app.api", LEAF),
    ("serve_app.engine", BOTTOM),
    ("serve_app.adapters", BOTTOM),
    ("serve_app.demo", BOTTOM),
    ("serve_app.models", BOTTOM),  # offline builders of real demo models and their tenants, like demo.py
    ("serve_app.config", SETTINGS),
    ("serve_app.router.config", SETTINGS),
    ("serve_app.deployments.config", SETTINGS),  # the engine deployments' settings, like router/config.py
    ("serve_app.deployments", REPLICAS),
    ("serve_app.router", ROUTER),
    ("serve_app.app", APP),
]

# (importer, imported): same-rank packages where this direction is refused.
NEVER = [("serve_app.adapters", "serve_app.engine")]


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def rank_of(module: str) -> int:
    for prefix, rank in RANKS:
        if _in(module, prefix):
            return rank
    raise AssertionError(f"{module} has no rank: add it to RANKS in {__file__}")


def modules() -> dict[str, Path]:
    """Every module in the package, dotted name -> file."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The serve_app module an import of `name` loads (its longest known prefix)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """serve_app modules that `module` imports anywhere in its file (not itself, not packages'
    empty __init__ chain)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        for name in names:
            if not _in(name, PACKAGE):
                continue
            target = _resolve(name, known)
            if target and target != module and target != PACKAGE:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {mod: imports_of(mod, path, known) for mod, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def upward(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for src in sorted(g):
        for dst in sorted(g[src]):
            if rank_of(dst) > rank_of(src):
                bad.append(f"{src} (rank {rank_of(src)}) -> {dst} (rank {rank_of(dst)})")
            for a, b in NEVER:
                if _in(src, a) and _in(dst, b):
                    bad.append(f"{src} -> {dst} ({a} never imports {b})")
    return bad


def test_every_module_has_a_rank():
    for mod in modules():
        if mod != PACKAGE:
            rank_of(mod)


def test_no_import_loops():
    loops = cycles(graph())
    assert not loops, "import loops inside serve_app/:\n" + "\n".join(" <-> ".join(c) for c in loops)


def test_no_upward_imports():
    bad = upward(graph())
    assert not bad, "imports that run up the request path:\n" + "\n".join(bad)


def test_router_process_imports_no_torch():
    code = "import sys, serve_app.router.ingress; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", "importing serve_app.router.ingress loads torch"


def test_the_checker_sees_loops_and_upward_arrows():
    g = {"serve_app.engine.a": {"serve_app.router.b"}, "serve_app.router.b": {"serve_app.engine.a"}}
    assert cycles(g) == [["serve_app.engine.a", "serve_app.router.b"]]
    assert upward(g) == ["serve_app.engine.a (rank 1) -> serve_app.router.b (rank 4)"]
    assert upward({"serve_app.adapters.b": {"serve_app.engine.a"}, "serve_app.engine.a": set()})
    assert not upward({"serve_app.engine.a": {"serve_app.adapters.b"}, "serve_app.adapters.b": set()})


if __name__ == "__main__":
    g = graph()
    for src in sorted(g):
        for dst in sorted(g[src]):
            print(f"{src} -> {dst}")
