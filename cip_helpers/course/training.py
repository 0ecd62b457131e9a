"""Training loops: classifiers (hard or soft targets), inference helpers and OE fine-tuning."""
from __future__ import annotations

import inspect
import math
import numbers
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method.models import predict_logits
from ..method.scores import energy_score, oe_energy_loss
from .data import make_loader
from .progress import progress as progress_bar


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy (a fraction) of ``model`` on ``(x, y)``."""
    return float((predict_logits(model, x).argmax(1) == y).float().mean())


def random_affine(x: Tensor, max_shift: int, generator: torch.Generator,
                  max_degrees: float = 10.0, max_scale: float = 0.1) -> Tensor:
    """Per-image random rotation (+-max_degrees), scaling (+-max_scale) and translation
    (+-max_shift pixels), zero fill; ``max_shift=0`` returns ``x`` unchanged."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    u = torch.rand(4, n, generator=generator) * 2 - 1
    angle, scale = u[0] * max_degrees * torch.pi / 180, 1 + u[1] * max_scale
    tx, ty = u[2] * 2 * max_shift / w, u[3] * 2 * max_shift / h
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against integer labels (hard) or probability rows (soft)."""
    if target.ndim == 1:
        return F.cross_entropy(logits, target)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


# ------------------------------------------------------------------ optimiser and lr recipes

OPTIMIZERS = ("auto", "adam", "sgd")
"""``train_classifier(optimizer=...)``: ``auto`` (the course's rule: SGD + Nesterov for lr >=
:data:`SGD_MIN_LR`, else Adam), ``adam`` or ``sgd`` (momentum, Nesterov as passed)."""
SGD_MIN_LR = 0.05
"""``optimizer="auto"`` picks SGD from this learning rate on (the ResNet/WRN recipe), Adam below."""
EPOCH_SCHEDULES = ("cosine", "step", "constant")
"""``train_classifier(schedule=...)``, stepped once per epoch: ``cosine`` (CosineAnnealingLR over
the epochs, to 0), ``step`` (x ``gamma`` after each epoch of ``milestones``: MultiStepLR) or
``constant``."""
OE_OPTIMIZERS = ("adam", "sgd")
"""``finetune_oe(optimizer=...)``."""
OE_SCHEDULES = ("constant", "cosine_step")
"""``finetune_oe(schedule=...)``: ``constant`` or ``cosine_step`` (cosine per optimiser step from
``lr`` to ``lr_min``)."""
OUTLIER_AUGMENTS = ("none", "crop_flip")
"""``finetune_oe(outlier_augment=...)``: ``none`` or ``crop_flip`` (:func:`random_crop_flip`)."""
OUTLIER_CROP_PAD = 4
"""Padding (pixels) of the outliers' random crop: ``RandomCrop(size, padding=4)`` in the outlier
transform of ``ood_detection/detection_train.py`` (GitHub Hatins/CIP_master)."""


def _require(name: str, value: Any, rule: str, test: Callable[[float], bool]) -> None:
    """Raise ``ValueError("<name>=<value>: must be <rule>")`` unless ``value`` is a finite real
    number (not a bool) that passes ``test``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and test(float(value))):
        raise ValueError(f"{name}={value!r}: must be {rule}")


def resolve_optimizer(name: str, lr: float) -> str:
    """The optimiser ``make_optimizer`` builds for ``name`` at ``lr``: ``"auto"`` resolves to
    ``"sgd"`` for ``lr >= SGD_MIN_LR``, else ``"adam"``; ``"adam"`` / ``"sgd"`` stay."""
    return ("sgd" if lr >= SGD_MIN_LR else "adam") if name == "auto" else name


def make_optimizer(params: Iterable[Any], name: str, lr: float, *, momentum: float = 0.9,
                   nesterov: bool = True, weight_decay: float = 0.0, fused: bool = False) -> torch.optim.Optimizer:
    """The optimiser of a training recipe over ``params`` (``model.parameters()``).

    ``name``: one of :data:`OPTIMIZERS`. ``"auto"`` is the course's rule: ``torch.optim.SGD``
    (``momentum``, ``nesterov``) for ``lr >= SGD_MIN_LR`` (0.05), ``torch.optim.Adam`` below.
    ``weight_decay`` (L2, >= 0) reaches either optimiser; ``momentum`` and ``nesterov`` apply to
    SGD only. ``fused=True`` asks Adam for its fused kernel (``torch.optim.Adam(..., fused=True)``:
    the same update in one kernel per step, ~15 % faster surrogate training on the 2-core course
    machine; other rounding, so other bits than the default loop). The SGD recipe of the authors' release (``knockoffnets/main.py``, ``IDA/main.py``,
    ``DQA/main.py``, ``ood_detection/detection_train.py`` of GitHub Hatins/CIP_master) is
    ``name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4``.

    Raises ``ValueError`` for an unknown name, a non-finite or non-positive ``lr``, a momentum
    outside [0, 1), a negative weight decay, or Nesterov SGD without momentum."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}: must be one of {list(OPTIMIZERS)}")
    _require("lr", lr, "a finite number > 0", lambda v: v > 0)
    _require("momentum", momentum, "in [0, 1)", lambda v: 0 <= v < 1)
    _require("weight_decay", weight_decay, "a finite number >= 0 (0 = no weight decay)", lambda v: v >= 0)
    name = resolve_optimizer(name, lr)
    if name == "sgd":
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0: pass momentum=0.9 (the authors' value) "
                             "or nesterov=False")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def make_epoch_scheduler(opt: torch.optim.Optimizer, schedule: str, epochs: int, *,
                         milestones: tuple[int, ...] = (30, 60, 90), gamma: float = 0.2
                         ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-epoch learning-rate schedule of :func:`train_classifier` (call ``.step()`` once
    after every epoch), or ``None`` for ``"constant"``.

    * ``"cosine"``: ``CosineAnnealingLR(T_max=max(epochs, 1))`` (the course's default).
    * ``"step"``: ``MultiStepLR``: the lr is multiplied by ``gamma`` once ``milestones[i]`` epochs
      are done, e.g. lr 0.1, milestones (30, 60, 90), gamma 0.2: 0.1 for epochs 1-30, 0.02 for
      31-60, 0.004 for 61-90, 0.0008 for 91-100 (the surrogate recipe of ``knockoffnets/main.py``,
      ``IDA/main.py`` and ``DQA/main.py`` of GitHub Hatins/CIP_master).
    * ``"constant"``: no schedule.

    Raises ``ValueError`` for an unknown schedule, and for ``"step"`` with milestones that are not
    strictly increasing whole epochs >= 1, none of them below ``epochs`` (the lr would never
    change), or ``gamma`` outside (0, 1]."""
    if schedule not in EPOCH_SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: must be one of {list(EPOCH_SCHEDULES)}")
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if schedule == "constant":
        return None
    marks = tuple(milestones)
    if (not marks or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in marks)
            or any(b <= a for a, b in zip(marks, marks[1:]))):
        raise ValueError(f"milestones={milestones!r}: must be a non-empty, strictly increasing tuple of "
                         "whole epochs >= 1, e.g. (30, 60, 90)")
    if marks[0] >= epochs:
        raise ValueError(f"schedule='step' with milestones={marks} never changes the lr in {epochs} epochs: "
                         f"pass milestones below {epochs} or schedule='constant'")
    _require("gamma", gamma, "in (0, 1] (the factor applied at each milestone)", lambda v: 0 < v <= 1)
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(marks), gamma=gamma)


def make_cosine_step_scheduler(opt: torch.optim.Optimizer, total_steps: int, lr_min: float
                               ) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay per optimiser step (call ``.step()`` after every ``opt.step()``): the lr of
    step k (0-based) is ``lr_min + (lr - lr_min) * (1 + cos(pi * k / total_steps)) / 2``, so the
    first step uses ``lr`` and after the last of ``total_steps`` steps the lr is ``lr_min``
    (``lr`` is each param group's lr when the scheduler is built). The OE recipe of
    ``ood_detection/detection_train.py`` (GitHub Hatins/CIP_master): lr 1e-3 to 1e-6 over
    ``epochs x len(ID loader)`` steps.

    Raises ``ValueError`` for ``total_steps`` < 1 or ``lr_min`` outside [0, lr]."""
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r}: must be a whole number >= 1 (epochs x steps per epoch)")
    base = [float(group["lr"]) for group in opt.param_groups]
    for lr in base:
        _require("lr", lr, "> 0 in every param group (the cosine starts there)", lambda v: v > 0)
        _require("lr_min", lr_min, f"in [0, lr] = [0, {lr}] (the floor the cosine decays to)",
                 lambda v, lr=lr: 0 <= v <= lr)

    def factor(lr: float) -> Any:
        def at(step: int) -> float:
            t = min(step, total_steps) / total_steps
            return (lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * t))) / lr
        return at

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=[factor(lr) for lr in base])


def random_crop_flip(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Per image: zero-pad by ``pad`` pixels, take a random crop of the original size (offsets
    uniform in 0..2*pad), then flip horizontally with probability 1/2: torchvision's
    ``RandomCrop(size, padding=pad)`` + ``RandomHorizontalFlip()``, the outlier transform of
    ``ood_detection/detection_train.py`` (GitHub Hatins/CIP_master), on a batch at once.

    ``x``: float (N, C, H, W); returns a new tensor of the same shape and dtype (values are pixels
    of ``x`` or 0). Draws 3 x N numbers from ``generator``. Raises ``ValueError`` for a tensor that
    is not 4-D or a negative ``pad``."""
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"random_crop_flip expects a batch (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise ValueError(f"pad={pad!r}: must be a whole number of pixels >= 0")
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    cols_in = torch.arange(w)
    rows = dy[:, None] + torch.arange(h)  # (N, H) rows of the padded image
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols_in, cols_in)  # (N, W), reversed if flipped
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def train_classifier(model: nn.Module, x: Tensor, target: Tensor, *, epochs: int, lr: float,
                     batch_size: int = 64, seed: int = 0, weight_decay: float = 0.0,
                     eval_data: tuple[Tensor, Tensor] | None = None, desc: str = "train",
                     augment_shift: int = 0, progress: bool = True,
                     eval_sets: dict[str, tuple[Tensor, Tensor]] | None = None,
                     optimizer: str = "auto", momentum: float = 0.9, nesterov: bool = True,
                     schedule: str = "cosine", milestones: tuple[int, ...] = (30, 60, 90),
                     gamma: float = 0.2, fused: bool = False) -> list[dict]:
    """Train on hard labels (N,) or soft labels (N, K). Returns one dict per epoch (loss, train
    accuracy against argmax targets, ``test_acc`` if ``eval_data`` is given, ``<name>_acc`` for
    every ``(x, labels)`` of ``eval_sets``, e.g. a trigger set; evaluation in eval mode changes no
    weight and draws no random number, so it does not change the trained model). ``augment_shift``
    > 0 randomly shifts, rotates and scales every training image (:func:`random_affine`): less
    overfitting, so ID test energies stay close to the ID training energies thresholds come from.

    The recipe: ``optimizer`` (:func:`make_optimizer`; default ``"auto"``: SGD + Nesterov,
    momentum 0.9 for lr >= 0.05, the ResNet/WRN recipe, else Adam), ``weight_decay``, and the
    per-epoch lr ``schedule`` (:func:`make_epoch_scheduler`; default ``"cosine"`` over the epochs;
    ``"step"`` multiplies the lr by ``gamma`` after each epoch of ``milestones``; ``"constant"``).
    The defaults are the course's quick recipe; ``fused`` selects Adam's fused kernel
    (:func:`make_optimizer`; the attack surrogates use it). The authors' surrogate recipe
    (``knockoffnets/main.py``, ``IDA/main.py``, ``DQA/main.py`` of GitHub Hatins/CIP_master) is
    ``lr=0.1, optimizer="sgd", weight_decay=5e-4, schedule="step", milestones=(30, 60, 90),
    gamma=0.2`` over 100 epochs (:func:`surrogate_train_kwargs` reads it from a profile).

    Raises ``ValueError`` for an empty dataset and for an invalid recipe (see
    :func:`make_optimizer`, :func:`make_epoch_scheduler`)."""
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    set_seed(seed)
    opt = make_optimizer(model.parameters(), optimizer, lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, fused=fused)
    sched = make_epoch_scheduler(opt, schedule, epochs, milestones=milestones, gamma=gamma)
    loader = make_loader(x, target, batch_size, shuffle=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    history = []
    bar = progress_bar(range(epochs), desc=desc, disable=not progress)
    for epoch in bar:
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for xb, tb in loader:
            logits = model(random_affine(xb, augment_shift, g))
            loss = soft_cross_entropy(logits, tb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            labels = tb if tb.ndim == 1 else tb.argmax(1)
            total += len(xb)
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += float(loss.detach()) * len(xb)
        if sched is not None:
            sched.step()
        row = {"epoch": epoch + 1, "loss": loss_sum / total, "train_acc": correct / total}
        if eval_data is not None:
            row["test_acc"] = accuracy(model, *eval_data)
        for name, (ex, ey) in (eval_sets or {}).items():
            row[f"{name}_acc"] = accuracy(model, ex, ey) if len(ex) else None
        history.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch" and v is not None})
    model.eval()
    return history


def finetune_oe(model: nn.Module, x_in: Tensor, y_in: Tensor, x_out: Tensor, *, epochs: int,
                lr: float, lam: float, m_in: float, m_out: float, batch_size: int = 64, seed: int = 0,
                eval_data: tuple[Tensor, Tensor] | None = None, desc: str = "OE fine-tuning",
                augment_shift: int = 0, progress: bool = True, optimizer: str = "adam",
                momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                schedule: str = "constant", lr_min: float = 1e-6, out_batch_size: int = 0,
                outlier_augment: str = "none") -> list[dict]:
    """Outlier-exposure fine-tuning with the energy-margin loss. Every step concatenates an ID batch
    (``batch_size`` images of ``x_in``, (N, C, H, W) floats in [0, 1], with labels ``y_in`` (N,))
    and an outlier batch from ``x_out`` into one forward pass (BatchNorm sees both), then splits the
    logits. Outliers are drawn in a fresh random order every epoch and cycled when the pool is
    shorter than an epoch's steps. Returns one dict per epoch (loss, mean ID and outlier energies
    ``e_in`` / ``e_out``, ``test_acc`` if ``eval_data`` is given).

    The recipe (the defaults are the course's quick recipe, bit for bit):

    * ``optimizer``: ``"adam"`` or ``"sgd"`` (``momentum``, ``nesterov``), with ``weight_decay``
      (:func:`make_optimizer`).
    * ``schedule``: ``"constant"`` or ``"cosine_step"``: cosine per optimiser step from ``lr`` to
      ``lr_min`` over ``epochs x ceil(len(x_in) / batch_size)`` steps
      (:func:`make_cosine_step_scheduler`).
    * ``out_batch_size``: outliers per step; 0 = as many as the step's ID images.
    * ``outlier_augment``: ``"none"`` or ``"crop_flip"`` (:func:`random_crop_flip`, padding
      :data:`OUTLIER_CROP_PAD`) applied to every outlier batch. ID images get ``augment_shift``.

    The authors' recipe (``ood_detection/detection_train.py`` of GitHub Hatins/CIP_master): 10
    epochs, lr 1e-3, ``optimizer="sgd"`` (momentum 0.9, Nesterov), ``weight_decay=5e-4``,
    ``schedule="cosine_step"`` to ``lr_min=1e-6``, 64 ID + 128 outlier images per step
    (``batch_size=64, out_batch_size=128``), ``outlier_augment="crop_flip"``, lambda 0.1, m_in -25,
    m_out -7 (:func:`oe_train_kwargs` reads the recipe from a profile).

    Raises ``ValueError`` for an empty outlier pool or ID set and for an invalid recipe."""
    if len(x_out) == 0:
        raise ValueError("OE fine-tuning needs a non-empty outlier pool")
    if len(x_in) == 0:
        raise ValueError("OE fine-tuning needs a non-empty ID training set")
    if optimizer not in OE_OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: must be one of {list(OE_OPTIMIZERS)}")
    if schedule not in OE_SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: must be one of {list(OE_SCHEDULES)}")
    if outlier_augment not in OUTLIER_AUGMENTS:
        raise ValueError(f"outlier_augment={outlier_augment!r}: must be one of {list(OUTLIER_AUGMENTS)}")
    if not isinstance(out_batch_size, int) or isinstance(out_batch_size, bool) or out_batch_size < 0:
        raise ValueError(f"out_batch_size={out_batch_size!r}: must be a whole number >= 0 "
                         "(0 = as many outliers as ID images per step)")
    set_seed(seed)
    opt = make_optimizer(model.parameters(), optimizer, lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay)
    in_loader = make_loader(x_in, y_in, batch_size, shuffle=True, seed=seed)
    sched = (make_cosine_step_scheduler(opt, max(epochs, 1) * len(in_loader), lr_min)
             if schedule == "cosine_step" else None)
    stride = out_batch_size or batch_size  # outliers consumed per step
    g = torch.Generator().manual_seed(seed + 1)
    history = []
    bar = progress_bar(range(epochs), desc=desc, disable=not progress)
    for epoch in bar:
        model.train()
        out_order = torch.randperm(len(x_out), generator=g)
        stats = {"loss": 0.0, "e_in": 0.0, "e_out": 0.0}
        steps = 0
        for step, (xb, yb) in enumerate(in_loader):
            pick = out_order[(torch.arange(out_batch_size or len(xb)) + step * stride) % len(x_out)]
            x_id = random_affine(xb, augment_shift, g)
            x_ood = x_out[pick]
            if outlier_augment == "crop_flip":
                x_ood = random_crop_flip(x_ood, OUTLIER_CROP_PAD, g)
            logits = model(torch.cat([x_id, x_ood]))
            logits_in, logits_out = logits[: len(xb)], logits[len(xb):]
            loss = oe_energy_loss(logits_in, yb, logits_out, m_in, m_out, lam)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            steps += 1
            stats["loss"] += float(loss.detach())
            stats["e_in"] += float(energy_score(logits_in.detach()).mean())
            stats["e_out"] += float(energy_score(logits_out.detach()).mean())
        row = {"epoch": epoch + 1, **{k: v / steps for k, v in stats.items()}}
        if eval_data is not None:
            row["test_acc"] = accuracy(model, *eval_data)
        history.append(row)
        bar.set_postfix({k: round(v, 3) for k, v in row.items() if k != "epoch"})
    model.eval()
    return history


# ------------------------------------------------------------------ recipes from a profile

_SURROGATE_FIELDS = {"optimizer": "surrogate_optimizer", "weight_decay": "surrogate_weight_decay",
                     "schedule": "surrogate_schedule", "milestones": "surrogate_milestones",
                     "gamma": "surrogate_step_gamma"}
"""train_classifier keyword -> profile field of the surrogate recipe."""
_OE_FIELDS = {"optimizer": "oe_optimizer", "weight_decay": "oe_weight_decay", "schedule": "oe_schedule",
              "lr_min": "oe_lr_min", "out_batch_size": "oe_out_batch", "outlier_augment": "oe_outlier_augment"}
"""finetune_oe keyword -> profile field of the OE recipe."""
_SURROGATE_SPEC_KEYS = {"optimizer": "optimizer", "weight_decay": "weight_decay", "schedule": "lr_schedule"}
"""Spec key of each surrogate recipe keyword recorded when it differs from the default."""
_OE_SPEC_KEYS = {"optimizer": "optimizer", "weight_decay": "weight_decay", "schedule": "lr_schedule",
                 "out_batch_size": "out_batch", "outlier_augment": "outlier_augment"}
"""Spec key of each OE recipe keyword recorded when it differs from the default."""


def _read_fields(cfg: Any, fields: dict[str, str], what: str) -> dict[str, Any]:
    missing = [f for f in fields.values() if not hasattr(cfg, f)]
    if missing:
        raise ValueError(f"{what} needs a profile with the field(s) {missing} (cip_helpers.course.config.Profile "
                         f"has them); got a {type(cfg).__name__} without them")
    return {kw: getattr(cfg, f) for kw, f in fields.items()}


def _non_default(func: Callable[..., Any], kwargs: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """The entries of ``kwargs`` whose value differs from ``func``'s default, renamed by ``keys``,
    tuples as lists (JSON)."""
    defaults = {k: v.default for k, v in inspect.signature(func).parameters.items()}
    out = {}
    for kw, value in kwargs.items():
        default = defaults[kw]
        same = tuple(value) == tuple(default) if isinstance(default, tuple) else value == default
        if not same:
            out[keys[kw]] = list(value) if isinstance(value, tuple) else value
    return out


def surrogate_train_kwargs(cfg: Any) -> dict[str, Any]:
    """The recipe keywords of :func:`train_classifier` for a surrogate of profile ``cfg`` (a
    ``config.Profile`` or anything with its ``surrogate_*`` fields): ``optimizer``, ``weight_decay``,
    ``schedule``, ``milestones``, ``gamma``. Pass lr, epochs and batch size as before::

        train_classifier(model, x, y, epochs=..., lr=cfg.surrogate_lr, batch_size=cfg.surrogate_batch,
                         seed=cfg.seed, **surrogate_train_kwargs(cfg))

    Quick and smoke give the defaults (today's training, bit for bit); full gives the authors'
    SGD + Nesterov, weight decay 5e-4, x0.2 at epochs 30/60/90. Raises ``ValueError`` when ``cfg``
    lacks a field."""
    return _read_fields(cfg, _SURROGATE_FIELDS, "surrogate_train_kwargs")


def surrogate_recipe_spec(cfg: Any) -> dict[str, Any]:
    """The entries a surrogate checkpoint's spec must add for the recipe of
    :func:`surrogate_train_kwargs`: ``optimizer``, ``weight_decay``, ``lr_schedule`` where they
    differ from :func:`train_classifier`'s defaults, and with ``schedule="step"`` always its
    ``lr_milestones`` (a list) and ``lr_gamma``. Quick and smoke give ``{}``, so their existing
    checkpoints keep their spec hash; full gives ``{"optimizer": "sgd", "weight_decay": 0.0005,
    "lr_schedule": "step", "lr_milestones": [30, 60, 90], "lr_gamma": 0.2}``. Raises
    ``ValueError`` when ``cfg`` lacks a field."""
    kwargs = surrogate_train_kwargs(cfg)
    milestones, gamma = kwargs.pop("milestones"), kwargs.pop("gamma")
    spec = _non_default(train_classifier, kwargs, _SURROGATE_SPEC_KEYS)
    if kwargs["schedule"] == "step":
        spec.update(lr_milestones=list(milestones), lr_gamma=gamma)
    return spec


def oe_train_kwargs(cfg: Any) -> dict[str, Any]:
    """The recipe keywords of :func:`finetune_oe` for profile ``cfg`` (``optimizer``,
    ``weight_decay``, ``schedule``, ``lr_min``, ``out_batch_size``, ``outlier_augment``); the ID
    batch is ``cfg.oe_in_batch or cfg.batch_size`` (:func:`oe_in_batch`). Quick and smoke give the
    defaults. Raises ``ValueError`` when ``cfg`` lacks a field."""
    return _read_fields(cfg, _OE_FIELDS, "oe_train_kwargs")


def oe_in_batch(cfg: Any) -> int:
    """ID images per OE step for profile ``cfg``: ``cfg.oe_in_batch``, or ``cfg.batch_size`` when
    it is 0 (quick, smoke). Raises ``ValueError`` when ``cfg`` lacks a field."""
    fields = _read_fields(cfg, {"in": "oe_in_batch", "victim": "batch_size"}, "oe_in_batch")
    return int(fields["in"] or fields["victim"])


def oe_recipe_spec(cfg: Any) -> dict[str, Any]:
    """The entries the OE checkpoint's spec must add for the recipe of :func:`oe_train_kwargs`
    and :func:`oe_in_batch`: ``optimizer``, ``weight_decay``, ``lr_schedule``, ``out_batch``,
    ``outlier_augment`` where they differ from :func:`finetune_oe`'s defaults, ``lr_min`` always
    with ``schedule="cosine_step"``, and ``in_batch`` when ``cfg.oe_in_batch`` is set. Quick and
    smoke give ``{}``, so their OE checkpoints keep their spec hash. Raises ``ValueError`` when
    ``cfg`` lacks a field."""
    kwargs = oe_train_kwargs(cfg)
    lr_min = kwargs.pop("lr_min")
    spec = _non_default(finetune_oe, kwargs, _OE_SPEC_KEYS)
    if kwargs["schedule"] == "cosine_step":
        spec["lr_min"] = lr_min
    if _read_fields(cfg, {"in": "oe_in_batch"}, "oe_recipe_spec")["in"]:
        spec["in_batch"] = oe_in_batch(cfg)
    return spec
