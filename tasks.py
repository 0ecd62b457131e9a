#!/usr/bin/env python3
"""Set-up and entry points of the course; needs only Python >= 3.10 and pip.

    python3 tasks.py course            # create .venv if missing, install, run every notebook (quick)
    python3 tasks.py test              # create .venv if missing, install, run the test suite
    python3 tasks.py test --fast       # the daily tier: everything but the end-to-end runs
    python3 tasks.py course --profile quick-fmnist   # Fashion-MNIST (lays out the data first)
    python3 tasks.py lab               # same set-up, then JupyterLab on notebooks/ (sliders live)

Options: ``course --profile smoke|quick|quick-fmnist|full --seeds 0,1,2 --only 01,03`` (passed to
``python -m cip_helpers.tools.run``); ``test`` passes extra args to pytest; ``lab`` to JupyterLab.
The virtual environment lives in ``.venv/`` at the repository root and is (re)installed whenever
``pyproject.toml`` changed since the last install. In a git checkout every command also installs
the nbstripout filter for ``notebooks/*.ipynb`` (``.gitattributes``), so a notebook saved by
JupyterLab with outputs is committed without them.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".install-stamp"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")


def ensure_venv() -> None:
    """Create .venv and install the project (editable, with test extras) when needed."""
    if sys.version_info < (3, 10):
        sys.exit(f"Python >= 3.10 is required, this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        try:
            venv.EnvBuilder(with_pip=True).create(VENV)
        except (OSError, subprocess.CalledProcessError) as exc:
            sys.exit(f"could not create {VENV} ({exc}). On Debian/Ubuntu the venv module needs its "
                     f"package: apt-get install python3-venv; then remove {VENV} and run this again")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == want:
        return
    print("installing the project and its dependencies into .venv (first run: several minutes)",
          flush=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                    "-e", f"{ROOT}[dev]"], check=True, cwd=ROOT)
    STAMP.write_text(want + "\n")


def install_notebook_filter(root: Path = ROOT, python: Path = PYTHON) -> bool:
    """Configure git's ``nbstripout`` filter (named in ``.gitattributes`` for ``notebooks/*.ipynb``)
    to strip outputs with this venv's nbstripout when a notebook is staged; the files on disk keep
    their outputs. ``--keep-id`` keeps the committed cell ids. Returns False (and changes nothing)
    outside a git checkout or without git."""
    if not (root / ".git").exists():
        return False
    clean = f'"{python}" -m nbstripout --keep-id'
    settings = {"filter.nbstripout.clean": clean, "filter.nbstripout.smudge": "cat",
                "diff.ipynb.textconv": f'"{python}" -m nbstripout --keep-id -t'}
    try:
        for key, value in settings.items():
            subprocess.run(["git", "config", "--local", key, value], cwd=root, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


def lab_command(argv: list[str], uid: int | None = None) -> list[str]:
    """``python -m jupyterlab`` on ``notebooks/`` with ``argv`` appended; adds ``--allow-root``
    when running as root (``uid`` 0; Jupyter refuses root without it) unless already given."""
    uid = os.getuid() if uid is None and hasattr(os, "getuid") else uid
    cmd = [str(PYTHON), "-m", "jupyterlab", f"--notebook-dir={ROOT / 'notebooks'}", *argv]
    if uid == 0 and "--allow-root" not in argv:
        print("running as root: adding --allow-root (Jupyter refuses root without it)", flush=True)
        cmd.append("--allow-root")
    return cmd


DATA_PROFILES = {"quick-fmnist": "fashionmnist", "paper-fmnist": "fashionmnist"}
"""Profiles on data that ``python -m data_prep.fetch --dataset <name>`` lays out before the run."""


def _profile_of(args: list[str]) -> str:
    """The value of ``--profile X`` / ``--profile=X`` in ``args`` ("" when absent)."""
    for i, a in enumerate(args):
        if a == "--profile" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--profile="):
            return a.split("=", 1)[1]
    return ""


def test_args(args: list[str]) -> list[str]:
    """pytest's arguments for ``tasks.py test ARGS``: ``--fast`` becomes ``-m "not slow"`` (the
    daily tier: no end-to-end runs); everything else goes to pytest unchanged."""
    if "--fast" not in args:
        return list(args)
    return ["-m", "not slow", *(a for a in args if a != "--fast")]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("course", "test", "lab"):
        print(__doc__)
        return 2
    ensure_venv()
    install_notebook_filter()
    if argv[0] == "lab":
        print("JupyterLab on notebooks/ (open the URL it prints; Ctrl-C twice stops it). Results of "
              "interactive runs go to results/<profile>/seed-<k>/, like the course's.", flush=True)
        return subprocess.run(lab_command(argv[1:]), cwd=ROOT).returncode
    if argv[0] == "course":
        args = argv[1:] if any(a.startswith("--profile") for a in argv[1:]) else ["--profile", "quick", *argv[1:]]
        dataset = DATA_PROFILES.get(_profile_of(args))
        if dataset:  # lay out the real data first (skipped when present; offline from a package)
            status = subprocess.run([str(PYTHON), "-m", "data_prep.fetch", "--dataset", dataset],
                                    cwd=ROOT).returncode
            if status:
                return status
        cmd = [str(PYTHON), "-m", "cip_helpers.tools.run", *args]
    else:
        cmd = [str(PYTHON), "-m", "pytest", *test_args(argv[1:])]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
