"""The package's layers: every import (module-level or inside a function) points down or stays in its package.

See docs/architecture.md. A failure names the importing module, the line and the layer it reached up to.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ferlab

ROOT = Path(ferlab.__file__).resolve().parent

# lowest first; a module may import its own package, any package of a lower layer, and the foundation's
# siblings of its own layer only where SIDEWAYS allows
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ferlab", "ferlab.hardware", "ferlab.images", "ferlab.transforms", "ferlab.plots", "ferlab.data",
     "ferlab.models", "ferlab.pretrained", "ferlab.checkpoint", "ferlab.ensemble", "ferlab.corruptions"),  # foundation
    ("ferlab.inference",),
    ("ferlab.train", "ferlab.evaluate", "ferlab.explain", "ferlab.recognize", "ferlab.predict_csv",
     "ferlab.robustness"),  # tasks
    ("ferlab.study", "ferlab.serve"),  # applications built on the tasks
    ("ferlab.cli",),
    ("ferlab.__main__",),
)
# imports between different packages of one layer; the foundation is one layer of small pieces that use each other
SIDEWAYS_LAYERS = {0}


def package_of(module: str) -> str:
    """The unit of ``module`` in LAYERS: ferlab.data.formats -> ferlab.data; ferlab -> ferlab."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer_of(module: str) -> int:
    unit = package_of(module)
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"{module} ({unit}) is in no layer of tests/test_layers.py: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str) -> list[tuple[int, str]]:
    """(line, imported ferlab module) for every absolute import in ``source``, however deep in the code."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ferlab":
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ferlab"]
    return out


def upward_imports(me: str, source: str, where: str) -> list[str]:
    """The imports of module ``me`` (its code ``source``, shown as ``where``) that point up or sideways."""
    bad = []
    mine = layer_of(me)
    for line, target in imports(source):
        theirs = layer_of(target)
        same_unit = package_of(target) == package_of(me)
        if theirs > mine or (theirs == mine and not same_unit and mine not in SIDEWAYS_LAYERS):
            bad.append(f"{where}:{line}: {me} (layer {mine}) imports {target} (layer {theirs})")
    return bad


def test_every_module_has_a_layer():
    for path in ROOT.rglob("*.py"):
        layer_of(module_name(path))


def test_no_module_imports_upward():
    bad = [b for path in sorted(ROOT.rglob("*.py"))
           for b in upward_imports(module_name(path), path.read_text(), str(path.relative_to(ROOT.parent)))]
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from ferlab.serve.app import create_app\n", "imports ferlab.serve.app"),  # foundation -> application
    ("def f():\n    from ferlab.train import fit\n", "imports ferlab.train"),  # a lazy import counts too
    ("import ferlab.recognize.api\n", "imports ferlab.recognize.api"),
    ("from ferlab.inference.loader import load_model\n", "imports ferlab.inference.loader"),
])
def test_an_upward_import_is_caught(source, expected):
    assert any(expected in b for b in upward_imports("ferlab.data.probe", source, "probe.py"))


def test_sideways_imports_between_tasks_are_caught():
    assert upward_imports("ferlab.explain.probe", "from ferlab.evaluate import split_rows\n", "probe.py")


def test_downward_and_own_package_imports_pass():
    source = "from ferlab.inference.backends import open_backend\nfrom ferlab.recognize.detect import crop_faces\n"
    assert upward_imports("ferlab.recognize.probe", source, "probe.py") == []
