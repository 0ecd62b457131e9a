"""Offline building blocks of ``data_prep``: image decoding, array conversion, atomic writes and
the manifest. Nothing here touches the network, so every function can be tested on fake data.

Output formats (read back by :mod:`cip_helpers.course.data_full`):

* ID splits: ``.npz`` with ``x`` uint8 (N, C, H, W), ``y`` int64 (N,), ``classes`` str (K,).
* Pools: ``.npy`` holding uint8 (N, C, H, W), memory-mappable.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CHUNK = 10_000


def log(message: str) -> None:
    """Progress messages of data_prep (stdout, flushed so they interleave with tqdm)."""
    print(message, flush=True)


# --- files -------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(out_path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``out_path``; on success move it onto ``out_path`` with
    ``os.replace`` (atomic on one file system), on failure delete it. Readers never see a
    half-written file."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npy(arr: np.ndarray, out_path: Path) -> Path:
    """Write ``arr`` to ``out_path`` (.npy) atomically."""
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    return Path(out_path)


def save_id_split(x: np.ndarray, y: np.ndarray, classes: Sequence[str], out_path: Path) -> Path:
    """Write one ID split (``x`` uint8 NCHW, ``y`` int64, ``classes``) to ``out_path`` (.npz)
    atomically, uncompressed (fast to load)."""
    x = np.ascontiguousarray(x)
    y = np.asarray(y)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"x must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
    if y.shape != (len(x),):
        raise ValueError(f"y must have shape ({len(x)},), got {y.shape}")
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=x, y=y.astype(np.int64), classes=np.array([str(c) for c in classes]))
    return Path(out_path)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """``root/manifest.json`` as a dict (``{"files": {}}`` when absent)."""
    path = Path(root) / "manifest.json"
    if not path.exists():
        return {"files": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err}); delete it and rerun "
                         "python -m data_prep.fetch to rebuild it") from err
    manifest.setdefault("files", {})
    return manifest


def record_in_manifest(root: Path, path: Path, **info: Any) -> dict[str, Any]:
    """Hash ``path`` and store its entry (sha256, bytes, ``info``) in ``root/manifest.json``,
    keyed by the path relative to ``root``. Returns the entry."""
    root, path = Path(root), Path(path)
    entry = {"sha256": sha256_file(path), "bytes": path.stat().st_size,
             "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             **info}
    manifest = read_manifest(root)
    manifest["files"][path.relative_to(root).as_posix()] = entry
    with atomic_path(root / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return entry


# --- images ------------------------------------------------------------------------------------
def fit_image(img: Image.Image, size: int, channels: int) -> Image.Image:
    """Convert to RGB (``channels=3``) or luminance gray (``channels=1``), then scale the shorter
    side to ``size`` and center-crop to ``size`` x ``size`` (antialiased bicubic)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size == (size, size):
        return img
    return ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)


def image_to_array(img: Image.Image | np.ndarray, size: int, channels: int) -> np.ndarray:
    """A PIL image or uint8 HW/HWC array as uint8 (channels, size, size)."""
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise TypeError(f"expected a uint8 image array, got {img.dtype}")
        img = Image.fromarray(img)
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 array, got {type(img).__name__}; build "
                        "the torchvision dataset without a transform")
    arr = np.asarray(fit_image(img, size, channels), dtype=np.uint8)
    return arr.reshape(size, size, channels).transpose(2, 0, 1)


def load_image_file(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode an image file into uint8 (channels, size, size). JPEGs are decoded at reduced scale
    (PIL draft mode) when much larger than ``size``. Unreadable files raise ValueError."""
    try:
        with Image.open(path) as img:
            img.draft("L" if channels == 1 else "RGB", (2 * size, 2 * size))
            return image_to_array(img, size, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode image {path} ({type(err).__name__}: {err}); delete or "
                         "replace it and rerun") from err


class FittedLoader:
    """A torchvision ``loader=`` that returns images already fitted to ``size`` (picklable)."""

    def __init__(self, size: int, channels: int = 3) -> None:
        self.size, self.channels = size, channels

    def __call__(self, path: str | Path) -> Image.Image:
        arr = load_image_file(Path(path), self.size, self.channels)
        return Image.fromarray(arr[0] if self.channels == 1 else arr.transpose(1, 2, 0))


def find_images(src_dir: Path) -> list[Path]:
    """All .jpg/.jpeg/.png files under ``src_dir`` (recursive, any case; hidden files and folders
    skipped), sorted by relative path so the order never depends on the file system."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"image folder {src_dir} does not exist or is not a folder")
    found = []
    for path in src_dir.rglob("*"):
        rel = path.relative_to(src_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(src_dir).as_posix())


def _progress(iterable: Iterable, total: int, desc: str) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", mininterval=1.0)


# --- builders ----------------------------------------------------------------------------------
def build_image_folder_pool(src_dir: Path, out_path: Path, size: int = 32, channels: int = 3,
                            max_images: int | None = None, seed: int = 0) -> Path:
    """Decode every image under ``src_dir`` (ImageFolder class folders or flat, recursive), fit
    it to ``size`` x ``size`` and write uint8 (N, channels, size, size) to ``out_path`` (.npy).

    ``max_images`` keeps a seeded random subset of the files (sorted order kept)."""
    files = find_images(src_dir)
    if not files:
        raise ValueError(f"no .jpg/.jpeg/.png images found under {src_dir}")
    if max_images is not None and max_images < len(files):
        keep = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        files = [files[i] for i in keep]
    out = np.empty((len(files), channels, size, size), dtype=np.uint8)
    for i, path in enumerate(_progress(files, len(files), f"images -> {Path(out_path).name}")):
        out[i] = load_image_file(path, size, channels)
    return save_npy(out, out_path)


def build_dataset_pool(datasets: Sequence[Any], out_path: Path, size: int = 32,
                       channels: int = 3) -> Path:
    """Concatenate the images (labels dropped) of map-style datasets yielding ``(PIL, label)``
    into uint8 (N, channels, size, size) at ``out_path`` (.npy)."""
    total = sum(len(ds) for ds in datasets)
    out = np.empty((total, channels, size, size), dtype=np.uint8)
    items = (ds[i][0] for ds in datasets for i in range(len(ds)))
    for i, img in enumerate(_progress(items, total, f"images -> {Path(out_path).name}")):
        out[i] = image_to_array(img, size, channels)
    return save_npy(out, out_path)


def convert_torchvision_split(ds: Any, out_path: Path, size: int | None = None,
                              channels: int | None = None,
                              classes: Sequence[str] | None = None) -> Path:
    """Write a torchvision-style classification dataset (``ds[i] -> (PIL image, int)``) to
    ``out_path`` as an ID split (.npz). ``size``/``channels`` default to those of the data.

    MNIST/CIFAR-style datasets with an in-memory uint8 ``data`` array and ``targets`` (and no
    transform) are converted without decoding image by image."""
    classes = list(classes if classes is not None else getattr(ds, "classes", []))
    data = getattr(ds, "data", None)
    if hasattr(data, "numpy"):
        data = data.numpy()
    fast = (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim in (3, 4)
            and hasattr(ds, "targets") and getattr(ds, "transform", None) is None)
    if fast:
        x = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        y = np.asarray(ds.targets, dtype=np.int64)
        if (size or x.shape[2]) != x.shape[2] or (channels or x.shape[1]) != x.shape[1]:
            import torch

            from cip_helpers.course.data_full import convert_images

            x = convert_images(torch.from_numpy(np.ascontiguousarray(x)), size or x.shape[2],
                               channels or x.shape[1]).numpy()
    else:
        n = len(ds)
        if n == 0:
            raise ValueError(f"dataset {type(ds).__name__} is empty; nothing to convert")
        first, _ = ds[0]
        if size is None or channels is None:
            probe = first if isinstance(first, np.ndarray) else np.asarray(first)
            size = size or min(probe.shape[:2])
            channels = channels or (1 if probe.ndim == 2 else 3)
        x = np.empty((n, channels, size, size), dtype=np.uint8)
        y = np.empty(n, dtype=np.int64)
        for i in _progress(range(n), n, f"{type(ds).__name__} -> {Path(out_path).name}"):
            img, label = ds[i]
            x[i], y[i] = image_to_array(img, size, channels), int(label)
    if not classes:
        classes = [str(c) for c in range(int(y.max()) + 1)] if len(y) else []
    return save_id_split(x, y, classes, out_path)


def copy_outlier_file(src: Path, out_path: Path, expected_n: int | None = None) -> Path:
    """Check the OE "300K random images" file (uint8 (N, 32, 32, 3), NHWC) and write it as
    uint8 (N, 3, 32, 32) to ``out_path`` (.npy), chunk by chunk (never all in memory)."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"outlier source file {src} does not exist")
    try:
        arr = np.load(src, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{src} is not a readable .npy file ({type(err).__name__}: {err}); "
                         "download it again") from err
    if arr.dtype != np.uint8 or arr.ndim != 4 or tuple(arr.shape[1:]) != (32, 32, 3):
        raise ValueError(f"{src} holds {arr.dtype} {arr.shape}; the 300K random images file is "
                         "uint8 (300000, 32, 32, 3). Download it again")
    if expected_n is not None and len(arr) != expected_n:
        raise ValueError(f"{src} holds {len(arr)} images, expected {expected_n}; the download is "
                         "probably incomplete. Download it again")
    with atomic_path(out_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(arr), 3, 32, 32))
        for start in range(0, len(arr), _CHUNK):
            out[start:start + _CHUNK] = arr[start:start + _CHUNK].transpose(0, 3, 1, 2)
        out.flush()
        del out
    return Path(out_path)
