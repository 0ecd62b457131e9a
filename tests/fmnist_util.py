"""Debian's Fashion-MNIST package for the real-data tests (test_fashion_mnist, test_full_profile):
where its archives are, or skip (fail under ``CIP_REQUIRE_FMNIST=1``, which ``.ci/run`` sets
after installing it, so CI cannot pass by skipping)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_prep import fetch

PACKAGE = fetch.LOCAL_SOURCES["fashionmnist"]
ARCHIVES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz")


def package_folder() -> Path:
    """The folder holding the package's four archives; skips (or fails) the test without it."""
    for folder in map(Path, PACKAGE.folders):
        if all((folder / a).is_file() for a in ARCHIVES):
            return folder
    why = (f"Debian's {PACKAGE.package} is not installed ({PACKAGE.install}, as root; .ci/run does it "
           f"when it can)")
    if os.environ.get("CIP_REQUIRE_FMNIST") == "1":
        pytest.fail(why + ", but CIP_REQUIRE_FMNIST=1 says it must be")
    pytest.skip(why)
