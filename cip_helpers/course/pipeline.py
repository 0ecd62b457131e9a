"""The expensive stages of the course, each load-or-train, so every notebook can ask for what it
needs ("the OE-tuned half victim") whether or not an earlier notebook already produced it.

Victims: ``all`` is trained on the whole victim-train split (KnockoffNets, DFME); ``half`` on the
class-balanced half (IDA, DQA: the attacker holds the other half).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..method.defenses import CIP, DAWN, DP, Defense, NoDefense, OEOnly, calibrate_thresholds
from ..method.digests import tensor_sha256, weights_sha256
from ..method.misinformation import AdaptiveMisinformation, check_score
from ..method.models import build_model, predict_logits
from ..method.scores import energy_score
from . import data
from .config import Profile
from .progress import progress as progress_bar
from .store import load_or_train, read_json, write_json
from .training import OERecipe, TrainRecipe, finetune_oe, oe_recipe_spec, train_classifier, train_misinformation

VICTIM_SPLITS = ("all", "half")


def _check_split(split: str) -> None:
    if split not in VICTIM_SPLITS:
        raise ValueError(f"victim split must be one of {VICTIM_SPLITS}, got {split!r}")


def spec_hash(spec: dict) -> str:
    """Short stable hash of a spec dict (identifies which model an artifact belongs to)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def victim_spec(cfg: Profile, split: str) -> dict:
    """Every setting that shapes the plain victim's weights."""
    _check_split(split)
    d = data.id_data(cfg)
    return {"stage": "victim", "split": split, "dataset": cfg.dataset, "n_train": cfg.n_train,
            "input_shape": list(d.shape), "n_classes": d.n_classes,
            "arch": cfg.victim_arch, "epochs": cfg.victim_epochs, "lr": cfg.lr,
            "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay,
            "augment_shift": cfg.augment_shift, "seed": cfg.seed}


def oe_spec(cfg: Profile, split: str) -> dict:
    """Every setting that shapes the OE-tuned victim (the plain victim's spec included). The OE
    recipe (optimiser, weight decay, lr schedule, ID/outlier batch sizes, outlier augmentation:
    ``training.oe_recipe_spec``) is recorded only where it differs from ``OERecipe``'s defaults,
    so the quick and smoke OE checkpoints keep the spec hash they had before these fields existed."""
    return {"stage": "oe", "victim": victim_spec(cfg, split), "n_outlier": cfg.n_outlier,
            "epochs": cfg.oe_epochs, "lr": cfg.oe_lr, "lambda": cfg.oe_lambda,
            "m_in": cfg.oe_m_in, "m_out": cfg.oe_m_out, **oe_recipe_spec(cfg),
            **({"pools": cfg.pools} if cfg.pools != "embedded" else {})}


def new_model(cfg: Profile, arch: str | None = None) -> nn.Module:
    """A fresh, seeded model of ``arch`` (default: the victim's) for the profile's dataset."""
    d = data.id_data(cfg)
    torch.manual_seed(cfg.seed)
    c, h, _ = d.shape
    return build_model(arch or cfg.victim_arch, c, d.n_classes, h)


def get_victim(cfg: Profile, split: str = "all", verbose: bool = True) -> tuple[nn.Module, dict]:
    """The plain victim M_V (load-or-train). ``info`` holds ``loaded`` and the learning curve."""
    d = data.id_data(cfg)
    x, y = d.split(split)

    def train(model: nn.Module) -> dict:
        history = train_classifier(model, x, y, TrainRecipe.victim(cfg), seed=cfg.seed, eval_data=d.split("test"),
                                   desc=f"victim ({split})", progress=verbose)
        return {"history": history}

    path = cfg.checkpoint_dir / f"victim_{split}.pt"
    return load_or_train(path, victim_spec(cfg, split), lambda: new_model(cfg), train, verbose,
                         name=f"victim ({split})")


def get_oe_victim(cfg: Profile, split: str = "all", verbose: bool = True) -> tuple[nn.Module, dict]:
    """The OE-tuned victim M'_V: the plain victim fine-tuned with the energy-margin loss, with the
    profile's OE recipe (``training.OERecipe.from_profile``)."""
    d = data.id_data(cfg)
    x, y = d.split(split)

    def train(model: nn.Module) -> dict:
        plain, _ = get_victim(cfg, split, verbose)
        model.load_state_dict(plain.state_dict())
        history = finetune_oe(model, x, y, data.query_pool(cfg, "outlier"), OERecipe.from_profile(cfg),
                              seed=cfg.seed, eval_data=d.split("test"), desc=f"OE fine-tuning ({split})",
                              progress=verbose)
        return {"history": history}

    path = cfg.checkpoint_dir / f"oe_victim_{split}.pt"
    return load_or_train(path, oe_spec(cfg, split), lambda: new_model(cfg), train, verbose,
                         name=f"OE fine-tuning ({split})")


def query_sets(cfg: Profile) -> dict[str, Tensor]:
    """The query sets notebooks 02/03 compare: ID test digits, the four unlabelled pools and,
    where the data has it (:func:`data.has_near_pool`), the near-distribution pool."""
    sets = {"ID test": data.id_data(cfg).split("test")[0],
            "Knockoff pool": data.query_pool(cfg, "knockoff"),
            "OE outliers": data.query_pool(cfg, "outlier"),
            "textures": data.query_pool(cfg, "textures"),
            "noise": data.query_pool(cfg, "noise")}
    if data.has_near_pool(cfg):
        sets["near-distribution"] = data.query_pool(cfg, "near")
    return sets


def energies(model: nn.Module, x: Tensor, temperature: float = 1.0) -> Tensor:
    """Energy score of every image of ``x`` under ``model``."""
    return energy_score(predict_logits(model, x), temperature)


def compute_thresholds(cfg: Profile, split: str = "all", p1: float | None = None,
                       p2: float | None = None, temperature: float | None = None,
                       model: nn.Module | None = None) -> dict:
    """E1/E2 (Section III-B: the p1-th / p2-th percentiles of ID-training energies) and R1 (online
    PBD: the ``cfg.pbd_r1_percentile``-th percentile of the reliability scores of the ID-training
    images CIP routes ID, or of all of them with ``cfg.pbd_r1_among="all"``) of the
    OE-tuned ``split`` victim (or of ``model``, which must be that victim). The entry records the
    sha256 of the weights (``weights_sha256``) and of the ID images (``data_sha256``) it was
    computed from, so a loader can tell whether it belongs to the checkpoint at hand."""
    p1 = split_p1(cfg, split) if p1 is None else p1
    p2 = cfg.p2 if p2 is None else p2
    t = cfg.temperature if temperature is None else temperature
    if model is None:
        model, _ = get_oe_victim(cfg, split, verbose=False)
    x, _ = data.id_data(cfg).split(split)
    c = calibrate_thresholds(predict_logits(model, x), p1, p2, t, cfg.pbd_r1_percentile, cfg.pbd_r1_among)
    return {"E1": c["E1"], "E2": c["E2"], "p1": p1, "p2": p2, "T": t,
            "R1": c["R1"], "r1_percentile": cfg.pbd_r1_percentile, "r1_among": cfg.pbd_r1_among,
            "r1_population": c["r1_population"],
            "model": f"checkpoints/oe_victim_{split}.pt (OE-tuned '{split}' victim)",
            "weights_sha256": weights_sha256(model), "model_spec_hash": spec_hash(oe_spec(cfg, split)),
            "data": f"ID training images of the '{split}' victim ({len(x)} from {cfg.dataset})",
            "data_sha256": tensor_sha256(x)}


def split_p1(cfg: Profile, split: str) -> float:
    """The E1 percentile of a victim: ``cfg.p1`` for the ``all`` victim (KnockoffNets, DFME),
    ``cfg.p1_half`` for the ``half`` victim (IDA, DQA). The authors' threshold script uses 95 for
    the former and 80 for the latter (``ood_detection/detection_test.py`` of Hatins/CIP_master:
    the help text of its ``--FPR`` option, "in the testing of IDA and DQA, it was set to 0.8");
    the quick and full profiles follow them."""
    return cfg.p1_half if split == "half" else cfg.p1


THRESHOLD_KEYS = ("weights_sha256", "data_sha256", "p1", "p2", "T", "r1_percentile", "r1_among")
"""What a stored thresholds entry must match to be reused: the bits of the weights and of the ID
data it was computed from, and the percentiles and temperature asked for."""


_ABLATION_THRESHOLDS: dict[tuple, dict] = {}
"""Ablation thresholds of this process, keyed by the values of :data:`THRESHOLD_KEYS`."""


def get_thresholds(cfg: Profile, split: str = "all", verbose: bool = True, p1: float | None = None,
                   p2: float | None = None) -> dict:
    """Thresholds of the OE-tuned ``split`` victim from ``results/<profile>/seed-<k>/thresholds.json``
    (top level: the ``all`` victim; key ``half``: the half victim). The stored entry is reused only
    if it was computed from exactly this checkpoint's weights and this ID data (sha256) with the
    current p1, p2, T and R1 percentile; otherwise it is recomputed and rewritten (and, with
    ``verbose``, the reason is printed). Returns the entry (see :func:`compute_thresholds`).

    ``p1`` other than the victim's own (:func:`split_p1`) or ``p2`` other than ``cfg.p2`` is an
    ablation (notebook 03's trade-off grid): computed, returned, never stored (the stored entry
    stays the profile's); within a process it is kept in memory under the same keys a stored entry
    must match (:data:`THRESHOLD_KEYS`), so the calls of one grid point compute it once."""
    _check_split(split)
    model, info = get_oe_victim(cfg, split, verbose=False)
    x, _ = data.id_data(cfg).split(split)
    wanted = {"weights_sha256": info["weights_sha256"], "data_sha256": tensor_sha256(x),
              "p1": split_p1(cfg, split) if p1 is None else p1, "p2": cfg.p2 if p2 is None else p2,
              "T": cfg.temperature, "r1_percentile": cfg.pbd_r1_percentile, "r1_among": cfg.pbd_r1_among}
    if (wanted["p1"], wanted["p2"]) != (split_p1(cfg, split), cfg.p2):
        key = tuple(wanted[k] for k in THRESHOLD_KEYS)
        if key not in _ABLATION_THRESHOLDS:
            _ABLATION_THRESHOLDS[key] = compute_thresholds(cfg, split, p1=p1, p2=p2, model=model)
        return dict(_ABLATION_THRESHOLDS[key])
    path = cfg.results_dir / "thresholds.json"
    stored = read_json(path) if path.exists() else {}
    entry = stored if split == "all" else stored.get("half", {})
    stale = [k for k in THRESHOLD_KEYS if entry.get(k) != wanted[k]]
    if not stale:
        return {k: v for k, v in entry.items() if k != "half"}
    if entry and verbose:
        print(f"thresholds.json ({split}) was computed for other {', '.join(stale)}: recomputing")
    fresh = compute_thresholds(cfg, split, model=model)
    if split == "all":
        stored = {**fresh, **({"half": stored["half"]} if "half" in stored else {})}
    else:
        stored["half"] = fresh
    write_json(path, stored)
    return fresh


DEFENSES = ("none", "oe", "dp", "dawn", "cip", "am")
"""Every defense :func:`get_defense` builds; ``oe`` (the OE-tuned victim, no poisoning) is the
course's ablation between ``none`` and ``cip``; ``am`` (Adaptive Misinformation, Kariyappa &
Qureshi 2020) a baseline that, like CIP, wraps the OE-tuned victim and changes as many training
answers."""


def get_defense(cfg: Profile, name: str, split: str = "all", strong: str = "shuffle_noise",
                pbd: str | None = "online", p1: float | None = None, p2: float | None = None,
                am_score: str | None = None) -> Defense:
    """A fresh defended API around the ``split`` victim, configured from the profile.

    ``none``, ``dp`` and ``dawn`` wrap the plain victim M_V; ``cip`` wraps the OE-tuned victim
    M'_V with the thresholds of :func:`get_thresholds` (as in the paper's code release); ``oe``
    answers with M'_V's own softmax (:class:`defenses.OEOnly`: outlier exposure without poisoning);
    ``am`` wraps M'_V and the misinformation model of :func:`get_misinformation_model` with the tau
    of :func:`get_am_calibration` (score ``am_score``, default ``cfg.am_score``; ``nu`` =
    ``cfg.am_nu``). ``strong`` picks CIP's strong PPD; ``pbd`` is ``"online"`` (the API default),
    ``"offline_top_T"`` (evaluation device: one call = the whole transfer set) or ``None``; PBD
    answers with ``cfg.pbd_answer``; ``p1`` / ``p2`` override the victim's E1 / E2 percentiles
    (ablations, see :func:`get_thresholds`). ``strong``, ``pbd``, ``p1`` and ``p2`` do not apply
    to ``am``, ``am_score`` applies to ``am`` only."""
    shape = data.id_data(cfg).shape
    if name == "am":
        model, _ = get_oe_victim(cfg, split, verbose=False)
        fhat, _ = get_misinformation_model(cfg, split, verbose=False)
        c = get_am_calibration(cfg, split, am_score)
        return AdaptiveMisinformation(model, fhat, shape, c["tau"], nu=c["nu"], score=c["score"], temperature=c["T"])
    if name == "cip":
        model, _ = get_oe_victim(cfg, split, verbose=False)
        t = get_thresholds(cfg, split, p1=p1, p2=p2)
        return CIP(model, shape, t["E1"], t["E2"], temperature=t["T"], strong=strong,
                   snr_db=cfg.snr_db, beta=cfg.rs_beta, gamma=cfg.rs_gamma, pbd=pbd, r1=t["R1"],
                   pbd_T=cfg.pbd_offline_T, seed=cfg.seed, pbd_answer=cfg.pbd_answer)
    if name == "oe":
        model, _ = get_oe_victim(cfg, split, verbose=False)
        return OEOnly(model, shape)
    model, _ = get_victim(cfg, split, verbose=False)
    if name == "none":
        return NoDefense(model, shape)
    if name == "dp":
        return DP(model, shape, beta=cfg.rs_beta, gamma=cfg.rs_gamma)
    if name == "dawn":
        return DAWN(model, shape, rate=cfg.dawn_rate, key=dawn_key(cfg))
    raise ValueError(f"unknown defense {name!r}; choose one of {DEFENSES}")


MISINFORMATION_SEED = 5151
"""Offset of the misinformation model's seed (initial weights, data order) from ``cfg.seed``: a
network of its own, not a copy of the victim's initialisation."""


def misinformation_spec(cfg: Profile, split: str, oe_weights_sha256: str) -> dict:
    """Every setting that shapes AM's misinformation model of the ``split`` victim: the OE-tuned
    victim it learns to contradict (its spec and the sha256 of its weights, so a retrained M'_V
    retrains it), the recipe (:meth:`training.TrainRecipe.misinformation`), the seed and the sha256
    of its training images (the split's ID images and the OE outlier pool)."""
    _check_split(split)
    x, _ = data.id_data(cfg).split(split)
    return {"stage": "misinformation", "oe_victim": oe_spec(cfg, split), "oe_weights_sha256": oe_weights_sha256,
            "arch": cfg.victim_arch, "epochs": cfg.am_epochs, "lr": cfg.lr, "batch_size": cfg.batch_size,
            "weight_decay": cfg.weight_decay, "augment_shift": cfg.augment_shift,
            "seed": cfg.seed + MISINFORMATION_SEED, "data_sha256": tensor_sha256(x),
            "outliers_sha256": tensor_sha256(data.query_pool(cfg, "outlier"))}


def get_misinformation_model(cfg: Profile, split: str = "all", verbose: bool = True) -> tuple[nn.Module, dict]:
    """AM's misinformation model fhat of the ``split`` victim (load-or-train,
    ``checkpoints/misinformation_<split>.pt``): the victim's architecture trained for
    ``cfg.am_epochs`` epochs on the split's ID training images and the OE outlier pool to put low
    probability on the OE-tuned victim's top-1 (:func:`training.train_misinformation`; checkpoint
    key :func:`misinformation_spec`). ``info`` holds ``loaded``, ``weights_sha256`` and the
    learning curve (``history``: victim-class mass and agreement on the ID test images)."""
    oe_model, oe_info = get_oe_victim(cfg, split, verbose)
    d = data.id_data(cfg)
    x, _ = d.split(split)
    spec = misinformation_spec(cfg, split, oe_info["weights_sha256"])

    def build() -> nn.Module:
        torch.manual_seed(spec["seed"])
        c, h, _ = d.shape
        return build_model(cfg.victim_arch, c, d.n_classes, h)

    def train(model: nn.Module) -> dict:
        history = train_misinformation(model, oe_model, x, data.query_pool(cfg, "outlier"),
                                       TrainRecipe.misinformation(cfg), seed=spec["seed"],
                                       eval_x=d.split("test")[0], desc=f"misinformation model ({split})",
                                       progress=verbose)
        return {"history": history}

    return load_or_train(cfg.checkpoint_dir / f"misinformation_{split}.pt", spec, build, train, verbose,
                         name=f"misinformation model ({split})")


AM_FILE = "am_calibration.json"
"""Per seed, AM's tau per victim split and score (``results/<profile>/seed-<k>/am_calibration.json``)."""

AM_KEYS = ("weights_sha256", "misinformation_sha256", "data_sha256", "score", "nu", "T", "cip")
"""What a stored AM calibration must match to be reused: the bits of the OE-tuned victim, of the
misinformation model and of the ID training images, the score, nu and temperature, and the
settings of the CIP whose top-1 change share it matches (``cip``: thresholds and poisoning)."""


def served_cip(cfg: Profile, split: str) -> CIP:
    """The CIP an owner serves in front of the ``split`` victim (online PBD), with the strong PPD
    of that split's attacks (``shuffle_noise`` for ``all``: KnockoffNets, DFME; ``reverse_rank``
    for ``half``: IDA, DQA), as :func:`benign_price` measures it."""
    return get_defense(cfg, "cip", split, strong="reverse_rank" if split == "half" else "shuffle_noise")


def _cip_settings(cip: CIP) -> dict:
    return {"E1": cip.e1, "E2": cip.e2, "R1": cip.r1, "T": cip.temperature, "strong": cip.strong,
            "snr_db": cip.snr_db, "beta": cip.beta, "gamma": cip.gamma, "pbd": cip.pbd,
            "pbd_answer": cip.pbd_answer, "seed": cip.seed}


def _top1_change(api: Defense, x: Tensor) -> float:
    """Share of the images ``x`` whose top-1 answer ``api`` changes vs its wrapped model's top-1."""
    return float((api(x).argmax(1) != api.last_clean.argmax(1)).double().mean())


def compute_am_calibration(cfg: Profile, split: str = "all", score: str | None = None) -> dict:
    """AM's tau for the ``split`` victim, from the split's ID TRAINING images: the share of them
    whose top-1 the served CIP changes (:func:`served_cip`, vs M'_V's top-1; ``target_top1_change``)
    is the target, and :meth:`AdaptiveMisinformation.calibrate` picks the tau at which AM (``score``,
    default ``cfg.am_score``; ``cfg.am_nu``; ``cfg.temperature`` for the energy score) changes as
    many as it can without changing more (``top1_change``: the share reached; ``misinformed``: the
    share answered with a > 0.5). The entry records the sha256 of both models' weights and of the
    images, and CIP's settings (:data:`AM_KEYS`)."""
    _check_split(split)
    score = check_score(cfg.am_score if score is None else score)
    model, info = get_oe_victim(cfg, split, verbose=False)
    fhat, finfo = get_misinformation_model(cfg, split, verbose=False)
    x, _ = data.id_data(cfg).split(split)
    cip = served_cip(cfg, split)
    target = _top1_change(cip, x)
    t = cfg.temperature if score == "energy" else 1.0
    am = AdaptiveMisinformation.calibrate(model, fhat, x, target, score=score, nu=cfg.am_nu, temperature=t)
    reached = _top1_change(am, x)
    return {"tau": am.tau, "score": score, "nu": am.nu, "T": t, "target_top1_change": target,
            "top1_change": reached, "misinformed": am.totals["misinformed"] / len(x), "n": len(x),
            "cip": _cip_settings(cip),
            "model": f"checkpoints/oe_victim_{split}.pt (OE-tuned '{split}' victim)",
            "misinformation_model": f"checkpoints/misinformation_{split}.pt",
            "weights_sha256": info["weights_sha256"], "misinformation_sha256": finfo["weights_sha256"],
            "data": f"ID training images of the '{split}' victim ({len(x)} from {cfg.dataset})",
            "data_sha256": tensor_sha256(x)}


def get_am_calibration(cfg: Profile, split: str = "all", score: str | None = None, verbose: bool = True) -> dict:
    """AM's calibration (:func:`compute_am_calibration`) of the ``split`` victim with ``score``
    (default ``cfg.am_score``), from :data:`AM_FILE` (keys: split, then score). The stored entry is
    reused only if it matches :data:`AM_KEYS`: the sha256 of the OE-tuned victim's and the
    misinformation model's weights and of the ID training images, the score, nu, temperature and
    the served CIP's thresholds and settings; otherwise it is recomputed and rewritten (and, with
    ``verbose``, the reason is printed)."""
    _check_split(split)
    score = check_score(cfg.am_score if score is None else score)
    _, info = get_oe_victim(cfg, split, verbose=False)
    _, finfo = get_misinformation_model(cfg, split, verbose=False)
    x, _ = data.id_data(cfg).split(split)
    wanted = {"weights_sha256": info["weights_sha256"], "misinformation_sha256": finfo["weights_sha256"],
              "data_sha256": tensor_sha256(x), "score": score, "nu": cfg.am_nu,
              "T": cfg.temperature if score == "energy" else 1.0, "cip": _cip_settings(served_cip(cfg, split))}
    path = cfg.results_dir / AM_FILE
    stored = read_json(path) if path.exists() else {}
    entry = stored.get(split, {}).get(score, {})
    stale = [k for k in AM_KEYS if entry.get(k) != wanted[k]]
    if not stale:
        return dict(entry)
    if entry and verbose:
        print(f"{AM_FILE} ({split}, {score}) was computed for other {', '.join(stale)}: recomputing")
    fresh = compute_am_calibration(cfg, split, score)
    stored.setdefault(split, {})[score] = fresh
    write_json(path, stored)
    return fresh


def dawn_key(cfg: Profile) -> str:
    """DAWN's secret key for this run: the profile's key with the seed appended, so every seed
    watermarks a different random subset of the same queries."""
    return f"{cfg.dawn_key}/seed-{cfg.seed}"


@dataclass(frozen=True)
class InnocentRecipe:
    """How one innocent model is trained: architecture, training data, augmentation, epochs.

    ``data``: ``"attacker"`` (the attacker's half, true labels: the model a legitimate competitor
    with the same data would build), ``"attacker_sub"`` (a random half of it), ``"half"`` (the
    owner's own half, trained independently: the closest honest model there is) or ``"mixed"``
    (a random half of the whole victim-train split). ``epochs_scale`` multiplies the profile's
    victim epochs (rounded, at least 1)."""

    arch: str
    data: str
    augment: bool
    epochs_scale: float = 1.0

    @property
    def tag(self) -> str:
        return f"{self.arch}_{self.data}" + ("" if self.augment else "_noaug") + (
            "" if self.epochs_scale == 1 else f"_ep{self.epochs_scale:g}")


INNOCENT_RECIPES = (
    InnocentRecipe("cnn", "attacker", True), InnocentRecipe("cnn_wide", "attacker", True),
    InnocentRecipe("mlp", "attacker", True), InnocentRecipe("cnn", "attacker", False),
    InnocentRecipe("cnn_wide", "half", True), InnocentRecipe("mlp", "attacker_sub", False),
    InnocentRecipe("cnn", "mixed", True), InnocentRecipe("cnn_wide", "attacker", False, 0.5),
)
"""The innocent pool of ownership verification (the course's design, not the authors'
release): it varies architecture, seed, training data and recipe, because how often an honest
model agrees with a trigger's altered label depends on all of them. ``cfg.n_innocent`` takes the
first n (cycled beyond eight; every model has its own seed)."""


def _innocent_data(cfg: Profile, recipe: InnocentRecipe, seed: int) -> tuple[Tensor, Tensor]:
    d = data.id_data(cfg)
    if recipe.data in ("attacker", "half"):
        return d.split(recipe.data)
    x, y = d.split("attacker" if recipe.data == "attacker_sub" else "all")
    if recipe.data not in ("attacker_sub", "mixed"):
        raise ValueError(f"unknown innocent data {recipe.data!r}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: len(x) // 2]
    return x[idx], y[idx]


def get_innocent_models(cfg: Profile, verbose: bool = True) -> dict[str, nn.Module]:
    """The innocent pool: ``cfg.n_innocent`` models that were NOT stolen, trained with true labels
    by the recipes of :data:`INNOCENT_RECIPES` (cycled, with a new seed per model and per profile
    seed), each load-or-train under ``checkpoints/innocent_<i>_<tag>.pt``. They tell, trigger by
    trigger, how often an honest model agrees with an altered label (:mod:`verification`).
    Returns ``{name: model}`` in the pool's order."""
    d = data.id_data(cfg)
    models = {}
    for i in progress_bar(range(cfg.n_innocent), desc="innocent pool", disable=not verbose, unit="model"):
        recipe = INNOCENT_RECIPES[i % len(INNOCENT_RECIPES)]
        seed = 101 * (i + 1) + 10_000 * cfg.seed
        x, y = _innocent_data(cfg, recipe, seed)
        epochs = max(1, round(cfg.victim_epochs * recipe.epochs_scale))
        shift = cfg.augment_shift if recipe.augment else 0
        name = f"innocent_{i + 1}_{recipe.tag}"
        spec = {"stage": "innocent", "recipe": asdict(recipe), "seed": seed, "dataset": cfg.dataset,
                "n_train": cfg.n_train, "n_images": len(x), "data_sha256": tensor_sha256(x),
                "epochs": epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "augment_shift": shift}

        def train(model: nn.Module, x: Tensor = x, y: Tensor = y, seed: int = seed, name: str = name,
                  epochs: int = epochs, shift: int = shift) -> dict:
            recipe = TrainRecipe(epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, augment_shift=shift)
            return {"history": train_classifier(model, x, y, recipe, seed=seed, desc=name, progress=verbose)}

        def build(arch: str = recipe.arch, seed: int = seed) -> nn.Module:
            torch.manual_seed(seed)
            c, h, _ = d.shape
            return build_model(arch, c, d.n_classes, h)

        models[name], _ = load_or_train(cfg.checkpoint_dir / f"{name}.pt", spec, build, train, verbose,
                                        name=name)
    return models


PRICE_SHARES = (0.25, 0.5, 0.75, 1.0, 2.0)
"""Online-PBD shares (percent of ID-routed queries, ``pbd_r1_percentile``) at which notebook 05
measures the benign price for the owner's trade-off (notebook 11)."""


def benign_price(cfg: Profile, split: str = "half", r1_percentile: float | None = None) -> dict:
    """What the served CIP (online PBD) costs benign users of the ``split`` victim, on the ID test
    digits: the share whose top-1 answer changes, split in two. ``oe_part``: the OE-tuned victim
    M'_V vs the plain victim M_V (what fine-tuning the detector costs); ``pbd_part``: the served
    CIP vs M'_V (what poisoning adds: PBD's flips, and any top-1 that weak or strong PPD moves);
    ``total``: served CIP vs M_V. Also ``n`` (test digits), ``pbd_flipped`` (PBD flips among them),
    ``routes`` (CIP's routing counts), ``r1_percentile`` / ``r1_among`` (the calibration) and the
    accuracies ``plain_acc``, ``oe_acc``, ``cip_acc``. ``r1_percentile`` other than the profile's
    recomputes R1 for this call only (thresholds.json is not touched)."""
    _check_split(split)
    x, y = data.id_data(cfg).split("test")
    plain = get_defense(cfg, "none", split)(x).argmax(1)
    oe = get_defense(cfg, "oe", split)(x).argmax(1)
    cip = get_defense(cfg, "cip", split, strong="reverse_rank" if split == "half" else "shuffle_noise")
    pct = cfg.pbd_r1_percentile if r1_percentile is None else float(r1_percentile)
    if pct != cfg.pbd_r1_percentile:
        train_x, _ = data.id_data(cfg).split(split)
        cip = cip.fresh(r1=calibrate_thresholds(predict_logits(cip.model, train_x), split_p1(cfg, split), cfg.p2,
                                                cip.temperature, pct, cfg.pbd_r1_among)["R1"])
    served = cip(x).argmax(1)

    def share(a: Tensor, b: Tensor) -> float:
        return float((a != b).double().mean())

    def acc(a: Tensor) -> float:
        return float((a == y).double().mean())

    counts = cip.route_counts()
    return {"n": len(x), "oe_part": share(oe, plain), "pbd_part": share(served, oe), "total": share(served, plain),
            "pbd_flipped": counts["PBD flipped"], "routes": counts, "r1_percentile": pct, "r1": cip.r1,
            "r1_among": cfg.pbd_r1_among, "plain_acc": acc(plain), "oe_acc": acc(oe), "cip_acc": acc(served)}
