"""Ownership verification: binomial p-values, conservative null rate, verdicts."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cip_helpers import verification as v


def test_binomial_p_values_match_closed_forms():
    # P(X >= 7) for Binomial(7, 0.1) = 0.1^7
    assert v.binomial_p_value(7, 7, 0.1) == pytest.approx(1e-7, rel=1e-9)
    # P(X >= 0) = 1
    assert v.binomial_p_value(0, 20, 0.3) == pytest.approx(1.0)
    # P(X >= 2) for Binomial(3, 0.5) = (3 + 1) / 8
    assert v.binomial_p_value(2, 3, 0.5) == pytest.approx(0.5)
    expected = sum(math.comb(10, k) * 0.2**k * 0.8 ** (10 - k) for k in range(6, 11))
    assert v.binomial_p_value(6, 10, 0.2) == pytest.approx(expected)
    with pytest.raises(ValueError):
        v.binomial_p_value(5, 3, 0.1)
    with pytest.raises(ValueError):
        v.binomial_p_value(1, 3, 0.0)


def test_null_rate_is_conservative_and_at_least_chance():
    assert v.null_agreement_rate([(0, 50), (0, 50)], n_classes=10) == 0.1  # chance floor
    p0 = v.null_agreement_rate([(10, 50), (12, 50), (8, 50)], n_classes=10)
    assert 12 / 50 < p0 < 0.4  # above the most agreeable model's rate, but not absurdly
    assert v.null_agreement_rate([], n_classes=4) == 0.25
    # heterogeneous innocents: the null follows the worst one (pooling would give ~11/64)
    p0 = v.null_agreement_rate([(0, 32), (11, 32)], n_classes=10)
    assert p0 > 11 / 32 and not v.verify(11, 32, p0)["flagged"]


def test_innocent_like_suspect_is_not_flagged_and_stolen_one_is():
    p0 = v.null_agreement_rate([(2, 20), (1, 20), (3, 20)], n_classes=10)
    innocent = v.verify(m=3, t=20, p0=p0, alpha=0.01)
    stolen = v.verify(m=19, t=20, p0=p0, alpha=0.01)
    assert not innocent["flagged"] and innocent["p_value"] > 0.01
    assert stolen["flagged"] and stolen["p_value"] < 1e-6
    assert not v.verify(m=0, t=0, p0=p0)["flagged"]  # no triggers, no claim


def test_count_agreements_uses_the_models_top1():
    class Fixed(nn.Module):
        def forward(self, x):
            return nn.functional.one_hot((2 * x.flatten(1)[:, 0]).long(), 3).float()

    x = torch.tensor([0.0, 0.5, 1.0, 0.5]).view(4, 1, 1, 1)  # raw images in [0, 1]: classes 0 1 2 1
    assert v.count_agreements(Fixed(), x, torch.tensor([0, 1, 0, 1])) == 3
    with pytest.raises(ValueError):
        v.count_agreements(Fixed(), x, torch.tensor([0, 1]))
