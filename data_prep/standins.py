"""STAND-IN pools: small offline substitutes for the three stored pools of the full profiles.

The stored pools that ``full`` and ``paper-fmnist`` read (``pools="stored"``) cannot be downloaded
without network: the 300K random images of the OE literature (922 MB, by hand), an ImageNet subset
(by hand) and DTD (625 MB). To let the stored-pool code path run anyway (CI, a laptop), this module
lays out small stand-ins **in exactly the stored format** (:mod:`cip_helpers.course.data_full`):

    <root>/pools/outlier.npy   uint8 (n, 3, 32, 32)  stands in for the 300K random images
    <root>/pools/knockoff.npy  uint8 (n, 3, 32, 32)  stands in for an ImageNet subset
    <root>/pools/textures.npy  uint8 (n, 3, 32, 32)  stands in for DTD

Every image is a random square crop of one of the photographs bundled with scikit-image (the
same disjoint photo sets as the embedded pools of :mod:`cip_helpers.course.data`: OE photos for
the outlier pool, other photos for the Knockoff pool, brick/grass/gravel for the textures),
RGB (grayscale photos repeated to 3 channels), fitted to 32 x 32 (antialiased bicubic,
:func:`data_prep.build.image_to_array`) and flipped left-right at random. Rendered characters
are not used: they are the near-distribution pool of digit victims, and an outlier pool that
contained them would teach the detector that they are OOD.

**They are stand-ins, not the paper's data**: numbers computed on them say nothing about the
paper. ``manifest.json`` marks each file ``"stand_in": true`` with what it stands in for and
what it was made from; :func:`cip_helpers.course.data_full.is_stand_in` reads that mark (and a
run that reads a stand-in warns). A real pool is never replaced by a stand-in (the step skips
it), and ``python -m data_prep.fetch`` replaces a stand-in by the real pool instead of skipping it.

    python -m data_prep.standins                     # 3,000 / 2,000 / 600 images under the data root
    python -m data_prep.standins --root /tmp/d --n-outlier 512 --n-knockoff 256 --n-textures 64
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .build import image_to_array, log, record_in_manifest, save_npy

SIZE = 32  # every stored pool is RGB 32 x 32 (data_full.POOL_SHAPE)
STANDIN_SEED = 2024  # crops of pool k use seed STANDIN_SEED + k (k: index in STANDINS)


@dataclass(frozen=True)
class StandIn:
    """How one stand-in pool is made: ``photos`` (scikit-image ``skimage.data`` names), the crop
    side as a fraction of the photo's shorter side (``scale``, uniform), the default image count
    ``n`` and what it ``stands_for``."""

    stands_for: str
    photos: tuple[str, ...]
    scale: tuple[float, float]
    n: int


# the photo sets of cip_helpers.course.data (OE_PHOTOS, KNOCKOFF_PHOTOS, TEXTURE_PHOTOS), copied so
# this module imports no torch; tests/test_full_profile.py checks that they are equal
STANDINS: dict[str, StandIn] = {
    "outlier": StandIn("the OE outlier set '300K random images' (300,000 x 32 x 32 x 3, Hendrycks et al.)",
                       ("astronaut", "chelsea", "coffee", "hubble_deep_field", "moon", "page", "retina"),
                       (0.08, 0.6), 3000),
    "knockoff": StandIn("the KnockoffNets query pool (an ImageNet subset the attacker owns)",
                        ("camera", "clock", "coins", "immunohistochemistry", "rocket", "stereo_motorcycle",
                         "text"), (0.08, 0.6), 2000),
    "textures": StandIn("DTD (5,640 texture images, partition 1), the textures OOD test set",
                        ("brick", "grass", "gravel"), (0.1, 0.5), 600),
}
"""The three stand-ins, keyed by stored pool name (``data_full.POOL_NAMES``)."""


def photo_rgb(name: str) -> np.ndarray:
    """The scikit-image photograph ``name`` as uint8 (H, W, 3): grayscale repeated to 3 channels,
    an alpha channel dropped, ``stereo_motorcycle``'s left view."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"skimage.data.{name}() is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def photo_crops(photos: Sequence[str], n: int, seed: int, scale: tuple[float, float] = (0.08, 0.6),
                size: int = SIZE) -> np.ndarray:
    """``n`` random square crops of the ``photos`` (scikit-image names) as uint8 (n, 3, size, size):
    per image a uniformly drawn photo, a side of U(``scale``) x its shorter side (at least 4
    pixels) at a uniform position, fitted to ``size`` x ``size`` (antialiased bicubic) and
    flipped left-right with probability 1/2. Deterministic for a given ``seed``, scikit-image
    (its photo files) and Pillow."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not photos:
        raise ValueError("photo_crops needs at least one photo")
    images = [photo_rgb(p) for p in photos]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        img = images[rng.integers(len(images))]
        h, w, _ = img.shape
        side = max(4, int(min(h, w) * rng.uniform(*scale)))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = image_to_array(np.ascontiguousarray(img[top:top + side, left:left + side]), size, 3)
        out[i] = crop[:, :, ::-1] if rng.random() < 0.5 else crop
    return out


def build_standin(root: Path, name: str, n: int | None = None, force: bool = False) -> Path:
    """Write the stand-in for pool ``name`` (``outlier``, ``knockoff`` or ``textures``) with ``n``
    images (default ``STANDINS[name].n``) to ``<root>/pools/<name>.npy`` atomically and record it
    in the manifest as a stand-in. An existing REAL pool (no stand-in mark) is never replaced;
    an existing stand-in with the same image count is kept unless ``force``. Returns the path."""
    from cip_helpers.course.data_full import is_stand_in, open_pool_file, pool_path

    if name not in STANDINS:
        raise ValueError(f"unknown pool {name!r}; choose one of {sorted(STANDINS)}")
    spec = STANDINS[name]
    n = spec.n if n is None else int(n)
    if n < 1:
        raise ValueError(f"a stand-in pool needs at least one image, got n={n}")
    root = Path(root)
    out = pool_path(root, name)
    if out.exists():
        if not is_stand_in(root, out):
            log(f"[{name}] {out} is a real pool (no stand-in mark in the manifest): kept, no stand-in written")
            return out
        if not force:
            try:
                existing = open_pool_file(out, name, root)
            except ValueError:
                existing = None
            if existing is not None and len(existing) == n:
                log(f"[{name}] skip: stand-in {out} exists ({n} images)")
                return out
    seed = STANDIN_SEED + list(STANDINS).index(name)
    log(f"[{name}] STAND-IN: {n} crops of scikit-image photos {', '.join(spec.photos)} -> {out}")
    save_npy(photo_crops(spec.photos, n, seed, spec.scale), out)
    import skimage

    record_in_manifest(
        root, out, pool=name, shape=[n, 3, SIZE, SIZE], stand_in=True, stands_in_for=spec.stands_for,
        source=(f"STAND-IN (python -m data_prep.standins): {n} random {SIZE}x{SIZE} RGB crops of the "
                f"photographs bundled with scikit-image {skimage.__version__}, not the paper's data"),
        made_from=[f"skimage.data.{p}" for p in spec.photos], crop_scale=list(spec.scale), seed=seed)
    return out


def build_standins(root: Path, sizes: dict[str, int] | None = None, force: bool = False) -> dict[str, Path]:
    """:func:`build_standin` for every pool; ``sizes`` maps pool names to image counts (missing
    names: the defaults of :data:`STANDINS`). Returns ``{pool name: path}``."""
    sizes = sizes or {}
    unknown = set(sizes) - set(STANDINS)
    if unknown:
        raise ValueError(f"unknown pool(s) {sorted(unknown)}; choose from {sorted(STANDINS)}")
    return {name: build_standin(root, name, sizes.get(name), force) for name in STANDINS}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.standins",
                                description="Lay out small STAND-IN pools (photo crops) in the stored format "
                                            "so that pools='stored' runs offline. Not the paper's data.")
    p.add_argument("--root", type=Path, default=None, help="data root (default: $CIP_DATA_ROOT or <repo>/data)")
    for name, spec in STANDINS.items():
        p.add_argument(f"--n-{name}", type=int, default=spec.n, metavar="N",
                       help=f"images in the {name} stand-in (default {spec.n})")
    p.add_argument("--force", action="store_true", help="rebuild stand-ins that exist (never a real pool)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the three stand-ins; returns the exit status."""
    from cip_helpers.course.config import data_root

    args = parse_args(argv)
    root = args.root.expanduser().resolve() if args.root else data_root()
    try:
        build_standins(root, {name: getattr(args, f"n_{name}") for name in STANDINS}, force=args.force)
    except ValueError as err:
        print(f"data_prep.standins: {err}", file=sys.stderr)
        return 1
    log(f"stand-in pools under {root / 'pools'} (marked stand_in in {root / 'manifest.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
