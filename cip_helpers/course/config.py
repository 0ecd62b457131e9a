"""Profiles: every size, epoch count, budget and model choice of the course in one place.

A notebook takes only ``profile`` (and optional ``overrides``) and calls :func:`get_profile`.
``smoke`` executes every cell in seconds (tests), ``quick`` gives meaningful numbers on a
2-core CPU in minutes, ``full`` is paper scale (downloads via ``data_prep/`` and a GPU).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import math
import numbers
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_DIR.parent


def shown_path(path: Path | str) -> str:
    """``path`` for printing in a notebook: relative to the repository root when inside it
    (``results/quick/seed-0``, the same on every machine), else absolute (e.g. a test's temporary
    ``CIP_RESULTS_ROOT``)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Profile:
    """All knobs of one run. Fields are grouped by the notebook that uses them first.

    Every construction (also ``dataclasses.replace``) coerces each value to its declared type
    (:func:`coerce_field`: lists and literal strings to tuples, integral floats/strings to int,
    numbers/numeric strings to float) and then checks the value ranges (:func:`check_ranges`).
    Raises ``ValueError`` naming the field, the declared type or valid range and the value given.
    """

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
    n_near: int = 3000  # near-distribution pool size (data.query_pool(cfg, "near"))
    pools: str = "embedded"  # photo pools (outlier, knockoff, textures): "embedded" skimage crops, "stored" data_prep's
    near_source: str = "characters"  # near pool: "characters" (rendered, data.render_characters), "mnist_digits"
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
    oe_optimizer: str = "adam"  # "sgd": SGD, momentum 0.9, Nesterov (authors: ood_detection/detection_train.py)
    oe_weight_decay: float = 0.0
    oe_schedule: str = "constant"  # "cosine_step": cosine decay per optimiser step from oe_lr to oe_lr_min
    oe_lr_min: float = 1e-6  # the cosine's floor (used only with oe_schedule="cosine_step")
    oe_in_batch: int = 0  # ID images per OE step (0 = batch_size)
    oe_out_batch: int = 0  # outlier images per OE step (0 = as many as the step's ID images)
    oe_outlier_augment: str = "none"  # "crop_flip": random crop (zero pad 4) + horizontal flip of outliers
    # --- 03 thresholds ------------------------------------------------------------------
    p1: float = 95.0
    p1_half: float = 80.0  # E1 percentile of the half victim (IDA/DQA): 80 in the authors' release
    p2: float = 99.9
    temperature: float = 1.0
    # --- 04/05 CIP -----------------------------------------------------------------------
    snr_db: float = 10.0  # shuffle_noise: white Gaussian noise at this SNR
    rs_beta: float = 0.9  # reverse sigmoid (weak PPD and DP)
    rs_gamma: float = 0.6
    pbd_r1_percentile: float = 0.75  # online PBD: flip when R < R1, this percentile of ID-train R ...
    pbd_r1_among: str = "id_routed"  # ... over the ID-train digits CIP routes ID ("all": every one)
    pbd_offline_T: float = 0.0035  # offline PBD: fraction (<1) of ID-routed queries or a count (>=1)
    pbd_answer: str = "authors"  # PBD's flipped answer: "authors" (near one-hot, random class) or "inverse"
    # --- 06 DAWN -------------------------------------------------------------------------
    dawn_rate: float = 0.005
    dawn_key: str = "cip-course-dawn-key"
    # --- 06 Adaptive Misinformation (AM, Kariyappa & Qureshi 2020; a baseline beside CIP) ----
    # AM wraps the OE-tuned victim; its misinformation model (the victim's architecture, lr, batch
    # and augmentation) learns to avoid the victim's class on the ID-train images + OE outliers;
    # tau is calibrated so AM changes the top-1 of as many ID-train images as the served CIP does.
    am_epochs: int = 4  # epochs of the misinformation model (ID-train images + as many outliers per step)
    am_nu: float = 10_000.0  # a = sigmoid(nu (tau - s)): the release's 10,000, a step at tau
    am_score: str = "msp"  # AM's OOD score s: "msp" (max softmax, AM's own) or "energy" (-E(x), ablation)
    # --- attacks (07-10) -----------------------------------------------------------------
    surrogate_arch: str = "cnn"
    surrogate_epochs: int = 6  # KnockoffNets surrogate
    surrogate_lr: float = 2e-3
    surrogate_width: int = 16  # channels of the first conv of the `cnn` surrogate / DFME student
    surrogate_batch: int = 64
    surrogate_optimizer: str = "auto"  # "auto": SGD + Nesterov for surrogate_lr >= 0.05, else Adam; "sgd"; "adam"
    surrogate_weight_decay: float = 0.0  # KnockoffNets / IDA / DQA surrogates (DFME's student: dfme.py)
    surrogate_schedule: str = "cosine"  # lr per epoch: cosine, step (x surrogate_step_gamma at milestones), constant
    surrogate_milestones: tuple[int, ...] = (30, 60, 90)  # epochs after which "step" multiplies the lr
    surrogate_step_gamma: float = 0.2
    knockoff_queries: int = 8000
    knockoff_curve: tuple[int, ...] = (1000, 2000, 4000, 8000)  # photo pool: attacks.knockoff_curve(pool="photos")
    knockoff_gamma: float = 3.0  # attacker's contrast adaptation of the pool: stretch(x)**gamma; 0 = raw
    knockoff_curve_label_type: str = "soft"  # label type of the queries-vs-accuracy curve
    knockoff_pbd_T: float = 0.0035  # CIP vs KnockoffNets: offline top-T PBD (authors: T = 17 on CIFAR-10)
    mixed_photos: int = 1000  # mixed KnockoffNets pool: the whole near pool + this many Knockoff photo crops
    mixed_curve: tuple[int, ...] = (1000, 2000)  # extra points of the mixed pool's queries-vs-accuracy curve
    tradeoff_p1: tuple[float, ...] = (50.0, 80.0, 95.0, 99.0)  # notebook 03's threshold trade-off grid (E1)
    tradeoff_p2: tuple[float, ...] = (97.5, 99.0, 99.9, 100.0)  # ... and its E2 grid (no surrogates)
    # DFME on quick: 36,000 queries is ~170x fewer than the paper's budget, and the plain DFME
    # recipe (batch 128, 5 student steps, constant lr) was seed-fragile there: undefended student
    # 0.79 / 0.41 / 0.80 over seeds 0-2. Measured alternatives (seeds 0-2, same victims): cosine
    # lr 0.51 +- 0.23; replay 5 0.79 +- 0.14; replay 10 0.83 +- 0.06; batch 64 + replay 5
    # 0.81 +- 0.04; + 3 student steps 0.83 +- 0.04; + lr drop (chosen) 0.83 +- 0.02.
    # A generator of (16, 8) channels at 24,000 queries (55 % of the time; undefended 0.83 / 0.76 /
    # 0.82 over seeds 0-2) is not used: against DAWN that student collapsed on two of three seeds
    # (0.82 / 0.11 / 0.54), so the cheaper DFME is not a stable attack.
    dfme_queries: int = 36000
    dfme_student_arch: str = ""  # the DFME student's architecture ("" = surrogate_arch)
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
    dfme_grad_queries: str = "defended"  # "victim": the authors' setting (gradient queries bypass the defense)
    ida_label_type: str = "hard"  # IDA's main label type (authors: hard); notebook 09 also runs soft
    dqa_label_type: str = "soft"  # DQA's label type (authors: soft)
    ida_epochs: int = 20
    dqa_ratios: tuple[float, ...] = (1.0, 0.5, 0.25)
    # --- 11 verification -----------------------------------------------------------------
    n_innocent: int = 8  # the innocent pool (pipeline.INNOCENT_RECIPES); >= 8 for calibrated verdicts
    alpha: float = 0.01
    # --- the evidence run (multi-seed; notebook 11 reads what it wrote) -------------------
    evidence: bool = False  # queries-to-conviction grid + memorisation curve (runner task "evidence")
    conviction_queries: tuple[int, ...] = (250, 500, 1000, 2000)  # thief budgets of the grid
    memorisation_epochs: int = 24  # mixed-pool KnockoffNets vs deployed CIP, trigger accuracy per epoch
    # --- adaptive attackers (notebook 12; the heavy thieves run only when evidence is on) ----
    adaptive_crops: int = 20  # photo crops per defense of the live averaging attack (evidence: 5x)
    adaptive_repeats: int = 200  # the most times the averaging thief asks each crop
    # --- cluster jobs (runner --executor slurm; tools/cluster.py JobResources reads them) -----
    job_gpus: int = 0  # GPUs per job (not for 00); 0 = CPU only, as the course's code computes today
    job_mem_gb: int = 8  # memory per job (SLURM --mem)
    job_minutes: int = 60  # time limit per job (SLURM --time); a job past it is reported as TIMEOUT
    job_partition: str = ""  # SLURM partition ("" = the cluster's default)
    # --- bookkeeping ---------------------------------------------------------------------
    cell_timeout: int = 1800  # seconds one notebook cell may run in the batch runner (0 = no limit)
    tag: str = ""  # results go to results/<tag or name>/

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = coerce_field(f.name, value)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)  # frozen: the documented way in __post_init__
        problems = check_ranges(self)
        if problems:
            raise ValueError(f"invalid profile {self.name!r}: " + "; ".join(problems))

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

    @property
    def dfme_arch(self) -> str:
        """The DFME student's architecture: ``dfme_student_arch``, or ``surrogate_arch`` when empty."""
        return self.dfme_student_arch or self.surrogate_arch

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Allowed values of the enumerated fields. config stays free of torch imports, so these are
# copies; tests/test_config_and_runner.py checks them against the modules that consume them.
DATASETS = ("mnist_embedded", "mnist", "fashionmnist", "cifar10", "cifar100", "food101")
"""``dataset``: the embedded MNIST stand-in or one of ``data_full.DATASETS``."""
ARCHS = ("cnn", "cnn_wide", "cnn_plain", "mlp", "resnet18", "wrn28_10")
"""``victim_arch`` / ``surrogate_arch``: ``models.ARCHS``."""
LABEL_TYPES = ("hard", "soft")
"""``knockoff_curve_label_type`` / ``ida_label_type`` / ``dqa_label_type``: ``attacks.LABEL_TYPES``."""
PBD_ANSWERS = ("authors", "inverse")
"""``pbd_answer``: ``poisoning.PBD_ANSWERS``."""
R1_AMONG = ("id_routed", "all")
"""``pbd_r1_among``: ``defenses.R1_AMONG``."""
GRAD_QUERIES = ("defended", "victim")
"""``dfme_grad_queries``: ``attacks.GRAD_QUERIES``."""
LR_SCHEDULES = ("constant", "cosine", "drop")
"""``dfme_lr_schedule``: ``dfme.LR_SCHEDULES``."""
SURROGATE_OPTIMIZERS = ("auto", "adam", "sgd")
"""``surrogate_optimizer``: ``training.OPTIMIZERS``."""
SURROGATE_SCHEDULES = ("cosine", "step", "constant")
"""``surrogate_schedule``: ``training.EPOCH_SCHEDULES``."""
OE_OPTIMIZERS = ("adam", "sgd")
"""``oe_optimizer``: ``training.OE_OPTIMIZERS``."""
OE_SCHEDULES = ("constant", "cosine_step")
"""``oe_schedule``: ``training.OE_SCHEDULES``."""
OUTLIER_AUGMENTS = ("none", "crop_flip")
"""``oe_outlier_augment``: ``training.OUTLIER_AUGMENTS``."""
POOL_SOURCES = ("embedded", "stored")
"""``pools``: ``embedded`` = crops of the photographs bundled with scikit-image (any dataset),
``stored`` = the pools ``data_prep`` laid out (``data_full.POOL_NAMES``; not on mnist_embedded)."""
NEAR_SOURCES = ("characters", "mnist_digits")
"""``near_source``: ``data.NEAR_SOURCES``."""
AM_SCORES = ("msp", "energy")
"""``am_score``: ``misinformation.AM_SCORES``."""


@functools.cache
def field_types() -> dict[str, Any]:
    """The declared type of every :class:`Profile` field, e.g. ``{"seed": int, "dqa_ratios":
    tuple[float, ...], ...}`` (``typing.get_type_hints``: the annotations are strings here)."""
    hints = typing.get_type_hints(Profile)
    return {f.name: hints[f.name] for f in dataclasses.fields(Profile)}


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _to_int(value: Any) -> int:
    """int (numpy's too), integral float or integral numeric string -> int; anything else (bool
    too) -> ValueError."""
    if isinstance(value, (bool, _numpy_bool_types())):
        raise ValueError("a bool is not an integer")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            value = float(text)  # "1e3", "2000.0"; raises ValueError for non-numbers
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise ValueError("not an integral number")


def _to_float(value: Any) -> float:
    """int, float (numpy's too) or numeric string -> finite float; anything else (bool, nan, inf)
    -> ValueError."""
    if isinstance(value, (bool, _numpy_bool_types())):
        raise ValueError("a bool is not a number")
    if isinstance(value, numbers.Real):
        out = float(value)
    elif isinstance(value, str):
        out = float(value.strip())
    else:
        raise ValueError("not a number")
    if not math.isfinite(out):
        raise ValueError("not a finite number")
    return out


def _numpy_bool_types() -> tuple[type, ...]:
    """``(numpy.bool_,)`` when numpy is already imported (it is not a ``bool`` subclass), else ``()``."""
    np = sys.modules.get("numpy")
    return (np.bool_,) if np is not None else ()


def _to_bool(value: Any) -> bool:
    """bool (numpy's too), or the text true/false/1/0 (any case) -> bool; anything else (0.5,
    "yes", None) raises ``ValueError``."""
    if isinstance(value, (bool, _numpy_bool_types())):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError("not a bool (True/False, or the text true/false/1/0)")


_SCALARS = {int: _to_int, float: _to_float, bool: _to_bool}


def coerce_field(name: str, value: Any, *, from_text: bool = False) -> Any:
    """``value`` converted to the declared type of :class:`Profile` field ``name``.

    * ``int``: an int, or an integral float / numeric string (``"3"``, ``"1e3"``); never a bool.
    * ``float``: an int, float or numeric string, finite; never a bool.
    * ``bool``: a bool, or the text true/false/1/0.
    * ``tuple[T, ...]`` / ``tuple[T, T]``: a list or tuple, or a string that ``ast.literal_eval``s
      to one (papermill turns a tuple into its repr string); every element converted to ``T``;
      a fixed-length tuple must have exactly that length.
    * ``str``: a str. With ``from_text=True`` (the runner's ``--set FIELD=VALUE``) ``value`` is the
      raw command-line text: a str field takes it as it is (``--set tag=2024`` -> ``"2024"``), the
      other fields parse it as above.

    Raises ``ValueError`` for an unknown field, or naming the field, its declared type and the
    value received when ``value`` does not convert.
    """
    types = field_types()
    if name not in types:
        raise ValueError(f"unknown profile field {name!r}; valid fields: {sorted(types)}")
    hint = types[name]

    def fail(why: str = "") -> ValueError:
        return ValueError(f"profile field {name!r} expects {_type_name(hint)}, got {value!r} "
                          f"({type(value).__name__})" + (f": {why}" if why else ""))

    if from_text and not isinstance(value, str):
        raise fail("command-line values are text")
    if hint is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if hint in _SCALARS:
        try:
            return _SCALARS[hint](value)
        except ValueError as err:
            raise fail(str(err)) from None
    if typing.get_origin(hint) is tuple:
        items = value
        if isinstance(items, str):
            try:
                items = ast.literal_eval(items.strip())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise fail("not a list or tuple literal") from None
        if not isinstance(items, (list, tuple)):
            raise fail("not a list or tuple")
        args = typing.get_args(hint)
        variadic = len(args) == 2 and args[1] is Ellipsis
        element_types = [args[0]] * len(items) if variadic else list(args)
        if len(element_types) != len(items):
            raise fail(f"expected {len(args)} elements, got {len(items)}")
        out = []
        for i, (t, v) in enumerate(zip(element_types, items)):
            try:
                out.append(_SCALARS[t](v))
            except ValueError as err:
                raise fail(f"element {i} ({v!r}) is not {_type_name(t)}: {err}") from None
        return tuple(out)
    raise TypeError(f"profile field {name!r} has type {_type_name(hint)}, which coerce_field does not know")


def check_ranges(p: Profile) -> list[str]:
    """Every value of ``p`` that would break or silently mislead a run, as one message per problem
    naming the field, the value and the valid range (``[]`` when all are valid). Called by
    :class:`Profile` on construction, which raises ``ValueError`` with these messages."""
    problems: list[str] = []

    def need(ok: bool, fields: str, rule: str) -> None:
        if not ok:
            values = ", ".join(f"{f.strip()}={getattr(p, f.strip())!r}" for f in fields.split(","))
            problems.append(f"{values}: must be {rule}")

    def one_of(field: str, allowed: tuple[str, ...]) -> None:
        need(getattr(p, field) in allowed, field, f"one of {list(allowed)}")

    one_of("dataset", DATASETS)
    one_of("victim_arch", ARCHS)
    one_of("surrogate_arch", ARCHS)
    one_of("knockoff_curve_label_type", LABEL_TYPES)
    one_of("ida_label_type", LABEL_TYPES)
    one_of("dqa_label_type", LABEL_TYPES)
    one_of("pbd_answer", PBD_ANSWERS)
    one_of("pbd_r1_among", R1_AMONG)
    one_of("dfme_grad_queries", GRAD_QUERIES)
    one_of("dfme_lr_schedule", LR_SCHEDULES)
    one_of("oe_optimizer", OE_OPTIMIZERS)
    one_of("oe_schedule", OE_SCHEDULES)
    one_of("oe_outlier_augment", OUTLIER_AUGMENTS)
    one_of("surrogate_optimizer", SURROGATE_OPTIMIZERS)
    one_of("surrogate_schedule", SURROGATE_SCHEDULES)
    one_of("pools", POOL_SOURCES)
    one_of("near_source", NEAR_SOURCES)
    one_of("am_score", AM_SCORES)
    need(not (p.pools == "stored" and p.dataset == "mnist_embedded"), "pools, dataset",
         "'embedded' with dataset='mnist_embedded' (stored pools come with the data_prep datasets)")
    need(p.near_source != "mnist_digits" or p.n_near <= 5000, "n_near, near_source",
         "<= 5000 with near_source='mnist_digits' (the embedded MNIST holds 5,000 digits)")
    need(p.near_source != "mnist_digits" or p.dataset not in ("mnist_embedded", "mnist"), "near_source, dataset",
         "'characters' on MNIST data (MNIST digits are the ID data there, not near-distribution queries)")
    need(p.dfme_student_arch in ("", *ARCHS), "dfme_student_arch", f"'' (= surrogate_arch) or one of {list(ARCHS)}")
    for f in ("seed", "n_train", "n_test", "augment_shift", "dfme_replay", "cell_timeout", "n_near",
              "mixed_photos"):
        need(getattr(p, f) >= 0, f, ">= 0" + {"n_train": " (0 = the whole training set)",
                                              "n_test": " (0 = the whole test set)",
                                              "cell_timeout": " (0 = no limit)"}.get(f, ""))
    for f in ("n_outlier", "n_knockoff", "n_textures"):
        if p.pools == "embedded":
            need(getattr(p, f) >= 1, f, ">= 1 with pools='embedded' (0 = 'the whole pool' only for stored pools)")
        else:
            need(getattr(p, f) >= 0, f, ">= 0 (0 = the whole stored pool)")
    for f in ("n_noise", "victim_epochs", "batch_size", "oe_epochs", "surrogate_epochs", "surrogate_width",
              "surrogate_batch", "knockoff_queries", "dfme_queries", "dfme_batch", "dfme_nz", "dfme_grad_m",
              "dfme_g_iter", "dfme_s_iter", "dfme_replay_size", "dfme_eval_every", "ida_epochs", "am_epochs"):
        need(getattr(p, f) >= 1, f, ">= 1")
    need(p.n_innocent >= 2, "n_innocent", ">= 2 (verification judges each suspect against K - 1 innocent "
         "models; 8 or more for the calibrated quick numbers)")
    for f in ("lr", "oe_lr", "surrogate_lr", "dfme_lr_s", "dfme_lr_g", "temperature", "rs_beta", "rs_gamma",
              "dfme_gain", "dfme_grad_eps", "am_nu"):
        need(getattr(p, f) > 0, f, "> 0")
    for f in ("weight_decay", "oe_lambda", "knockoff_gamma"):
        need(getattr(p, f) >= 0, f, ">= 0" + (" (0 = raw pool images)" if f == "knockoff_gamma" else ""))
    for f in ("oe_weight_decay", "surrogate_weight_decay", "oe_in_batch", "oe_out_batch"):
        need(getattr(p, f) >= 0, f, ">= 0" + (" (0 = batch_size)" if f == "oe_in_batch" else
                                              " (0 = as many as the step's ID images)" if f == "oe_out_batch"
                                              else " (0 = no weight decay)"))
    need(p.oe_lr_min >= 0 and (p.oe_schedule != "cosine_step" or p.oe_lr_min <= p.oe_lr), "oe_lr_min, oe_lr",
         "0 <= oe_lr_min (<= oe_lr with oe_schedule='cosine_step': the floor the cosine decays to)")
    marks = p.surrogate_milestones
    need(len(marks) >= 1 and all(m >= 1 for m in marks) and all(b > a for a, b in zip(marks, marks[1:])),
         "surrogate_milestones", "a non-empty, strictly increasing tuple of epochs >= 1, e.g. (30, 60, 90)")
    if p.surrogate_schedule == "step" and marks:
        need(marks[0] < min(p.surrogate_epochs, p.ida_epochs), "surrogate_milestones, surrogate_epochs, ida_epochs",
             "a first milestone below surrogate_epochs and ida_epochs with surrogate_schedule='step' "
             "(otherwise the lr never changes: lower the milestones or use surrogate_schedule='constant')")
    need(0 < p.surrogate_step_gamma <= 1, "surrogate_step_gamma", "in (0, 1] (the lr factor at each milestone)")
    need(p.oe_m_in < p.oe_m_out, "oe_m_in, oe_m_out", "oe_m_in < oe_m_out (ID energies pushed below m_in, "
                                                      "outlier energies above m_out)")
    need(0 <= p.p1 < p.p2 <= 100, "p1, p2", "0 <= p1 < p2 <= 100 (percentiles of ID-train energies)")
    need(0 <= p.p1_half < p.p2 <= 100, "p1_half, p2", "0 <= p1_half < p2 <= 100 (percentiles of the half "
                                                      "victim's ID-train energies)")
    need(0 <= p.pbd_r1_percentile <= 100, "pbd_r1_percentile", "in [0, 100] (a percentile)")
    for f in ("pbd_offline_T", "knockoff_pbd_T"):
        t = getattr(p, f)
        need(t >= 0 and (t < 1 or float(t).is_integer()), f, "a fraction in [0, 1) or a whole count >= 1")
    need(0 <= p.dawn_rate <= 1, "dawn_rate", "in [0, 1]")
    need(0 < p.alpha < 1, "alpha", "in (0, 1) (a significance level)")
    need(len(p.conviction_queries) >= 1 and all(n >= 1 for n in p.conviction_queries), "conviction_queries",
         "one or more query counts >= 1")
    need(p.memorisation_epochs >= 1, "memorisation_epochs", ">= 1")
    need(p.job_gpus >= 0, "job_gpus", ">= 0 (0 = CPU-only jobs)")
    for f in ("job_mem_gb", "job_minutes"):
        need(getattr(p, f) >= 1, f, ">= 1")
    need(all(c.isalnum() or c in "-_," for c in p.job_partition), "job_partition",
         "a SLURM partition name (letters, digits, '-', '_'; '' = the cluster's default)")
    need(len(p.knockoff_curve) >= 1 and all(n >= 1 for n in p.knockoff_curve), "knockoff_curve",
         "a non-empty tuple of query counts >= 1")
    need(all(1 <= n <= p.n_near + p.mixed_photos for n in p.mixed_curve), "mixed_curve, n_near, mixed_photos",
         "a tuple (may be empty) of query counts in [1, n_near + mixed_photos] (the mixed pool's size)")
    need(len(p.tradeoff_p1) >= 1 and all(0 <= v < p.p2 for v in p.tradeoff_p1), "tradeoff_p1, p2",
         "a non-empty tuple of percentiles in [0, p2)")
    need(len(p.tradeoff_p2) >= 1 and all(p.p1 < v <= 100 for v in p.tradeoff_p2), "tradeoff_p2, p1",
         "a non-empty tuple of percentiles in (p1, 100]")
    need(len(p.dqa_ratios) >= 1 and all(r > 0 for r in p.dqa_ratios), "dqa_ratios",
         "a non-empty tuple of ratios > 0 (n_noise = n_id / r)")
    need(all(c >= 1 for c in p.dfme_gen_channels), "dfme_gen_channels", "two channel counts >= 1")
    if p.dfme_batch >= 1 and p.dfme_g_iter >= 1 and p.dfme_grad_m >= 1 and p.dfme_s_iter >= 1:
        per_round = p.dfme_batch * (p.dfme_g_iter * (p.dfme_grad_m + 1) + p.dfme_s_iter)
        need(p.dfme_queries >= per_round, "dfme_queries",
             f">= the queries of one DFME round, dfme_batch x (dfme_g_iter x (dfme_grad_m + 1) + "
             f"dfme_s_iter) = {per_round} (otherwise the student is never trained)")
    need(p.tag not in (".", "..") and "/" not in p.tag and "\\" not in p.tag, "tag",
         "a single directory name (no '/' or '\\', not '.' or '..')")
    need(bool(p.name) and p.name not in (".", "..") and "/" not in p.name and "\\" not in p.name, "name",
         "a non-empty single directory name")
    return problems


def results_root() -> Path:
    """Where ``results/`` lives: ``$CIP_RESULTS_ROOT`` if set, else ``<repo>/results``."""
    env = os.environ.get("CIP_RESULTS_ROOT")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "results"


def data_root() -> Path:
    """Where ``data_prep/`` puts the full-profile datasets: ``$CIP_DATA_ROOT`` or ``<repo>/data``."""
    env = os.environ.get("CIP_DATA_ROOT")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data"


PAPER_TRIGGER_T: dict[str, dict[str, int]] = {
    "cifar10": {"knockoff": 17, "ida": 87}, "cifar100": {"ida": 49}, "food101": {"ida": 101}}
"""The authors' offline-PBD budgets T (Table IV; IDA's T also serves DQA): the ``full`` profile
takes them for its dataset (``get_profile("full", dataset="cifar100")`` sets ``pbd_offline_T=49``),
and falls back to :data:`DEFAULT_PBD_FRACTION` of the ID-routed queries where the paper has none."""
DEFAULT_PBD_FRACTION = 0.0035
"""T as a fraction of the ID-routed queries where no paper T applies (87 of 25,000 on CIFAR-10)."""

PROFILES: dict[str, Profile] = {
    "quick": Profile(name="quick"),
    # Fashion-MNIST at the quick profile's sizes: a class-balanced 4,000 / 1,000 of the real data
    # (python -m data_prep.fetch --dataset fashionmnist), the same photo-crop pools, and the
    # embedded MNIST digits as the near-distribution source (clothes victim, digit queries).
    "quick-fmnist": Profile(name="quick-fmnist", dataset="fashionmnist", near_source="mnist_digits"),
    "smoke": Profile(
        name="smoke",
        n_train=600,
        n_test=200,
        n_outlier=600,
        n_knockoff=600,
        n_textures=100,
        n_noise=100,
        n_near=300,
        mixed_photos=300,
        mixed_curve=(300,),
        tradeoff_p1=(50.0, 95.0),
        tradeoff_p2=(99.0, 99.9),
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
        am_epochs=1,
        pbd_offline_T=3,
        dawn_rate=0.02,
        n_innocent=3,
        adaptive_crops=4,
        adaptive_repeats=20,
        cell_timeout=600,
    ),
    "full": Profile(
        name="full",
        dataset="cifar10",
        pools="stored",
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
        # OE recipe of ood_detection/detection_train.py (Hatins/CIP_master): SGD, momentum 0.9,
        # Nesterov, decay 5e-4, cosine per step to 1e-6, --batch_size 64 + --oe_batch_size 128,
        # outliers RandomCrop(size, padding=4) + RandomHorizontalFlip; lambda 0.1 (oe_lambda default)
        oe_optimizer="sgd",
        oe_weight_decay=5e-4,
        oe_schedule="cosine_step",
        oe_lr_min=1e-6,
        oe_in_batch=64,
        oe_out_batch=128,
        oe_outlier_augment="crop_flip",
        surrogate_arch="wrn28_10",  # --Surrogate_model wrn28 in knockoffnets/, IDA/, DQA/main.py
        surrogate_epochs=100,
        surrogate_lr=0.1,
        # surrogate recipe of knockoffnets/main.py, IDA/main.py, DQA/main.py: SGD, momentum 0.9,
        # Nesterov, weight decay 5e-4, MultiStepLR milestones [30, 60, 90], gamma 0.2
        surrogate_optimizer="sgd",
        surrogate_weight_decay=5e-4,
        surrogate_schedule="step",
        surrogate_milestones=(30, 60, 90),
        surrogate_step_gamma=0.2,
        knockoff_queries=50_000,
        knockoff_curve=(5000, 10_000, 20_000, 50_000),
        knockoff_gamma=0.0,  # ImageNet photos are sent as they are
        surrogate_batch=128,
        dfme_queries=6_000_000,  # --query_times default 6*(10**6) in DFME/main.py (and DF/main.py)
        dfme_student_arch="resnet18",  # --Surrogate_model resnet18 in DFME/main.py
        dfme_batch=256,
        dfme_nz=256,
        dfme_gen_channels=(128, 64),
        dfme_gain=2.0,  # = DFME's tanh output
        dfme_lr_g=1e-4,
        dfme_s_iter=5,  # DFME/main.py: 5 student steps, no replay (its lr steps x0.3 at 10/30/50 % not yet)
        dfme_replay=0,
        dfme_lr_schedule="constant",
        dfme_eval_every=1_000_000,
        ida_epochs=100,
        pbd_offline_T=87,  # PAPER_TRIGGER_T["cifar10"]; get_profile sets it per dataset
        knockoff_pbd_T=17,
        cell_timeout=0,
        job_gpus=0,  # the course's code computes on the CPU (no device placement yet): a GPU would idle
        job_mem_gb=32,
        job_minutes=48 * 60,
    ),
}
# The paper-size Fashion-MNIST grid, what a cluster user runs (tools/run.py --executor slurm; cost
# table: results/paper-fmnist/cost.md). The paper reports FMNIST only for DFME (Table IV, FMNIST/RN18:
# ResNet-18 victim 93.19 %, ResNet-18 student): the whole 60,000 / 10,000 images and ResNet-18 victims
# (full's DFME student is ResNet-18 already). Everything else is the full profile's (its recipes,
# the WRN-28-10 surrogates of the authors' knockoffnets/, IDA/, DQA/main.py, the stored pools); for
# the attacks the paper does not report on FMNIST it has no trigger budget T, so T is
# DEFAULT_PBD_FRACTION of the ID-routed queries (0.35 %, as CIFAR-10's 87 of 25,000). Its
# near-distribution pool is the embedded MNIST digits, as quick-fmnist's (clothes victim, digit queries).
PROFILES["paper-fmnist"] = dataclasses.replace(
    PROFILES["full"], name="paper-fmnist", dataset="fashionmnist", victim_arch="resnet18",
    near_source="mnist_digits", pbd_offline_T=DEFAULT_PBD_FRACTION, knockoff_pbd_T=DEFAULT_PBD_FRACTION)


def get_profile(name: str = "quick", **overrides: Any) -> Profile:
    """Return the named profile, with ``overrides`` replacing single fields.

    Each override is converted to the field's declared type (:func:`coerce_field`): papermill
    passes a list, or for a tuple the string ``"(1.0, 0.5)"``, where a tuple is declared; an
    integral ``2.0`` or ``"2"`` becomes ``2``. A str field takes only a str. Then the ranges of
    all fields are checked (:func:`check_ranges`).

    Raises ``ValueError`` for an unknown profile or field, for a value that does not convert
    (naming the field, its declared type and the value) and for a value out of its valid range.

    >>> get_profile("smoke", victim_epochs=2).victim_epochs
    2
    >>> get_profile("smoke", dqa_ratios="(1.0, 0.5)").dqa_ratios
    (1.0, 0.5)
    """
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    known = field_types()
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown profile field(s) {unknown}; valid fields: {sorted(known)}")
    if name == "full" and "dataset" in overrides:  # the paper's trigger-set sizes follow the dataset
        paper_t = PAPER_TRIGGER_T.get(str(overrides["dataset"]), {})
        overrides = {"pbd_offline_T": paper_t.get("ida", DEFAULT_PBD_FRACTION),
                     "knockoff_pbd_T": paper_t.get("knockoff", DEFAULT_PBD_FRACTION), **overrides}
    return dataclasses.replace(PROFILES[name], **overrides)  # Profile.__post_init__ coerces, checks
