"""The shape of the code: arrows one way (orchestrator -> jobs), the driver's rooms in layers (a room imports only
the rooms below it), no import cycle, no private name imported across modules, every module importable on its
own, a config that needs neither Ray nor MLflow (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "orchestrator")
# The rooms of orchestrator/ (``orchestrator.<room>``; pipeline is a module) and the rooms each may import
# besides itself and jobs/: the config knows nothing of a run, a run's shared state nothing of Ray or MLflow,
# a stage nothing of the commands that start it.
LAYERS = {
    "config": set(),
    "run": {"config"},
    "tracking": {"config", "run"},
    "remote": {"config", "run"},
    "stages": {"config", "run", "tracking", "remote"},
    "pipeline": {"config", "run", "tracking", "remote", "stages"},
    "experiments": {"config", "run", "tracking", "remote", "stages", "pipeline"},
    "cli": {"config", "run", "tracking", "remote", "stages", "pipeline", "experiments"},
}
STAGES = {"prepare", "unlearn", "merge", "evaluate", "report"}


def modules() -> dict[str, Path]:
    """Every module of the project's packages: dotted name -> file."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (module level or inside functions; not
    under ``if TYPE_CHECKING``), each resolved to the longest known module prefix."""
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"

    def resolve(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    resolve(a.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:  # `from pkg import mod` imports the module pkg.mod
                    resolve(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {t for t in imports_of(m, p, set(mods)) if t.split(".")[0] in PACKAGES} for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_the_graph_checker_finds_a_cycle_and_resolves_imports():
    # the checker itself can fail: a made-up cycle is found, a chain is not
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = import_graph()
    assert "orchestrator.stages.unlearn" in graph["orchestrator.pipeline"]
    assert "jobs.evaluate.suites" in graph["jobs.evaluate.qa"]  # from jobs.evaluate.suites import ...
    assert "orchestrator.config.schema" in graph["orchestrator.config.checks"]
    assert "orchestrator.config.checks" not in graph["orchestrator.config.schema"]  # the loader calls the checks
    assert layer_violations({"orchestrator.config.schema": {"orchestrator.run.context"}}) == [
        "orchestrator.config.schema (config) imports orchestrator.run.context (run)"
    ]


def test_no_import_cycle_in_the_project():
    assert cycles(import_graph()) == []


def test_jobs_never_import_orchestrator():
    back = {
        m: sorted(t for t in ts if t.startswith("orchestrator"))
        for m, ts in import_graph().items()
        if m.startswith("jobs")
    }
    assert {m: ts for m, ts in back.items() if ts} == {}


def test_every_module_imports_on_its_own():
    """Each module imported first in a fresh set of project modules (third-party ones stay loaded: this is
    about the project's own import order), all in one interpreter to keep it quick."""
    names = sorted(modules())
    code = (
        "import importlib, sys, traceback\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] in ('jobs', 'orchestrator')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{n}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def room(module: str) -> str:
    """The room of an orchestrator module: ``orchestrator.stages.unlearn.selection`` -> ``stages``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "orchestrator"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} ({room(m)}) imports {t} ({room(t)})"
        for m, ts in graph.items()
        if m.startswith("orchestrator.")
        for t in ts
        if t.startswith("orchestrator.") and room(t) != room(m) and room(t) not in LAYERS.get(room(m), set())
    )


def test_each_room_imports_only_the_rooms_below_it():
    graph = import_graph()
    rooms = {room(m) for m in graph if m.startswith("orchestrator.")}
    assert rooms == set(LAYERS), rooms  # every room has its layer
    assert layer_violations(graph) == []


def test_the_stages_are_named_by_their_folder():
    names = {
        p.stem if p.is_file() else p.name
        for p in (ROOT / "orchestrator" / "stages").iterdir()
        if p.name not in ("__init__.py", "__pycache__")
    }
    assert names == STAGES


def test_no_private_name_crosses_a_module_boundary():
    crossing = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                crossing += [
                    f"{name}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert crossing == []


def test_the_config_needs_neither_ray_nor_mlflow():
    code = (
        "import sys, pkgutil, importlib, orchestrator.config as c\n"
        "for m in pkgutil.walk_packages(c.__path__, 'orchestrator.config.'): importlib.import_module(m.name)\n"
        "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
