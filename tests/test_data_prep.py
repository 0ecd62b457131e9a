"""data_prep (fetch/convert) and cip_helpers.course.data_full (read) on tiny fake data; no network."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cip_helpers.course import data, data_full
from cip_helpers.course.config import get_profile
from data_prep import build, fetch


@pytest.fixture(autouse=True)
def _data_root(tmp_path, monkeypatch):
    """Every test sees its own empty data root (so error messages name no --root)."""
    monkeypatch.setenv("CIP_DATA_ROOT", str(tmp_path / "data"))
    data._id_data.cache_clear()
    data._query_pool.cache_clear()
    yield
    data._id_data.cache_clear()
    data._query_pool.cache_clear()


@pytest.fixture()
def root(tmp_path) -> Path:
    return tmp_path / "data"


def _png(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _image_tree(src: Path) -> int:
    """2 class folders x 5 images of different sizes/formats + a nested flat folder + noise."""
    n = 0
    for c, cls in enumerate(("cat", "dog")):
        for i in range(5):
            ext = ".png" if i % 2 else ".JPG"
            _png(src / cls / f"img{i}{ext}", (20 + 7 * i, 40 + 3 * c), seed=10 * c + i)
            n += 1
    for i in range(3):
        _png(src / "extra" / "deeper" / f"flat{i}.jpeg", (64, 48), seed=100 + i, mode="L")
        n += 1
    (src / "notes.txt").write_text("not an image")
    _png(src / ".hidden" / "skip.png", (32, 32), seed=999)
    return n


def _fake_pool(root: Path, name: str, n: int, seed: int = 0) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    build.save_npy(arr, data_full.pool_path(root, name))
    return arr


# --- Knockoff pool from an image folder --------------------------------------------------------
def test_find_images_recursive_sorted_and_filtered(tmp_path):
    n = _image_tree(tmp_path / "src")
    files = build.find_images(tmp_path / "src")
    assert len(files) == n == 13
    rel = [f.relative_to(tmp_path / "src").as_posix() for f in files]
    assert rel == sorted(rel) and rel[0] == "cat/img0.JPG" and "extra/deeper/flat2.jpeg" in rel
    assert not any(".hidden" in r or r.endswith(".txt") for r in rel)


def test_build_image_folder_pool_shape_dtype_and_subset(tmp_path):
    _image_tree(tmp_path / "src")
    out = build.build_image_folder_pool(tmp_path / "src", tmp_path / "pool.npy", size=32, channels=3)
    arr = np.load(out)
    assert arr.shape == (13, 3, 32, 32) and arr.dtype == np.uint8
    gray = np.load(build.build_image_folder_pool(tmp_path / "src", tmp_path / "g.npy", 28, 1))
    assert gray.shape == (13, 1, 28, 28)
    # gray source images come out with three equal channels in the RGB pool
    assert np.array_equal(arr[-1, 0], arr[-1, 1]) and np.array_equal(arr[-1, 1], arr[-1, 2])
    sub = np.load(build.build_image_folder_pool(tmp_path / "src", tmp_path / "s.npy",
                                                max_images=4, seed=3))
    assert sub.shape == (4, 3, 32, 32)
    assert sum(any(np.array_equal(s, a) for a in arr) for s in sub) == 4
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_build_image_folder_pool_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .jpg"):
        build.build_image_folder_pool(tmp_path / "empty", tmp_path / "p.npy")
    bad = tmp_path / "bad"
    _png(bad / "ok.png", (10, 10), seed=0)
    (bad / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="broken.jpg"):
        build.build_image_folder_pool(bad, tmp_path / "p.npy")
    assert not (tmp_path / "p.npy").exists()


def test_fetch_knockoff_skips_when_present_and_records_manifest(tmp_path, root, capsys):
    _image_tree(tmp_path / "src")
    out = fetch.fetch_knockoff(root, tmp_path / "src")
    assert out == root / "pools" / "knockoff.npy"
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["files"]["pools/knockoff.npy"]
    assert entry["sha256"] == build.sha256_file(out) and entry["shape"] == [13, 3, 32, 32]
    mtime = out.stat().st_mtime_ns
    capsys.readouterr()
    fetch.fetch_knockoff(root, tmp_path / "does-not-matter")
    assert "skip" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == mtime
    x = data_full.load_pool_array("knockoff", root, 28, 1, 5, seed=0)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.uint8


def test_fetch_knockoff_missing_folder_says_what_to_do(root):
    with pytest.raises(fetch.FetchError, match="--knockoff-dir"):
        fetch.fetch_knockoff(root, root / "nope")


# --- ID datasets ----------------------------------------------------------------------------------
def test_convert_fakedata_roundtrip(root):
    from torchvision.datasets import FakeData

    for split, n in (("train", 12), ("test", 6)):
        ds = FakeData(size=n, image_size=(3, 32, 32), num_classes=10, random_offset=n)
        build.convert_torchvision_split(ds, data_full.id_path(root, "cifar10", split),
                                        classes=[f"c{i}" for i in range(10)])
    tx, ty, vx, vy, classes = data_full.load_id_arrays("cifar10", root)
    assert tx.shape == (12, 3, 32, 32) and vx.shape == (6, 3, 32, 32)
    assert tx.dtype == torch.uint8 and ty.dtype == torch.int64
    assert classes == [f"c{i}" for i in range(10)]
    img0, label0 = FakeData(size=12, image_size=(3, 32, 32), num_classes=10, random_offset=12)[0]
    assert torch.equal(tx[0], torch.from_numpy(np.array(img0)).permute(2, 0, 1))
    assert ty[0].item() == label0


class _CifarLike:
    """A CIFAR-style dataset: in-memory NHWC uint8 ``data`` and list ``targets``."""

    transform = None

    def __init__(self, n: int, hw: int = 32) -> None:
        self.data = np.random.default_rng(n).integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.data)


def test_convert_fast_path_and_gray_resize(tmp_path):
    ds = _CifarLike(8)
    out = build.convert_torchvision_split(ds, tmp_path / "a.npz")
    with np.load(out) as f:
        assert np.array_equal(f["x"], ds.data.transpose(0, 3, 1, 2))
        assert f["y"].tolist() == ds.targets and f["y"].dtype == np.int64
    out = build.convert_torchvision_split(ds, tmp_path / "b.npz", size=28, channels=1)
    with np.load(out) as f:
        assert f["x"].shape == (8, 1, 28, 28)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    magic = {3: 2051, 1: 2049}[arr.ndim]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(f">{1 + arr.ndim}i", magic, *arr.shape) + arr.tobytes())


def _fake_mnist_raw(root: Path, n_train: int = 20, n_test: int = 10) -> tuple[np.ndarray, ...]:
    """MNIST raw files where torchvision looks for them, so MNIST(download=True) stays offline."""
    rng = np.random.default_rng(0)
    raw = fetch.raw_dir(root) / "MNIST" / "raw"
    arrays = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        arrays += [x, y]
    return tuple(arrays)


def test_fetch_id_dataset_mnist_offline_then_skip(root, capsys):
    tx, ty, vx, vy = _fake_mnist_raw(root)
    paths = fetch.fetch_id_dataset("mnist", root)
    assert paths == [root / "id/mnist/train.npz", root / "id/mnist/test.npz"]
    x, y, x2, y2, classes = data_full.load_id_arrays("mnist", root)
    assert torch.equal(x[:, 0], torch.from_numpy(tx)) and torch.equal(y2, torch.from_numpy(vy).long())
    assert classes == [str(i) for i in range(10)]
    files = json.loads((root / "manifest.json").read_text())["files"]
    assert set(files) == {"id/mnist/train.npz", "id/mnist/test.npz"}
    capsys.readouterr()
    fetch.fetch_id_dataset("mnist", root)
    assert capsys.readouterr().out.count("skip") == 2


def test_fetch_id_dataset_food101_offline(root):
    """A fake extracted Food-101 (101 classes, 1 train + 1 test JPEG each) through torchvision."""
    base = fetch.raw_dir(root) / "food-101"
    classes = [f"dish{i:03d}" for i in range(101)]
    meta = {"train": {}, "test": {}}
    for i, cls in enumerate(classes):
        for split, k in (("train", 0), ("test", 1)):
            img = Image.new("RGB", (50 + i % 7, 40), color=(i, 2 * i % 256, 100 + k))
            (base / "images" / cls).mkdir(parents=True, exist_ok=True)
            img.save(base / "images" / cls / f"{k}.jpg")
            meta[split][cls] = [f"{cls}/{k}"]
    (base / "meta").mkdir()
    for split in ("train", "test"):
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
    fetch.fetch_id_dataset("food101", root)
    tx, ty, vx, vy, names = data_full.load_id_arrays("food101", root)
    assert tx.shape == (101, 3, 32, 32) and vx.shape == (101, 3, 32, 32)
    assert names == classes and sorted(ty.tolist()) == list(range(101))
    k = int(torch.nonzero(ty == 5)[0])
    assert abs(int(tx[k, 0].float().mean()) - 5) <= 2  # the solid colour survives JPEG + resize


def test_fetch_id_dataset_no_network_message(root, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(fetch, "_torchvision_split", offline)
    with pytest.raises(fetch.FetchError) as info:
        fetch.fetch_id_dataset("cifar10", root)
    msg = str(info.value)
    assert "cifar-10-python.tar.gz" in msg and str(root / "raw") in msg
    assert "python -m data_prep.fetch --dataset cifar10" in msg


# --- outlier pool -----------------------------------------------------------------------------------
def test_outlier_roundtrip_seeded_subset_and_gray(tmp_path, root):
    src = tmp_path / "300K_random_images.npy"
    nhwc = np.random.default_rng(1).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    np.save(src, nhwc)
    with pytest.raises(fetch.FetchError, match="300000"):
        fetch.fetch_outlier(root, src)  # the CLI insists on the full 300K file
    out = fetch.fetch_outlier(root, src, expected_n=None)
    assert np.array_equal(np.load(out), nhwc.transpose(0, 3, 1, 2))
    a = data_full.load_pool_array("outlier", root, 32, 3, 10, seed=7)
    b = data_full.load_pool_array("outlier", root, 32, 3, 10, seed=7)
    c = data_full.load_pool_array("outlier", root, 32, 3, 10, seed=8)
    assert a.shape == (10, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    idx = np.sort(np.random.default_rng(7).choice(50, 10, replace=False))
    assert torch.equal(a, torch.from_numpy(nhwc[idx].transpose(0, 3, 1, 2).copy()))
    assert data_full.load_pool_array("outlier", root, 32, 3, 0, seed=0).shape[0] == 50
    g = data_full.load_pool_array("outlier", root, 28, 1, 10, seed=7)
    assert g.shape == (10, 1, 28, 28) and g.dtype == torch.uint8
    g32 = data_full.load_pool_array("outlier", root, 32, 1, 10, seed=7)
    luma = (a.double() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).double()).sum(1)
    assert (g32[:, 0].double() - luma).abs().max() <= 0.51


def test_outlier_wrong_file_and_missing_source(tmp_path, root):
    bad = tmp_path / "wrong.npy"
    np.save(bad, np.zeros((4, 3, 32, 32), dtype=np.uint8))  # NCHW instead of NHWC
    with pytest.raises(fetch.FetchError, match=r"uint8 \(300000, 32, 32, 3\)"):
        fetch.fetch_outlier(root, bad, expected_n=None)
    with pytest.raises(fetch.FetchError) as info:
        fetch.fetch_outlier(root, None)
    assert fetch.OUTLIER_URL in str(info.value)
    assert str(root / "manual" / "300K_random_images.npy") in str(info.value)


def test_pool_too_small_names_count(root):
    _fake_pool(root, "textures", 6)
    with pytest.raises(ValueError, match="holds only 6"):
        data_full.load_pool_array("textures", root, 32, 3, 7, seed=0)


# --- textures (DTD) -------------------------------------------------------------------------------
def test_fetch_textures_offline_from_fake_dtd(root):
    dtd = fetch.raw_dir(root) / "dtd" / "dtd"
    for split, names in (("train", ["banded/a.jpg", "dotted/b.jpg"]), ("val", ["banded/c.jpg"]),
                         ("test", ["dotted/d.jpg", "banded/e.jpg"])):
        for i, name in enumerate(names):
            _png(dtd / "images" / name, (90 + 10 * i, 70), seed=i)
        (dtd / "labels").mkdir(parents=True, exist_ok=True)
        (dtd / "labels" / f"{split}1.txt").write_text("\n".join(names) + "\n")
    out = fetch.fetch_textures(root)
    assert np.load(out).shape == (5, 3, 32, 32)
    assert data_full.load_pool_array("textures", root, 28, 1, 3, seed=1).shape == (3, 1, 28, 28)


# --- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["outlier", "knockoff", "textures"])
def test_missing_pool_names_path_and_command(root, name):
    with pytest.raises(FileNotFoundError) as info:
        data_full.load_pool_array(name, root, 32, 3, 5, seed=0)
    msg = str(info.value)
    assert str(root / "pools" / f"{name}.npy") in msg and "python -m data_prep.fetch" in msg
    assert {"outlier": "--outlier-file", "knockoff": "--knockoff-dir",
            "textures": "--textures"}[name] in msg


def test_missing_id_names_path_and_command(root, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data_full.load_id_arrays("cifar100", root)
    assert str(root / "id/cifar100/train.npz") in str(info.value)
    assert "python -m data_prep.fetch --dataset cifar100" in str(info.value)
    other = tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match=f"--root {other} --dataset mnist"):
        data_full.load_id_arrays("mnist", other)


def test_corrupt_files_raise_value_error(root):
    path = data_full.id_path(root, "mnist", "train")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match="Delete it and re-fetch") as info:
        data_full.load_id_arrays("mnist", root)
    assert str(path) in str(info.value)
    pool = data_full.pool_path(root, "outlier")
    pool.parent.mkdir(parents=True)
    full = np.zeros((10, 3, 32, 32), dtype=np.uint8)
    np.save(pool, full)
    pool.write_bytes(pool.read_bytes()[:-500])  # truncated
    with pytest.raises(ValueError, match="outlier.npy"):
        data_full.load_pool_array("outlier", root, 32, 3, 5, seed=0)
    np.save(pool, np.zeros((10, 32, 32, 3), dtype=np.uint8))  # the unconverted NHWC file
    with pytest.raises(ValueError, match="expected uint8"):
        data_full.load_pool_array("outlier", root, 32, 3, 5, seed=0)


def test_wrong_id_contents_raise_value_error(root):
    x = np.zeros((4, 3, 32, 32), dtype=np.uint8)
    build.save_id_split(x, np.arange(4), [str(i) for i in range(10)],
                        data_full.id_path(root, "mnist", "train"))  # CIFAR shape under mnist
    with pytest.raises(ValueError, match=r"expected uint8 \(N, 1, 28, 28\)"):
        data_full.load_id_arrays("mnist", root)
    with pytest.raises(ValueError, match="unknown full-profile dataset"):
        data_full.load_id_arrays("svhn", root)


def test_fetch_rebuilds_unreadable_output(tmp_path, root, capsys):
    _image_tree(tmp_path / "src")
    out = data_full.pool_path(root, "knockoff")
    out.parent.mkdir(parents=True)
    out.write_bytes(b"garbage")
    fetch.fetch_knockoff(root, tmp_path / "src")
    assert "rebuilding" in capsys.readouterr().out
    assert np.load(out).shape == (13, 3, 32, 32)


# --- CLI --------------------------------------------------------------------------------------------
def test_cli_exit_status_and_partial_success(tmp_path, root, capsys):
    _image_tree(tmp_path / "src")
    rc = fetch.main(["--root", str(root), "--knockoff-dir", str(tmp_path / "src"),
                     "--outlier-file", str(tmp_path / "missing.npy")])
    err = capsys.readouterr().err
    assert rc == 1 and "outlier" in err and fetch.OUTLIER_URL in err
    assert data_full.pool_path(root, "knockoff").exists()
    assert not data_full.pool_path(root, "outlier").exists()
    assert fetch.main(["--root", str(root), "--knockoff-dir", str(tmp_path / "src")]) == 0


def test_cli_rejects_unknown_dataset():
    with pytest.raises(SystemExit):
        fetch.parse_args(["--dataset", "svhn"])


# --- end to end through cip_helpers.course.data ----------------------------------------------------------
def test_full_profile_dispatch_reads_layout(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        x = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
        build.save_id_split(x, np.arange(n) % 10, [str(i) for i in range(10)],
                            data_full.id_path(root, "mnist", split))
    _fake_pool(root, "knockoff", 30)
    cfg = get_profile("full", dataset="mnist", n_train=0, n_test=0, n_knockoff=12)
    d = data.id_data(cfg)
    assert d.train_x.shape == (40, 1, 28, 28) and d.test_x.shape == (20, 1, 28, 28)
    assert d.train_x.dtype == torch.float32 and d.n_classes == 10
    assert 0.0 <= d.train_x.min().item() and d.train_x.max().item() <= 1.0
    assert d.train_x.max().item() > 0.9  # scaled by 1/255, not left at 0..255 or squashed
    assert len(d.half_idx) == 20 and len(d.attacker_idx) == 20
    q = data.query_pool(cfg, "knockoff")
    assert q.shape == (12, 1, 28, 28) and q.dtype == torch.float32 and q.max().item() <= 1.0
    with pytest.raises(FileNotFoundError, match="--outlier-file"):
        data.query_pool(cfg, "outlier")


# --- an installed package as the offline source (issue 17) --------------------------------------
def _fake_package(folder: Path, recompress: bool, n_train: int = 20, n_test: int = 10) -> dict[str, bytes]:
    """Fake Fashion-MNIST archives in a package folder; returns the decompressed IDX bytes."""
    import gzip

    rng = np.random.default_rng(3)
    contents = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                          ("labels-idx1", (np.arange(n) % 10).astype(np.uint8))):
            raw = struct.pack(f">{1 + arr.ndim}i", {3: 2051, 1: 2049}[arr.ndim], *arr.shape) + arr.tobytes()
            contents[f"{prefix}-{kind}-ubyte"] = raw
            folder.mkdir(parents=True, exist_ok=True)
            # mtime differs between "original" and "recompressed": other archive bytes, same content
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(raw, mtime=7 if recompress else 1))
    return contents


@pytest.fixture()
def fake_fmnist_package(tmp_path, monkeypatch):
    """Point LOCAL_SOURCES / IDX_MD5 / torchvision's MD5s at a fake package folder (original
    archives: torchvision's MD5 matches; the package's recompressed copies: only the content's)."""
    import hashlib

    import torchvision.datasets as tvd

    folder = tmp_path / "usr_share_datasets_fashion-mnist"
    contents = _fake_package(tmp_path / "original", recompress=False)
    _fake_package(folder, recompress=True)
    md5 = lambda b: hashlib.md5(b).hexdigest()  # noqa: E731
    monkeypatch.setattr(tvd.FashionMNIST, "resources",
                        [(f"{k}.gz", md5((tmp_path / "original" / f"{k}.gz").read_bytes())) for k in contents])
    monkeypatch.setattr(fetch, "IDX_MD5", {"fashionmnist": {k: md5(v) for k, v in contents.items()}})
    monkeypatch.setattr(fetch, "LOCAL_SOURCES", {"fashionmnist": fetch.LocalSource(
        package="dataset-fashion-mnist", install="apt-get install dataset-fashion-mnist",
        folders=(str(tmp_path / "nowhere"), str(folder)), raw_subdir="FashionMNIST/raw")})
    return folder, contents


def test_issue17_fashionmnist_from_a_recompressed_package_offline_then_skip(root, fake_fmnist_package, capsys):
    """No network: the package's archives (other gzip bytes, same content) are checked and laid out
    as torchvision's extracted files; the rerun skips both splits."""
    folder, contents = fake_fmnist_package
    paths = fetch.fetch_id_dataset("fashionmnist", root, download=False)
    assert paths == [root / "id/fashionmnist/train.npz", root / "id/fashionmnist/test.npz"]
    raw = fetch.raw_dir(root) / "FashionMNIST" / "raw"
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == contents
    tx, ty, vx, vy, classes = data_full.load_id_arrays("fashionmnist", root)
    assert tx.shape == (20, 1, 28, 28) and vx.shape == (10, 1, 28, 28)
    assert classes[0] == "T-shirt/top" and ty.tolist() == [i % 10 for i in range(20)]
    manifest = json.loads((root / "manifest.json").read_text())["files"]
    assert all(str(folder) in manifest[f"id/fashionmnist/{s}.npz"]["source"] for s in ("train", "test"))
    out = capsys.readouterr().out
    assert "dataset-fashion-mnist" in out
    fetch.fetch_id_dataset("fashionmnist", root, download=False)
    assert capsys.readouterr().out.count("skip") == 2


def test_issue17_original_archives_pass_by_torchvision_md5(root, fake_fmnist_package, tmp_path, monkeypatch):
    folder, contents = fake_fmnist_package
    import shutil

    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "original", folder)
    monkeypatch.setattr(fetch, "IDX_MD5", {})  # only the archive MD5s can vouch for them now
    fetch.fetch_id_dataset("fashionmnist", root, download=False)
    assert data_full.load_id_arrays("fashionmnist", root)[0].shape == (20, 1, 28, 28)


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "not_gzip"])
def test_issue17_damaged_package_file_fails_closed(root, fake_fmnist_package, damage):
    """A package file that matches neither checksum is refused, named, and nothing is written."""
    import gzip

    folder, contents = fake_fmnist_package
    target = folder / "t10k-labels-idx1-ubyte.gz"
    if damage == "flip_a_byte":
        raw = bytearray(contents["t10k-labels-idx1-ubyte"])
        raw[-1] ^= 1
        target.write_bytes(gzip.compress(bytes(raw)))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:20])
    else:
        target.write_bytes(b"plain text, not a gzip archive")
    with pytest.raises(fetch.FetchError) as info:
        fetch.fetch_id_dataset("fashionmnist", root, download=False)
    msg = str(info.value)
    assert str(target) in msg and "checksum" in msg and "apt-get install --reinstall dataset-fashion-mnist" in msg
    assert not (fetch.raw_dir(root) / "FashionMNIST").exists() or not any((fetch.raw_dir(root) / "FashionMNIST").rglob("*ubyte"))
    assert not (root / "id" / "fashionmnist").exists()


def test_issue17_no_network_and_no_package_names_both_ways(root, fake_fmnist_package, monkeypatch):
    monkeypatch.setattr(fetch, "LOCAL_SOURCES", {"fashionmnist": fetch.LocalSource(
        package="dataset-fashion-mnist", install="apt-get install dataset-fashion-mnist",
        folders=("/nonexistent/fashion-mnist",), raw_subdir="FashionMNIST/raw")})
    status = fetch.main(["--root", str(root), "--dataset", "fashionmnist", "--offline"])
    assert status == 1
    with pytest.raises(fetch.FetchError) as info:
        fetch.fetch_id_dataset("fashionmnist", root, download=False)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg  # way 1: the Debian package
    assert "fashion-mnist.s3-website" in msg and str(root / "raw" / "FashionMNIST" / "raw") in msg  # way 2
