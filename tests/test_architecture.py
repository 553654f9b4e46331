"""The library's shape, checked from its source with ``ast``: imports go one way, modules stay small.

Imports go config → data → model → train → distill/quant → evaluation → bench → analysis
(README, "Layout"). A module may import its own layer or a lower one, never a higher one, and
never inside a function to dodge a cycle: the import graph is acyclic as written.
"""

from __future__ import annotations

import ast
import dataclasses
import graphlib
import json
import re
from pathlib import Path

import pytest

from compactnlu.quant import METHODS, MethodConfig

PACKAGE = Path(__file__).resolve().parents[1] / "lib" / "compactnlu"
MAX_LINES = 360  # "about 350"

LAYERS = ["config", "data", "model", "train", "distill/quant", "evaluation", "bench", "analysis"]
# Every module's layer; a new module must be placed here (test_every_module_has_a_layer).
LAYER_OF = {
    "compactnlu": "config", "compactnlu.artifacts": "config", "compactnlu.config": "config",
    "compactnlu.cachekeys": "config", "compactnlu.cpu": "config", "compactnlu.paper": "config",
    "compactnlu.type_checks": "config", "compactnlu.provenance": "config",
    "compactnlu.overrides": "config", "compactnlu.progress": "config",
    "compactnlu.encoders": "config", "compactnlu.e5_file": "data",
    "compactnlu.massive_download": "data", "compactnlu.massive": "data", "compactnlu.compose": "data",
    "compactnlu.synthetic": "data", "compactnlu.features": "data", "compactnlu.explore": "data",
    "compactnlu.interface": "model", "compactnlu.model": "model", "compactnlu.e5": "model",
    "compactnlu.trainer": "train", "compactnlu.pretrain": "train", "compactnlu.train": "train",
    "compactnlu.classic": "train",
    "compactnlu.distill": "distill/quant", "compactnlu.kd_losses": "distill/quant",
    "compactnlu.teacher_cache": "distill/quant", "compactnlu.quant": "distill/quant",
    "compactnlu.onnx_runtime": "distill/quant",
    "compactnlu.metrics": "evaluation", "compactnlu.metric_statistics": "evaluation",
    "compactnlu.evaluation": "evaluation", "compactnlu.errors": "evaluation", "compactnlu.variants": "evaluation",
    "compactnlu.inference": "evaluation",
    "compactnlu.bench": "bench", "compactnlu.pcptq": "bench", "compactnlu.table2": "bench",
    "compactnlu.significance": "analysis", "compactnlu.plots": "analysis", "compactnlu.study": "analysis",
    "compactnlu.paper_scale": "analysis",
    "compactnlu.replicates": "analysis", "compactnlu.reproduce": "analysis", "compactnlu.notebook": "analysis",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The compactnlu modules an import statement in ``module`` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    named = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
    return named or ([source] if source in MODULES else [])


def _imports(module: str) -> tuple[set[str], list[str]]:
    """(the compactnlu modules ``module`` imports, those imported inside a function)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found, in_function = set(), []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = [t for t in _resolve(module, node) if t != module]
            found.update(targets)
            if id(node) in nested:
                in_function += targets
    return found, in_function


GRAPH = {m: _imports(m)[0] for m in MODULES}


def layer(module: str) -> int:
    """The module's layer, or its package's (``compactnlu.quant.static``: ``compactnlu.quant``'s)."""
    while module not in LAYER_OF and "." in module.removeprefix("compactnlu."):
        module = module.rpartition(".")[0]
    name = LAYER_OF.get(module)
    return LAYERS.index(name) if name else -1


def test_import_graph_is_acyclic():
    try:
        list(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_no_library_import_inside_a_function():
    late = {m: _imports(m)[1] for m in MODULES}
    assert {m: t for m, t in late.items() if t} == {}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer(m) < 0] == []


def test_imports_go_one_way():
    upward = [(m, t) for m, targets in GRAPH.items() for t in targets
              if m != "compactnlu" and layer(t) > layer(m)]
    assert upward == [], "a module imports from a later layer (LAYERS order)"


TRAINING_STACK = {"compactnlu.trainer", "compactnlu.pretrain", "compactnlu.train", "compactnlu.distill",
                  "compactnlu.kd_losses", "compactnlu.teacher_cache"}


def test_quantization_does_not_import_the_training_stack():
    """quant/ takes a trained model and, for the search, an objective as a callable."""
    reach = {m: t & TRAINING_STACK for m, t in GRAPH.items() if m.startswith("compactnlu.quant")}
    assert {m: t for m, t in reach.items() if t} == {}


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of the lines that carry code: no blanks, comments or lone brackets."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#") and line.strip() not in {")", "]", "}", "),", "],"}]


def _sources() -> dict[str, str]:
    out = {str(p.relative_to(PACKAGE.parents[1])): p.read_text(encoding="utf-8") for p in MODULES.values()}
    for notebook in sorted((PACKAGE.parents[1] / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                out[f"{notebook.name} cell {i}"] = "".join(cell["source"])
    return out


def test_no_six_line_block_is_repeated():
    """The same six code lines in two places are one function waiting to be written."""
    seen, repeated = {}, []
    for where, text in _sources().items():
        lines = _code_lines(text)
        for i in range(len(lines) - 5):
            block = tuple(line for _, line in lines[i:i + 6])
            place = f"{where}:{lines[i][0]}"
            if block in seen:
                repeated.append((seen[block], place))
            seen.setdefault(block, place)
    assert repeated == []


# Reading a variant's or a policy's meaning out of its name: slicing it, splitting it, or testing
# its prefix. What a name means is in its row of the variant table or in its typed config.
NAME_PARSING = [
    re.compile(r"\b\w*(policy|variant)\w*\s*\[\s*-?\d*\s*:"),  # policy_name[7:]
    re.compile(r"\b\w*(policy|variant)\w*\.(startswith|endswith|split|rsplit|partition|rpartition)\("),
    re.compile(r"\.(startswith|endswith)\(\s*[\"'](lambda|uniform|sensitivity|baseline|kd|teacher)"),
    re.compile(r"\.split\(\s*[\"'][-=@][\"']"),  # the separators of "uniform-4", "lambda=1", "kd@seed1"
    re.compile(r"\.replace\(\s*[\"']lambda="),
]
# What the study did before its settings were typed (pcptq.reapply, notebook 07's Pareto labels).
FORMER_OFFENDERS = [
    'if policy_name.startswith("lambda="):',
    "return searched(profile, data, cache, name, trained, replace(config, lam=float(policy_name[7:])))",
    "bits = int(policy_name[8:])",
    'sweep.assign(kind=sweep.policy.map(lambda p: "λ sweep" if p.startswith("lambda") else p.split("-")[0]),',
    'label=sweep.policy.str.replace("lambda=", "λ=")),',
]


def _name_parsing(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if any(p.search(line) for p in NAME_PARSING)]


def test_no_name_is_parsed_for_its_meaning():
    assert all(_name_parsing(line) for line in FORMER_OFFENDERS)  # the check sees what it is for
    found = {where: lines for where, text in _sources().items() if (lines := _name_parsing(text))}
    assert found == {}


# Notebooks that still register fp32 models by hand (their owners' to move to study.make).


def test_no_notebook_calls_the_registry():
    """A notebook makes a variant with ``study.make`` (or ``ptq_stage``), which registers it."""
    calls = {where: text for where, text in _sources().items() if ".ipynb" in where
             and re.search(r"\bregister\(", text)}
    assert calls == {}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_a_config_dataclass(name):
    """Its settings: a frozen dataclass of its own, read back from a record by ``from_record``."""
    config = METHODS[name].config
    assert issubclass(config, MethodConfig) and config is not MethodConfig
    assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen
    assert not hasattr(METHODS[name], "quantize")  # the entry points take the config, not the handler


def test_modules_are_small():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checker_sees_a_cycle_and_a_late_import(tmp_path):
    """The graph above is built by this file's own parser: a cycle must fail the sorter."""
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).static_order())
    node = ast.parse("def f():\n    from .model import X\n").body[0].body[0]
    assert _resolve("compactnlu.train", node) == ["compactnlu.model"]
