"""Ring 1: the package's shape. Stages import only the stages before them, nothing imports in a circle,
the package's own modules are imported at module top, and a third-party import inside a function is
one of the few heavy ones kept lazy on purpose."""

from __future__ import annotations

import ast
from pathlib import Path

import geneformer_ray

PACKAGE = Path(geneformer_ray.__file__).parent

# the order of the pipeline: a module may import its own stage and the ones before it
LAYERS = {"settings": 0, "files": 0, "plots": 0, "tracking": 0, "runtime": 0, "console": 0,
          "data": 1, "models": 2, "train": 3, "infer": 4, "hpo": 4, "api": 5, "__init__": 5, "cli": 6}
SHARED = {"settings", "files", "plots", "tracking", "runtime", "console"}  # top-level helpers every stage uses
# third-party imports a function may make, and why: each costs seconds where most runs never need it
LAZY = {"torch": "runtime: tokenize tasks and the CLI's checks plan devices without torch",
        "ray.train": "runtime: as torch", "ray.train.torch": "runtime: as torch", "ray.data": "runtime: as torch",
        "mlflow": "2.6 s; runs with tracking off never need it", "umap": "first import compiles numba code (~20 s)",
        "matplotlib": "only runs that draw need it", "sklearn.mixture": "2-6 s; only the perturbation mixture model needs it", "torch_npu": "the NPU seam: absent on CPU and CUDA hosts",
        "ray": "cli: --help and usage errors answer without it"}


def _modules() -> dict[str, ast.Module]:
    """{dotted name: syntax tree} of every module; a package is named without ``__init__``."""
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"):
            ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "__init__"


def _imports(tree: ast.Module, *, nested: bool) -> list[tuple[int, str]]:
    """(line, module) of the imports at module level (nested=False) or inside functions (nested=True)."""
    found, inside = [], set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and (id(node) in inside) == nested:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" if node.module == "geneformer_ray" else node.module for a in node.names]
            found += [(node.lineno, name) for name in names]
    return found


def test_stages_import_only_the_stages_before_them():
    wrong = []
    for module, tree in _modules().items():
        stage = _stage(module)
        for line, name in _imports(tree, nested=False):
            if not name.startswith("geneformer_ray") or name == "geneformer_ray.__version__":
                continue  # the version string lives in the package root, whose import loads nothing else
            target = _stage(name)
            if target == stage:
                continue
            if LAYERS[target] > LAYERS[stage] or (LAYERS[target] == LAYERS[stage] and target not in SHARED):
                wrong.append(f"{module}:{line} imports {name} ({target} does not come before {stage})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    modules = _modules()
    graph = {m: {n if n in modules else n.rpartition(".")[0] for _, n in _imports(t, nested=False)
                 if n.startswith("geneformer_ray")} for m, t in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            assert state.get(target) != 1, "import circle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_imports_inside_functions_are_only_the_deliberately_lazy_ones():
    wrong = []
    for module, tree in _modules().items():
        for line, name in _imports(tree, nested=True):
            if module == "geneformer_ray" and name == "geneformer_ray.api":
                continue  # the package's lazy face: workers importing one stage do not load the whole API
            if not any(name == lazy or name.startswith(lazy + ".") for lazy in LAZY):
                wrong.append(f"{module}:{line} imports {name} inside a function")
    assert not wrong, "\n".join(wrong)


def test_the_folder_list_shows_the_pipeline():
    stages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert stages == ["data", "hpo", "infer", "models", "train"]
    assert (PACKAGE / "resources" / "vocab" / "gc30M").is_dir() and not (PACKAGE / "resources" / "__init__.py").exists()
    for stage in stages:  # each stage says in its docstring what it holds
        assert len(ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())) or "") > 100
