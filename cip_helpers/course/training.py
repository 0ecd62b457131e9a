"""Training loops: classifiers (hard or soft targets), inference helpers and OE fine-tuning."""
from __future__ import annotations

import dataclasses
import math
import numbers
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method.misinformation import misinformation_loss
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
"""``OERecipe(optimizer=...)``."""
OE_SCHEDULES = ("constant", "cosine_step")
"""``OERecipe(schedule=...)``: ``constant`` or ``cosine_step`` (cosine per optimiser step from
``lr`` to ``lr_min``)."""
OUTLIER_AUGMENTS = ("none", "crop_flip")
"""``OERecipe(outlier_augment=...)``: ``none`` or ``crop_flip`` (:func:`random_crop_flip`)."""
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


@dataclass(frozen=True)
class TrainRecipe:
    """How :func:`train_classifier` trains: ``epochs``, ``lr``, ``batch_size``; the optimiser
    (:func:`make_optimizer`: ``optimizer`` one of :data:`OPTIMIZERS`, default ``"auto"`` = SGD +
    Nesterov, momentum 0.9 from lr 0.05 on, else Adam; ``momentum``, ``nesterov``,
    ``weight_decay``; ``fused`` asks Adam for its fused kernel); the per-epoch lr ``schedule``
    (:func:`make_epoch_scheduler`: ``"cosine"``, ``"step"`` with ``milestones`` and ``gamma``, or
    ``"constant"``); ``augment_shift`` > 0 randomly shifts, rotates and scales every training image
    (:func:`random_affine`). The defaults are the course's quick recipe. The authors' surrogate
    recipe (``knockoffnets/main.py``, ``IDA/main.py``, ``DQA/main.py`` of GitHub
    Hatins/CIP_master): lr 0.1, SGD, weight decay 5e-4, ``"step"`` x0.2 at epochs 30, 60, 90 of
    100 (:meth:`surrogate` reads it from the full profile). An invalid recipe raises
    ``ValueError`` when training starts."""

    epochs: int
    lr: float
    batch_size: int = 64
    optimizer: str = "auto"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    schedule: str = "cosine"
    milestones: tuple[int, ...] = (30, 60, 90)
    gamma: float = 0.2
    augment_shift: int = 0
    fused: bool = False

    @classmethod
    def victim(cls, cfg: Any) -> TrainRecipe:
        """The victims' recipe of profile ``cfg`` (``victim_epochs``, ``lr``, ``batch_size``,
        ``weight_decay``, ``augment_shift``; the optimiser and schedule are the defaults)."""
        return cls(epochs=cfg.victim_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                   weight_decay=cfg.weight_decay, augment_shift=cfg.augment_shift)

    @classmethod
    def misinformation(cls, cfg: Any) -> TrainRecipe:
        """The recipe of AM's misinformation model (:func:`train_misinformation`): the victims'
        (:meth:`victim`) for ``cfg.am_epochs`` epochs, as the release trains it beside the
        defender with the defender's optimiser settings."""
        return dataclasses.replace(cls.victim(cfg), epochs=cfg.am_epochs)

    @classmethod
    def surrogate(cls, cfg: Any, epochs: int | None = None) -> TrainRecipe:
        """The attack surrogates' recipe of profile ``cfg`` (its ``surrogate_*`` fields; ``epochs``
        overrides ``surrogate_epochs``), with Adam's fused kernel. Raises ``ValueError`` when
        ``cfg`` lacks a field."""
        f = _read_fields(cfg, _SURROGATE_FIELDS, "TrainRecipe.surrogate")
        return cls(**{**f, "epochs": f["epochs"] if epochs is None else epochs}, fused=True)

    def make_optimizer(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """:func:`make_optimizer` with this recipe's optimiser settings."""
        return make_optimizer(params, self.optimizer, self.lr, momentum=self.momentum, nesterov=self.nesterov,
                              weight_decay=self.weight_decay, fused=self.fused)

    def make_scheduler(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        """:func:`make_epoch_scheduler` with this recipe's schedule (``None`` for constant)."""
        return make_epoch_scheduler(opt, self.schedule, self.epochs, milestones=self.milestones, gamma=self.gamma)


def train_classifier(model: nn.Module, x: Tensor, target: Tensor, recipe: TrainRecipe, seed: int = 0,
                     eval_data: tuple[Tensor, Tensor] | None = None,
                     eval_sets: dict[str, tuple[Tensor, Tensor]] | None = None,
                     desc: str = "train", progress: bool = True) -> list[dict]:
    """Train ``model`` on images ``x`` (N, C, H, W) with hard labels (N,) or soft labels (N, K)
    ``target``, as ``recipe`` says. Returns one dict per epoch: loss, train accuracy against the
    argmax targets, ``test_acc`` on ``eval_data`` and ``<name>_acc`` for every ``(x, labels)`` of
    ``eval_sets`` (e.g. a trigger set); evaluation changes no weight and draws no random number.
    Raises ``ValueError`` for an empty dataset or an invalid recipe."""
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    set_seed(seed)
    opt = recipe.make_optimizer(model.parameters())
    sched = recipe.make_scheduler(opt)
    loader = make_loader(x, target, recipe.batch_size, shuffle=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    history = []
    bar = progress_bar(range(recipe.epochs), desc=desc, disable=not progress)
    for epoch in bar:
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for xb, tb in loader:
            logits = model(random_affine(xb, recipe.augment_shift, g))
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


@dataclass(frozen=True)
class OERecipe:
    """How the OE fine-tuning of :func:`finetune_oe` trains (paper Sec. III-B, Eq. 6; the energy-
    margin loss is :func:`~cip_helpers.method.scores.oe_energy_loss`). Fields: ``epochs``, ``lr``;
    the loss's weight ``lam`` and margins ``m_in`` < ``m_out`` (energies); ``batch_size`` ID images
    and ``out_batch_size`` outliers per step (0 = as many as the step's ID images);
    ``optimizer`` (:data:`OE_OPTIMIZERS`, with ``momentum``, ``nesterov``, ``weight_decay``;
    :func:`make_optimizer`); ``schedule`` ``"constant"`` or ``"cosine_step"`` (cosine per optimiser
    step from ``lr`` to ``lr_min``, :func:`make_cosine_step_scheduler`); ``outlier_augment``
    (:data:`OUTLIER_AUGMENTS`: ``"crop_flip"`` is :func:`random_crop_flip` with padding
    :data:`OUTLIER_CROP_PAD`); ``augment_shift`` for the ID images (:func:`random_affine`).

    The defaults are the course's quick recipe. The authors' (``ood_detection/detection_train.py``
    of GitHub Hatins/CIP_master): 10 epochs, lr 1e-3, SGD (momentum 0.9, Nesterov), weight decay
    5e-4, ``cosine_step`` to 1e-6, 64 ID + 128 outliers per step, ``crop_flip``, lambda 0.1,
    m_in -25, m_out -7 (:meth:`from_profile` reads either from a profile). Raises ``ValueError``
    for an unknown optimizer, schedule or augmentation and for a negative ``out_batch_size``."""

    epochs: int
    lr: float
    lam: float
    m_in: float
    m_out: float
    batch_size: int = 64
    out_batch_size: int = 0
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    schedule: str = "constant"
    lr_min: float = 1e-6
    outlier_augment: str = "none"
    augment_shift: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("optimizer", OE_OPTIMIZERS), ("schedule", OE_SCHEDULES),
                              ("outlier_augment", OUTLIER_AUGMENTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be one of {list(allowed)}")
        n = self.out_batch_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"out_batch_size={n!r}: must be a whole number >= 0 "
                             "(0 = as many outliers as ID images per step)")

    @classmethod
    def from_profile(cls, cfg: Any) -> OERecipe:
        """The OE recipe of profile ``cfg`` (its ``oe_*`` fields; ID batch ``cfg.oe_in_batch``, or
        ``cfg.batch_size`` when that is 0). Raises ``ValueError`` when ``cfg`` lacks a field."""
        f = _read_fields(cfg, _OE_FIELDS, "OERecipe.from_profile")
        in_batch, victim_batch = f.pop("in_batch"), f.pop("victim_batch")
        return cls(batch_size=int(in_batch or victim_batch), **f)

    def make_optimizer(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """:func:`make_optimizer` with this recipe's optimiser settings."""
        return make_optimizer(params, self.optimizer, self.lr, momentum=self.momentum,
                              nesterov=self.nesterov, weight_decay=self.weight_decay)

    def make_scheduler(self, opt: torch.optim.Optimizer, steps_per_epoch: int
                       ) -> torch.optim.lr_scheduler.LambdaLR | None:
        """The per-step schedule (``None`` for ``"constant"``)."""
        if self.schedule != "cosine_step":
            return None
        return make_cosine_step_scheduler(opt, max(self.epochs, 1) * steps_per_epoch, self.lr_min)


def finetune_oe(model: nn.Module, x_in: Tensor, y_in: Tensor, x_out: Tensor, recipe: OERecipe,
                seed: int = 0, eval_data: tuple[Tensor, Tensor] | None = None,
                desc: str = "OE fine-tuning", progress: bool = True) -> list[dict]:
    """Outlier-exposure fine-tuning with the energy-margin loss (paper Sec. III-B).

    Every step takes a batch of ID images ``x_in`` (N, C, H, W) in [0, 1] with labels ``y_in``
    (N,) and a batch of outliers ``x_out`` (M, C, H, W), runs them through ``model`` in ONE pass
    (BatchNorm sees both) and minimises cross-entropy on the ID part plus ``lam`` x the energy
    margins. Outliers come in a fresh random order every epoch (cycled when the pool is short).
    Returns one dict per epoch: ``loss``, the mean ID and outlier energies ``e_in``/``e_out``, and
    ``test_acc`` on ``eval_data``. Raises ``ValueError`` for an empty ID set or outlier pool."""
    if len(x_in) == 0 or len(x_out) == 0:
        raise ValueError("OE fine-tuning needs a non-empty ID training set and outlier pool")
    set_seed(seed)
    opt = recipe.make_optimizer(model.parameters())
    in_loader = make_loader(x_in, y_in, recipe.batch_size, shuffle=True, seed=seed)
    sched = recipe.make_scheduler(opt, len(in_loader))
    n_out = recipe.out_batch_size or recipe.batch_size  # outliers consumed per step
    g = torch.Generator().manual_seed(seed + 1)
    history = []
    bar = progress_bar(range(recipe.epochs), desc=desc, disable=not progress)
    for epoch in bar:
        model.train()
        out_order = torch.randperm(len(x_out), generator=g)
        stats = {"loss": 0.0, "e_in": 0.0, "e_out": 0.0}
        for step, (xb, yb) in enumerate(in_loader):
            pick = out_order[(torch.arange(recipe.out_batch_size or len(xb)) + step * n_out) % len(x_out)]
            x_id = random_affine(xb, recipe.augment_shift, g)
            x_ood = x_out[pick]
            if recipe.outlier_augment == "crop_flip":
                x_ood = random_crop_flip(x_ood, OUTLIER_CROP_PAD, g)
            logits = model(torch.cat([x_id, x_ood]))
            logits_in, logits_out = logits[: len(xb)], logits[len(xb):]
            loss = oe_energy_loss(logits_in, yb, logits_out, recipe.m_in, recipe.m_out, recipe.lam)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            stats["loss"] += float(loss.detach())
            stats["e_in"] += float(energy_score(logits_in.detach()).mean())
            stats["e_out"] += float(energy_score(logits_out.detach()).mean())
        row = {"epoch": epoch + 1, **{k: v / len(in_loader) for k, v in stats.items()}}
        if eval_data is not None:
            row["test_acc"] = accuracy(model, *eval_data)
        history.append(row)
        bar.set_postfix({k: round(v, 3) for k, v in row.items() if k != "epoch"})
    model.eval()
    return history


def train_misinformation(model: nn.Module, victim: nn.Module, x_in: Tensor, x_out: Tensor, recipe: TrainRecipe,
                         seed: int = 0, eval_x: Tensor | None = None, desc: str = "misinformation model",
                         progress: bool = True) -> list[dict]:
    """Train AM's misinformation model ``model`` (Kariyappa & Qureshi 2020) to put low probability
    on ``victim``'s class: :func:`~cip_helpers.method.misinformation.misinformation_loss` with
    labels argmax ``victim(x)`` (eval mode, no gradient) of exactly the images ``model`` sees.

    Every step takes a batch of ID images ``x_in`` (N, C, H, W) in [0, 1] (randomly shifted,
    rotated and scaled by ``recipe.augment_shift``, :func:`random_affine`) and as many outliers of
    ``x_out`` (M, C, H, W), in a fresh random order every epoch (cycled when the pool is short),
    and runs both through ``model`` in ONE pass, as the release's ``train_step`` does
    (``admis/utils/model.py``; it labels its ID images with the true class, the course with the
    victim's top-1, the class AM must not reveal). Optimiser and per-epoch lr schedule: ``recipe``
    (:class:`TrainRecipe`, e.g. :meth:`TrainRecipe.misinformation`). Returns one dict per epoch:
    ``loss``, ``victim_mass`` (mean probability ``model`` puts on the victim's class over the
    epoch's ID images) and, on ``eval_x``, ``test_victim_mass`` and ``test_agree`` (share of images
    where ``model``'s top-1 IS the victim's: the misinformation that would not mislead).
    Raises ``ValueError`` for an empty ID set or outlier pool, or an invalid recipe."""
    if len(x_in) == 0 or len(x_out) == 0:
        raise ValueError("the misinformation model needs a non-empty ID training set and outlier pool")
    set_seed(seed)
    victim.eval()
    opt = recipe.make_optimizer(model.parameters())
    sched = recipe.make_scheduler(opt)
    loader = make_loader(x_in, None, recipe.batch_size, shuffle=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    eval_labels = predict_logits(victim, eval_x).argmax(1) if eval_x is not None else None
    history = []
    bar = progress_bar(range(recipe.epochs), desc=desc, disable=not progress)
    for epoch in bar:
        model.train()
        out_order = torch.randperm(len(x_out), generator=g)
        loss_sum, mass_sum, seen = 0.0, 0.0, 0
        for step, (xb,) in enumerate(loader):
            pick = out_order[(torch.arange(len(xb)) + step * recipe.batch_size) % len(x_out)]
            x_all = torch.cat([random_affine(xb, recipe.augment_shift, g), x_out[pick]])
            with torch.no_grad():
                labels = victim(x_all).argmax(1)
            logits = model(x_all)
            loss = misinformation_loss(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(x_all)
            mass_sum += float(logits[: len(xb)].detach().softmax(1).gather(1, labels[: len(xb), None]).sum())
            seen += len(xb)
        if sched is not None:
            sched.step()
        row = {"epoch": epoch + 1, "loss": loss_sum / (2 * seen), "victim_mass": mass_sum / seen}
        if eval_x is not None:
            q = predict_logits(model, eval_x).softmax(1)
            row["test_victim_mass"] = float(q.gather(1, eval_labels[:, None]).mean())
            row["test_agree"] = float((q.argmax(1) == eval_labels).float().mean())
        history.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"})
    model.eval()
    return history


# ------------------------------------------------------------------ recipes from a profile

_SURROGATE_FIELDS = {"epochs": "surrogate_epochs", "lr": "surrogate_lr", "batch_size": "surrogate_batch",
                     "optimizer": "surrogate_optimizer", "weight_decay": "surrogate_weight_decay",
                     "schedule": "surrogate_schedule", "milestones": "surrogate_milestones",
                     "gamma": "surrogate_step_gamma"}
"""TrainRecipe field -> profile field of the surrogate recipe."""
_OE_FIELDS = {"epochs": "oe_epochs", "lr": "oe_lr", "lam": "oe_lambda", "m_in": "oe_m_in", "m_out": "oe_m_out",
              "in_batch": "oe_in_batch", "victim_batch": "batch_size", "out_batch_size": "oe_out_batch",
              "optimizer": "oe_optimizer", "weight_decay": "oe_weight_decay", "schedule": "oe_schedule",
              "lr_min": "oe_lr_min", "outlier_augment": "oe_outlier_augment", "augment_shift": "augment_shift"}
"""OERecipe field (``in_batch``/``victim_batch``: its ``batch_size``) -> profile field."""
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


def _non_default(recipe: Any, keys: dict[str, str]) -> dict[str, Any]:
    """The fields of the dataclass ``recipe`` named in ``keys`` whose value differs from the
    class default, renamed by ``keys``, tuples as lists (JSON)."""
    defaults = {f.name: f.default for f in dataclasses.fields(recipe)}
    out = {}
    for name, key in keys.items():
        value = getattr(recipe, name)
        if value != defaults[name]:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def surrogate_recipe_spec(cfg: Any) -> dict[str, Any]:
    """The entries a surrogate checkpoint's spec must add for the recipe of
    :meth:`TrainRecipe.surrogate` beyond epochs, lr and batch: ``optimizer``, ``weight_decay``,
    ``lr_schedule`` where they differ from :class:`TrainRecipe`'s defaults, and with
    ``schedule="step"`` always its ``lr_milestones`` (a list) and ``lr_gamma``. Quick and smoke
    give ``{}``, so their existing checkpoints keep their spec hash; full gives ``{"optimizer":
    "sgd", "weight_decay": 0.0005, "lr_schedule": "step", "lr_milestones": [30, 60, 90],
    "lr_gamma": 0.2}``. Raises ``ValueError`` when ``cfg`` lacks a field."""
    recipe = TrainRecipe.surrogate(cfg)
    spec = _non_default(recipe, _SURROGATE_SPEC_KEYS)
    if recipe.schedule == "step":
        spec.update(lr_milestones=list(recipe.milestones), lr_gamma=recipe.gamma)
    return spec


def oe_recipe_spec(cfg: Any) -> dict[str, Any]:
    """The entries the OE checkpoint's spec must add for the recipe of
    :meth:`OERecipe.from_profile` beyond epochs, lr and the loss (which ``pipeline.oe_spec``
    records): ``optimizer``, ``weight_decay``, ``lr_schedule``, ``out_batch``, ``outlier_augment``
    where they differ from :class:`OERecipe`'s defaults, ``lr_min`` always with
    ``schedule="cosine_step"``, and ``in_batch`` when ``cfg.oe_in_batch`` is set. Quick and smoke
    give ``{}``, so their OE checkpoints keep their spec hash. Raises ``ValueError`` when ``cfg``
    lacks a field."""
    recipe = OERecipe.from_profile(cfg)
    spec = _non_default(recipe, _OE_SPEC_KEYS)
    if recipe.schedule == "cosine_step":
        spec["lr_min"] = recipe.lr_min
    if cfg.oe_in_batch:  # read by from_profile above, which names a missing field
        spec["in_batch"] = recipe.batch_size
    return spec
