"""One source of truth for the loops the notebooks teach (d2l-style): a notebook cell that shows a
package function starts with ``# shown from cip_helpers.<layer>.<module>`` and holds that
function's (or class's) source exactly; the harness, the tests and load-or-train run the package's
copy. This test keeps the two equal, so a cell never shows code that is not what runs."""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import textwrap

import pytest

from cip_helpers.course.config import REPO_ROOT

MARK = re.compile(r"^# shown from (cip_helpers(?:\.\w+)+)\b")
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def shown_cells() -> list[tuple[str, int, str, str]]:
    """(notebook, cell index, module, cell source) of every marked code cell."""
    found = []
    for path in NOTEBOOKS:
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            source = "".join(cell["source"])
            m = MARK.match(source)
            if cell["cell_type"] == "code" and m:
                found.append((path.name, i, m.group(1), source))
    return found


def definitions(source: str) -> dict[str, str]:
    """name -> source text of every top-level function and class in ``source``."""
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node, padded=False) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def package_source(obj) -> str:
    """The source of ``obj`` from its decorator-free ``def``/``class`` line on."""
    text = textwrap.dedent(inspect.getsource(obj))
    tree = ast.parse(text)
    return ast.get_source_segment(text, tree.body[0], padded=False)


CELLS = shown_cells()


def test_the_notebooks_show_their_loops():
    """The loops issue 26 asks to see in code cells: OE fine-tuning and its loss (02), the
    query-then-train attack (07), a DFME round (08)."""
    shown = {(nb[:2], name) for nb, _, _, source in CELLS for name in definitions(source)}
    assert {("02", "oe_energy_loss"), ("02", "finetune_oe"), ("08", "generator_step"), ("08", "student_step"),
            ("08", "dfme_round"), ("07", "steal_once")} <= shown, shown


@pytest.mark.parametrize("notebook, index, module, source", CELLS, ids=[f"{c[0][:2]}-cell{c[1]}" for c in CELLS])
def test_a_shown_cell_is_the_package_code(notebook, index, module, source):
    mod = importlib.import_module(module)
    defs = definitions(source)
    assert defs, f"{notebook} cell {index} is marked but defines nothing"
    for name, text in defs.items():
        assert hasattr(mod, name), f"{notebook} cell {index} shows {name}, which {module} does not define"
        want = package_source(getattr(mod, name))
        assert text == want, (f"{notebook} cell {index}: {name} differs from {module}.{name}; copy the "
                              f"package's source into the cell (or change both)")


def test_the_check_finds_a_difference():
    source = "# shown from cip_helpers.method.scores\ndef energy_score(logits, temperature=1.0):\n    return 0\n"
    defs = definitions(source)
    from cip_helpers.method import scores
    assert defs["energy_score"] != package_source(scores.energy_score)
    assert MARK.match(source).group(1) == "cip_helpers.method.scores"
