"""What the paper-size Fashion-MNIST grid costs (issue 29): CPU-hours measured here, GPU-hours estimated.

    python benchmarks/cost_table.py                              # profile paper-fmnist -> results/paper-fmnist/
    python benchmarks/cost_table.py --plan-only                  # the step counts, no timing
    python benchmarks/cost_table.py --profile full --set dataset=cifar10 --out /tmp/cost

Three parts:

1. **Plan** (:func:`plan`, arithmetic only): what the profile makes each notebook do, as items of
   four kinds, read off the course's code (``pipeline``, ``attacks``, ``dfme``, notebooks 01-11):
   ``train`` (optimiser steps of one architecture at one batch size: epochs x ceil(images /
   batch) per trained model), ``oe`` (OE steps: ``oe_in_batch`` ID images + ``oe_out_batch``
   outliers), ``dfme`` (DFME rounds: ``dfme_queries // round_queries`` per run) and ``infer``
   (images through one architecture's forward pass: test-set evaluation after every epoch, the
   API's answers to transfer sets, energies of the pools). The training counts are exact for the
   profile; the inference counts are the major forward passes, rounded up where a notebook's
   bookkeeping is involved (each item says how it was counted).
2. **Per-step cost measured here** (:func:`measure`): each kind of step at the profile's paper size
   (batch, architecture, augmentation, optimiser), on random inputs of the dataset's shape, with
   ONE torch thread; the cost is the process's CPU time per step (``time.process_time``: core-
   seconds, robust to other jobs sharing the machine; the wall time is recorded beside it).
   CPU-hours = steps x CPU seconds per step: core-hours of this machine's cores.
3. **FLOPs** (:func:`forward_flops`): the forward pass of one image of each architecture, counted
   by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products, 2 FLOPs per
   multiply-add), x3 for a training step (forward + backward); GPU-hours = FLOPs / an assumed
   effective throughput (:data:`GPU_ASSUMPTION`). No GPU was used: they are estimates only.
   (The course's code places every tensor on the CPU today; see the README's cost section.)

Writes ``<out>/cost.json`` (machine, date, torch version, assumptions, per-step costs, every
item with its CPU-hours and GPU-hours, totals for 1 and 3 seeds) and ``<out>/cost.md``.
Run time here: about 3-4 minutes (the DFME round at batch 256 and the WRN-28-10 steps dominate).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # python benchmarks/cost_table.py from anywhere
    sys.path.insert(0, str(REPO))

from cip_helpers.course import config  # noqa: E402  (torch-free; torch is imported where measured)

GPU_ASSUMPTION = {
    "device": "NVIDIA A100 (SXM, 40/80 GB)",
    "peak_fp32_flops": 19.5e12,
    "peak_tf32_flops": 156e12,
    "utilisation": 0.30,
    "effective_flops": 0.30 * 19.5e12,
    "training_flops": "3 x the forward pass (forward + backward of activations and weights)",
    "note": ("GPU-hours = counted FLOPs / (30 % of the A100's 19.5 TFLOP/s FP32 peak = 5.85 TFLOP/s). "
             "An estimate only: no GPU was used. PyTorch's default TF32 convolutions can beat it (the "
             "'TF32' column assumes 30 % of 156 TFLOP/s), while 28 x 28 images in batches of 64-256, "
             "per-batch augmentation and Python overhead keep a GPU further below its peak."),
}
"""The throughput assumed for the GPU-hours column (nothing here ran on a GPU)."""

INFER_BATCH = 256  # models.PREDICT_BATCH: the chunk of every batched forward pass
NOTEBOOK_TITLES = {
    "00": "orientation", "01": "victim training", "02": "energy scores and OE", "03": "threshold selection",
    "04": "performance-degradation poisoning", "05": "reliability and backdooring", "06": "DP and DAWN",
    "07": "KnockoffNets", "08": "DFME", "09": "IDA", "10": "DQA", "11": "results and verification"}


@dataclass(frozen=True)
class Item:
    """One line of the plan. ``kind``: ``train`` (``count`` optimiser steps of ``arch`` at
    ``batch`` images, ``augment``: random affine of the ID images), ``oe`` (``count`` OE steps),
    ``dfme`` (``count`` DFME rounds) or ``infer`` (``count`` images through ``arch``'s forward
    pass). ``what`` says which models or passes, ``how`` how the count was made."""

    notebook: str
    what: str
    kind: str
    arch: str
    count: int
    batch: int = 0
    augment: bool = False
    how: str = ""


# ----------------------------------------------------------------------------- 1. plan


def sizes(cfg: config.Profile) -> dict[str, int]:
    """The data sizes the profile implies: ``N`` victim-train images (0 = the whole training set
    of ``data_full.DATASETS``), ``Nt`` test images, ``Nh`` the half victim's and ``Na`` the IDA
    attacker's images (``data.class_balanced_half``: floor(n_c / 2) per class; the class-balanced
    datasets here halve exactly), the pools and ``M`` (the mixed KnockoffNets pool)."""
    from cip_helpers.course import data_full

    spec = data_full.DATASETS.get(cfg.dataset, {"n_train": 4000, "n_test": 1000})
    n = cfg.n_train or spec["n_train"]
    nt = cfg.n_test or spec["n_test"]
    near = cfg.n_near if (spec.get("shape", (1, 28, 28)) == (1, 28, 28)) else 0
    return {"N": n, "Nt": nt, "Nh": n // 2, "Na": n - n // 2, "outlier": cfg.n_outlier,
            "knockoff": cfg.n_knockoff, "textures": cfg.n_textures, "noise": cfg.n_noise, "near": near,
            "M": near + cfg.mixed_photos if near else 0}


def _steps(images: int, batch: int, epochs: int) -> int:
    return math.ceil(images / batch) * epochs


def _steal(nb: str, what: str, cfg: config.Profile, s: dict, n: int, epochs: int, arch: str | None = None,
           train: bool = True, oe_api: bool = False) -> list[Item]:
    """One query-then-train run (``attacks.steal``): the surrogate's training (``epochs`` x
    ceil(n / surrogate_batch) steps, unless ``train`` is False: a content-addressed reuse), its
    test accuracy after every epoch (``epochs`` x Nt images), and the victim-side passes: the API's
    answers, the undefended top-1 of the kept answers, CIP's routing probe for T (3n) and the
    record's victim / defended / OE-victim test accuracies (3 Nt)."""
    arch = arch or cfg.surrogate_arch
    items = []
    if train:
        items += [Item(nb, what, "train", arch, _steps(n, cfg.surrogate_batch, epochs), cfg.surrogate_batch,
                       how=f"{epochs} epochs x ceil({n:,} / {cfg.surrogate_batch})"),
                  Item(nb, what + ": test accuracy per epoch", "infer", arch, epochs * s["Nt"],
                       how=f"{epochs} x {s['Nt']:,}")]
    items.append(Item(nb, what + ": victim-side passes", "infer", cfg.victim_arch, 3 * n + 3 * s["Nt"],
                      how=f"3 x {n:,} queries + 3 x {s['Nt']:,} test"))
    return items


def _runs(nb: str, label: str, runs: int, cfg: config.Profile, s: dict, n: int, epochs: int,
          arch: str | None = None, train: bool = True) -> list[Item]:
    """``runs`` identical-size :func:`_steal` runs merged into one item per kind."""
    one = _steal(nb, label, cfg, s, n, epochs, arch, train)
    return [Item(i.notebook, f"{runs} x {i.what}" if runs != 1 else i.what, i.kind, i.arch, runs * i.count,
                 i.batch, i.augment, f"{runs} x ({i.how})" if runs != 1 else i.how) for i in one]


def plan(cfg: config.Profile) -> list[Item]:
    """Every item of the profile's grid for ONE seed (notebooks 01-11; 00 trains nothing), as the
    course's code runs it; see the module docstring. Assumes the default ``evidence=False``."""
    from cip_helpers.course import dfme, pipeline

    s = sizes(cfg)
    N, Nt, Nh, Na, M = s["N"], s["Nt"], s["Nh"], s["Na"], s["M"]
    V, bs = cfg.victim_arch, cfg.batch_size
    q = Nt + s["knockoff"] + s["outlier"] + s["textures"] + s["noise"] + s["near"]  # pipeline.query_sets
    p = []
    # 01: the two victims (pipeline.get_victim: train_classifier with the victim recipe)
    p += [Item("01", "victim 'all'", "train", V, _steps(N, bs, cfg.victim_epochs), bs, cfg.augment_shift > 0,
               f"{cfg.victim_epochs} epochs x ceil({N:,} / {bs})"),
          Item("01", "victim 'half'", "train", V, _steps(Nh, bs, cfg.victim_epochs), bs, cfg.augment_shift > 0,
               f"{cfg.victim_epochs} epochs x ceil({Nh:,} / {bs})"),
          Item("01", "test accuracy per epoch, confusion matrix", "infer", V, (2 * cfg.victim_epochs + 3) * Nt,
               how=f"(2 x {cfg.victim_epochs} + 3) x {Nt:,}")]
    # 02: OE fine-tuning of both victims (pipeline.get_oe_victim: finetune_oe), energies of every set
    oe_in = cfg.oe_in_batch or bs
    p += [Item("02", "OE fine-tuning 'all'", "oe", V, math.ceil(N / oe_in) * cfg.oe_epochs, oe_in,
               how=f"{cfg.oe_epochs} epochs x ceil({N:,} / {oe_in})"),
          Item("02", "OE fine-tuning 'half'", "oe", V, math.ceil(Nh / oe_in) * cfg.oe_epochs, oe_in,
               how=f"{cfg.oe_epochs} epochs x ceil({Nh:,} / {oe_in})"),
          Item("02", "energies before/after OE, thresholds, test accuracy per epoch", "infer", V,
               2 * q + 2 * N + Nh + (2 * cfg.oe_epochs + 2) * Nt,
               how=f"2 x {q:,} query-set images + 2 x {N:,} + {Nh:,} ID-train + (2 x {cfg.oe_epochs} + 2) x {Nt:,} test")]
    # 03: the threshold trade-off grid: one mixed-pool CIP surrogate per p1 (attacks.threshold_tradeoff)
    n_p1, n_p2 = len(cfg.tradeoff_p1), len(cfg.tradeoff_p2)
    if M:
        p += _runs("03", "mixed-pool CIP surrogate (one per p1)", n_p1, cfg, s, M, cfg.surrogate_epochs)
        p.append(Item("03", "p1/p2 grid: thresholds, fidelity, routes", "infer", V,
                      (n_p1 - 1) * N + (n_p1 + n_p2) * Nt + n_p2 * M + s["near"],
                      how=f"{n_p1 - 1} x {N:,} + {n_p1 + n_p2} x {Nt:,} + {n_p2} x {M:,} + {s['near']:,}"))
    p.append(Item("03", "query-set logits, threshold explorer", "infer", V, q + N, how=f"{q:,} + {N:,}"))
    # 04-06: the defenses on pools and test images, no training (n_pool = 1000 in 04 and 06)
    p.append(Item("04", "CIP answers on 5 pools x 1,000 + test (2 strong PPDs)", "infer", V, 3 * (5000 + Nt),
                  how=f"~3 x (5,000 + {Nt:,})"))
    p.append(Item("05", "R on train/test, benign price (2 splits + shares)", "infer", V,
                  N + Nt + (2 + len(pipeline.PRICE_SHARES)) * 3 * Nt + len(pipeline.PRICE_SHARES) * Nh,
                  how=f"{N:,} + {Nt:,} + {2 + len(pipeline.PRICE_SHARES)} x 3 x {Nt:,} + "
                      f"{len(pipeline.PRICE_SHARES)} x {Nh:,}"))
    p.append(Item("06", "the 5 defenses on test + 2 pools x 1,000", "infer", V, 2 * 5 * (Nt + 2000),
                  how=f"~2 x 5 x ({Nt:,} + 2,000)"))
    # 07: KnockoffNets (notebook 07's cells; the mixed CIP soft run at p1 is 03's, reused)
    nq = cfg.knockoff_queries
    p += _runs("07", "photo pool, 5 defenses x hard/soft", 10, cfg, s, nq, cfg.surrogate_epochs)
    p += _runs("07", "cnn_plain ablation (none, dp)", 2, cfg, s, nq, cfg.surrogate_epochs, arch="cnn_plain")
    if M:
        reused = cfg.p1 in cfg.tradeoff_p1 and cfg.knockoff_curve_label_type == "soft"
        p += _runs("07", "mixed pool, 5 defenses x hard/soft" + (" (CIP soft: 03's)" if reused else ""),
                   10 - reused, cfg, s, M, cfg.surrogate_epochs)
        p += _runs("07", "mixed pool, served CIP (online PBD) hard/soft", 2, cfg, s, M, cfg.surrogate_epochs)
        for n in sorted(n for n in set(cfg.mixed_curve) if n < M):
            p += _runs("07", f"mixed curve point {n:,} queries (none, cip)", 2, cfg, s, n, cfg.surrogate_epochs)
        p += _runs("07", "low-ES branch only (none, cip; at most the mixed pool)", 2, cfg, s, M,
                   cfg.surrogate_epochs)
    p.append(Item("07", "undefended answers to the transfer set (histogram)", "infer", V, nq, how=f"{nq:,}"))
    # 08: DFME, 5 defenses + the victim-gradient ablation of dp and cip (none shares its run)
    r = dfme.DFMERecipe.from_profile(cfg)
    rounds = cfg.dfme_queries // r.round_queries
    evals = math.ceil(rounds * r.round_queries / cfg.dfme_eval_every)
    p += [Item("08", "7 DFME runs (5 defenses + 2 victim-gradient)", "dfme", cfg.dfme_arch, 7 * rounds, r.batch,
               how=f"7 x ({cfg.dfme_queries:,} // {r.round_queries:,} queries per round)"),
          Item("08", "student test accuracy on the curve", "infer", cfg.dfme_arch, 7 * evals * Nt,
               how=f"7 x {evals} x {Nt:,}"),
          Item("08", "records: victim and defended test accuracy", "infer", V, 7 * 3 * Nt, how=f"7 x 3 x {Nt:,}")]
    # 09: IDA: 4 defenses x hard/soft, inverse answer, served (online) hard/soft, p1 = 95 hard/soft
    p += _runs("09", "IDA runs (8 main + inverse + 2 served + 2 at p1 95)", 13, cfg, s, Na, cfg.ida_epochs)
    # 10: DQA: its kept answers equal IDA's soft ones, so every surrogate is IDA's (content-addressed)
    for ratio in cfg.dqa_ratios:
        n = Na + int(round(Na / ratio))
        p += _runs("10", f"DQA r = {ratio:g}: 4 defenses + served CIP (surrogates: 09's)", 5, cfg, s, n,
                   cfg.ida_epochs, train=False)
    # 11: the innocent pool (pipeline.get_innocent_models), then verification (trigger sets: small)
    for i in range(cfg.n_innocent):
        rec = pipeline.INNOCENT_RECIPES[i % len(pipeline.INNOCENT_RECIPES)]
        n = {"attacker": Na, "half": Nh, "attacker_sub": Na // 2, "mixed": N // 2}[rec.data]
        epochs = max(1, round(cfg.victim_epochs * rec.epochs_scale))
        p.append(Item("11", f"innocent {i + 1}: {rec.tag}", "train", rec.arch, _steps(n, bs, epochs), bs,
                      rec.augment, f"{epochs} epochs x ceil({n:,} / {bs})"))
    p.append(Item("11", "innocent models' test accuracy", "infer", "cnn", cfg.n_innocent * Nt,
                  how=f"{cfg.n_innocent} x {Nt:,} (cnn-sized)"))
    return p


# ----------------------------------------------------------------------------- 2. per-step cost


@dataclass(frozen=True)
class StepCost:
    """Measured cost of one step: ``cpu_s`` process CPU seconds (1 torch thread), ``wall_s`` wall
    seconds, for one ``train``/``oe`` step at ``batch``, one ``dfme`` round at ``batch``, or one
    image (``infer``, measured on batches of ``batch``); best of ``repeats`` after a warm-up."""

    kind: str
    arch: str
    batch: int
    cpu_s: float
    wall_s: float
    repeats: int


def _time(fn: Callable[[], object], repeats: int, per: int = 1) -> tuple[float, float]:
    """(best CPU seconds, best wall seconds) of ``fn`` over ``repeats`` calls, divided by ``per``."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu) / per, min(wall) / per


def _shape(cfg: config.Profile) -> tuple[int, int, int]:
    from cip_helpers.course import data_full

    return tuple(data_full.DATASETS.get(cfg.dataset, {"shape": (1, 28, 28)})["shape"])


def measure(cfg: config.Profile, items: list[Item], repeats: int = 2,
            log: Callable[[str], None] = print) -> dict[str, StepCost]:
    """Measure every (kind, arch, batch, augment) step the plan ``items`` use, on random inputs
    of the dataset's shape, with the profile's optimisers; keyed by :func:`step_key`."""
    import torch

    from cip_helpers.course import attacks, dfme, training
    from cip_helpers.method.defenses import NoDefense
    from cip_helpers.method.models import build_model, predict_logits
    from cip_helpers.method.scores import oe_energy_loss

    torch.set_num_threads(1)
    c, h, _ = _shape(cfg)
    k = 10
    g = torch.Generator().manual_seed(0)
    out: dict[str, StepCost] = {}

    def model(arch: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return attacks.build_surrogate(arch, cfg.surrogate_width, (c, h, h), k)

    def rand(n: int) -> torch.Tensor:
        return torch.rand(n, c, h, h, generator=g)

    for key in sorted({step_key(i) for i in items}):
        kind, arch, batch, augment = _parse_key(key)
        started = time.perf_counter()
        if kind == "infer":
            m = model(arch).eval()
            n = INFER_BATCH if arch not in ("wrn28_10",) else 64  # WRN-28-10: ~0.1 s per image here
            x = rand(n)
            predict_logits(m, x[:8])
            cpu, wall = _time(lambda: predict_logits(m, x), repeats, per=n)
        elif kind == "train":
            m = model(arch).train()
            # augmented: the victims' (and innocents') recipe on labels; else the surrogates' on answered rows
            recipe = (training.TrainRecipe(epochs=1, lr=cfg.lr, batch_size=batch, weight_decay=cfg.weight_decay,
                                           augment_shift=cfg.augment_shift) if augment
                      else training.TrainRecipe.surrogate(cfg))
            opt = recipe.make_optimizer(m.parameters())
            soft = not augment
            x = rand(batch)
            t = (torch.softmax(torch.randn(batch, k, generator=g), 1) if soft
                 else torch.randint(0, k, (batch,), generator=g))

            def step(x: torch.Tensor = x, t: torch.Tensor = t) -> None:
                loss = training.soft_cross_entropy(m(training.random_affine(x, recipe.augment_shift, g)), t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step(x[:8], t[:8])  # warm-up: first-call allocations and kernel selection
            cpu, wall = _time(step, repeats)
        elif kind == "oe":
            m = model(arch).train()
            recipe = training.OERecipe.from_profile(cfg)
            opt = recipe.make_optimizer(m.parameters())
            n_out = recipe.out_batch_size or recipe.batch_size
            x_in, y_in, x_out = rand(recipe.batch_size), torch.randint(0, k, (recipe.batch_size,), generator=g), rand(n_out)

            def step(x_in: torch.Tensor = x_in, y_in: torch.Tensor = y_in, x_out: torch.Tensor = x_out) -> None:
                x_id = training.random_affine(x_in, recipe.augment_shift, g)
                x_ood = x_out
                if recipe.outlier_augment == "crop_flip":
                    x_ood = training.random_crop_flip(x_out, training.OUTLIER_CROP_PAD, g)
                logits = m(torch.cat([x_id, x_ood]))
                loss = oe_energy_loss(logits[:len(x_id)], y_in, logits[len(x_id):], recipe.m_in, recipe.m_out,
                                      recipe.lam)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step(x_in[:8], y_in[:8], x_out[:8])
            cpu, wall = _time(step, repeats)
        elif kind == "dfme":
            victim = build_model(cfg.victim_arch, c, k, h).eval()
            api = NoDefense(victim, (c, h, h))

            def one_round(batch: int) -> None:
                small = dfme.DFMERecipe(**{**asdict(dfme.DFMERecipe.from_profile(cfg)), "batch": batch})
                student, gen = model(arch), dfme.Generator(cfg.dfme_nz, tuple(cfg.dfme_gen_channels), c, h)
                opt_s, opt_g = small.optimizers(student, gen)
                dfme.dfme_round(student, gen, opt_s, opt_g, api, dfme.ReplayBuffer(cfg.dfme_replay_size),
                                torch.Generator().manual_seed(0), small)

            one_round(8)  # warm-up
            cpu, wall = _time(lambda: one_round(batch), 1)  # one round at batch 256: ~1 min here
        else:
            raise ValueError(f"unknown step kind {kind!r}")
        out[key] = StepCost(kind, arch, batch, round(cpu, 6), round(wall, 6), 1 if kind == "dfme" else repeats)
        log(f"  {key:<32} {cpu:9.3g} CPU s ({wall:9.3g} wall s) per {'image' if kind == 'infer' else 'step'}"
            f"  [{time.perf_counter() - started:.0f} s]")
    return out


def step_key(item: Item) -> str:
    """The measured step an item's count multiplies: ``kind/arch/batch[/aug]`` (``infer/arch`` per image)."""
    if item.kind == "infer":
        return f"infer/{item.arch}"
    return f"{item.kind}/{item.arch}/{item.batch}" + ("/aug" if item.augment else "")


def _parse_key(key: str) -> tuple[str, str, int, bool]:
    parts = key.split("/")
    if parts[0] == "infer":
        return "infer", parts[1], INFER_BATCH, False
    return parts[0], parts[1], int(parts[2]), len(parts) > 3 and parts[3] == "aug"


# ----------------------------------------------------------------------------- 3. FLOPs


def forward_flops(cfg: config.Profile, archs: set[str]) -> dict[str, float]:
    """FLOPs of one image's forward pass per architecture (``FlopCounterMode``: convolutions and
    matrix products, 2 per multiply-add), plus ``generator`` (DFME's generator, per image)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cip_helpers.course import attacks, dfme

    c, h, _ = _shape(cfg)
    out = {}
    for arch in sorted(archs):
        m = attacks.build_surrogate(arch, cfg.surrogate_width, (c, h, h), 10).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(torch.rand(1, c, h, h))
        out[arch] = float(counter.get_total_flops())
    gen = dfme.Generator(cfg.dfme_nz, tuple(cfg.dfme_gen_channels), c, h).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        gen(torch.randn(2, cfg.dfme_nz))
    out["generator"] = float(counter.get_total_flops()) / 2
    return out


def item_flops(item: Item, cfg: config.Profile, fwd: dict[str, float]) -> float:
    """FLOPs of an item: forward x3 per trained image, x1 per inferred image; a DFME round is
    B(m + 1) g_iter student + victim forwards (gradient estimate), g_iter B generator steps (x3),
    s_iter B generator forwards + victim forwards + student steps (x3), replay B student steps (x3)."""
    if item.kind == "infer":
        return item.count * fwd[item.arch]
    if item.kind == "train":
        return item.count * item.batch * 3 * fwd[item.arch]
    if item.kind == "oe":
        n_out = cfg.oe_out_batch or item.batch
        return item.count * (item.batch + n_out) * 3 * fwd[item.arch]
    if item.kind == "dfme":
        b, student, victim, gen = item.batch, fwd[item.arch], fwd[cfg.victim_arch], fwd["generator"]
        grad = cfg.dfme_g_iter * (b * (cfg.dfme_grad_m + 1) * (student + victim) + 3 * b * gen)
        fresh = cfg.dfme_s_iter * b * (gen + victim + 3 * student)
        replay = cfg.dfme_replay * b * 3 * student
        return item.count * (grad + fresh + replay)
    raise ValueError(f"unknown item kind {item.kind!r}")


# ----------------------------------------------------------------------------- table


def build_table(cfg: config.Profile, items: list[Item], steps: dict[str, StepCost] | None,
                fwd: dict[str, float], seeds: int = 3) -> dict:
    """Every item with its CPU-hours (``None`` without measured ``steps``) and GPU-hours, the
    per-notebook sums and the totals for 1 and ``seeds`` seeds."""
    eff, eff_tf32 = GPU_ASSUMPTION["effective_flops"], GPU_ASSUMPTION["utilisation"] * GPU_ASSUMPTION["peak_tf32_flops"]
    rows = []
    for it in items:
        flops = item_flops(it, cfg, fwd)
        cost = steps.get(step_key(it)) if steps else None
        rows.append({**asdict(it), "step": step_key(it), "flops": flops,
                     "cpu_h": None if cost is None else it.count * cost.cpu_s / 3600,
                     "gpu_h": flops / eff / 3600, "gpu_h_tf32": flops / eff_tf32 / 3600})
    notebooks = {}
    for nb in sorted({r["notebook"] for r in rows}):
        mine = [r for r in rows if r["notebook"] == nb]
        notebooks[nb] = {"title": NOTEBOOK_TITLES.get(nb, ""),
                         "cpu_h": None if steps is None else sum(r["cpu_h"] for r in mine),
                         "gpu_h": sum(r["gpu_h"] for r in mine), "gpu_h_tf32": sum(r["gpu_h_tf32"] for r in mine),
                         "flops": sum(r["flops"] for r in mine)}

    def total(k: int) -> dict:
        return {"seeds": k, "cpu_h": None if steps is None else k * sum(n["cpu_h"] for n in notebooks.values()),
                "gpu_h": k * sum(n["gpu_h"] for n in notebooks.values()),
                "gpu_h_tf32": k * sum(n["gpu_h_tf32"] for n in notebooks.values())}

    return {"items": rows, "notebooks": notebooks, "total_1_seed": total(1), f"total_{seeds}_seeds": total(seeds)}


def machine_info(threads: int) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": threads}
    try:
        info["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                 if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def _fmt(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h:,.0f}" if h >= 100 else f"{h:,.1f}" if h >= 1 else f"{h:.2f}"


def to_markdown(result: dict) -> str:
    """The readable table of :func:`main`'s result (cost.md)."""
    t, seeds = result["table"], result["seeds"]
    a, m = result["assumptions"], result["machine"]
    lines = [f"# Cost of the paper-size grid: profile `{result['profile']}`", "",
             f"Written by `python benchmarks/cost_table.py` on {result['date']} ({m.get('cpu_model', m['processor'])}, "
             f"{m['cpu_count']} cores, torch {m['torch']}). One seed runs notebooks 01-11 once; "
             f"{seeds} seeds run them {seeds} times. Submit it with:", "",
             f"    {result['command']}", "",
             "**CPU core-hours** are measured here: every kind of step at paper size, once or twice, with one "
             "torch thread, as process CPU time, times the number of steps the profile implies. "
             "**GPU-hours are estimates only** (no GPU was used): FLOPs counted per forward pass (x3 for training) "
             f"divided by {a['gpu']['effective_flops'] / 1e12:.2f} TFLOP/s, i.e. {a['gpu']['utilisation']:.0%} of an "
             f"{a['gpu']['device']}'s FP32 peak; the TF32 column assumes {a['gpu']['utilisation']:.0%} of its TF32 peak.",
             "", "| notebook | CPU core-h, 1 seed | GPU-h est., 1 seed | GPU-h est. (TF32), 1 seed | "
             f"CPU core-h, {seeds} seeds | GPU-h est., {seeds} seeds |", "|---|---:|---:|---:|---:|---:|"]
    for nb, row in t["notebooks"].items():
        lines.append(f"| {nb} {row['title']} | {_fmt(row['cpu_h'])} | {_fmt(row['gpu_h'])} | {_fmt(row['gpu_h_tf32'])} | "
                     f"{_fmt(None if row['cpu_h'] is None else seeds * row['cpu_h'])} | {_fmt(seeds * row['gpu_h'])} |")
    t1, tk = t["total_1_seed"], t[f"total_{seeds}_seeds"]
    lines.append(f"| **total** | **{_fmt(t1['cpu_h'])}** | **{_fmt(t1['gpu_h'])}** | **{_fmt(t1['gpu_h_tf32'])}** | "
                 f"**{_fmt(tk['cpu_h'])}** | **{_fmt(tk['gpu_h'])}** |")
    limit_h = result["profile_fields"]["job_minutes"] / 60
    over = [f"{nb} ({row['gpu_h']:.1f} h)" for nb, row in t["notebooks"].items() if row["gpu_h"] > limit_h]
    over_tf32 = [f"{nb} ({row['gpu_h_tf32']:.1f} h)" for nb, row in t["notebooks"].items() if row["gpu_h_tf32"] > limit_h]
    from cip_helpers.tools.run import THREADS

    over_cpu = [f"{nb} ({row['cpu_h'] / THREADS.get(nb, 1):,.0f} h on {THREADS.get(nb, 1)} thread"
                f"{'s' if THREADS.get(nb, 1) > 1 else ''})" for nb, row in t["notebooks"].items()
                if row["cpu_h"] is not None and row["cpu_h"] / THREADS.get(nb, 1) > limit_h]
    lines += ["", f"One SLURM job runs one notebook of one seed, with a time limit of job_minutes = "
                  f"{limit_h:g} h. Jobs whose GPU estimate exceeds it: {', '.join(over) or 'none'} "
                  f"(TF32 column: {', '.join(over_tf32) or 'none'}). **As the code stands** (CPU only, "
                  f"job_gpus = {result['profile_fields']['job_gpus']}, the runner's fixed 1-2 torch threads "
                  f"per notebook), the jobs over the limit are {', '.join(over_cpu) or 'none'}: the "
                  "paper-size grid needs GPU placement in the course's code before a cluster can run it."]
    lines += ["", "## Per-step cost measured here", "",
              "| step | CPU s per step (1 thread) | wall s | forward GFLOP per image | steps or images, 1 seed |",
              "|---|---:|---:|---:|---:|"]
    counts: dict[str, int] = {}
    for r in t["items"]:
        counts[r["step"]] = counts.get(r["step"], 0) + r["count"]
    for key, cost in result["per_step"].items():
        unit = "image" if cost["kind"] == "infer" else "round" if cost["kind"] == "dfme" else "step"
        lines.append(f"| `{key}` (per {unit}) | {cost['cpu_s']:.3g} | {cost['wall_s']:.3g} | "
                     f"{result['forward_flops'][cost['arch']] / 1e9:.3f} | {counts.get(key, 0):,} |")
    lines += ["", "## What each notebook does at this size", "",
              "| notebook | item | step | count | how counted | CPU core-h | GPU-h est. |",
              "|---|---|---|---:|---|---:|---:|"]
    for r in t["items"]:
        lines.append(f"| {r['notebook']} | {r['what']} | `{r['step']}` | {r['count']:,} | {r['how']} | "
                     f"{_fmt(r['cpu_h'])} | {_fmt(r['gpu_h'])} |")
    lines += ["", "## Assumptions", ""] + [f"* {x}" for x in a["notes"]] + [f"* {a['gpu']['note']}", ""]
    return "\n".join(lines)


NOTES = [
    "Step counts follow the course's code for one seed with the profile as it is (evidence=False): "
    "every trained model is epochs x ceil(images / batch) steps; a checkpoint reused by content "
    "addressing costs nothing (07's mixed-pool CIP soft-label surrogate is 03's; every DQA surrogate "
    "of notebook 10 is IDA's of 09, because DQA keeps exactly IDA's answers: seen in the CI run, where "
    "every DQA record says surrogate_loaded. Only offline top-T PBD depends on the mix: noise queries "
    "routed ID that change T or the flipped set would give each ratio's offline-CIP run a surrogate "
    "of its own, up to 3 IDA-sized trainings more).",
    "Inference counts are the major forward passes (test accuracy after every epoch, the API's "
    "answers, CIP's routing probe, energies of the pools); bookkeeping passes are rounded up.",
    "07's low-ES-branch runs are counted at the whole mixed pool (an upper bound: they train on the "
    "queries CIP routes low-ES only).",
    "CPU time is measured with random inputs of the dataset's shape (cost does not depend on the "
    "pixels), one torch thread, best of the repeats after a warm-up step; a machine with other jobs "
    "inflates wall time more than process CPU time, which the table uses.",
    "Per-core throughput does not add up perfectly over many cores: a job with c cores needs at "
    "least core-hours / c hours.",
    "The stand-in pools (data_prep.standins) are smaller than the real ones; the plan uses the "
    "profile's pool sizes (300,000 outliers, 50,000 Knockoff images, 5,640 textures), as a cluster "
    "run with the real pools has them.",
    "The course's code places every model and tensor on the CPU (no CUDA device placement), so the "
    "GPU-hours are what a device-aware version would need; as the code stands, a job computes on the "
    "CPUs it is given, and the CPU core-hours column is its cost.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="paper-fmnist", choices=sorted(config.PROFILES))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a profile field")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the multi-seed total (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per step (best is kept; DFME: 1)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/<profile>/)")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and its FLOPs, measure nothing")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field.strip()] = config.coerce_field(field.strip(), value)
    cfg = config.get_profile(args.profile, **overrides)
    items = plan(cfg)
    fwd = forward_flops(cfg, {i.arch for i in items} | {cfg.victim_arch})
    if args.plan_only:
        table = build_table(cfg, items, None, fwd, args.seeds)
        for r in table["items"]:
            print(f"{r['notebook']} {r['step']:<28} {r['count']:>14,}  {r['gpu_h']:9.2f} GPU-h  {r['what']}")
        print(f"total 1 seed: {table['total_1_seed']['gpu_h']:.1f} GPU-h (estimate)")
        return 0
    out = args.out or (config.results_root() / (cfg.tag or cfg.name))
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    print(f"measuring {len({step_key(i) for i in items})} kinds of step for profile {cfg.name!r} (1 torch thread)")
    steps = measure(cfg, items, args.repeats)
    table = build_table(cfg, items, steps, fwd, args.seeds)
    seed_list = ",".join(map(str, range(args.seeds)))
    command = f"python -m cip_helpers.tools.run --profile {cfg.name} --seeds {seed_list} --executor slurm"
    result = {
        "profile": cfg.name, "overrides": {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(1), "loadavg_1min_before": load_before,
                    "loadavg_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                    "measure_seconds": round(time.perf_counter() - started, 1)},
        "seeds": args.seeds, "command": command,
        "sizes": sizes(cfg), "profile_fields": {f: getattr(cfg, f) for f in (
            "dataset", "victim_arch", "surrogate_arch", "dfme_student_arch", "victim_epochs", "batch_size", "oe_epochs",
            "oe_in_batch", "oe_out_batch", "surrogate_epochs", "ida_epochs", "surrogate_batch", "knockoff_queries",
            "dfme_queries", "dfme_batch", "n_innocent", "pools", "job_gpus", "job_minutes")},
        "assumptions": {"gpu": GPU_ASSUMPTION, "notes": NOTES},
        "per_step": {k: asdict(v) for k, v in steps.items()},
        "forward_flops": fwd, "table": table,
    }
    from cip_helpers.course.store import write_json, write_text

    write_json(out / "cost.json", result)
    write_text(out / "cost.md", to_markdown(result))
    t1, tk = table["total_1_seed"], table[f"total_{args.seeds}_seeds"]
    print(f"total, 1 seed: {t1['cpu_h']:,.0f} CPU core-hours here, {t1['gpu_h']:,.0f} GPU-hours (estimate); "
          f"{args.seeds} seeds: {tk['cpu_h']:,.0f} / {tk['gpu_h']:,.0f}")
    print(f"wrote {out / 'cost.json'} and {out / 'cost.md'} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
