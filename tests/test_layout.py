"""The package's shape stays as the docs describe it: every module says its job first, every function fits on a
screen, every import sits at the top of its module (the layers' order is lint-imports' contract in
pyproject.toml, which CI runs), and the wheel lists every package."""

import ast
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "prune_cli"
MODULES = sorted(PACKAGE.rglob("*.py"))
# third-party modules a function may import on use: optional extras, or heavy ones only some runs need
DEFERRED = (
    "matplotlib",
    "onnx",
    "onnxruntime",
    "torch.utils.tensorboard",
    "torch.onnx",
    "torch._dynamo",
    "torchvision",
    "mlflow",
)
DEFERRED += ("sklearn",)
# ``import prune_cli`` imports neither torch nor Hydra: the two public functions import their layer on use
LAZY_API = {("__init__.py", "prune_cli.deploy.load"), ("__init__.py", "prune_cli.structure.any_network")}
LONGEST = 80


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_a_module_says_its_job_first(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.split()) >= 4, f"{_name(path)} has no docstring saying what it holds"


def test_no_function_is_longer_than_a_screen():
    long = [
        f"{_name(p)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for p in MODULES
        for f in _functions(ast.parse(p.read_text()))
        if f.end_lineno - f.lineno + 1 > LONGEST
    ]
    assert not long, f"functions over {LONGEST} lines: {long}"


def test_imports_sit_at_the_top_of_their_module():
    inner = []
    for path in MODULES:
        for f in _functions(ast.parse(path.read_text())):
            for node in ast.walk(f):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    deferred = name.split(".")[0] != "prune_cli" and name.startswith(DEFERRED)
                    if not deferred and (path.name, name) not in LAZY_API:
                        inner.append(f"{_name(path)}:{node.lineno} imports {name} inside {f.name}")
    assert not inner, inner


def test_the_wheel_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found | {"prune_cli.conf"} == listed


def test_the_layer_contract_names_every_package():
    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    packages = {f"prune_cli.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert named == packages, "every top-level package has its place in the layers (pyproject.toml)"
