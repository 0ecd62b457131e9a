"""The package's three layers (README "Reading the code"): the method imports nothing from the
course or the tools and touches no file; the course imports nothing from the tools."""
from __future__ import annotations

import ast
import builtins
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cip_helpers.course.config import REPO_ROOT

PACKAGE = REPO_ROOT / "cip_helpers"
LAYERS = ("method", "course", "tools")  # each may import only the layers before it
FILE_MODULES = {"os", "pathlib", "shutil", "tempfile", "pickle", "json", "io", "glob", "zipfile", "urllib"}
FILE_CALLS = {"open", "load", "save", "read_text", "write_text", "read_bytes", "write_bytes", "mkdir",
              "unlink", "loadtxt", "savetxt", "fromfile", "tofile"}


def layer_imports(source: str, own: str) -> list[tuple[int, str]]:
    """(line, target) of every import in ``source`` (a module of layer ``own``) that reaches a
    layer after ``own``, relative (``from ..tools import x``) or absolute (``cip_helpers.tools``)."""
    later = LAYERS[LAYERS.index(own) + 1:]
    bad = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 2:  # from ..X import / from .. import X
                names = [module.split(".")[0]] if module else [a.name for a in node.names]
            elif node.level == 0:
                names = [module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            layer = parts[1] if parts[0] == "cip_helpers" and len(parts) > 1 else parts[0]
            if layer in later:
                bad.append((node.lineno, name))
    return bad


def file_access(source: str) -> list[tuple[int, str]]:
    """(line, what) of every import of a file-handling module and every call of a file-handling
    function or method (``open``, ``torch.load``, ``path.write_text``, ...) in ``source``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] in FILE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if (node.module or "").split(".")[0] in FILE_MODULES:
                bad.append((node.lineno, node.module))
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in FILE_CALLS:
                bad.append((node.lineno, name))
    return bad


def modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).glob("*.py"))


def test_the_layers_are_folders_and_hold_every_module():
    assert [p.name for p in PACKAGE.glob("*.py")] == ["__init__.py"]
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").exists()
        assert len(modules(layer)) >= 3
    assert {"scores.py", "poisoning.py", "defenses.py", "verification.py", "models.py"} <= \
        {p.name for p in modules("method")}


@pytest.mark.parametrize("layer", LAYERS[:2])
def test_no_layer_imports_a_later_one(layer):
    found = {p.name: layer_imports(p.read_text(), layer) for p in modules(layer)}
    assert not {k: v for k, v in found.items() if v}


def test_the_method_opens_no_file():
    found = {p.name: file_access(p.read_text()) for p in modules("method")}
    assert not {k: v for k, v in found.items() if v}


def test_the_checks_find_what_they_look_for():
    """The two scanners above are not vacuous: they flag each kind of fault."""
    assert layer_imports("from ..course import store\nfrom ..tools.run import main\n", "method") == \
        [(1, "course"), (2, "tools")]
    assert layer_imports("import cip_helpers.tools.report\nfrom cip_helpers.course import data\n",
                         "method") == [(1, "cip_helpers.tools.report"), (2, "cip_helpers.course")]
    assert layer_imports("from ..method import scores\nfrom . import store\n", "course") == []
    assert layer_imports("from ..tools import report\n", "course") == [(1, "tools")]
    assert [w for _, w in file_access(
        "from pathlib import Path\nimport json\nx = torch.load(p)\nopen(p)\nPath(p).write_text('')\n")] == \
        ["pathlib", "json", "load", "open", "write_text"]


def test_importing_the_method_loads_neither_course_nor_tools():
    code = ("import sys\nimport cip_helpers.method.defenses, cip_helpers.method.verification, "
            "cip_helpers.method.poisoning, cip_helpers.method.scores, cip_helpers.method.inputs\n"
            "print(sorted(m for m in sys.modules if m.startswith(('cip_helpers.course', 'cip_helpers.tools',"
            " 'pandas', 'matplotlib', 'IPython'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]"


def test_the_method_runs_with_every_file_closed(monkeypatch):
    """Build CIP, DP and DAWN, answer queries with PBD, and run the ownership test while any file
    open raises: the method's work never touches the disk."""
    from cip_helpers.method import verification
    from cip_helpers.method.defenses import CIP, DAWN, DP
    from cip_helpers.method.models import small_cnn

    torch.manual_seed(0)
    owner, suspect = small_cnn(1, 10, 28).eval(), small_cnn(1, 10, 28).eval()
    innocents = [small_cnn(1, 10, 28).eval() for _ in range(3)]
    train, queries = torch.rand(64, 1, 28, 28), torch.rand(16, 1, 28, 28)

    def refuse(*args, **kwargs):
        raise AssertionError(f"the method opened a file: {args[:1]}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    cip = CIP.calibrate(owner, train, p1=50.0, p2=90.0, r1_percentile=50.0)
    for api in (cip, DP(owner, (1, 28, 28)), DAWN(owner, (1, 28, 28), rate=0.5)):
        assert api(queries).shape == (16, 10)
    x, y = cip.trigger_set.x, cip.trigger_set.labels
    assert len(x) > 0
    ood = torch.as_tensor(verification.ood_flags(owner, x, cip.e1))
    result = verification.ownership_test(suspect, innocents, x, y, ood, alpha=0.01)
    assert set(result) >= {"p_value", "flagged"} and 0.0 <= result["p_value"] <= 1.0
