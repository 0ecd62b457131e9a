#!/usr/bin/env python3
"""Set-up and entry points of the course; needs only Python >= 3.10 and pip.

    python3 tasks.py course            # create .venv if missing, install, run every notebook (quick)
    python3 tasks.py test              # create .venv if missing, install, run the test suite
    python3 tasks.py course --profile quick-fmnist   # Fashion-MNIST (lays out the data first)

Options: ``course --profile smoke|quick|full --only 01,03``; ``test`` passes extra args to pytest.
The virtual environment lives in ``.venv/`` at the repository root and is (re)installed whenever
``pyproject.toml`` changed since the last install.
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
        venv.EnvBuilder(with_pip=True).create(VENV)
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == want:
        return
    print("installing the project and its dependencies into .venv (first run: several minutes)",
          flush=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                    "-e", f"{ROOT}[dev]"], check=True, cwd=ROOT)
    STAMP.write_text(want + "\n")


DATA_PROFILES = {"quick-fmnist": "fashionmnist"}
"""Profiles on data that ``python -m data_prep.fetch --dataset <name>`` lays out before the run."""


def _profile_of(args: list[str]) -> str:
    """The value of ``--profile X`` / ``--profile=X`` in ``args`` ("" when absent)."""
    for i, a in enumerate(args):
        if a == "--profile" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--profile="):
            return a.split("=", 1)[1]
    return ""


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("course", "test"):
        print(__doc__)
        return 2
    ensure_venv()
    if argv[0] == "course":
        args = argv[1:] if any(a.startswith("--profile") for a in argv[1:]) else ["--profile", "quick", *argv[1:]]
        dataset = DATA_PROFILES.get(_profile_of(args))
        if dataset:  # lay out the real data first (skipped when present; offline from a package)
            status = subprocess.run([str(PYTHON), "-m", "data_prep.fetch", "--dataset", dataset],
                                    cwd=ROOT).returncode
            if status:
                return status
        cmd = [str(PYTHON), "-m", "cip_helpers.run", *args]
    else:
        cmd = [str(PYTHON), "-m", "pytest", *argv[1:]]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
