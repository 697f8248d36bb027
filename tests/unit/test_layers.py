"""Imports go one way, inside functions too. Every module's AST is walked (module-level imports and imports
inside functions alike), and the graph of imports between our own modules must have no cycle and no edge that
goes up a layer. The layers, bottom to top, are written down once here and in docs/design.md:

    foundation     rlhf.*                                   errors, atomic files, YAML, untrusted text, left-padded batches
    data           feedback.*, reward.text                  preference data, judges, how a pair is encoded
    process        pipeline, pipeline.distributed, pipeline.blocks
    runtime        pipeline.artifacts, .models, .generation, .strategy, .deepspeed, .checkpoint, .tracking, .mfu
    models         reward.*                                 reward models: scoring, evaluation
    methods        pipeline.data, pipeline.arrow, pipeline.rl.*, pipeline.plan, pipeline.judging
    stages         pipeline.stages.*                        one module per stage (they never import each other)
    orchestration  pipeline.config, .runner, .report, .export, .serve, .reference
    entry          pipeline.cli, pipeline.__main__

A module may import its own layer or any layer below; `feedback` (and everything under `pipeline`'s process layer)
imports nothing from `pipeline`."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("rlhf", "feedback", "reward", "pipeline")
LAYERS = [
    ("foundation", ["rlhf", "rlhf.*"]),
    ("data", ["feedback", "feedback.*", "reward.text"]),
    ("process", ["pipeline", "pipeline.distributed", "pipeline.blocks"]),
    ("runtime", ["pipeline.artifacts", "pipeline.models", "pipeline.generation", "pipeline.strategy",
                 "pipeline.deepspeed", "pipeline.checkpoint", "pipeline.tracking", "pipeline.mfu"]),
    ("models", ["reward", "reward.*"]),
    ("methods", ["pipeline.data", "pipeline.arrow", "pipeline.rl", "pipeline.rl.*", "pipeline.plan", "pipeline.judging"]),
    ("stages", ["pipeline.stages", "pipeline.stages.*"]),
    ("orchestration", ["pipeline.config", "pipeline.runner", "pipeline.report", "pipeline.report.*", "pipeline.export",
                       "pipeline.serve", "pipeline.serve.*", "pipeline.reference", "pipeline.monitor",
                       "pipeline.monitor.*"]),
    ("entry", ["pipeline.cli", "pipeline.cli.*", "pipeline.__main__"]),
]


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module}: in no layer; add it to LAYERS here and in docs/design.md")


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of our own modules, at any depth."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package this module is in
                    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - child.level + 1] + ([child.module] if child.module else []))
                # `from pkg import mod` imports the submodule mod; `from mod import name` the module itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            else:
                visit(child, inner)
                continue
            for t in targets:
                while t and t not in known:  # `import a.b.c` where a.b.c is a module's attribute: its module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    out.append((t, child.lineno, in_function))

    visit(tree, False)
    return out


def graph(root: Path = ROOT) -> dict[str, list[tuple[str, int, bool]]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def upward(g) -> list[str]:
    return [f"{a}:{line} imports {b} ({LAYERS[layer(b)][0]}, above {LAYERS[layer(a)][0]})"
            for a, edges in g.items() for b, line, _ in edges if layer(b) > layer(a)]


def cycles(g) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in {b for b, _, _ in g.get(v, [])}:
            if w not in index:
                strong(w)
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

    for v in g:
        if v not in index:
            strong(v)
    return out


def test_imports_go_one_way_also_inside_functions():
    g = graph()
    assert sum(len(e) for e in g.values()) > 300  # the walk sees imports inside functions too
    assert sum(inner for e in g.values() for _, _, inner in e) > 0
    assert not cycles(g), cycles(g)
    assert not upward(g), "\n".join(upward(g))


def test_feedback_and_the_foundation_import_nothing_from_pipeline():
    g = graph()
    bad = [f"{a}:{line} imports {b}" for a, edges in g.items() if a.split(".")[0] in ("feedback", "rlhf")
           for b, line, _ in edges if b.split(".")[0] in ("pipeline", "reward") and b != "reward.text"]
    assert not bad, bad


def test_stages_never_import_each_other():
    g = graph()
    bad = [f"{a}:{line} imports {b}" for a, edges in g.items() if a.startswith("pipeline.stages.")
           for b, line, _ in edges if b.startswith("pipeline.stages.") and b != "pipeline.stages.common"
           and a != "pipeline.stages.common"]
    assert not bad, bad


@pytest.mark.parametrize("bad", [
    ("pipeline/distributed.py", "from pipeline.deepspeed import zero_stage"),  # the edge that closed the old cycle
    ("feedback/schema.py", "from pipeline.artifacts import write_jsonl"),
    ("pipeline/deepspeed.py", "from pipeline.stages.common import save_model"),
])
def test_a_reintroduced_upward_import_is_caught(tmp_path, bad):
    """The check on a copy of the project with one upward import put back (inside a function, where the old
    architecture test could not see it)."""
    import shutil

    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg)
    path, line = bad
    f = tmp_path / path
    f.write_text(f.read_text() + f"\n\ndef _reintroduced():\n    {line}\n")
    g = graph(tmp_path)
    assert upward(g) or cycles(g)
