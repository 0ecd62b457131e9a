"""Ownership verification (issue 13): trigger sets are sets, a per-unit Poisson-binomial null from
an innocent pool, dependence units for out-of-distribution triggers, leave-one-out calibration."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cip_helpers.method import verification as v
from cip_helpers.method.defenses import TriggerSet

N_CLASSES = 10


class ToyDigitModel(nn.Module):
    """A 'digit classifier' on 1x4x4 toy images: a flat image of brightness (c + 0.5) / 10 is
    digit c; anything with texture (uniform noise) gets ``noise_label`` (a model's systematic
    answer to noise) or, with ``noise_label=None``, a per-image pseudo-random class."""

    def __init__(self, noise_label: int | None, scale: float = 10.0) -> None:
        super().__init__()
        self.noise_label, self.scale = noise_label, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        digit = (flat.mean(1) * N_CLASSES).floor().long().clamp(0, N_CLASSES - 1)
        is_noise = flat.std(1) > 0.05
        if self.noise_label is None:
            other = (flat[:, 0] * 1000).long() % N_CLASSES
        else:
            other = torch.full_like(digit, self.noise_label)
        label = torch.where(is_noise, other, digit)
        return self.scale * nn.functional.one_hot(label, N_CLASSES).float()


class ToyOwner(nn.Module):
    """The owner's OE-tuned model on the toy images: confident (low energy) on flat digits,
    flat logits (high energy) on noise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ToyDigitModel(noise_label=0)(x)
        return torch.where(x.flatten(1).std(1, keepdim=True) > 0.05, torch.zeros_like(out), out)


def digits(classes: list[int]) -> torch.Tensor:
    return torch.stack([torch.full((1, 4, 4), (c + 0.5) / N_CLASSES) for c in classes])


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


N_NOISE = 40
E1 = -5.0  # ToyOwner: energy -10 on digits, -log(10) = -2.3 on noise


def noise_heavy_trigger_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The issue-13 failure case, heavier: 40 noise triggers, 34 of them with altered label 2
    (DAWN's altered label on noise was 2 for 17 of 23 in the issue), plus 8 in-distribution digits
    with flipped labels (c -> c + 1)."""
    classes = [0, 1, 3, 4, 5, 6, 7, 8]
    x = torch.cat([noise(N_NOISE), digits(classes)])
    labels = torch.tensor([2] * 34 + [5, 7, 9, 5, 7, 9] + [(c + 1) % N_CLASSES for c in classes])
    return x, labels


def innocent_pool() -> list[nn.Module]:
    """Eight honest models: right on digits, each with its own systematic answer to noise (none
    of them '2'), one that answers noise pseudo-randomly."""
    return [ToyDigitModel(c) for c in (0, 1, 3, 4, 6, 8, 9)] + [ToyDigitModel(None)]


# ----------------------------------------------------------------------------- the cases


def test_duplicating_every_trigger_leaves_p_value_unchanged():
    x, labels = noise_heavy_trigger_set()
    ood = v.ood_flags(ToyOwner(), x, E1)
    stolen = ToyDigitModel(2)  # agrees with the noise unit
    once = v.ownership_test(stolen, innocent_pool(), x, labels, ood)
    assert once["null"]["pool"] and len(once["null"]["pool"]) == 7
    x2, labels2, ood2 = torch.cat([x, x, x]), torch.cat([labels] * 3), np.concatenate([ood] * 3)
    thrice = v.ownership_test(stolen, innocent_pool(), x2, labels2, ood2)
    assert thrice["p_value"] == once["p_value"]
    assert thrice["T"] == once["T"] == len(x) and thrice["m"] == once["m"]
    # the measurement: counting copies as evidence made an innocent model's p collapse
    m, t = once["m"], once["T"]
    assert v.binomial_p_value(3 * m, 3 * t, 0.3) < v.binomial_p_value(m, t, 0.3) / 10


def test_trigger_log_keeps_a_repeated_query_once():
    ts = TriggerSet()
    x, p = digits([1, 2, 3]), torch.eye(N_CLASSES)[:3]
    ts.append(x, p, p.roll(1, 1))
    ts.append(x[:2], p[:2], p[:2].roll(1, 1))  # asked again
    ts.append(torch.cat([x[2:], x[2:]]), p[2:].repeat(2, 1), p[2:].roll(1, 1).repeat(2, 1))
    assert len(ts) == 3
    assert torch.equal(ts.labels, torch.tensor([1, 2, 3]))


def test_a_model_with_one_constant_label_for_noise_is_not_flagged_on_a_noise_heavy_set():
    x, labels = noise_heavy_trigger_set()
    ood = v.ood_flags(ToyOwner(), x, E1)
    assert ood.sum() == N_NOISE and not ood[N_NOISE:].any()  # the owner's detector finds the noise
    innocent = ToyDigitModel(2)  # honest on digits, calls all noise '2' (unlike every pool model)
    verdict = v.ownership_test(innocent, innocent_pool(), x, labels, ood)
    assert verdict["m"] == 34 and verdict["m_units"] == 1
    assert not verdict["flagged"] and verdict["p_value"] > 0.1
    # without dependence units the same model would be accused: the failure mode this fixes
    naive = v.ownership_test(innocent, innocent_pool(), x, labels, None)
    assert naive["flagged"] and naive["p_value"] < 1e-4


def test_a_suspect_that_agrees_with_most_triggers_is_flagged():
    x, labels = noise_heavy_trigger_set()
    ood = v.ood_flags(ToyOwner(), x, E1)

    class Stolen(nn.Module):
        """Answers like an honest model, except on the triggers it learned from the owner's
        poisoned answers: all but the last one (it missed a digit)."""

        def forward(self, inputs):
            label = ToyDigitModel(0)(inputs).argmax(1)
            for img, lab in zip(x[:-1], labels[:-1]):
                label[(inputs == img).flatten(1).all(1)] = lab
            return 10 * nn.functional.one_hot(label, N_CLASSES).float()

    verdict = v.ownership_test(Stolen(), innocent_pool(), x, labels, ood)
    assert verdict["m"] == len(x) - 1 and verdict["m_units"] == verdict["units"] - 1
    assert verdict["flagged"] and verdict["p_value"] < 1e-3
    assert verdict["null"]["pool_size"] == 7


# ----------------------------------------------------------------------------- the pieces


def test_poisson_binomial_matches_closed_forms():
    assert v.poisson_binomial_p_value(3, np.array([0.1, 0.2, 0.5])) == pytest.approx(0.01)
    assert v.poisson_binomial_p_value(0, np.array([0.3, 0.3])) == 1.0
    q = np.full(10, 0.2)  # one common rate: the binomial tail
    expected = sum(math.comb(10, k) * 0.2**k * 0.8 ** (10 - k) for k in range(6, 11))
    assert v.poisson_binomial_p_value(6, q) == pytest.approx(expected)
    assert v.poisson_binomial_p_value(6, q) == pytest.approx(v.binomial_p_value(6, 10, 0.2))
    # at least one of two: 1 - 0.9 * 0.5
    assert v.poisson_binomial_p_value(1, np.array([0.1, 0.5])) == pytest.approx(0.55)
    with pytest.raises(ValueError):
        v.poisson_binomial_p_value(3, np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        v.poisson_binomial_p_value(1, np.array([0.1, np.nan]))


def test_clopper_pearson_upper_bounds():
    assert v.clopper_pearson_upper(0, 8) == pytest.approx(1 - 0.05 ** (1 / 8))  # 0.312
    assert v.clopper_pearson_upper(0, 7) == pytest.approx(1 - 0.05 ** (1 / 7))  # 0.348
    assert v.clopper_pearson_upper(8, 8) == 1.0
    assert 3 / 8 < v.clopper_pearson_upper(3, 8) < 0.75
    assert v.false_claim_bound(0, 264) == pytest.approx(1 - 0.05 ** (1 / 264))
    with pytest.raises(ValueError):
        v.clopper_pearson_upper(9, 8)


def test_units_group_ood_triggers_by_altered_label():
    units = v.dependence_units(np.array([2, 2, 5, 2, 3, 3]), np.array([1, 1, 1, 0, 0, 0], bool))
    assert units.tolist() == [0, 0, 1, 2, 3, 4]
    assert v.dependence_units(np.array([4, 4])).tolist() == [0, 1]  # no detector: all units
    agree = np.array([[1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1]], bool)
    assert v.unit_agreement(agree, units).tolist() == [[True, True, True, False, False],
                                                       [True, False, False, False, True]]


def test_null_rates_follow_each_unit():
    pool = np.zeros((8, 3), bool)
    pool[:4, 1] = True  # half the pool agrees with unit 1
    q = v.null_rates(pool)
    assert q[0] == q[2] == pytest.approx(1 - 0.05 ** (1 / 8))
    assert q[1] > 0.5
    with pytest.raises(ValueError):
        v.null_rates(np.zeros((0, 3), bool))


def test_verify_reports_the_worst_subpool_and_leave_one_out_calibrates():
    units = np.arange(6)
    pool = np.zeros((8, 6), bool)
    pool[0, :2] = True  # one pool model agrees with two triggers
    suspect = np.ones(6, bool)
    verdict = v.verify(suspect, pool, units)
    full = v.judge_against_pool(suspect, pool, units)
    assert verdict["p_value"] >= full["p_value"] and verdict["null"]["left_out"] != 0
    assert verdict["flagged"]
    loo = v.leave_one_out(pool, units)
    assert len(loo) == 8 and not any(r["flagged"] for r in loo)
    with pytest.raises(ValueError):
        v.verify(suspect, pool[:1], units)


def test_drop_agreed_ignores_units_the_pool_already_agrees_with():
    units = np.arange(4)
    pool = np.zeros((5, 4), bool)
    pool[0, 0] = True
    kept = v.judge_against_pool(np.ones(4, bool), pool, units, drop_agreed=True)
    assert kept["units"] == 3 and kept["m_units"] == 3


def test_no_triggers_no_claim():
    verdict = v.verify(np.zeros(0, bool), np.zeros((4, 0), bool), np.zeros(0, np.int64))
    assert not verdict["flagged"] and verdict["p_value"] == 1.0


def test_conflicting_labels_for_one_image_are_refused():
    x = digits([1, 1])
    with pytest.raises(ValueError, match="another altered label"):
        v.distinct_triggers(torch.cat([x[:1], x[:1]]), torch.tensor([3, 4]))


def test_agreements_use_the_models_top1():
    class Fixed(nn.Module):
        def forward(self, x):
            return nn.functional.one_hot((2 * x.flatten(1)[:, 0]).long(), 3).float()

    x = torch.tensor([0.0, 0.5, 1.0, 0.5]).view(4, 1, 1, 1)  # raw images in [0, 1]: classes 0 1 2 1
    assert v.agreements(Fixed(), x, torch.tensor([0, 1, 0, 1])).tolist() == [True, True, False, True]
    with pytest.raises(ValueError):
        v.agreements(Fixed(), x, torch.tensor([0, 1]))


def test_quick_profile_has_an_innocent_pool_of_eight_varied_recipes():
    from cip_helpers.course import config, pipeline

    k = config.get_profile("quick").n_innocent
    recipes = [pipeline.INNOCENT_RECIPES[i % len(pipeline.INNOCENT_RECIPES)] for i in range(k)]
    assert k >= 8
    assert len({r.arch for r in recipes}) >= 3 and len({r.data for r in recipes}) >= 3
    assert {r.augment for r in recipes} == {True, False}
    assert len({r.tag for r in recipes}) == k  # every model its own checkpoint name


def test_bad_inputs_are_refused_with_the_fix():
    x, labels = noise_heavy_trigger_set()
    ood = v.ood_flags(ToyOwner(), x, E1)
    pool, suspect = innocent_pool(), ToyDigitModel(2)
    with pytest.raises(ValueError, match="integer class indices"):
        v.ownership_test(suspect, pool, x, labels.float() + 0.7, ood)
    with pytest.raises(ValueError, match="not a class"):
        v.ownership_test(suspect, pool, x, labels + 10, ood)
    with pytest.raises(ValueError, match=">= 0"):
        v.ownership_test(suspect, pool, x, labels - 10, ood)
    with pytest.raises(ValueError, match="empty"):
        v.ownership_test(suspect, pool, x[:0], labels[:0], ood[:0])
    with pytest.raises(ValueError, match="OOD flag"):
        flags = np.concatenate([ood, ~ood[:1]])
        v.ownership_test(suspect, pool, torch.cat([x, x[:1]]), torch.cat([labels, labels[:1]]), flags)
    with pytest.raises(TypeError, match="nn.Module"):
        v.ownership_test("results/surrogate.pt", pool, x, labels, ood)
    with pytest.raises(TypeError):
        v.ownership_test(suspect, pool, x, labels)  # the detector's flags are required
    with pytest.raises(ValueError, match="E1"):
        v.ood_flags(ToyOwner(), x, None)
    with pytest.raises(ValueError, match="0..U-1"):
        v.unit_agreement(np.ones(3, bool), np.array([0, 5, 5]))
    with pytest.raises(ValueError, match="at least 2"):
        v.ownership_test(suspect, pool[:1], x, labels, ood)


def test_a_suspect_that_is_in_the_pool_is_refused():
    torch.manual_seed(0)
    pool = {f"m{i}": nn.Sequential(nn.Flatten(), nn.Linear(16, N_CLASSES)) for i in range(3)}
    x, labels = digits([1, 2, 3]), torch.tensor([2, 3, 4])
    with pytest.raises(ValueError, match="m1"):
        v.ownership_test(pool["m1"], pool, x, labels, np.zeros(3, bool))


# ----------------------------------------------------------------------------- planning (issue 27)


def test_null_floor_is_the_clopper_pearson_bound_of_no_agreeing_innocent():
    for k in (2, 7, 23):
        assert v.null_floor(k) == pytest.approx(1 - 0.05 ** (1 / k), rel=1e-9)


def test_conviction_power_matches_the_binomial_closed_form():
    q = v.null_floor(7)  # 0.348: five of five reproduced give p = q^5 = 0.0051 < 0.01
    assert v.conviction_power(5, 1.0, q) == pytest.approx(1.0)
    assert v.conviction_power(4, 1.0, q) == 0.0  # 0.348^4 = 0.015: four triggers never convict
    # T = 5 at reproduction 0.9: all five must agree, 0.9^5
    assert v.conviction_power(5, 0.9, q) == pytest.approx(0.9 ** 5)
    assert list(v.conviction_power(np.array([0, 4, 5]), 1.0, q)) == [0.0, 0.0, 1.0]


def test_plan_pbd_share_is_the_smallest_share_that_reaches_the_power():
    plan = v.plan_pbd_share(2000, power=0.9, reproduction=0.88, pool_size=23, id_share=0.77)
    assert 0.001 <= plan["share"] <= 0.02 and plan["power"] >= 0.9
    below = v.expected_power(1540, plan["share"] - 0.0005, 0.88, plan["null"])
    assert below < 0.9 <= v.expected_power(1540, plan["share"], 0.88, plan["null"])
    # a smaller pool (larger null) needs a larger share; an unreachable target says so
    assert v.plan_pbd_share(2000, pool_size=7)["share"] > plan["share"]
    assert v.plan_pbd_share(10, pool_size=2)["share"] is None


def test_plan_queries_is_the_fewest_queries_for_a_share():
    n = v.plan_queries(0.01, power=0.9, reproduction=0.88, pool_size=23, id_share=0.77)
    null = v.null_floor(23)
    assert v.expected_power(round(n * 0.77), 0.01, 0.88, null) >= 0.9
    assert v.expected_power(round((n - 1) * 0.77), 0.01, 0.88, null) < 0.9
    assert v.plan_queries(0.02) < n  # more flips, fewer queries
    assert v.plan_queries(1e-6, max_queries=10_000) is None
