"""The house plan (DESIGN.md): no import loops, a task-agnostic pipeline, and a compile whose
stdout carries only its result, with the libraries' own chatter kept off the terminal."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the installed package names of the repository's folders (setup.cfg's package_dir)
ROOTS = {"fscompile": REPO / "fscompile", "fscompile.backends": REPO / "backends",
         "fscompile.calibration": REPO / "calibration"}
TASK_NAMES = ("text-classification", "image-classification", "question-answering", "text-generation")


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for pkg, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = (path, path.name == "__init__.py")
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside functions."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        here = name if is_pkg else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.split(".")[:len(here.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import x` may name a submodule
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "fscompile.tasks.text" in graph and "fscompile.calibration.sets" in graph  # the walk sees every folder
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pipeline_knows_tasks_only_through_the_adapter():
    graph = import_graph()
    assert not any("fscompile.pipeline" in graph[m] for m in graph if m.startswith(("fscompile.tasks", "fscompile.models")))
    assert not any(d.startswith("fscompile.tasks.") and d != "fscompile.tasks.base" for d in graph["fscompile.pipeline"])
    source = (REPO / "fscompile/pipeline.py").read_text()
    assert not [n for n in TASK_NAMES if n in source], "pipeline.py branches on a task's name"


def _compile(teacher: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "fscompile", str(teacher), "--shots", "4", "--out", str(out), "--steps", "4",
            "--augment", "3", "--batch-size", "4", "--profile-seconds", "0.05", "--seq-len", "16", "--generator", "none",
            *flags]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_compile_prints_only_its_result_on_stdout(tiny_teacher, tmp_path):
    """The table (or with --json the manifest alone) on stdout; ORT's calibrator prints, which
    --verbose lets through to stderr, reach neither stream otherwise."""
    r = _compile(tiny_teacher, tmp_path / "table")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert "→ ort-int8" in lines[0] and lines[-1].startswith("compiled in ")
    assert all(ln.lstrip()[0] in "┏┃┡│└" for ln in lines[1:-1]), r.stdout
    assert "Collecting tensor data" not in r.stdout + r.stderr

    r = _compile(tiny_teacher, tmp_path / "json", "--json", "--verbose")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["task"] == "text-classification"  # the whole of stdout is the manifest
    assert "Collecting tensor data" in r.stderr  # the chatter exists: --verbose shows it, on stderr
