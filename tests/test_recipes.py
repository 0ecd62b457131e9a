"""Issue 15 item 7: the full profile's training recipes (OE, surrogates, DFME budget) follow the
authors' release (GitHub Hatins/CIP_master: ``ood_detection/detection_train.py``,
``knockoffnets/main.py``, ``IDA/main.py``, ``DQA/main.py``, ``DFME/main.py``), reach the optimiser,
and leave the quick and smoke profiles bit for bit as they were."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from cip_helpers.course import config, pipeline, training
from cip_helpers.course.config import get_profile
from cip_helpers.course.data import make_loader
from cip_helpers.method.scores import oe_energy_loss


def _tiny(n_classes: int = 3, channels: int = 1, size: int = 8, seed: int = 0) -> nn.Module:
    """A conv + BatchNorm + linear model for (N, channels, size, size) images."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * size * size, n_classes))


def _data(n: int, seed: int = 0, size: int = 8, n_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, n_classes, (n,), generator=g)


class _Recorder(nn.Module):
    """Wraps a model; records every forward input and the lr of ``captured['opt']`` at that time."""

    def __init__(self, inner: nn.Module, captured: dict) -> None:
        super().__init__()
        self.inner, self.captured, self.inputs, self.lrs = inner, captured, [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.inputs.append(x.detach().clone())
            self.lrs.append(self.captured["opt"].param_groups[0]["lr"])
        return self.inner(x)


@pytest.fixture
def captured(monkeypatch) -> dict:
    """Records the optimiser that training.make_optimizer builds (the one train_classifier and
    finetune_oe step)."""
    box: dict = {}
    real = training.make_optimizer

    def spy(*args, **kwargs):
        box["opt"] = real(*args, **kwargs)
        return box["opt"]

    monkeypatch.setattr(training, "make_optimizer", spy)
    return box


def _assert_authors_sgd(opt: torch.optim.Optimizer) -> None:
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["weight_decay"], group["momentum"], group["nesterov"]) == (5e-4, 0.9, True)


# ------------------------------------------------------------------ the full profile's values


def test_issue15_full_profile_holds_the_authors_recipes_and_quick_smoke_the_old_ones():
    full, quick, smoke = (get_profile(n) for n in ("full", "quick", "smoke"))
    # ood_detection/detection_train.py
    assert (full.oe_epochs, full.oe_lr, full.oe_lambda, full.oe_m_in, full.oe_m_out) == (10, 1e-3, 0.1, -25.0, -7.0)
    assert (full.oe_optimizer, full.oe_weight_decay, full.oe_schedule, full.oe_lr_min) == ("sgd", 5e-4,
                                                                                            "cosine_step", 1e-6)
    assert (full.oe_in_batch, full.oe_out_batch, full.oe_outlier_augment) == (64, 128, "crop_flip")
    # knockoffnets/main.py, IDA/main.py, DQA/main.py
    assert (full.surrogate_arch, full.surrogate_epochs, full.surrogate_lr, full.surrogate_batch) == ("wrn28_10", 100,
                                                                                                   0.1, 128)
    assert (full.surrogate_optimizer, full.surrogate_weight_decay, full.surrogate_schedule) == ("sgd", 5e-4, "step")
    assert (full.surrogate_milestones, full.surrogate_step_gamma) == ((30, 60, 90), 0.2)
    # DFME/main.py: --Surrogate_model resnet18, --query_times 6*(10**6)
    assert (full.dfme_arch, full.dfme_queries) == ("resnet18", 6_000_000)
    for p in (quick, smoke):  # every new field at the value that reproduces the old training
        assert (p.oe_optimizer, p.oe_weight_decay, p.oe_schedule, p.oe_in_batch, p.oe_out_batch,
                p.oe_outlier_augment) == ("adam", 0.0, "constant", 0, 0, "none")
        assert (p.surrogate_optimizer, p.surrogate_weight_decay, p.surrogate_schedule) == ("auto", 0.0, "cosine")
        assert p.dfme_student_arch == "" and p.dfme_arch == p.surrogate_arch == "cnn"
    assert training.OERecipe.from_profile(quick).batch_size == quick.batch_size == 64
    assert training.OERecipe.from_profile(full).batch_size == 64


def test_issue15_allowed_values_match_training():
    assert config.SURROGATE_OPTIMIZERS == training.OPTIMIZERS
    assert config.SURROGATE_SCHEDULES == training.EPOCH_SCHEDULES
    assert config.OE_OPTIMIZERS == training.OE_OPTIMIZERS
    assert config.OE_SCHEDULES == training.OE_SCHEDULES
    assert config.OUTLIER_AUGMENTS == training.OUTLIER_AUGMENTS


@pytest.mark.parametrize(("overrides", "message"), [
    ({"oe_optimizer": "rmsprop"}, r"oe_optimizer='rmsprop': must be one of \['adam', 'sgd'\]"),
    ({"oe_schedule": "cosine"}, r"oe_schedule='cosine': must be one of \['constant', 'cosine_step'\]"),
    ({"oe_outlier_augment": "cutout"}, r"oe_outlier_augment='cutout': must be one of \['none', 'crop_flip'\]"),
    ({"surrogate_optimizer": "sgdm"}, r"surrogate_optimizer='sgdm': must be one of \['auto', 'adam', 'sgd'\]"),
    ({"surrogate_schedule": "multistep"}, r"surrogate_schedule='multistep': must be one of"),
    ({"dfme_student_arch": "vgg16"}, r"dfme_student_arch='vgg16': must be '' \(= surrogate_arch\) or one of"),
    ({"oe_weight_decay": -1e-4}, r"oe_weight_decay=-0.0001: must be >= 0"),
    ({"surrogate_weight_decay": -1}, r"surrogate_weight_decay=-1.0: must be >= 0"),
    ({"oe_out_batch": -1}, r"oe_out_batch=-1: must be >= 0"),
    ({"oe_schedule": "cosine_step", "oe_lr_min": 0.01}, r"oe_lr_min=0.01, oe_lr=0.001: must be 0 <= oe_lr_min"),
    ({"surrogate_milestones": (60, 30)}, r"surrogate_milestones=\(60, 30\): must be a non-empty, strictly increasing"),
    ({"surrogate_milestones": ()}, r"surrogate_milestones=\(\): must be a non-empty"),
    ({"surrogate_step_gamma": 0}, r"surrogate_step_gamma=0.0: must be in \(0, 1\]"),
    ({"surrogate_schedule": "step"}, r"surrogate_milestones=\(30, 60, 90\), surrogate_epochs=1, ida_epochs=2: "
                                     r"must be a first milestone below"),
])
def test_issue15_new_profile_fields_are_range_checked(overrides, message):
    with pytest.raises(ValueError, match=r"invalid profile 'smoke': .*" + message):
        get_profile("smoke", **overrides)


def test_issue15_valid_neighbours_of_the_range_checks_pass():
    cfg = get_profile("smoke", surrogate_schedule="step", surrogate_milestones=(1,), surrogate_epochs=3)
    assert (cfg.surrogate_milestones, cfg.surrogate_schedule) == ((1,), "step")
    assert get_profile("smoke", oe_schedule="cosine_step", oe_lr_min=0).oe_lr_min == 0.0
    assert get_profile("smoke", oe_schedule="cosine_step", oe_lr_min=1e-3).oe_lr_min == 1e-3  # = oe_lr
    assert get_profile("smoke", surrogate_step_gamma=1).surrogate_step_gamma == 1.0
    assert get_profile("smoke", dfme_student_arch="mlp").dfme_arch == "mlp"
    assert get_profile("full", surrogate_milestones="(30, 60)").surrogate_milestones == (30, 60)  # --set text


# ------------------------------------------------------------------ weight decay and optimiser


def test_issue15_full_profile_weight_decay_reaches_the_optimiser(captured):
    full = get_profile("full")
    x, y = _data(16)
    training.train_classifier(_tiny(), x, y, training.TrainRecipe.surrogate(full, epochs=31), progress=False)
    _assert_authors_sgd(captured["opt"])
    assert captured["opt"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.2)  # after epoch 30: x0.2
    x_out = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    training.finetune_oe(_tiny(), x, y, x_out,
                         dataclasses.replace(training.OERecipe.from_profile(full), epochs=1, batch_size=8),
                         progress=False)
    _assert_authors_sgd(captured["opt"])
    # today's default: no weight decay anywhere
    training.train_classifier(_tiny(), x, y, training.TrainRecipe(epochs=1, lr=0.1, batch_size=16), progress=False)
    assert captured["opt"].param_groups[0]["weight_decay"] == 0.0


def test_issue15_oe_recipe_reaches_finetune_oe_through_the_pipeline(results_root, monkeypatch, captured):
    """get_oe_victim passes the profile's OE recipe (here the full recipe on smoke data) to
    finetune_oe: SGD with weight decay 5e-4, 64 ID + 128 outliers per step, cosine to 1e-6."""
    recipe = {"oe_optimizer": "sgd", "oe_weight_decay": 5e-4, "oe_schedule": "cosine_step", "oe_lr_min": 1e-6,
              "oe_in_batch": 64, "oe_out_batch": 128, "oe_outlier_augment": "crop_flip"}
    cfg = get_profile("smoke", n_train=128, oe_epochs=1, **recipe)
    monkeypatch.setattr(pipeline, "get_victim", lambda cfg, split="all", verbose=True: (pipeline.new_model(cfg), {}))
    seen: list[_Recorder] = []

    def spy_finetune(model, *args, **kwargs):  # the real finetune_oe, on a recording view of the model
        seen.append(_Recorder(model, captured))
        return training.finetune_oe(seen[-1], *args, **kwargs)

    monkeypatch.setattr(pipeline, "finetune_oe", spy_finetune)
    _, info = pipeline.get_oe_victim(cfg, "all", verbose=False)
    assert not info["loaded"] and len(seen) == 1
    _assert_authors_sgd(captured["opt"])
    assert captured["opt"].param_groups[0]["lr"] == pytest.approx(1e-6)  # cosine per step, at its floor
    n_id = len(pipeline.data.id_data(cfg).split("all")[0])
    sizes = [len(b) for b in seen[0].inputs]  # ID batch + outlier batch per step
    assert n_id > 64 and sizes == [64 + 128] * (n_id // 64) + ([n_id % 64 + 128] if n_id % 64 else [])
    spec = pipeline.oe_spec(cfg, "all")
    assert {k: spec[k] for k in ("optimizer", "weight_decay", "lr_schedule", "lr_min", "in_batch", "out_batch",
                                 "outlier_augment")} == {"optimizer": "sgd", "weight_decay": 5e-4,
                                                         "lr_schedule": "cosine_step", "lr_min": 1e-6,
                                                         "in_batch": 64, "out_batch": 128,
                                                         "outlier_augment": "crop_flip"}


# ------------------------------------------------------------------ schedules


def test_issue15_step_decay_multiplies_the_lr_by_0_2_after_epochs_30_60_90(captured):
    opt = torch.optim.SGD(_tiny().parameters(), lr=0.1)
    sched = training.make_epoch_scheduler(opt, "step", 100, milestones=(30, 60, 90), gamma=0.2)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for epochs, lr in ((range(0, 30), 0.1), (range(30, 60), 0.02), (range(60, 90), 0.004), (range(90, 100), 8e-4)):
        assert all(lrs[e] == pytest.approx(lr, rel=1e-9) for e in epochs), (epochs, lr)
    # through train_classifier: milestones (1, 2), 3 epochs -> 0.1 * 0.2 * 0.2 after training
    x, y = _data(16)
    training.train_classifier(_tiny(), x, y, training.TrainRecipe(epochs=3, lr=0.1, batch_size=16, optimizer="sgd",
                                                                   schedule="step", milestones=(1, 2), gamma=0.2),
                              progress=False)
    assert captured["opt"].param_groups[0]["lr"] == pytest.approx(0.004)
    # constant: unchanged; cosine (today): 0 after the last epoch
    training.train_classifier(_tiny(), x, y, training.TrainRecipe(epochs=3, lr=0.1, batch_size=16, schedule="constant"),
                              progress=False)
    assert captured["opt"].param_groups[0]["lr"] == 0.1
    training.train_classifier(_tiny(), x, y, training.TrainRecipe(epochs=3, lr=0.1, batch_size=16), progress=False)
    assert captured["opt"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"never changes the lr in 10 epochs: pass milestones below 10"):
        training.make_epoch_scheduler(opt, "step", 10, milestones=(30, 60, 90))
    with pytest.raises(ValueError, match=r"milestones=\(30, 30\): must be a non-empty, strictly increasing"):
        training.make_epoch_scheduler(opt, "step", 100, milestones=(30, 30))
    with pytest.raises(ValueError, match=r"gamma=1.5: must be in \(0, 1\]"):
        training.make_epoch_scheduler(opt, "step", 100, gamma=1.5)


def test_issue15_oe_cosine_decays_per_step_and_reaches_lr_min_at_the_last_step(captured):
    x, y = _data(32)  # 4 steps of 8 per epoch, 3 epochs: 12 steps
    x_out = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = _Recorder(_tiny(), captured)
    training.finetune_oe(model, x, y, x_out,
                         training.OERecipe(epochs=3, lr=1e-3, lam=0.1, m_in=-25.0, m_out=-7.0, batch_size=8,
                                           optimizer="sgd", weight_decay=5e-4, schedule="cosine_step",
                                           lr_min=1e-6), progress=False)
    assert len(model.lrs) == 12
    want = [1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * k / 12)) for k in range(12)]
    assert model.lrs == pytest.approx(want, rel=1e-9)  # a new lr every step, not every epoch
    assert model.lrs[0] == pytest.approx(1e-3) and model.lrs[6] == pytest.approx((1e-3 + 1e-6) / 2)
    assert captured["opt"].param_groups[0]["lr"] == pytest.approx(1e-6, rel=1e-9)  # after the last step
    # today's default: constant lr
    model = _Recorder(_tiny(), captured)
    training.finetune_oe(model, x, y, x_out,
                         training.OERecipe(epochs=2, lr=1e-3, lam=0.1, m_in=-25.0, m_out=-7.0, batch_size=8), progress=False)
    assert isinstance(captured["opt"], torch.optim.Adam) and set(model.lrs) == {1e-3}
    with pytest.raises(ValueError, match=r"lr_min=0.01: must be in \[0, lr\] = \[0, 0.001\]"):
        training.finetune_oe(_tiny(), x, y, x_out,
                             training.OERecipe(epochs=1, lr=1e-3, lam=0.1, m_in=-25.0, m_out=-7.0,
                                               schedule="cosine_step", lr_min=1e-2), progress=False)


# ------------------------------------------------------------------ outlier batch and augmentation


def _rows_of(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For every row of ``rows``, the index of the identical image in ``pool`` (-1 if none)."""
    same = (rows.flatten(1)[:, None, :] == pool.flatten(1)[None, :, :]).all(-1)  # (len(rows), len(pool))
    return torch.where(same.any(1), same.float().argmax(1), torch.full((len(rows),), -1))


def test_issue15_oe_step_holds_64_id_and_128_outlier_images(captured):
    x, y = _data(128)
    x_out = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    model = _Recorder(_tiny(), captured)
    training.finetune_oe(model, x, y, x_out,
                         training.OERecipe(epochs=1, lr=1e-3, lam=0.1, m_in=-25.0, m_out=-7.0, batch_size=64,
                                           out_batch_size=128), progress=False)
    assert [len(b) for b in model.inputs] == [192, 192]
    id_rows = torch.cat([b[:64] for b in model.inputs])
    out_rows = torch.cat([b[64:] for b in model.inputs])
    assert sorted(_rows_of(id_rows, x).tolist()) == list(range(128))  # every ID image once
    picked = _rows_of(out_rows, x_out)
    assert (picked >= 0).all() and len(set(picked.tolist())) == 256  # 256 distinct outliers of the pool
    # today's default: as many outliers as ID images
    model = _Recorder(_tiny(), captured)
    training.finetune_oe(model, x, y, x_out,
                         training.OERecipe(epochs=1, lr=1e-3, lam=0.1, m_in=-25.0, m_out=-7.0, batch_size=64), progress=False)
    assert [len(b) for b in model.inputs] == [128, 128]
    with pytest.raises(ValueError, match=r"out_batch_size=-1: must be a whole number >= 0"):
        training.finetune_oe(_tiny(), x, y, x_out,
                             training.OERecipe(epochs=1, lr=1e-3, lam=0.1, m_in=-25.0, m_out=-7.0,
                                               out_batch_size=-1), progress=False)


def test_issue15_crop_flip_changes_outliers_but_keeps_their_shape(captured):
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    out = training.random_crop_flip(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    found = []
    for i in range(len(x)):  # each output is one 8x8 window of the zero-padded image, maybe mirrored
        hits = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                if torch.equal(out[i], (lambda w: w.flip(-1) if flip else w)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert hits, i
        found.append(hits[0])
    assert {f for _, _, f in found} == {False, True}  # both flipped and unflipped images
    assert sum((dy, dx) != (4, 4) for dy, dx, _ in found) >= 24  # most crops are shifted
    assert sum(not torch.equal(out[i], x[i]) for i in range(len(x))) >= 30
    assert torch.equal(training.random_crop_flip(x, 4, torch.Generator().manual_seed(0)), out)  # seeded
    # in finetune_oe: the outliers the model sees are augmented copies (no longer pool rows), same shape
    xi, yi = _data(16)
    x_out = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    model = _Recorder(_tiny(), captured)
    training.finetune_oe(model, xi, yi, x_out,
                         training.OERecipe(epochs=1, lr=1e-3, lam=0.1, m_in=-25.0, m_out=-7.0, batch_size=8,
                                           out_batch_size=16, outlier_augment="crop_flip"), progress=False)
    seen = torch.cat([b[8:] for b in model.inputs])
    assert seen.shape == (32, 1, 8, 8) and (_rows_of(seen, x_out) == -1).float().mean() > 0.8
    with pytest.raises(ValueError, match=r"outlier_augment='cutout': must be one of \['none', 'crop_flip'\]"):
        training.finetune_oe(_tiny(), xi, yi, x_out,
                             training.OERecipe(epochs=1, lr=1e-3, lam=0.1, m_in=-25.0, m_out=-7.0,
                                               outlier_augment="cutout"), progress=False)
    with pytest.raises(ValueError, match=r"random_crop_flip expects a batch \(N, C, H, W\), got \(3, 8, 8\)"):
        training.random_crop_flip(x[0], 4, torch.Generator())


# ------------------------------------------------------------------ quick and smoke unchanged


QUICK_SMOKE_SPEC_HASHES = {  # spec_hash(victim_spec), spec_hash(oe_spec) before issue 15 item 7
    ("quick", "all"): ("32679cf54110e1f9", "078f78fdefb2194e"),
    ("quick", "half"): ("09c0dcab48dc2d72", "85682fc793bce817"),
    ("smoke", "all"): ("4e3164acc85de43c", "44707ebe9545d3f2"),
    ("smoke", "half"): ("011ad6d4e633c149", "97e641ea388e95ab"),
}


def test_issue15_quick_and_smoke_spec_hashes_are_unchanged():
    for (name, split), (victim_hash, oe_hash) in QUICK_SMOKE_SPEC_HASHES.items():
        cfg = get_profile(name)
        assert pipeline.spec_hash(pipeline.victim_spec(cfg, split)) == victim_hash, (name, split)
        assert pipeline.spec_hash(pipeline.oe_spec(cfg, split)) == oe_hash, (name, split)
        assert training.oe_recipe_spec(cfg) == {} and training.surrogate_recipe_spec(cfg) == {}
    # a recipe that differs is recorded, so its checkpoint is not mistaken for the old one
    sgd = get_profile("quick", oe_optimizer="sgd", oe_weight_decay=5e-4)
    assert pipeline.spec_hash(pipeline.oe_spec(sgd, "all")) != QUICK_SMOKE_SPEC_HASHES[("quick", "all")][1]
    assert training.surrogate_recipe_spec(get_profile("full")) == {
        "optimizer": "sgd", "weight_decay": 5e-4, "lr_schedule": "step", "lr_milestones": [30, 60, 90],
        "lr_gamma": 0.2}
    assert training.oe_recipe_spec(get_profile("full")) == {
        "optimizer": "sgd", "weight_decay": 5e-4, "lr_schedule": "cosine_step", "lr_min": 1e-6, "in_batch": 64,
        "out_batch": 128, "outlier_augment": "crop_flip"}


def _old_train_classifier(model, x, y, *, epochs, lr, batch_size, seed, weight_decay, augment_shift):
    """The training loop before issue 15 item 7 (the reference the defaults must reproduce)."""
    training.set_seed(seed)
    if lr >= 0.05:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    loader = make_loader(x, y, batch_size, shuffle=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    for _ in range(epochs):
        model.train()
        for xb, tb in loader:
            loss = training.soft_cross_entropy(model(training.random_affine(xb, augment_shift, g)), tb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()


def _old_finetune_oe(model, x_in, y_in, x_out, *, epochs, lr, lam, m_in, m_out, batch_size, seed, augment_shift):
    """The OE loop before issue 15 item 7."""
    training.set_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = make_loader(x_in, y_in, batch_size, shuffle=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_out), generator=g)
        for step, (xb, yb) in enumerate(loader):
            pick = order[(torch.arange(len(xb)) + step * batch_size) % len(x_out)]
            logits = model(torch.cat([training.random_affine(xb, augment_shift, g), x_out[pick]]))
            loss = oe_energy_loss(logits[: len(xb)], yb, logits[len(xb):], m_in, m_out, lam)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _frozen_finetune_oe(model, x_in, y_in, x_out, *, epochs, lr, lam, m_in, m_out, batch_size, seed,
                        augment_shift, optimizer, weight_decay, schedule, lr_min, out_batch_size, outlier_augment):
    """The OE loop as it was before the OERecipe regrouping (every recipe option), for the
    bit-identity test below."""
    training.set_seed(seed)
    opt = training.make_optimizer(model.parameters(), optimizer, lr, momentum=0.9, nesterov=True,
                                  weight_decay=weight_decay)
    loader = make_loader(x_in, y_in, batch_size, shuffle=True, seed=seed)
    sched = (training.make_cosine_step_scheduler(opt, max(epochs, 1) * len(loader), lr_min)
             if schedule == "cosine_step" else None)
    stride = out_batch_size or batch_size
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_out), generator=g)
        for step, (xb, yb) in enumerate(loader):
            pick = order[(torch.arange(out_batch_size or len(xb)) + step * stride) % len(x_out)]
            x_id = training.random_affine(xb, augment_shift, g)
            x_ood = x_out[pick]
            if outlier_augment == "crop_flip":
                x_ood = training.random_crop_flip(x_ood, training.OUTLIER_CROP_PAD, g)
            logits = model(torch.cat([x_id, x_ood]))
            loss = oe_energy_loss(logits[: len(xb)], yb, logits[len(xb):], m_in, m_out, lam)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("lr", [2e-3, 0.1], ids=["adam", "sgd"])
def test_issue15_quick_training_is_bit_identical_to_before(lr):
    x, y = _data(64, seed=5)
    common = dict(epochs=2, lr=lr, batch_size=16, weight_decay=1e-4, augment_shift=2)
    old, default, explicit = _tiny(), _tiny(), _tiny()
    _old_train_classifier(old, x, y, seed=3, **common)
    training.train_classifier(default, x, y, training.TrainRecipe(**common), seed=3, progress=False)
    training.train_classifier(explicit, x, y, training.TrainRecipe(optimizer="auto", momentum=0.9, nesterov=True,
                                                                   schedule="cosine", **common), seed=3, progress=False)
    assert not _same_weights(old, _tiny())  # training moved the weights
    assert _same_weights(old, default) and _same_weights(old, explicit)
    # the quick profile's surrogate recipe (weight decay 0 included) is that default, with Adam's fused kernel
    via = dataclasses.replace(training.TrainRecipe.surrogate(get_profile("quick")), fused=False, **common)
    assert training.TrainRecipe.surrogate(get_profile("quick")).fused
    old0, via_profile = _tiny(), _tiny()
    _old_train_classifier(old0, x, y, seed=3, **{**common, "weight_decay": 0.0})
    training.train_classifier(via_profile, x, y, dataclasses.replace(via, weight_decay=0.0), seed=3, progress=False)
    assert _same_weights(old0, via_profile) and not _same_weights(old0, old)
    # and a different recipe does change them
    other = _tiny()
    training.train_classifier(other, x, y, training.TrainRecipe(**{**common, "weight_decay": 5e-2}), seed=3,
                              progress=False)
    assert not _same_weights(old, other)


def test_issue15_quick_oe_finetuning_is_bit_identical_to_before():
    x, y = _data(48, seed=6)
    x_out = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    recipe = dict(epochs=2, lr=1e-3, lam=0.1, m_in=-20.0, m_out=-3.0, batch_size=16, augment_shift=2)
    old, default, via_profile = _tiny(), _tiny(), _tiny()
    _old_finetune_oe(old, x, y, x_out, seed=3, **recipe)
    training.finetune_oe(default, x, y, x_out,
                         training.OERecipe(**recipe), seed=3, progress=False)
    training.finetune_oe(via_profile, x, y, x_out,
                         dataclasses.replace(training.OERecipe.from_profile(get_profile("quick")), **recipe),
                         seed=3, progress=False)
    assert not _same_weights(old, _tiny())
    assert _same_weights(old, default) and _same_weights(old, via_profile)


def test_oe_recipe_regrouping_is_bit_identical_for_the_authors_recipe():
    """Issue 26: finetune_oe(model, ..., OERecipe) trains exactly as the keyword version did, with
    every option of the full (authors') recipe switched on."""
    x, y = _data(40, seed=8)
    x_out = torch.rand(70, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    recipe = dataclasses.replace(training.OERecipe.from_profile(get_profile("full")), epochs=2, batch_size=16,
                                 augment_shift=2)
    assert (recipe.optimizer, recipe.schedule, recipe.out_batch_size, recipe.outlier_augment) == \
        ("sgd", "cosine_step", 128, "crop_flip")
    old, new = _tiny(), _tiny()
    _frozen_finetune_oe(old, x, y, x_out, seed=4, **{f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)
                                                      if f.name not in ("momentum", "nesterov")})
    training.finetune_oe(new, x, y, x_out, recipe, seed=4, progress=False)
    assert not _same_weights(old, _tiny()) and _same_weights(old, new)


def test_issue15_recipe_helpers_fail_closed():
    x, y = _data(8)
    for kwargs, message in (({"optimizer": "rmsprop"}, r"optimizer='rmsprop': must be one of \['auto', 'adam', 'sgd'\]"),
                            ({"schedule": "linear"}, r"schedule='linear': must be one of \['cosine', 'step', 'constant'\]"),
                            ({"momentum": 1.0}, r"momentum=1.0: must be in \[0, 1\)"),
                            ({"weight_decay": -1.0}, r"weight_decay=-1.0: must be a finite number >= 0"),
                            ({"optimizer": "sgd", "momentum": 0.0}, r"nesterov=True needs momentum > 0")):
        with pytest.raises(ValueError, match=message):
            training.train_classifier(_tiny(), x, y, training.TrainRecipe(epochs=1, lr=0.1, **kwargs), progress=False)
    with pytest.raises(ValueError, match=r"optimizer='auto': must be one of \['adam', 'sgd'\]"):
        training.finetune_oe(_tiny(), x, y, x,
                             training.OERecipe(epochs=1, lr=1e-3, lam=0.1, m_in=-25.0, m_out=-7.0,
                                               optimizer="auto"), progress=False)

    class Partial:
        surrogate_optimizer = "sgd"

    with pytest.raises(ValueError, match=r"TrainRecipe.surrogate needs a profile with the field\(s\) "
                                         r"\['surrogate_epochs', 'surrogate_lr', 'surrogate_batch', 'surrogate_weight_decay'"):
        training.TrainRecipe.surrogate(Partial())
