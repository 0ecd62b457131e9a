"""Issue 18, interactive use: the set-up gives JupyterLab (``python3 tasks.py lab``), and an
interactive session does not dirty the tracked notebooks (git's nbstripout filter, installed by
every ``tasks.py`` command, strips outputs when a notebook is staged)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _strip(path: Path) -> bytes:
    """What the git filter stores for ``path`` (nbstripout with the filter's options)."""
    return subprocess.run([sys.executable, "-m", "nbstripout", "--keep-id", "-t"], stdin=path.open("rb"),
                          capture_output=True, check=True).stdout


def test_notebook_sources_are_what_the_filter_would_commit():
    """The stored sources are output-free in the filter's own sense: stripping changes no byte (so
    the filter never rewrites a clean notebook, and a notebook with outputs cannot be committed)."""
    from concurrent.futures import ThreadPoolExecutor

    assert NOTEBOOKS
    with ThreadPoolExecutor(4) as pool:  # one nbstripout process per notebook, a few at a time
        stripped = list(pool.map(_strip, NOTEBOOKS))
    changed = [p.name for p, out in zip(NOTEBOOKS, stripped) if out != p.read_bytes()]
    assert not changed, f"nbstripout would change {changed}: run python -m nbstripout --keep-id on them"


def test_gitattributes_filters_only_the_notebook_sources():
    attrs = (ROOT / ".gitattributes").read_text()
    rules = [line.split() for line in attrs.splitlines() if line.strip() and not line.startswith("#")]
    assert rules == [["notebooks/*.ipynb", "filter=nbstripout", "diff=ipynb"]]  # executed copies keep outputs


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_interactive_session_does_not_dirty_tracked_notebooks(tmp_path):
    """What JupyterLab's autosave did to 03 (6.6 KB -> 333 KB of outputs): with the filter the
    working tree keeps the outputs, git shows no diff, and staging stores the clean file (so
    nothing is left to commit)."""
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / ".gitattributes", repo / ".gitattributes")
    book = repo / "notebooks" / "03_threshold_selection.ipynb"
    shutil.copy(ROOT / "notebooks" / book.name, book)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                              capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    assert tasks.install_notebook_filter(repo, Path(sys.executable))
    git("add", ".")
    git("commit", "-q", "-m", "clean")
    clean = book.read_bytes()

    nb = json.loads(clean)  # an interactive session: every code cell executed, outputs autosaved
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["execution_count"] = i + 1
        cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["x" * 1000 + "\n"] * 30}]
    book.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    assert len(book.read_bytes()) > 5 * len(clean)

    assert git("diff") == "", "the session shows up as a change"  # (status may list it until staged)
    git("add", str(book))
    assert git("status", "--porcelain") == "", "staging the session left a change to commit"
    assert git("show", f":notebooks/{book.name}").encode() == clean
    assert json.loads(book.read_text())["cells"][2]["outputs"], "the working copy lost its outputs"


def test_install_notebook_filter_outside_git_changes_nothing(tmp_path):
    assert tasks.install_notebook_filter(tmp_path, Path(sys.executable)) is False
    assert not any(tmp_path.iterdir())


def test_lab_command_opens_the_notebooks_and_adds_allow_root_only_for_root(capsys):
    as_root = tasks.lab_command([], uid=0)
    assert as_root[1:3] == ["-m", "jupyterlab"] and as_root[-1] == "--allow-root"
    assert f"--notebook-dir={ROOT / 'notebooks'}" in as_root
    assert "--allow-root" in capsys.readouterr().out
    assert "--allow-root" not in tasks.lab_command([], uid=1000)
    assert tasks.lab_command(["--allow-root", "--port=9999"], uid=0).count("--allow-root") == 1


def test_setup_installs_jupyterlab_and_nbstripout():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip() for d in deps}
    assert {"jupyterlab", "nbstripout"} <= names
    subprocess.run([sys.executable, "-m", "jupyterlab", "--version"], check=True, capture_output=True)


def test_fast_tier_leaves_out_only_the_slow_marker():
    assert tasks.test_args(["--fast", "-q"]) == ["-m", "not slow", "-q"]
    assert tasks.test_args(["-q", "-x"]) == ["-q", "-x"]
    assert tasks.test_args([]) == []
