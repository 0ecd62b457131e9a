"""Model-stealing attacks against the defended APIs (notebooks 07-10): KnockoffNets, DFME, IDA, DQA.

The attacker only ever calls ``api(x)`` (a :class:`~cip_helpers.method.defenses.Defense` used as a black
box: images in, probability rows out). Everything the defender knows (the victim's accuracy, the
trigger set of DAWN/CIP) is read from the defender's side *after* the attack, to score it.

The attack itself is :func:`steal_once` (the transfer set in one call, the kept answers, a surrogate
trained on them); :func:`steal` runs it against a fresh defended API and adds the bookkeeping
(the defender's scores, the record). Shared machinery:

* :func:`train_surrogate`: load-or-train a surrogate on (query, answer) pairs with hard (argmax) or
  soft labels. The checkpoint is content-addressed: its name is a hash of a spec holding the sha256
  of the queries, of the training targets and every training setting, so identical answers give the
  identical surrogate without retraining (this makes DQA almost free after IDA).
* :func:`trigger_accuracy`: how often the surrogate's top-1 equals the defender's altered label.
* :func:`write_record` / :func:`load_records` / :func:`load_surrogate`: one JSON record per
  (attack, defense, setting) run under ``results/<profile>/metrics/``, with the trigger set saved
  next to it and the surrogate checkpoint named in the record.

DFME's generator/student loop lives in :mod:`cip_helpers.course.dfme`.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from ..method.defenses import CIP, DAWN, Defense, TriggerSet
from ..method.digests import QUERY_FORM, tensor_sha256, weights_sha256
from ..method.misinformation import AdaptiveMisinformation
from ..method.models import build_model, predict_logits, small_cnn
from . import data, dfme, pipeline, training
from .config import Profile
from .store import (CheckpointError, load_checkpoint, load_or_train, load_triggers, read_json, save_triggers,
                    write_json)
from .training import TrainRecipe, accuracy, set_seed, train_classifier

LABEL_TYPES = ("hard", "soft")
ATTACKS = ("knockoff", "dfme", "ida", "dqa")
GRAD_QUERIES = ("defended", "victim")
"""Where DFME's zeroth-order gradient-estimation queries go: ``"defended"`` (the course: every
query goes through the defended API) or ``"victim"`` (the authors' release, ``DFME/main.py``:
``estimate_gradient_objective`` calls the model behind the defense directly, so only the
student-training queries are poisoned; an ablation)."""
REQUIRED_KEYS = ("name", "attack", "defense", "setting", "dataset", "victim", "label_type", "queries",
                 "victim_acc", "defended_acc", "surrogate_acc", "trigger_acc", "n_triggers",
                 "dqa_ratio", "seed", "seconds", "surrogate_checkpoint", "trigger_file",
                 "weights_sha256", "surrogate_sha256", "triggers_sha256", "oe_victim_acc",
                 "surrogate_best_acc", "ablation")
DQA_NOISE_SEED = 4242  # offset of the DQA attacker's uniform-noise generator


# ----------------------------------------------------------------------------- hashing and models


def build_surrogate(arch: str, width: int, input_shape: tuple[int, ...], n_classes: int,
                    seed: int = 0) -> nn.Module:
    """A fresh, seeded surrogate: ``cnn`` is the small CNN at ``width`` channels, other
    architectures come from :func:`cip_helpers.method.models.build_model`."""
    torch.manual_seed(seed)
    c, h, _ = input_shape
    if arch == "cnn":
        return small_cnn(c, n_classes, h, width=width)
    return build_model(arch, c, n_classes, h)


def _model_from_spec(spec: dict) -> nn.Module:
    return build_surrogate(spec["arch"], spec["width"], tuple(spec["input_shape"]), spec["n_classes"])


def targets_from_answers(answers: Tensor, label_type: str) -> Tensor:
    """Training targets: argmax labels (``hard``) or the answered probability rows (``soft``)."""
    if label_type not in LABEL_TYPES:
        raise ValueError(f"label_type must be one of {LABEL_TYPES}, got {label_type!r}")
    return answers.argmax(1) if label_type == "hard" else answers.float()


# ----------------------------------------------------------------------------- surrogate training


def surrogate_recipe(cfg: Profile, epochs: int, arch: str | None = None) -> dict:
    """The data-independent part of a surrogate's checkpoint key: architecture, width, epochs,
    lr, batch size, seed, the recipe of :func:`training.surrogate_recipe_spec` and, for Adam, the
    kernel (``fused_adam``: Adam's fused kernel gives other bits than the per-parameter loop)."""
    recipe = {"arch": cfg.surrogate_arch if arch is None else arch, "width": cfg.surrogate_width,
              "epochs": epochs, "lr": cfg.surrogate_lr, "batch_size": cfg.surrogate_batch, "seed": cfg.seed,
              **training.surrogate_recipe_spec(cfg)}
    if training.resolve_optimizer(cfg.surrogate_optimizer, cfg.surrogate_lr) == "adam":
        recipe["fused_adam"] = True
    return recipe


def surrogate_spec(cfg: Profile, x: Tensor, targets: Tensor, label_type: str, epochs: int,
                   arch: str | None = None) -> dict:
    """Everything that shapes a surrogate's weights: the data hashes and the training recipe
    (:func:`surrogate_recipe`; ``arch`` overrides ``cfg.surrogate_arch``)."""
    d = data.id_data(cfg)
    return {"stage": "surrogate", "input_shape": list(d.shape), "n_classes": d.n_classes,
            "label_type": label_type, "n_queries": len(x), "queries_sha256": tensor_sha256(x),
            "targets_sha256": tensor_sha256(targets), **surrogate_recipe(cfg, epochs, arch)}


def train_surrogate(cfg: Profile, x: Tensor, answers: Tensor, label_type: str, *,
                    epochs: int | None = None, desc: str = "surrogate", verbose: bool = True,
                    arch: str | None = None,
                    eval_sets: dict[str, tuple[Tensor, Tensor]] | None = None) -> tuple[nn.Module, dict]:
    """Load-or-train a surrogate on (query, answer) pairs. ``answers`` are the API's probability
    rows; ``label_type`` ``hard`` trains on their argmax with cross-entropy, ``soft`` on the rows
    with soft cross-entropy. ``arch`` overrides ``cfg.surrogate_arch``. After every epoch the
    surrogate's accuracy on the ID test digits (``test_acc``) and on every ``(x, labels)`` of
    ``eval_sets`` (``<name>_acc``, e.g. a trigger set) is logged in ``info["history"]`` (the
    paper reports the best epoch; the course's headline is the last). Returns ``(model, info)``;
    ``info["checkpoint"]`` is the checkpoint path relative to ``cfg.results_dir`` and
    ``info["loaded"]`` says whether it was reused."""
    if len(x) != len(answers):
        raise ValueError(f"{len(x)} queries but {len(answers)} answers")
    epochs = cfg.surrogate_epochs if epochs is None else epochs
    targets = targets_from_answers(answers, label_type)
    spec = surrogate_spec(cfg, x, targets, label_type, epochs, arch)
    sets = {"test": data.id_data(cfg).split("test"), **(eval_sets or {})}
    # evaluation changes no weight, but the logged history must belong to these sets
    spec["eval_per_epoch"] = {k: [tensor_sha256(ex), tensor_sha256(ey)] for k, (ex, ey) in sets.items()}
    path = cfg.checkpoint_dir / "surrogates" / f"surrogate_{pipeline.spec_hash(spec)}.pt"

    def train(model: nn.Module) -> dict:
        history = train_classifier(model, x, targets, TrainRecipe.surrogate(cfg, epochs), seed=cfg.seed,
                                   eval_sets=sets, desc=desc, progress=verbose)
        return {"history": history}

    model, info = load_or_train(path, spec, lambda: _model_from_spec(spec), train, verbose, name=desc)
    return model, {**info, "checkpoint": str(path.relative_to(cfg.results_dir))}


def best_epoch(history: list[dict], at: str = "epoch") -> tuple[float | None, int | None]:
    """``(best test accuracy, the earliest point reaching it)`` over a training history
    (``(None, None)`` without ``test_acc`` entries); ``at`` names the point's key (``"epoch"``, or
    ``"queries"`` for a DFME curve). The authors report the best test epoch; the course's headline
    ``surrogate_acc`` is the final epoch."""
    accs = [(h["test_acc"], h[at]) for h in history or [] if h.get("test_acc") is not None]
    if not accs:
        return None, None
    acc, epoch = max(accs, key=lambda a: (a[0], -a[1]))
    return acc, epoch


def trigger_accuracy(model: nn.Module, triggers: TriggerSet) -> float | None:
    """Fraction of the trigger set on which ``model``'s top-1 equals the altered label
    (``None`` for an empty trigger set)."""
    if len(triggers) == 0:
        return None
    return accuracy(model, triggers.x, triggers.labels)


# ----------------------------------------------------------------------------- defenses and scoring


def dawn_rate_for(cfg: Profile, n_queries: int) -> float:
    """DAWN's rate matching offline PBD's budget ``cfg.pbd_offline_T``: the fraction itself if < 1,
    else T absolute triggers among ``n_queries`` queries."""
    t = cfg.pbd_offline_T
    return float(t) if t < 1 else min(1.0, float(t) / max(n_queries, 1))


def make_defense(cfg: Profile, name: str, split: str = "all", strong: str = "shuffle_noise",
                 pbd: str | None = "online", dawn_rate: float | None = None,
                 pbd_T: float | None = None, p1: float | None = None, p2: float | None = None,
                 am_score: str | None = None) -> Defense:
    """A FRESH defended API (empty trigger set) via :func:`pipeline.get_defense`;
    ``dawn_rate`` and ``pbd_T`` override ``cfg.dawn_rate`` and ``cfg.pbd_offline_T``, ``p1`` / ``p2``
    the victim's E1 / E2 percentiles (ablations), ``am_score`` AM's score (default ``cfg.am_score``)."""
    if dawn_rate is not None:
        cfg = dataclasses.replace(cfg, dawn_rate=dawn_rate)
    if pbd_T is not None:
        cfg = dataclasses.replace(cfg, pbd_offline_T=pbd_T)
    return pipeline.get_defense(cfg, name, split, strong=strong, pbd=pbd, p1=p1, p2=p2, am_score=am_score)


def defended_accuracy(cfg: Profile, split: str = "all", **defense_kwargs) -> float:
    """Top-1 accuracy of the defended API on the ID test digits, measured on a separate fresh
    instance (so test digits never enter the trigger set of the instance the attacker used)."""
    x, y = data.id_data(cfg).split("test")
    api = make_defense(cfg, split=split, **defense_kwargs)
    return float((api(x).argmax(1) == y).float().mean())


def victim_accuracy(cfg: Profile, split: str = "all") -> float:
    """Test accuracy of the plain victim M_V."""
    model, _ = pipeline.get_victim(cfg, split, verbose=False)
    return accuracy(model, *data.id_data(cfg).split("test"))


def oe_victim_accuracy(cfg: Profile, split: str = "all") -> float:
    """Test accuracy of the OE-tuned victim M'_V itself (its argmax, no poisoning): the paper's
    Test(M'_V) (Table IV). The defended API's own top-1 accuracy is ``defended_accuracy``."""
    model, _ = pipeline.get_oe_victim(cfg, split, verbose=False)
    return accuracy(model, *data.id_data(cfg).split("test"))


def _compact_history(history: list[dict] | None) -> list[dict] | None:
    """Per-epoch accuracies of a training history, rounded for the record (loss dropped)."""
    if not history:
        return None
    return [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()
             if k == "epoch" or k.endswith("_acc")} for h in history]


# ----------------------------------------------------------------------------- records


def record_name(attack: str, defense: str, setting: str | None = None) -> str:
    """``<attack>_<defense>[_<setting>]``: the file stem of a run's record."""
    return f"{attack}_{defense}" + (f"_{setting}" if setting else "")


def write_record(cfg: Profile, record: dict, triggers: TriggerSet | None = None) -> Path:
    """Write ``metrics/<name>.json`` (and the defender's trigger set as ``<name>.triggers.pt``).
    ``record`` must hold every key of :data:`REQUIRED_KEYS` except ``trigger_file`` and
    ``triggers_sha256`` (filled in here from ``triggers``)."""
    name = record["name"]
    if triggers is not None:
        path = cfg.metrics_dir / f"{name}.triggers.pt"
        save_triggers(path, triggers)
        record["trigger_file"] = str(path.relative_to(cfg.results_dir))
        record["triggers_sha256"] = triggers_sha256(triggers)
    record.setdefault("trigger_file", None)
    record.setdefault("triggers_sha256", None)
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"record {name} lacks keys {missing}")
    return write_json(cfg.metrics_dir / f"{name}.json", record)


def read_records(metrics: Path, pattern: str = "*.json") -> list[dict]:
    """The attack records (learning-curve points included) among the JSON files of ``metrics``
    matching ``pattern``, in file order. A record of an older version of the course raises
    ``ValueError`` (:func:`check_record_keys`)."""
    records = []
    for path in sorted(Path(metrics).glob(pattern)):
        r = read_json(path)
        if r.get("attack") in ATTACKS:
            check_record_keys(r, path)
            records.append(r)
    return records


def load_records(cfg: Profile, attack: str) -> pd.DataFrame:
    """All records of ``attack`` under ``metrics/`` as a table (one row per run; :func:`read_records`)."""
    return pd.DataFrame([r for r in read_records(cfg.metrics_dir, f"{attack}_*.json") if r["attack"] == attack])


def results_table(cfg: Profile, attack: str, columns: tuple[str, ...] = (
        "defense", "setting", "ablation", "label_type", "queries", "victim_acc", "oe_victim_acc",
        "defended_acc", "surrogate_acc", "surrogate_best_acc", "trigger_acc", "n_triggers", "dqa_ratio",
        "seconds"), ablations: bool | None = False) -> pd.DataFrame:
    """The results-table rows of ``attack`` (not the learning-curve points): the main runs
    (``ablations=False``), the ablation runs (``True``) or both (``None``); columns that are empty
    in every row are left out."""
    df = load_records(cfg, attack)
    if df.empty:
        return df
    if "curve_point" in df:
        df = df[~df["curve_point"].fillna(False).astype(bool)]
    if ablations is not None:
        is_ablation = df["ablation"].notna() if "ablation" in df else pd.Series(False, index=df.index)
        df = df[is_ablation == ablations]
    return df[[c for c in columns if c in df and df[c].notna().any()]].reset_index(drop=True)


def _rerun_hint(cfg: Profile, rec: dict) -> str:
    book = {"knockoff": "07", "dfme": "08", "ida": "09", "dqa": "10"}.get(rec.get("attack"), "07-10")
    return (f"re-run the attack: python -m cip_helpers.tools.run --profile {cfg.name} --set seed={cfg.seed}"
            f"{' --set tag=' + cfg.tag if cfg.tag else ''} --only {book}")


def load_surrogate(cfg: Profile, record: str) -> nn.Module:
    """The surrogate (or DFME student) of the run whose record is ``metrics/<record>.json``.
    Raises ``ValueError`` if the checkpoint's weights are not the ones the record was measured on
    (``surrogate_sha256``), with the command that re-runs the attack."""
    rec = read_json(cfg.metrics_dir / f"{record}.json")
    spec, _, state = load_checkpoint(cfg.results_dir / rec["surrogate_checkpoint"])
    if rec.get("surrogate_sha256") != weights_sha256(state):
        raise ValueError(f"{rec['surrogate_checkpoint']} does not hold the surrogate that "
                         f"metrics/{record}.json was measured on (weights sha256 differs); "
                         + _rerun_hint(cfg, rec))
    model = _model_from_spec(spec)
    model.load_state_dict(state)
    return model.eval()


def load_trigger_set(cfg: Profile, record: str) -> TriggerSet | None:
    """The defender's trigger set of the run ``record`` (``None`` for defenses without one).
    Raises ``ValueError`` if the file is not the trigger set the record names (sha256)."""
    rec = read_json(cfg.metrics_dir / f"{record}.json")
    if not rec["trigger_file"]:
        return None
    triggers = load_triggers(cfg.results_dir / rec["trigger_file"])
    if rec.get("triggers_sha256") != triggers_sha256(triggers):
        raise ValueError(f"{rec['trigger_file']} is not the trigger set of metrics/{record}.json "
                         "(sha256 differs); " + _rerun_hint(cfg, rec))
    return triggers


def checkpoint_sha256(path: Path) -> str:
    """sha256 of the weights in the checkpoint at ``path`` (:func:`digests.weights_sha256`), read
    once per file version (cached by path and modification time: a rewritten file is re-read).
    Raises ``OSError`` or :class:`store.CheckpointError` for a missing or unreadable file."""
    return _checkpoint_sha256(str(path), Path(path).stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _checkpoint_sha256(path: str, mtime_ns: int) -> str:  # mtime_ns: a rewritten file is re-read
    return weights_sha256(load_checkpoint(Path(path))[2])


RECORD_VERSION_KEYS = ("oe_victim_acc", "surrogate_best_acc", "ablation")
"""Keys every record of this version of the course holds and older ones lack."""


def check_record_keys(rec: dict, path: Path) -> None:
    """Refuse a record without :data:`RECORD_VERSION_KEYS`: it was written by an older version of
    the course (e.g. IDA's records before they were named by label type), and reading it next to
    current ones would mix two versions in one table. Raises ``ValueError`` with the fix."""
    missing = [k for k in RECORD_VERSION_KEYS if k not in rec]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it was written by an older version of the course. "
                         f"Delete it (rm '{path}') and re-run its attack notebook (07-10) if you need it")


OE_DEFENSES = ("oe", "cip", "am")
"""Defenses answered by the OE-tuned victim M'_V (checkpoint ``oe_victim_<split>.pt``); the others
wrap the plain victim M_V (``victim_<split>.pt``). AM's answers also come from its misinformation
model (``misinformation_<split>.pt``, :data:`SECOND_CHECKPOINTS`)."""

SECOND_CHECKPOINTS = {"am": ("misinformation", "misinformation_sha256")}
"""Defenses whose answers also come from a second model: the checkpoint stage and the record key
holding the sha256 of its weights (:func:`check_record` compares both)."""


def answering_checkpoint(defense: str) -> str:
    """The checkpoint stage whose weights answer behind ``defense``: ``"oe_victim"`` or ``"victim"``."""
    return "oe_victim" if defense in OE_DEFENSES else "victim"


def check_record(cfg: Profile, rec: dict) -> None:
    """Refuse a record made with other weights than the checkpoints now on disk.

    The record's ``weights_sha256`` must equal the sha256 of the checkpoint that answered
    (``oe_victim_<victim>.pt`` for CIP, OE-only and AM, ``victim_<victim>.pt`` otherwise); for AM
    also ``misinformation_sha256`` that of ``misinformation_<victim>.pt`` (:data:`SECOND_CHECKPOINTS`).
    Without a checkpoint (a fresh clone reading committed JSON) there is nothing to compare and
    that check passes. Raises ``ValueError`` naming the command that re-runs the attack."""
    split = rec.get("victim", "all")
    checks = [(answering_checkpoint(rec.get("defense")), "weights_sha256")]
    if rec.get("defense") in SECOND_CHECKPOINTS:
        checks.append(SECOND_CHECKPOINTS[rec["defense"]])
    for stage, key in checks:
        path = cfg.checkpoint_dir / f"{stage}_{split}.pt"
        if not path.exists():
            continue
        have = checkpoint_sha256(path)
        if rec.get(key) != have:
            raise ValueError(f"metrics/{rec.get('name')}.json was measured against other weights than "
                             f"{path.name} now holds ({str(rec.get(key))[:16]}... vs "
                             f"{have[:16]}...); " + _rerun_hint(cfg, rec))


# ----------------------------------------------------------------------------- one stealing run


def steal_once(api: Defense, queries: Tensor, label_type: str,
               train: Callable[[Tensor, Tensor, str], tuple[nn.Module, dict]],
               keep: Tensor | None = None) -> tuple[Tensor, nn.Module, dict]:
    """The attack itself, as every query-then-train thief runs it (KnockoffNets, IDA, DQA): send
    the whole transfer set ``queries`` to the defended ``api`` in ONE call, keep the answers
    selected by the boolean mask ``keep`` (default: all; DQA drops its noise answers) and train a
    surrogate on the kept (query, answer) pairs with ``train(x, answers, label_type)`` (the
    course passes :func:`train_surrogate`, load-or-train; ``label_type`` is ``"hard"`` or
    ``"soft"``). Returns ``(answers, surrogate, info)``: every answer, kept or not, and what
    ``train`` returned."""
    answers = api(queries)  # <- the attacker's only access to the victim
    keep = torch.ones(len(queries), dtype=torch.bool) if keep is None else keep
    surrogate, info = train(queries[keep], answers[keep], label_type)
    return answers, surrogate, info


FIT_OPTIONS = ("epochs", "arch", "trigger_curve")
"""The surrogate-training options of :func:`steal` (its ``fit``)."""


def steal(cfg: Profile, attack: str, defense: str, queries: Tensor, label_type: str, *,
          split: str = "all", setting: str | None = None, keep: Tensor | None = None,
          defense_kwargs: dict | None = None, fit: dict | None = None, extra: dict | None = None,
          sources: Tensor | None = None, verbose: bool = True) -> dict:
    """One stealing run with its bookkeeping: a fresh ``defense`` API (seeded with ``cfg.seed``),
    the attack (:func:`steal_once`: ``queries`` in one call, the answers selected by ``keep``
    trained on), the defender's scoring of the surrogate, and the record, written and returned.

    ``fit`` holds the surrogate's rarely changed options (:data:`FIT_OPTIONS`): ``epochs``
    (default ``cfg.surrogate_epochs``), ``arch`` (another surrogate architecture) and
    ``trigger_curve`` (log the trigger accuracy after every epoch in ``history``). ``extra`` adds
    record keys or sets them, e.g. ``ablation``: the run is not one of the table's main rows (it
    goes to the ablation table of ``table.md``). ``sources`` (int64, one code of
    :data:`MIXED_SOURCES` per query) adds CIP's routing counts per source.

    The record's ``labels_kept`` is the share of the trained answers whose top-1 equals the
    undefended API's (the plain victim's) top-1: what a hard-label attacker still learns from;
    for CIP ``labels_kept_by_route`` splits it by branch (``scores.ROUTE_NAMES``)."""
    start = time.perf_counter()
    fit = fit or {}
    if set(fit) - set(FIT_OPTIONS):
        raise ValueError(f"unknown fit options {sorted(set(fit) - set(FIT_OPTIONS))}; use {FIT_OPTIONS}")
    epochs, arch, trigger_curve = (fit.get(k) for k in FIT_OPTIONS)
    set_seed(cfg.seed)
    defense_kwargs = dict(defense_kwargs or {})
    api = make_defense(cfg, defense, split, **defense_kwargs)
    keep = torch.ones(len(queries), dtype=torch.bool) if keep is None else keep
    name = record_name(attack, defense, setting)
    kept: dict = {}

    def train(x: Tensor, answers: Tensor, label_type: str) -> tuple[nn.Module, dict]:
        # between the call and the training: what the defender measures of the kept answers
        triggers, routes = _trigger_set(api), api.last_routes[keep] if isinstance(api, CIP) else None
        kept.update(_labels_kept(cfg, split, x, answers, routes))
        eval_sets = ({"trigger": (triggers.x, triggers.labels)} if trigger_curve and triggers is not None
                     and len(triggers) else None)
        return train_surrogate(cfg, x, answers, label_type, epochs=epochs, desc=name, verbose=verbose,
                               arch=arch, eval_sets=eval_sets)

    _, model, info = steal_once(api, queries, label_type, train, keep)
    triggers = _trigger_set(api)
    best_acc, best_ep = best_epoch(info.get("history"))
    test_x, test_y = data.id_data(cfg).split("test")
    record = {
        "name": name, "attack": attack, "defense": defense, "setting": setting,
        "dataset": cfg.dataset, "victim": split, "label_type": label_type,
        "queries": len(queries), "queries_trained": int(keep.sum()),
        "victim_acc": victim_accuracy(cfg, split),
        "oe_victim_acc": oe_victim_accuracy(cfg, split) if defense in OE_DEFENSES else None,
        "defended_acc": defended_accuracy(cfg, split, name=defense, **defense_kwargs),
        "surrogate_acc": accuracy(model, test_x, test_y),
        "surrogate_best_acc": best_acc, "surrogate_best_epoch": best_ep,
        "history": _compact_history(info.get("history")), "surrogate_arch": arch or cfg.surrogate_arch,
        "ablation": None,  # set through ``extra``; the key keeps this place in the record
        "trigger_acc": trigger_accuracy(model, triggers) if triggers is not None else None,
        "n_triggers": len(triggers) if triggers is not None else None,
        "triggers_trained": _n_triggers_trained(triggers, queries[keep]) if triggers is not None else None,
        "dqa_ratio": None, "seed": cfg.seed, "routes": api.route_counts() if isinstance(api, CIP) else None,
        **kept, "routes_by_source": _routes_by_source(api, sources),
        "defense_kwargs": defense_kwargs, "surrogate_checkpoint": info["checkpoint"],
        "surrogate_loaded": info["loaded"], **_am_fields(cfg, split, api, keep),
        **provenance(api.weights_sha256, queries, triggers, model, _second_weights(api)),
        **(extra or {}),
    }
    record["seconds"] = round(time.perf_counter() - start, 2)
    write_record(cfg, record, triggers)
    return record


def _second_weights(api: Defense) -> str | None:
    """The sha256 of an AM API's misinformation model (``None`` for the other defenses)."""
    return api.misinformation_sha256 if isinstance(api, AdaptiveMisinformation) else None


def _am_fields(cfg: Profile, split: str, api: Defense, answered: Tensor | None = None) -> dict:
    """The record keys of an AM run (``{}`` for the other defenses): ``am_tau``, ``am_nu``,
    ``am_score``; ``am_target_top1_change`` (the share of ID training images whose top-1 the served
    CIP changes, what tau was calibrated to) and ``am_train_top1_change`` (the share AM changes,
    :func:`pipeline.get_am_calibration`); given ``answered`` (a mask over the last call's queries),
    ``am_misinformed``: the share of those answered with a > 0.5 (misinformation)."""
    if not isinstance(api, AdaptiveMisinformation):
        return {}
    c = pipeline.get_am_calibration(cfg, split, api.score, verbose=False)
    out = {"am_tau": api.tau, "am_nu": api.nu, "am_score": api.score,
           "am_target_top1_change": c["target_top1_change"], "am_train_top1_change": c["top1_change"]}
    if answered is not None and len(api.last_alpha) == len(answered):
        alpha = api.last_alpha[answered]
        out["am_misinformed"] = float((alpha > 0.5).double().mean()) if len(alpha) else None
    return out


def _trigger_set(api: Defense) -> TriggerSet | None:
    """The defender's trigger set of a DAWN or CIP API (``None`` for the other defenses)."""
    return api.trigger_set if isinstance(api, (DAWN, CIP)) else None


def _labels_kept(cfg: Profile, split: str, x: Tensor, answers: Tensor, routes: Tensor | None) -> dict:
    """``labels_kept`` (share of ``answers`` whose top-1 is the plain victim's top-1 on ``x``) and,
    given CIP's ``routes``, ``labels_kept_by_route`` ({branch: share or None when empty})."""
    from ..method.scores import ROUTE_NAMES

    if len(x) == 0:
        return {"labels_kept": None, "labels_kept_by_route": None}
    model, info = pipeline.get_victim(cfg, split, verbose=False)
    key = (info["weights_sha256"], tensor_sha256(x))
    if key not in _VICTIM_LABELS:  # the runs of a notebook on one transfer set share one forward pass
        if len(_VICTIM_LABELS) >= 16:
            _VICTIM_LABELS.clear()
        _VICTIM_LABELS[key] = predict_logits(model, x).argmax(1)
    same = answers.argmax(1) == _VICTIM_LABELS[key]
    by_route = None
    if routes is not None:
        by_route = {name: (float(same[routes == k].float().mean()) if bool((routes == k).any()) else None)
                    for k, name in enumerate(ROUTE_NAMES)}
    return {"labels_kept": float(same.float().mean()), "labels_kept_by_route": by_route}


_VICTIM_LABELS: dict[tuple[str, str], Tensor] = {}
"""The plain victim's top-1 per (weights sha256, queries sha256), for :func:`_labels_kept`."""


def _routes_by_source(api: Defense, sources: Tensor | None) -> dict | None:
    """CIP's routing counts of the last call per source of a mixed transfer set (else ``None``)."""
    from ..method.scores import ROUTE_NAMES

    if sources is None or not isinstance(api, CIP):
        return None
    routes = api.last_routes
    return {src: {name: int(((sources == i) & (routes == k)).sum()) for k, name in enumerate(ROUTE_NAMES)}
            for i, src in enumerate(MIXED_SOURCES)}


def provenance(weights: str, queries: Tensor | None, triggers: TriggerSet | None,
               surrogate: nn.Module, misinformation: str | None = None) -> dict:
    """The content addresses of one run (sha256, hex): the weights that answered
    (``weights_sha256``, given), the transfer set (``queries_sha256``; ``None`` for DFME, whose
    queries are generated), the defender's trigger set (``triggers_sha256``, ``None`` without one)
    and the surrogate's weights (``surrogate_sha256``); for AM also its misinformation model's
    weights (``misinformation_sha256``, given; the key only exists for AM). Readers of the record
    compare them with the files at hand (:func:`check_record`, :func:`load_trigger_set`,
    :func:`load_surrogate`)."""
    return {"weights_sha256": weights,
            "queries_sha256": tensor_sha256(queries) if queries is not None else None,
            "triggers_sha256": triggers_sha256(triggers) if triggers is not None else None,
            "surrogate_sha256": weights_sha256(surrogate),
            **({"misinformation_sha256": misinformation} if misinformation is not None else {})}


def triggers_sha256(triggers: TriggerSet) -> str:
    """sha256 of a trigger set's inputs and altered answers (what verification uses)."""
    return tensor_sha256(torch.cat([triggers.x.flatten(1), triggers.altered], 1)) if len(triggers) \
        else tensor_sha256(torch.empty(0))


def _n_triggers_trained(triggers: TriggerSet, trained_x: Tensor) -> int:
    """How many triggers are among the queries the attacker trained on (exact image match)."""
    if len(triggers) == 0:
        return 0
    trained = {tensor_sha256(x) for x in trained_x}
    return sum(tensor_sha256(t) in trained for t in triggers.x)


# ----------------------------------------------------------------------------- the attacks


def adapt_to_digits(x: Tensor, gamma: float) -> Tensor:
    """The KnockoffNets attacker's only adaptation of its natural images to a digit API (it knows
    the input format: white strokes on a black background): stretch each image to [0, 1], then
    raise it to the power ``gamma`` (darkens backgrounds, keeps bright structures).
    ``gamma = 0`` sends the pool images unchanged."""
    if gamma == 0:
        return x
    lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-3)).pow(gamma).clamp(0, 1)


def knockoff_queries(cfg: Profile, n: int | None = None) -> Tensor:
    """The first ``n`` (default ``cfg.knockoff_queries``) images of the KnockoffNets pool, adapted
    with :func:`adapt_to_digits` (``cfg.knockoff_gamma``)."""
    pool = data.query_pool(cfg, "knockoff")
    n = cfg.knockoff_queries if n is None else n
    if n > len(pool):
        raise ValueError(f"{n} KnockoffNets queries requested but the pool holds {len(pool)}")
    return adapt_to_digits(pool[:n], cfg.knockoff_gamma)


KNOCKOFF_POOLS = ("photos", "mixed")
"""KnockoffNets transfer sets: ``photos`` (the Knockoff pool's photo crops, :func:`knockoff_queries`)
or ``mixed`` (rendered characters + photo crops, :func:`mixed_queries`)."""
MIXED_SOURCES = ("near-distribution", "photo crops")
"""Source codes of :func:`mixed_queries` (0, 1)."""
MIXED_SEED = 1717  # the one fixed shuffle of the mixed pool (plus 1000 x seed)


def mixed_queries(cfg: Profile, n: int | None = None) -> tuple[Tensor, Tensor]:
    """The mixed KnockoffNets transfer set: every image of the ``near`` pool (rendered printed
    characters, sent as they are: they already have the victim's framing) and the first
    ``cfg.mixed_photos`` photo queries of :func:`knockoff_queries`, shuffled once (seeded).
    Returns the first ``n`` (default all) as ``(x (n, C, H, W) float32 in [0, 1], source (n,)
    int64)`` with source 0 = near-distribution, 1 = photo crop (:data:`MIXED_SOURCES`).
    Raises ``ValueError`` when the data has no ``near`` pool (:func:`data.has_near_pool`) or
    ``n`` exceeds the pool."""
    near = data.query_pool(cfg, "near")
    photos = knockoff_queries(cfg, cfg.mixed_photos) if cfg.mixed_photos else near[:0]
    x = torch.cat([near, photos])
    source = torch.cat([torch.zeros(len(near), dtype=torch.long), torch.ones(len(photos), dtype=torch.long)])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(MIXED_SEED + 1000 * cfg.seed))
    n = len(x) if n is None else n
    if n > len(x):
        raise ValueError(f"{n} mixed KnockoffNets queries requested but the mixed pool holds {len(x)} "
                         f"(n_near {cfg.n_near} + mixed_photos {cfg.mixed_photos})")
    return x[order[:n]], source[order[:n]]


def pool_queries(cfg: Profile, pool: str, n: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``(queries, source codes or None)`` of a KnockoffNets pool (:data:`KNOCKOFF_POOLS`)."""
    if pool == "photos":
        return knockoff_queries(cfg, n), None
    if pool == "mixed":
        return mixed_queries(cfg, n)
    raise ValueError(f"pool must be one of {KNOCKOFF_POOLS}, got {pool!r}")


def pool_size(cfg: Profile, pool: str) -> int:
    """The full query budget of a KnockoffNets pool: ``knockoff_queries`` or n_near + mixed_photos."""
    return cfg.knockoff_queries if pool == "photos" else cfg.n_near + cfg.mixed_photos


def cip_routes(cfg: Profile, queries: Tensor, split: str = "all", p1: float | None = None,
               p2: float | None = None) -> Tensor:
    """The branch CIP routes each query to, (n,) int64 in {0 ID, 1 low-ES, 2 high-ES}
    (``scores.ROUTE_NAMES``), from a probe API that poisons nothing the attacker sees (the
    defender's view of a transfer set); ``p1`` / ``p2`` move E1 / E2 (ablations)."""
    probe = make_defense(cfg, "cip", split, strong="reverse_rank", pbd=None, p1=p1, p2=p2)
    probe(queries)
    return probe.last_routes.clone()


def run_knockoff(cfg: Profile, defense: str, label_type: str, n_queries: int | None = None,
                 verbose: bool = True, arch: str | None = None, pool: str = "photos",
                 p1: float | None = None, branch: int | None = None, pbd: str = "offline_top_T",
                 am_score: str | None = None) -> dict:
    """KnockoffNets (Orekondy et al. 2019) against the ``all`` victim: unlabelled images from
    ``pool`` (:data:`KNOCKOFF_POOLS`), answers from ``defense``, a surrogate trained on them. CIP as
    in the authors' release (``knockoffnets/main.py``): strong PPD ``shuffle_noise`` and offline
    top-T PBD among the ID-routed queries, T from ``cfg.knockoff_pbd_T`` (:func:`offline_pbd_T`;
    no PBD when nothing routes ID). The per-epoch trigger accuracy is logged (``history``).

    Settings (record ``knockoff_<defense>_<setting>``): ``<label>`` (photos) or ``mixed_<label>``;
    ``_q<n>`` for a learning-curve point with fewer queries than the pool's budget; ablations
    (second table): ``_<arch>`` another surrogate architecture on the same answers (e.g.
    ``cnn_plain``), ``_p1-<p1>`` CIP with E1 at another percentile (notebook 03's trade-off),
    ``_branch<k>`` an attacker whose transfer set is only the pool's queries CIP routes to branch
    ``k`` (``scores.ROUTE_NAMES``; e.g. 1 = low-ES, where weak PPD answers). Mixed-pool records carry
    ``routes_by_source`` (CIP: routing counts per :data:`MIXED_SOURCES`). ``pbd="online"``: CIP as
    an owner serves it (online PBD, R1 from :func:`pipeline.get_thresholds`), setting
    ``<...>_online``, a main row of its own beside the paper's offline top-T row. AM (``am``):
    tau calibrated to CIP's share of changed training answers (:func:`pipeline.get_am_calibration`);
    ``am_score`` other than ``cfg.am_score`` is an ablation, setting ``_<score>`` (e.g. ``_energy``:
    AM's answer behind CIP's energy score).

    Raises ``ValueError`` for an unknown pool or branch, a pool the data does not have (``mixed``
    needs :func:`data.has_near_pool`), more queries than the pool holds, and ``am_score`` for
    another defense than ``am``."""
    from ..method.scores import ROUTE_NAMES

    if branch is not None and branch not in range(len(ROUTE_NAMES)):
        raise ValueError(f"branch must be one of 0, 1, 2 ({', '.join(ROUTE_NAMES)}), got {branch!r}")
    if p1 is not None and defense != "cip":
        raise ValueError(f"p1 sets CIP's E1; defense {defense!r} has no thresholds (use defense='cip')")
    if am_score is not None and defense != "am":
        raise ValueError(f"am_score sets AM's OOD score; defense {defense!r} is not AM (use defense='am')")
    _check_pbd(defense, pbd)
    queries, source = pool_queries(cfg, pool)
    n = len(queries) if n_queries is None else n_queries
    if not 1 <= n <= len(queries):
        raise ValueError(f"n_queries must be in [1, {len(queries)}] (the {pool} pool's size), got {n}")
    curve = n != len(queries)
    queries, source = queries[:n], (source[:n] if source is not None else None)
    setting = ("mixed_" if pool == "mixed" else "") + label_type + (f"_q{n}" if curve else "")
    setting += "_online" if pbd == "online" else ""
    ablation = None
    if arch is not None and arch != cfg.surrogate_arch:
        setting += f"_{arch}"
        ablation = f"surrogate {arch}"
    if p1 is not None:
        setting += f"_p1-{p1:g}"
        ablation = f"E1 at p1 = {p1:g}"
    kwargs: dict = {}
    if am_score is not None and am_score != cfg.am_score:
        setting += f"_{am_score}"
        ablation = f"AM with the {am_score} score"
        kwargs["am_score"] = am_score
    if branch is not None:
        keep = cip_routes(cfg, queries, "all", p1) == branch
        if not bool(keep.any()):
            raise ValueError(f"no query of the {pool} pool routes {ROUTE_NAMES[branch]}: nothing to attack with")
        queries, source = queries[keep], (source[keep] if source is not None else None)
        setting += f"_branch{branch}"
        ablation = f"only the queries CIP routes {ROUTE_NAMES[branch]}"  # how many: the record's queries
    if defense == "cip" and pbd == "online":
        kwargs = served_cip_kwargs("knockoff", p1)
    elif defense == "cip":
        t = offline_pbd_T(cfg, queries, "all", cfg.knockoff_pbd_T, p1=p1)
        kwargs = {"strong": STRONG_PPD["knockoff"], "pbd": "offline_top_T" if t else None, "pbd_T": t}
        if p1 is not None:
            kwargs["p1"] = p1
    return steal(cfg, "knockoff", defense, queries, label_type, setting=setting, defense_kwargs=kwargs,
                 fit={"arch": arch, "trigger_curve": not curve},
                 extra={"ablation": ablation, "curve_point": curve, "pool": pool}, sources=source,
                 verbose=verbose)


def offline_pbd_T(cfg: Profile, queries: Tensor, split: str = "half", budget: float | None = None,
                  p1: float | None = None) -> float:
    """The defender's offline-PBD budget for a transfer set, as an absolute count: T = ``budget``
    (default ``cfg.pbd_offline_T``) if >= 1, else round(fraction x the number of queries CIP
    routes ID, with E1 at the ``p1``-th percentile when given). (``defenses.CIP`` reads a fraction
    as a share of ALL queries in the call; the course counts ID-routed queries, so padding a
    transfer set with noise does not change T.)"""
    budget = cfg.pbd_offline_T if budget is None else budget
    if budget >= 1:
        return float(budget)
    n_id = int((cip_routes(cfg, queries, split, p1) == 0).sum())  # nothing is flipped or returned
    return float(round(budget * n_id))


def knockoff_curve(cfg: Profile, defense: str, label_type: str | None = None,
                   verbose: bool = False, pool: str = "photos") -> list[tuple[int, float]]:
    """``[(n, surrogate accuracy), ...]``: KnockoffNets with the first ``n`` queries of ``pool``,
    ``n`` in ``cfg.knockoff_curve`` (photos) or ``cfg.mixed_curve`` plus the whole mixed pool. The
    full-budget point is read from its record when that exists (the main run), so its record (and
    ``seconds``) are not overwritten by a cached re-run."""
    label_type = cfg.knockoff_curve_label_type if label_type is None else label_type
    full = pool_size(cfg, pool)
    ns = cfg.knockoff_curve if pool == "photos" else tuple(sorted({*cfg.mixed_curve, full}))
    setting = ("mixed_" if pool == "mixed" else "") + label_type
    points = []
    for n in ns:
        main = cfg.metrics_dir / f"{record_name('knockoff', defense, setting)}.json"
        if n == full and main.exists():
            points.append((n, read_json(main)["surrogate_acc"]))
        else:
            points.append((n, run_knockoff(cfg, defense, label_type, n, verbose, pool=pool)["surrogate_acc"]))
    return points


PBD_CHOICES = ("offline_top_T", "online")
"""How CIP's PBD runs in an attack: ``offline_top_T`` (the paper's evaluation: the T least reliable
ID-routed queries of the whole transfer set) or ``online`` (as served: R < R1 per query)."""

STRONG_PPD = {"knockoff": "shuffle_noise", "dfme": "shuffle_noise", "ida": "reverse_rank", "dqa": "reverse_rank"}
"""CIP's strong PPD against each attack, as in the authors' release (``knockoffnets/main.py``,
``IDA/main.py``, ``DQA/main.py``)."""


def served_cip_kwargs(attack: str, p1: float | None = None) -> dict:
    """The defense settings of CIP as an owner serves it against ``attack``: its strong PPD
    (:data:`STRONG_PPD`), online PBD and, given ``p1``, E1 at that percentile (an ablation)."""
    return {"strong": STRONG_PPD[attack], "pbd": "online", **({"p1": p1} if p1 is not None else {})}


def _check_pbd(defense: str, pbd: str) -> None:
    if pbd not in PBD_CHOICES:
        raise ValueError(f"pbd must be one of {PBD_CHOICES}, got {pbd!r}")
    if pbd == "online" and defense != "cip":
        raise ValueError(f"pbd='online' is CIP's served mode; defense {defense!r} has no PBD")


def _ida_defense_kwargs(cfg: Profile, defense: str, queries: Tensor, n_id: int,
                        p1: float | None = None, pbd: str = "offline_top_T") -> dict:
    if defense == "cip" and pbd == "online":
        return served_cip_kwargs("ida", p1)
    if defense == "cip":
        t = offline_pbd_T(cfg, queries, p1=p1)
        kwargs = {"strong": STRONG_PPD["ida"], "pbd": "offline_top_T" if t else None, "pbd_T": t}
        return kwargs if p1 is None else {**kwargs, "p1": p1}
    if defense == "dawn":
        return {"dawn_rate": dawn_rate_for(cfg, n_id)}
    return {}


def run_ida(cfg: Profile, defense: str, label_type: str | None = None, verbose: bool = True,
            p1: float | None = None, pbd_answer: str | None = None, pbd: str = "offline_top_T") -> dict:
    """In-distribution attack against the ``half`` victim: the attacker queries all of its own
    half of the ID data (``split("attacker")``) and trains on the answers (``label_type``,
    default ``cfg.ida_label_type``; ``cfg.ida_epochs``). CIP as in the authors' release: strong
    PPD ``reverse_rank``, offline top-T PBD with T = ``pbd_offline_T`` among ID-routed queries,
    E1 at the half victim's ``cfg.p1_half``; DAWN watermarks the same fraction. Setting: the
    label type. ``pbd="online"``: CIP as served (online PBD), setting ``<label>_online``, a main
    row beside the paper's offline one. Ablations (CIP only): ``p1`` (another E1 percentile, setting
    ``<label>_p1-<p1>``) and ``pbd_answer`` (setting ``<label>_<answer>``)."""
    _check_pbd(defense, pbd)
    label_type = cfg.ida_label_type if label_type is None else label_type
    x, _ = data.id_data(cfg).split("attacker")
    setting, ablation = label_type + ("_online" if pbd == "online" else ""), None
    if p1 is not None and p1 != cfg.p1_half:
        setting, ablation = f"{setting}_p1-{p1:g}", f"E1 at p1 = {p1:g}"
    else:
        p1 = None
    if pbd_answer is not None and pbd_answer != cfg.pbd_answer:
        cfg = dataclasses.replace(cfg, pbd_answer=pbd_answer)
        setting, ablation = f"{setting}_{pbd_answer}", f"PBD answer {pbd_answer}"
    return steal(cfg, "ida", defense, x, label_type, split="half", setting=setting,
                 defense_kwargs=_ida_defense_kwargs(cfg, defense, x, len(x), p1, pbd),
                 fit={"epochs": cfg.ida_epochs}, extra={"ablation": ablation}, verbose=verbose)


def dqa_queries(cfg: Profile, r: float) -> tuple[Tensor, Tensor]:
    """DQA's transfer set for ratio ``r``: the attacker's ID images plus ``round(n_id / r)``
    uniform-noise images, interleaved at random. Returns ``(queries, is_id)``."""
    x_id, _ = data.id_data(cfg).split("attacker")
    n_noise = int(round(len(x_id) / r))
    g = torch.Generator().manual_seed(cfg.seed + DQA_NOISE_SEED)
    noise = torch.rand(n_noise, *x_id.shape[1:], generator=g)
    queries = torch.cat([x_id, noise])
    order = torch.randperm(len(queries), generator=g)
    # keep the ID images in their original order inside the mix: the ID part the attacker trains on
    # is then bit-identical to IDA's transfer set, so identical answers reuse IDA's surrogate.
    id_slots = torch.sort(order[: len(x_id)]).values
    mixed, mixed_is_id = torch.empty_like(queries), torch.zeros(len(queries), dtype=torch.bool)
    mixed[id_slots], mixed_is_id[id_slots] = x_id, True
    noise_slots = torch.sort(order[len(x_id):]).values
    mixed[noise_slots] = noise
    return mixed, mixed_is_id


def run_dqa(cfg: Profile, defense: str, r: float, verbose: bool = True, pbd: str = "offline_top_T") -> dict:
    """Deceptive query attack: IDA's queries mixed with ``n_id / r`` uniform-noise queries in ONE
    transfer set; the attacker discards the noise answers and trains on the ID part exactly as IDA.
    DAWN's rate is IDA's (fraction of ALL queries), CIP's offline PBD counts ID-routed queries only.
    Labels: ``cfg.dqa_label_type`` (soft, as in the authors' ``DQA/main.py``). ``pbd="online"``:
    CIP as served, setting ``r<r>_online``."""
    _check_pbd(defense, pbd)
    queries, is_id = dqa_queries(cfg, r)
    kwargs = _ida_defense_kwargs(cfg, defense, queries, int(is_id.sum()), pbd=pbd)
    setting = f"r{r:g}" + ("_online" if pbd == "online" else "")
    return steal(cfg, "dqa", defense, queries, cfg.dqa_label_type, split="half", setting=setting,
                 keep=is_id, defense_kwargs=kwargs, fit={"epochs": cfg.ida_epochs},
                 extra={"dqa_ratio": r, "n_noise": int((~is_id).sum())}, verbose=verbose)


def defense_spec(cfg: Profile, defense: str, split: str = "all", strong: str = "shuffle_noise",
                 pbd: str | None = "online", dawn_rate: float | None = None, am_score: str | None = None) -> dict:
    """Every setting of a defended API, the sha256 of the wrapped model's weights included (and,
    for CIP, the thresholds computed from them; for AM, its misinformation model's sha256 and tau):
    the part of an interactive attack's checkpoint key that the defense contributes, so a retrained
    victim (or misinformation model) never reuses a stale DFME student."""
    if defense == "am":
        c = pipeline.get_am_calibration(cfg, split, am_score)
        return {"name": "am", "weights_sha256": c["weights_sha256"],
                "misinformation_sha256": c["misinformation_sha256"], "tau": c["tau"], "nu": c["nu"],
                "score": c["score"], "T": c["T"]}
    if defense == "oe":
        _, info = pipeline.get_oe_victim(cfg, split, verbose=False)
        return {"name": "oe", "weights_sha256": info["weights_sha256"]}
    if defense == "cip":
        t = pipeline.get_thresholds(cfg, split)
        spec = {"name": "cip", "weights_sha256": t["weights_sha256"],
                "E1": t["E1"], "E2": t["E2"], "R1": t["R1"], "T": t["T"], "strong": strong,
                "pbd": pbd, "snr_db": cfg.snr_db, "beta": cfg.rs_beta, "gamma": cfg.rs_gamma,
                "pbd_T": cfg.pbd_offline_T, "seed": cfg.seed, "keyed_on": form_spec()}
        if pbd is not None:
            spec["pbd_answer"] = cfg.pbd_answer
        return spec
    _, info = pipeline.get_victim(cfg, split, verbose=False)
    spec = {"name": defense, "weights_sha256": info["weights_sha256"]}
    if defense == "dp":
        spec.update(beta=cfg.rs_beta, gamma=cfg.rs_gamma)
    elif defense == "dawn":
        spec.update(rate=cfg.dawn_rate if dawn_rate is None else dawn_rate, key=pipeline.dawn_key(cfg),
                    keyed_on=form_spec())
    elif defense != "none":
        raise ValueError(f"unknown defense {defense!r}; choose one of {pipeline.DEFENSES}")
    return spec


def form_spec() -> dict:
    """The canonical form CIP's and DAWN's random choices are keyed on (:data:`digests.QUERY_FORM`),
    as JSON: part of every stored stage computed from their answers (a defense's spec, the
    trade-off grid, ``adaptive.json``), since the same settings with another form give other answers."""
    return {"levels": QUERY_FORM.levels, "pool": QUERY_FORM.pool}


def run_dfme(cfg: Profile, defense: str, verbose: bool = True,
             grad_queries: str | None = None) -> tuple[dict, dfme.Generator]:
    """DFME against the ``all`` victim behind ``defense``, ``cfg.dfme_queries`` queries in all
    (gradient-estimation queries included). CIP as in the authors' release: strong PPD
    ``shuffle_noise`` and NO PBD (their DFME poisoning has no ID branch; Table IV has no trigger
    column for DFME). ``grad_queries`` (default ``cfg.dfme_grad_queries``, see
    :data:`GRAD_QUERIES`): ``"victim"`` sends the zeroth-order gradient queries to the model behind
    the defense, as the authors' code does (an ablation, setting ``victim-grad``; for ``none`` the
    two settings are the same experiment and share one run). Load-or-run: the student, generator
    and trigger set are reused when the settings match. Writes the record and returns ``(record,
    generator)``; the record's ``curve`` is test accuracy vs queries."""
    start = time.perf_counter()
    grad_queries = cfg.dfme_grad_queries if grad_queries is None else grad_queries
    if grad_queries not in GRAD_QUERIES:
        raise ValueError(f"grad_queries must be one of {GRAD_QUERIES}, got {grad_queries!r}")
    kwargs = {"strong": STRONG_PPD["dfme"], "pbd": None} if defense == "cip" else {}
    d = data.id_data(cfg)
    spec = defense_spec(cfg, defense, **kwargs)
    bypass = grad_queries == "victim" and defense != "none"  # for none the victim IS the API
    if bypass:
        spec = {**spec, "grad_queries": "victim"}
    student_arch = cfg.dfme_arch
    student, gen, triggers, info = dfme.run_dfme_attack(
        cfg, lambda: make_defense(cfg, defense, **kwargs), spec,
        lambda: build_surrogate(student_arch, cfg.surrogate_width, d.shape, d.n_classes, cfg.seed),
        desc=f"dfme_{defense}", verbose=verbose, bypass_gradient_queries=bypass)
    if defense == "cip":
        triggers = None  # no PBD against DFME: there is no trigger set to score
    test_x, test_y = d.split("test")
    setting = "victim-grad" if grad_queries == "victim" else None
    name = record_name("dfme", defense, setting)
    best_acc, best_queries = best_epoch(info["curve"], at="queries")
    record = {
        "name": name, "attack": "dfme", "defense": defense, "setting": setting, "dataset": cfg.dataset,
        "victim": "all", "label_type": "logits", "queries": info["n_queries"], "grad_queries": grad_queries,
        "ablation": "gradient queries bypass the defense" if setting else None,
        "surrogate_arch": student_arch,
        "victim_acc": victim_accuracy(cfg), "defended_acc": defended_accuracy(cfg, name=defense, **kwargs),
        "oe_victim_acc": oe_victim_accuracy(cfg) if defense in OE_DEFENSES else None,
        "surrogate_best_acc": best_acc, "surrogate_best_queries": best_queries,
        "surrogate_acc": accuracy(student, test_x, test_y),
        "trigger_acc": trigger_accuracy(student, triggers) if triggers is not None else None,
        "n_triggers": len(triggers) if triggers is not None else None, "dqa_ratio": None,
        "seed": cfg.seed, "defense_kwargs": kwargs, "curve": info["curve"],
        "attack_seconds": info["seconds"], "surrogate_checkpoint": str(info["path"].relative_to(cfg.results_dir)),
        **(_am_fields(cfg, "all", make_defense(cfg, defense)) if defense == "am" else {}),
        **provenance(spec["weights_sha256"], None, triggers, student, spec.get("misinformation_sha256")),
        "generator_checkpoint": str(info["path"].with_suffix(".generator.pt").relative_to(cfg.results_dir)),
        "surrogate_loaded": info["loaded"],
    }
    record["seconds"] = round(time.perf_counter() - start, 2)
    write_record(cfg, record, triggers)
    return record, gen


# ----------------------------------------------------------------------------- threshold trade-off

TRADEOFF_FILE = "threshold_tradeoff.json"
TRADEOFF_VERSION = 3  # the rows' fields: a stored grid of another version is recomputed


def tradeoff_key(cfg: Profile) -> dict:
    """What a stored trade-off grid (:func:`threshold_tradeoff`) must match to be reused: the OE
    victim's weights, the mixed pool and the test digits (sha256), the grids, CIP's settings (the
    canonical form its answers are keyed on included) and the surrogate recipe."""
    queries, _ = mixed_queries(cfg)
    _, oe_info = pipeline.get_oe_victim(cfg, "all", verbose=False)
    test_x, _ = data.id_data(cfg).split("test")
    return {"version": TRADEOFF_VERSION, "weights_sha256": oe_info["weights_sha256"],
            "queries_sha256": tensor_sha256(queries),
            "test_sha256": tensor_sha256(test_x), "p1_grid": list(cfg.tradeoff_p1),
            "p2_grid": list(cfg.tradeoff_p2), "p1": cfg.p1, "p2": cfg.p2, "T": cfg.temperature,
            "label_type": cfg.knockoff_curve_label_type, "knockoff_pbd_T": cfg.knockoff_pbd_T,
            "cip": {"snr_db": cfg.snr_db, "beta": cfg.rs_beta, "gamma": cfg.rs_gamma,
                    "pbd_answer": cfg.pbd_answer, "keyed_on": form_spec()},
            "surrogate": surrogate_recipe(cfg, cfg.surrogate_epochs)}


def threshold_tradeoff(cfg: Profile, verbose: bool = True) -> dict:
    """What moving a threshold costs and buys (notebook 03), load-or-compute in
    ``<results_dir>/threshold_tradeoff.json``.

    ``p1`` rows, one per ``cfg.tradeoff_p1`` (E1 at that percentile, E2 at ``cfg.p2``): the
    mixed-pool KnockoffNets attack against CIP with ``cfg.knockoff_curve_label_type`` labels
    (:func:`run_knockoff` with ``pool="mixed"``, ``p1``; the profile's own p1 is the main run's
    record), giving ``fidelity`` (the top-1 accuracy of CIP's answers on the ID test digits, in
    [0, 1], without PBD, which flips a handful of answers per call: one definition for both grids), ``poisoned_share`` (share of the mixed transfer set answered with weak or strong PPD or
    flipped by PBD), ``strong_share`` (the part answered with strong PPD), ``surrogate_acc``, ``trigger_acc`` (``None`` without triggers), ``T`` and
    ``routes`` (counts), plus ``near_shares`` (branch shares of the ``near`` pool).
    ``p2`` rows, one per ``cfg.tradeoff_p2`` (E1 at ``cfg.p1``): ``fidelity``,
    ``poisoned_share`` and ``strong_share`` of the mixed pool (E2 only moves queries between weak
    and strong PPD, so the poisoned share stays) and ``near_shares``; no surrogate is trained.

    The file records the sha256 of the OE victim's weights, of the mixed pool and of the test
    digits, the grids, CIP's poisoning settings (the canonical form its answers are keyed on
    included) and the surrogate recipe; it is reused only when
    all match and every p1 row's surrogate is on disk with the weights its record names (else
    recomputed: a fresh clone has the JSON but no checkpoints).
    Returns ``{"key": ..., "p1": [rows], "p2": [rows], "label_type": ...}``. Raises ``ValueError``
    when the data has no ``near`` pool (:func:`data.has_near_pool`: 28 x 28 grayscale only)."""
    from ..method.scores import ROUTE_NAMES, route_fractions

    path = cfg.results_dir / TRADEOFF_FILE
    queries, _ = mixed_queries(cfg)
    oe_model, _ = pipeline.get_oe_victim(cfg, "all", verbose=False)
    label_type = cfg.knockoff_curve_label_type
    key = tradeoff_key(cfg)
    if path.exists():
        stored = read_json(path)
        missing = _tradeoff_surrogates_missing(cfg, stored) if stored.get("key") == key else []
        if stored.get("key") == key and not missing:
            return stored
        if verbose:
            print(f"{TRADEOFF_FILE}: recomputing, its surrogates are not on disk" if missing else
                  f"{TRADEOFF_FILE}: recomputing, it was computed for other weights, data or settings")
    near_energy = pipeline.energies(oe_model, data.query_pool(cfg, "near"), cfg.temperature)
    p1_rows = []
    for p1 in cfg.tradeoff_p1:
        own = p1 == cfg.p1
        rec = run_knockoff(cfg, "cip", label_type, pool="mixed", p1=None if own else p1, verbose=verbose)
        t = pipeline.get_thresholds(cfg, "all", verbose=False, p1=p1)
        routes = rec["routes"]
        poisoned = routes["low-ES OOD"] + routes["high-ES OOD"] + routes.get("PBD flipped", 0)
        fidelity = defended_accuracy(cfg, "all", name="cip", pbd=None, p1=p1)
        p1_rows.append({"p1": p1, "p2": cfg.p2, "E1": t["E1"], "E2": t["E2"], "fidelity": fidelity,
                        "poisoned_share": poisoned / rec["queries"],
                        "strong_share": routes["high-ES OOD"] / rec["queries"], "surrogate_acc": rec["surrogate_acc"],
                        "trigger_acc": rec["trigger_acc"], "T": rec["n_triggers"], "routes": routes,
                        "near_shares": route_fractions(near_energy, t["E1"], t["E2"]),
                        "record": rec["name"]})
    p2_rows = []
    for p2 in cfg.tradeoff_p2:
        t = pipeline.get_thresholds(cfg, "all", verbose=False, p2=p2)
        fidelity = defended_accuracy(cfg, "all", name="cip", pbd=None, p2=p2)
        routes = cip_routes(cfg, queries, "all", p2=p2)
        p2_rows.append({"p1": cfg.p1, "p2": p2, "E1": t["E1"], "E2": t["E2"], "fidelity": fidelity,
                        "poisoned_share": float((routes > 0).float().mean()),
                        "strong_share": float((routes == 2).float().mean()),
                        "routes": {k: int(v) for k, v in zip(ROUTE_NAMES, torch.bincount(routes, minlength=3).tolist())},
                        "near_shares": route_fractions(near_energy, t["E1"], t["E2"])})
    out = {"key": key, "label_type": label_type, "p1": p1_rows, "p2": p2_rows}
    write_json(path, out)
    return out


def _tradeoff_surrogates_missing(cfg: Profile, stored: dict) -> list[str]:
    """The records of a stored trade-off grid's p1 rows whose surrogate cannot be loaded with the
    weights the record names (:func:`load_surrogate`): the grid is an expensive stage whose
    artifacts are the surrogates too, and notebook 11 verifies every record's surrogate."""
    missing = []
    for row in stored.get("p1", []):
        try:
            load_surrogate(cfg, row["record"])
        except (OSError, KeyError, ValueError, CheckpointError):
            missing.append(str(row.get("record")))
    return missing


def nearest_tradeoff(tradeoff: dict, p1: float, p2: float) -> dict:
    """The grid rows of :func:`threshold_tradeoff` nearest to a slider setting: ``{"p1": row,
    "p2": row}`` (nearest by absolute percentile difference; ties to the lower value)."""
    pick = lambda rows, key, v: min(rows, key=lambda r: (abs(r[key] - v), r[key]))  # noqa: E731
    return {"p1": pick(tradeoff["p1"], "p1", p1), "p2": pick(tradeoff["p2"], "p2", p2)}
