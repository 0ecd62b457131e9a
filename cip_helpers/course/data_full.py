"""Reader for the ``full`` (paper-scale) profile: the arrays that ``data_prep/`` laid out.

Nothing here downloads. Every missing file raises :class:`FileNotFoundError` naming the path
expected and the ``python -m data_prep.fetch ...`` command that creates it; an unreadable file
raises :class:`ValueError` saying to delete and re-fetch it.

Layout under the data root (``cip_helpers.course.config.data_root()``)::

    id/<dataset>/train.npz     x: uint8 (N, C, H, W), y: int64 (N,), classes: str (K,)
    id/<dataset>/test.npz      same keys
    pools/outlier.npy          uint8 (300000, 3, 32, 32)  the OE "300K random images"
    pools/knockoff.npy         uint8 (N, 3, 32, 32)       user-provided natural images
    pools/textures.npy         uint8 (5640, 3, 32, 32)    DTD (train + val + test, partition 1)
    manifest.json              sha256 of every produced file

Pools are stored once, as RGB 32x32 ``.npy`` files (memory-mapped, so a subset does not read
the whole file); :func:`load_pool_array` converts them to the ID image size and channel count
(28x28 gray for MNIST-like datasets) at load time.
"""
from __future__ import annotations

import json
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import data_root

DATASETS: dict[str, dict] = {
    "mnist": {"shape": (1, 28, 28), "n_classes": 10, "n_train": 60_000, "n_test": 10_000},
    "fashionmnist": {"shape": (1, 28, 28), "n_classes": 10, "n_train": 60_000, "n_test": 10_000},
    "cifar10": {"shape": (3, 32, 32), "n_classes": 10, "n_train": 50_000, "n_test": 10_000},
    "cifar100": {"shape": (3, 32, 32), "n_classes": 100, "n_train": 50_000, "n_test": 10_000},
    "food101": {"shape": (3, 32, 32), "n_classes": 101, "n_train": 75_750, "n_test": 25_250},
}
POOL_NAMES = ("outlier", "knockoff", "textures")
POOL_SHAPE = (3, 32, 32)  # every pool is stored as RGB 32x32
OUTLIER_SOURCE_NAME = "300K_random_images.npy"
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luminance, as PIL's "L" conversion

_FETCH = "python -m data_prep.fetch"


# --- layout ------------------------------------------------------------------------------------
def id_path(root: Path, dataset: str, split: str) -> Path:
    """``root/id/<dataset>/<split>.npz`` (split: ``train`` or ``test``)."""
    return Path(root) / "id" / dataset / f"{split}.npz"


def pool_path(root: Path, name: str) -> Path:
    """``root/pools/<name>.npy``."""
    return Path(root) / "pools" / f"{name}.npy"


def fetch_command(what: str, root: Path | None = None) -> str:
    """The shell command that creates the files of ``what`` (a dataset or pool name); it names
    ``--root`` only when ``root`` is not the default data root."""
    root_arg = ""
    if root is not None and Path(root).resolve() != data_root().resolve():
        root_arg = f" --root {root}"
    if what in DATASETS:
        return f"{_FETCH}{root_arg} --dataset {what}"
    if what == "outlier":
        return f"{_FETCH}{root_arg} --outlier-file /path/to/{OUTLIER_SOURCE_NAME}"
    if what == "knockoff":
        return f"{_FETCH}{root_arg} --knockoff-dir /path/to/imagenet_subset"
    if what == "textures":
        return f"{_FETCH}{root_arg} --textures"
    raise ValueError(f"unknown dataset or pool {what!r}; choose one of "
                     f"{sorted(DATASETS) + list(POOL_NAMES)}")


def _missing(path: Path, what: str, root: Path) -> FileNotFoundError:
    hint = ""
    if what == "outlier":
        hint = (f" (download {OUTLIER_SOURCE_NAME} by hand first: "
                "https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy)")
    elif what == "knockoff":
        hint = " (a folder of natural images you provide, e.g. an ImageNet subset)"
    return FileNotFoundError(f"{what}: expected {path}, which does not exist. Create it with: "
                             f"{fetch_command(what, root)}{hint}. See data_prep/README.md.")


def _corrupt(path: Path, what: str, root: Path, why: str) -> ValueError:
    return ValueError(f"{what}: file {path} is unreadable or malformed ({why}). Delete it and "
                      f"re-fetch: rm {path} && {fetch_command(what, root)}")


# --- validation (also used by data_prep to decide whether to skip) ------------------------------
def read_id_file(path: Path, dataset: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                              list[str]]:
    """Read and check one ``id/<dataset>/<split>.npz``; returns ``(x, y, classes)``."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    root = Path(root) if root is not None else Path(path).parents[2]
    path = Path(path)
    if not path.is_file():
        raise _missing(path, dataset, root)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in ("x", "y", "classes") if key in f.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise _corrupt(path, dataset, root, f"{type(err).__name__}: {err}") from err
    missing = {"x", "y", "classes"} - set(arrays)
    if missing:
        raise _corrupt(path, dataset, root, f"missing arrays {sorted(missing)}")
    x, y, classes = arrays["x"], arrays["y"], [str(c) for c in arrays["classes"]]
    spec = DATASETS[dataset]
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != spec["shape"]:
        raise _corrupt(path, dataset, root, f"x is {x.dtype} {x.shape}, expected uint8 "
                                            f"(N, {', '.join(map(str, spec['shape']))})")
    if y.dtype != np.int64 or y.shape != (len(x),):
        raise _corrupt(path, dataset, root, f"y is {y.dtype} {y.shape}, expected int64 ({len(x)},)")
    if len(classes) != spec["n_classes"]:
        raise _corrupt(path, dataset, root, f"{len(classes)} class names, expected "
                                            f"{spec['n_classes']}")
    if len(y) and (y.min() < 0 or y.max() >= spec["n_classes"]):
        raise _corrupt(path, dataset, root, f"labels span [{y.min()}, {y.max()}], expected "
                                            f"[0, {spec['n_classes'] - 1}]")
    return x, y, classes


def open_pool_file(path: Path, name: str, root: Path | None = None) -> np.ndarray:
    """Memory-map and check one ``pools/<name>.npy``: uint8 (N, 3, 32, 32)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parents[1]
    if not path.is_file():
        raise _missing(path, name, root)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise _corrupt(path, name, root, f"{type(err).__name__}: {err}") from err
    if arr.dtype != np.uint8 or arr.ndim != 4 or tuple(arr.shape[1:]) != POOL_SHAPE:
        raise _corrupt(path, name, root, f"array is {arr.dtype} {arr.shape}, expected uint8 "
                                         f"(N, 3, 32, 32)")
    return arr


# --- public API used by cip_helpers.course.data ----------------------------------------------------------
def load_id_arrays(dataset: str, root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """``(train_x, train_y, test_x, test_y, classes)`` of ``dataset``: x uint8 (N, C, H, W),
    y int64. The official train/test split; data.py does any subsetting and the half split."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown full-profile dataset {dataset!r}; choose one of "
                         f"{sorted(DATASETS)}")
    root = Path(root)
    tx, ty, classes = read_id_file(id_path(root, dataset, "train"), dataset, root)
    vx, vy, test_classes = read_id_file(id_path(root, dataset, "test"), dataset, root)
    if classes != test_classes:
        raise _corrupt(id_path(root, dataset, "test"), dataset, root,
                       "class names differ from train.npz")
    return (torch.from_numpy(tx), torch.from_numpy(ty), torch.from_numpy(vx),
            torch.from_numpy(vy), classes)


def convert_images(x: Tensor, image_size: int, channels: int) -> Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, image_size, image_size): RGB->gray by luminance,
    gray->RGB by repetition, bilinear antialiased resize."""
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected a uint8 (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    if channels not in (1, 3) or x.shape[1] not in (1, 3):
        raise ValueError(f"only 1 or 3 channels are supported (from {x.shape[1]} to {channels})")
    same_size = tuple(x.shape[2:]) == (image_size, image_size)
    if x.shape[1] == channels and same_size:
        return x
    if x.shape[1] == 1 and channels == 3 and same_size:
        return x.expand(-1, 3, -1, -1).contiguous()
    out = torch.empty(len(x), channels, image_size, image_size, dtype=torch.uint8)
    luma = torch.tensor(LUMA).view(1, 3, 1, 1)
    for start in range(0, len(x), 8192):  # chunks: 300K float images would need ~3.7 GB at once
        chunk = x[start:start + 8192].float()
        if chunk.shape[1] == 3 and channels == 1:
            chunk = (chunk * luma).sum(1, keepdim=True)
        if not same_size:
            chunk = torch.nn.functional.interpolate(chunk, size=(image_size, image_size),
                                                    mode="bilinear", antialias=True,
                                                    align_corners=False)
        if chunk.shape[1] == 1 and channels == 3:
            chunk = chunk.expand(-1, 3, -1, -1)
        out[start:start + 8192] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def is_stand_in(root: Path, path: Path) -> bool:
    """Whether ``root/manifest.json`` marks ``path`` (under ``root``) as a stand-in (written by
    ``python -m data_prep.standins``). False without a manifest or an entry."""
    manifest = Path(root) / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
        rel = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(files.get(rel, {}).get("stand_in", False))


def load_pool_array(name: str, root: Path, image_size: int, channels: int, n: int,
                    seed: int) -> Tensor:
    """A seeded random subset of ``n`` images (``n=0``: all) of pool ``name`` (``outlier``,
    ``knockoff`` or ``textures``) as uint8 (n, channels, image_size, image_size).

    The subset depends only on ``(n, seed, pool size)``; images keep their file order."""
    if name not in POOL_NAMES:
        raise ValueError(f"unknown full-profile pool {name!r}; choose one of {POOL_NAMES} "
                         "(the 'noise' pool is generated, not loaded)")
    if n < 0:
        raise ValueError(f"pool size must be >= 0, got {n}")
    root = Path(root)
    path = pool_path(root, name)
    arr = open_pool_file(path, name, root)
    if is_stand_in(root, path):
        warnings.warn(f"{path} is a STAND-IN pool (python -m data_prep.standins: crops of scikit-image's "
                      f"photos), not the paper's {name} pool: results on it only show that the code runs. "
                      f"Lay out the real pool with {fetch_command(name, root)}", UserWarning, stacklevel=2)
    available = len(arr)
    if n > available:
        raise ValueError(f"{name}: asked for {n} images but {path} holds only {available}; "
                         f"lower the profile's pool size to <= {available} or provide more images "
                         f"({fetch_command(name, root)})")
    if n == 0 or n == available:
        idx = np.arange(available)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(available, size=n, replace=False))
    try:
        x = torch.from_numpy(np.ascontiguousarray(arr[idx]))
    except (OSError, ValueError) as err:
        raise _corrupt(path, name, root, f"{type(err).__name__}: {err}") from err
    return convert_images(x, image_size, channels)
