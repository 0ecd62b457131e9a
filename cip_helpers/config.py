"""Profiles: every size, epoch count, budget and model choice of the course in one place.

A notebook takes only ``profile`` (and optional ``overrides``) and calls :func:`get_profile`.
``smoke`` executes every cell in seconds (tests), ``quick`` gives meaningful numbers on a
2-core CPU in minutes, ``full`` is paper scale (downloads via ``data_prep/`` and a GPU).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


@dataclass(frozen=True)
class Profile:
    """All knobs of one run. Fields are grouped by the notebook that uses them first."""

    name: str
    seed: int = 0  # changes every random choice: init, data order, pools, attacker, DAWN key
    # --- data -------------------------------------------------------------------------
    dataset: str = "mnist_embedded"  # full profile: mnist, fashionmnist, cifar10, cifar100, food101
    n_train: int = 4000  # victim-train digits (the embedded set has 5,000: 4,000 train / 1,000 test)
    n_test: int = 1000
    n_outlier: int = 6000  # OE outlier pool (photo crops, disjoint photos from the Knockoff pool)
    n_knockoff: int = 8000  # KnockoffNets query pool
    n_textures: int = 1000  # OOD test set (textures: the DTD stand-in)
    n_noise: int = 1000  # uniform-noise OOD test set
    # --- 01 victim training -----------------------------------------------------------
    victim_arch: str = "cnn"  # cnn (quick), resnet18 (MNIST/FMNIST), wrn28_10 (CIFAR/FOOD)
    victim_epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    augment_shift: int = 3  # random shift (pixels), +-10 deg rotation, +-10 % scale (victims, OE)
    # --- 02 outlier exposure (energy-margin loss, Liu et al. 2020) ----------------------
    oe_epochs: int = 3
    oe_lambda: float = 0.1
    oe_m_in: float = -20.0  # read off the plain victim's ID-train energies (notebook 02)
    oe_m_out: float = -3.0
    oe_lr: float = 1e-3
    # --- 03 thresholds ------------------------------------------------------------------
    p1: float = 95.0
    p2: float = 99.9
    temperature: float = 1.0
    # --- 04/05 CIP -----------------------------------------------------------------------
    snr_db: float = 10.0  # shuffle_noise: white Gaussian noise at this SNR
    rs_beta: float = 0.9  # reverse sigmoid (weak PPD and DP)
    rs_gamma: float = 0.6
    pbd_r1_percentile: float = 0.5  # online PBD: flip when R < this percentile of ID-train R
    pbd_offline_T: float = 0.0035  # offline PBD: fraction (<1) of ID-routed queries or a count (>=1)
    # --- 06 DAWN -------------------------------------------------------------------------
    dawn_rate: float = 0.005
    dawn_key: str = "cip-course-dawn-key"
    # --- attacks (07-10) -----------------------------------------------------------------
    surrogate_arch: str = "cnn"
    surrogate_epochs: int = 6  # KnockoffNets surrogate
    surrogate_lr: float = 2e-3
    surrogate_width: int = 16  # channels of the first conv of the `cnn` surrogate / DFME student
    surrogate_batch: int = 64
    knockoff_queries: int = 8000
    knockoff_curve: tuple[int, ...] = (1000, 2000, 4000, 8000)
    knockoff_gamma: float = 3.0  # attacker's contrast adaptation of the pool: stretch(x)**gamma; 0 = raw
    knockoff_curve_label_type: str = "soft"  # label type of the queries-vs-accuracy curve
    # DFME on quick: 36,000 queries is ~500x fewer than the paper's budget, and the plain DFME
    # recipe (batch 128, 5 student steps, constant lr) was seed-fragile there: undefended student
    # 0.79 / 0.41 / 0.80 over seeds 0-2. Measured alternatives (seeds 0-2, same victims): cosine
    # lr 0.51 +- 0.23; replay 5 0.79 +- 0.14; replay 10 0.83 +- 0.06; batch 64 + replay 5
    # 0.81 +- 0.04; + 3 student steps 0.83 +- 0.04; + lr drop (chosen) 0.83 +- 0.02.
    dfme_queries: int = 36000
    dfme_batch: int = 64  # queries per generator/student batch (more rounds for the same budget)
    dfme_nz: int = 64
    dfme_gen_channels: tuple[int, int] = (32, 16)
    dfme_gain: float = 8.0  # generator images = sigmoid(gain * pre-activation): high contrast
    dfme_grad_m: int = 1  # random directions per forward-difference gradient estimate
    dfme_grad_eps: float = 1e-3
    dfme_lr_s: float = 0.1
    dfme_lr_g: float = 1e-2
    dfme_g_iter: int = 1
    dfme_s_iter: int = 3  # student steps on fresh queries per round
    dfme_lr_schedule: str = "drop"  # student lr: constant, cosine, or drop (x0.1 for the last quarter)
    dfme_replay: int = 5  # extra student steps per round on replayed past answers (no new queries)
    dfme_replay_size: int = 10_000  # replay memory (images)
    dfme_eval_every: int = 4000  # queries between test-accuracy points of the DFME curve
    ida_label_type: str = "hard"  # soft labels: PBD's flipped answers are too flat to be learned
    ida_epochs: int = 20
    dqa_ratios: tuple[float, ...] = (1.0, 0.5, 0.25)
    # --- 11 verification -----------------------------------------------------------------
    n_innocent: int = 3
    alpha: float = 0.01
    # --- bookkeeping ---------------------------------------------------------------------
    cell_timeout: int = 1800  # seconds one notebook cell may run in the batch runner (0 = no limit)
    tag: str = ""  # results go to results/<tag or name>/

    @property
    def profile_dir(self) -> Path:
        """``results/<tag or profile>/`` (or under ``$CIP_RESULTS_ROOT``): every seed of this profile,
        and the multi-seed aggregate (``summary.json``, ``table.md``) and ``timings.json``."""
        return results_root() / (self.tag or self.name)

    @property
    def results_dir(self) -> Path:
        """``results/<tag or profile>/seed-<seed>/``: every artifact of this run (one seed)."""
        return self.profile_dir / f"seed-{self.seed}"

    @property
    def checkpoint_dir(self) -> Path:
        return self.results_dir / "checkpoints"

    @property
    def figures_dir(self) -> Path:
        return self.results_dir / "figures"

    @property
    def metrics_dir(self) -> Path:
        return self.results_dir / "metrics"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def results_root() -> Path:
    """Where ``results/`` lives: ``$CIP_RESULTS_ROOT`` if set, else ``<repo>/results``."""
    env = os.environ.get("CIP_RESULTS_ROOT")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "results"


def data_root() -> Path:
    """Where ``data_prep/`` puts the full-profile datasets: ``$CIP_DATA_ROOT`` or ``<repo>/data``."""
    env = os.environ.get("CIP_DATA_ROOT")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data"


PROFILES: dict[str, Profile] = {
    "quick": Profile(name="quick"),
    "smoke": Profile(
        name="smoke",
        n_train=600,
        n_test=200,
        n_outlier=600,
        n_knockoff=600,
        n_textures=100,
        n_noise=100,
        victim_epochs=1,
        oe_epochs=1,
        surrogate_epochs=1,
        knockoff_queries=600,
        knockoff_curve=(300, 600),
        dfme_queries=1200,
        dfme_batch=32,
        dfme_nz=16,
        dfme_gen_channels=(16, 8),
        dfme_eval_every=600,
        ida_epochs=2,
        pbd_offline_T=3,
        dawn_rate=0.02,
        n_innocent=3,
        cell_timeout=600,
    ),
    "full": Profile(
        name="full",
        dataset="cifar10",
        n_train=0,  # 0 = the whole official training set
        n_test=0,
        n_outlier=300_000,
        n_knockoff=50_000,
        n_textures=5640,
        n_noise=10_000,
        victim_arch="wrn28_10",
        victim_epochs=100,
        batch_size=128,
        lr=0.1,
        weight_decay=5e-4,
        oe_epochs=10,
        oe_m_in=-25.0,
        oe_m_out=-7.0,
        oe_lr=1e-3,
        surrogate_arch="resnet18",
        surrogate_epochs=100,
        surrogate_lr=0.1,
        knockoff_queries=50_000,
        knockoff_curve=(5000, 10_000, 20_000, 50_000),
        knockoff_gamma=0.0,  # ImageNet photos are sent as they are
        surrogate_batch=128,
        dfme_queries=20_000_000,
        dfme_batch=256,
        dfme_nz=256,
        dfme_gen_channels=(128, 64),
        dfme_gain=2.0,  # = DFME's tanh output
        dfme_lr_g=1e-4,
        dfme_s_iter=5,  # the DFME recipe as published: no replay, constant student lr
        dfme_replay=0,
        dfme_lr_schedule="constant",
        dfme_eval_every=1_000_000,
        ida_epochs=100,
        pbd_offline_T=87,
        cell_timeout=0,
    ),
}


def get_profile(name: str = "quick", **overrides: Any) -> Profile:
    """Return the named profile, with ``overrides`` replacing single fields.

    >>> get_profile("smoke", victim_epochs=2).victim_epochs
    2
    """
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    known = {f.name for f in dataclasses.fields(Profile)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown profile field(s) {unknown}; valid fields: {sorted(known)}")
    for key, value in overrides.items():  # papermill passes lists where tuples are declared
        if isinstance(value, list):
            overrides[key] = tuple(value)
    return dataclasses.replace(PROFILES[name], **overrides)
