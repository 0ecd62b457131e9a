"""Attackers who know CIP (cip_helpers.course.adaptive, notebook 12): the averaging thief's pieces
on toy APIs, the filter and selection rules, the augmented copies, the across-seeds aggregate, and
the evidence run's whole path (every thief, the ownership verdicts, adaptive.json and its content
addressing) on the smoke profile."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from cip_helpers.course import adaptive, config
from conftest import one_thread_smoke

K = 4
"""Classes of the toy APIs."""


def crops(n: int = 12, seed: int = 0) -> torch.Tensor:
    """Toy 'photos' (n, 1, 8, 8) in [0, 1]; the hidden top-1 of crop i is i % K (:func:`hidden_of`)."""
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.5
    x[:, 0, 0, 0] = torch.arange(n) % K / 10  # the hidden class, readable from the first pixel
    return x


def hidden_of(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0, 0, 0] * 10).round().long()


class ShuffleAPI:
    """A toy CIP high-ES branch: the hidden row (0.4 on the hidden class, 0.2 elsewhere) with its
    entries permuted so that the top mass never stays on the hidden class. ``keyed=False``: fresh
    randomness per ask; ``keyed=True``: the permutation is a function of the image's bytes (the
    same query always gets the same answer)."""

    name = "toy"
    n_classes = K

    def __init__(self, keyed: bool) -> None:
        self.keyed, self.generator = keyed, torch.Generator().manual_seed(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for img, h in zip(x, hidden_of(x)):
            row = torch.full((K,), 0.2)
            row[h] = 0.4
            g = (torch.Generator().manual_seed(int(hashlib.sha256(img.numpy().tobytes()).hexdigest()[:8], 16))
                 if self.keyed else self.generator)
            while True:
                perm = torch.randperm(K, generator=g)
                if perm[h] != h:
                    break
            out.append(row[perm])
        return torch.stack(out)


# ----------------------------------------------------------------------------- (a) averaging


def test_nudges_change_what_they_say_and_stay_in_range():
    x = crops()
    g = torch.Generator().manual_seed(0)
    assert adaptive.nudge(x, "repeat", g) is x
    ulp = adaptive.nudge(x, "ulp", g)
    changed = (ulp != x).flatten(1).sum(1)
    assert changed.tolist() == [1] * len(x)  # one pixel, by one float32 ulp
    assert float((ulp - x).abs().max()) < 1e-6
    noise = adaptive.nudge(x, "noise", g)
    assert float((noise - x).abs().max()) <= 1 / 255 + 1e-7 and noise.min() >= 0 and noise.max() <= 1
    pixel = adaptive.nudge(x, "pixel", g)
    diff = (pixel != x).flatten(1)
    assert diff.sum(1).le(1).all() and torch.allclose(pixel[pixel != x], 1 - x[pixel != x])
    with pytest.raises(ValueError, match="kind must be one of"):
        adaptive.nudge(x, "blur", g)


def test_averaging_recovers_fresh_randomness_and_not_a_keyed_answer():
    """Against per-ask randomness the LOWEST mean finds the hidden class (the shuffle never leaves
    the top mass there); the HIGHEST does not. Against keyed randomness repeats add nothing, but a
    nudge that changes the bytes buys a fresh draw."""
    x, h = crops(), hidden_of(crops())
    g = torch.Generator().manual_seed(0)
    means = adaptive.running_means(ShuffleAPI(keyed=False), x, 200, "repeat", g)
    assert means.shape == (200, len(x), K) and torch.allclose(means.sum(-1), torch.ones(200, len(x)))
    assert (adaptive.guess_top1(means[-1], "lowest") == h).all()
    assert not (adaptive.guess_top1(means[-1], "highest") == h).any()
    keyed = adaptive.running_means(ShuffleAPI(keyed=True), x, 50, "repeat", g)
    assert torch.equal(keyed[0], keyed[-1])  # every ask gave the same answer
    nudged = adaptive.running_means(ShuffleAPI(keyed=True), x, 200, "noise", g)
    assert (adaptive.guess_top1(nudged[-1], "lowest") == h).float().mean() > 0.9
    with pytest.raises(ValueError, match="rule must be one of"):
        adaptive.guess_top1(means[-1], "middle")


def test_poisoned_crops_and_the_chance_bound():
    x = crops(40)

    class Hidden(nn.Module):
        def forward(self, z):
            return nn.functional.one_hot(hidden_of(z), K).float()

    idx, asked = adaptive.poisoned_crops(ShuffleAPI(keyed=False), Hidden(), x, 5, chunk=8)
    assert len(idx) == 5 and asked == 8  # every answer of the first chunk is poisoned
    assert adaptive.chance_bound(0, 0.1) is None
    from scipy import stats
    b = adaptive.chance_bound(100, 0.1, 0.01)
    assert stats.binom.sf(round(b * 100) - 1, 100, 0.1) <= 0.01 < stats.binom.sf(round(b * 100) - 2, 100, 0.1)


# ----------------------------------------------------------------------------- (b)-(d) rules


def test_filter_and_selection_rules():
    answers = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.5, 0.5, 0.0]])
    assert adaptive.looks_poisoned(answers).tolist() == [False, True, False]

    class Energy(nn.Module):  # logits whose logsumexp is the first pixel
        def forward(self, z):
            return torch.stack([z[:, 0, 0, 0], torch.full_like(z[:, 0, 0, 0], -50.0)], 1)

    x = torch.zeros(5, 1, 4, 4)
    x[:, 0, 0, 0] = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert adaptive.select_in_distribution(Energy(), x, 2).tolist() == [1, 3]  # lowest energy: largest lse


def test_augmented_copies_are_shifted_flipped_and_seeded():
    x = torch.zeros(30, 1, 10, 10)
    x[:, 0, 4:6, 2:4] = 1.0
    a = adaptive.augment(x, torch.Generator().manual_seed(3))
    b = adaptive.augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert torch.allclose(a.sum((1, 2, 3)), x.sum((1, 2, 3)))  # a 2-pixel shift keeps the blob inside
    assert (a != x).flatten(1).any(1).float().mean() > 0.5
    assert adaptive.budget_points(4000) == [500, 1000, 2000, 4000, 8000, 12000]


def test_triggers_among_keeps_the_log_of_the_queries_sent():
    from cip_helpers.method.defenses import TriggerSet

    x = crops(6)
    api = type("A", (), {"name": "cip", "trigger_set": TriggerSet(x[[1, 4]], torch.eye(K)[[1, 0]],
                                                                  torch.eye(K)[[2, 3]])})()
    tx, labels = adaptive.triggers_among(api, x[:3])
    assert torch.equal(tx, x[[1]]) and labels.tolist() == [2]
    assert adaptive.triggers_among(type("B", (), {"name": "dp"})(), x) is None


def test_aggregate_gives_mean_and_sd_per_row():
    def seed(s, acc, flagged):
        return {"seed": s, "rows": [
            {"attacker": "budget", "variant": "500 queries", "defense": "cip", "label_type": "hard",
             "surrogate_acc": acc, "cost": 0.9 - acc, "p_value": 0.5, "flagged": flagged, "T": None if s > 5 else 3},
            {"attacker": "averaging", "variant": "repeat", "defense": "cip", "rule": "lowest", "recovery": 0.1 * s}]}

    rows = adaptive.aggregate([seed(0, 0.5, True), seed(1, 0.7, False), seed(2, 0.6, None)])
    budget = next(r for r in rows if r["attacker"] == "budget")
    assert budget["n"] == 3 and budget["seeds"] == [0, 1, 2] and budget["label_type"] == "hard"
    assert budget["surrogate_acc"] == pytest.approx(0.6) and budget["surrogate_acc_sd"] == pytest.approx(0.1)
    assert (budget["flagged"], budget["judged"]) == (1, 2)
    avg = next(r for r in rows if r["attacker"] == "averaging")
    assert avg["recovery"] == pytest.approx(0.1) and avg["rule"] == "lowest"
    one = adaptive.aggregate([seed(7, 0.5, None)])[0]
    assert one["surrogate_acc_sd"] is None and one["T"] is None and one["judged"] == 0


# ----------------------------------------------------------------------------- the evidence run on smoke


@pytest.fixture(scope="module")
def smoke_evidence(tmp_path_factory):
    """adaptive.run on the smoke profile with ``evidence`` on (a shrunk averaging attack: 3 crops,
    R up to 4), in a results root of this module, one torch thread."""
    with one_thread_smoke(tmp_path_factory.mktemp("adaptive_results")), pytest.MonkeyPatch.context() as mp:
        mp.setattr(adaptive, "R_GRID", (1, 2, 4))
        cfg = config.get_profile("smoke", evidence=True, adaptive_crops=3, adaptive_repeats=4)
        result, why = adaptive.load_or_run(cfg, verbose=False)
        yield cfg, result, why


@pytest.mark.slow
def test_the_evidence_path_runs_every_thief_on_smoke(smoke_evidence):
    cfg, result, why = smoke_evidence
    assert why == "" and (cfg.results_dir / adaptive.FILE).exists()
    names = adaptive.available()
    assert {"none", "dp", "dawn", "cip"} <= set(names)
    rows = result["rows"]
    pool = result["mixed_pool"]
    for name in names:
        mine = [r for r in rows if r["defense"] == name]
        assert {r["attacker"] for r in mine} == {"averaging", "poison_aware", "selection", "budget"}, name
        budget = [r["queries"] for r in mine if r["attacker"] == "budget"]
        assert budget == adaptive.budget_points(pool) and max(budget) == 3 * pool
        for r in mine:
            if "surrogate_acc" not in r:
                continue
            judged = name in adaptive.TRIGGER_DEFENSES and r["trained"] > 0
            assert (r["T"] is not None) == judged, (name, r["variant"])
            if judged:
                assert 0 <= r["m"] <= r["T"] and 0 <= r["p_value"] <= 1
            if name == "none" and r["surrogate_acc"] is not None:
                assert r["cost"] == 0
    curves = result["averaging"]["cip"]["curves"]
    assert set(curves) == set(adaptive.NUDGES) and [n for n, _ in curves["repeat"]["lowest"]] == [1, 2, 4]
    assert result["checkpoints"].keys() >= {"victim_all", "oe_victim_all"}
    assert result["defenses"]["cip"]["weights_sha256"] == result["checkpoints"]["oe_victim_all"]


@pytest.mark.slow
def test_adaptive_json_is_read_only_for_its_weights_and_settings(smoke_evidence):
    cfg, result, _ = smoke_evidence  # the fixture's results root and shrunk sizes hold here too
    # the student's run: evidence off, reads what the evidence run wrote (with the fixture's sizes)
    plain = config.get_profile("smoke", adaptive_crops=3, adaptive_repeats=4)
    stored, why = adaptive.load_or_run(plain)
    assert why == "" and stored["rows"] == json.loads(json.dumps(result["rows"]))
    other, why = adaptive.load(config.get_profile("smoke", surrogate_epochs=2, adaptive_crops=3, adaptive_repeats=4))
    assert other is None and "surrogate_epochs" in why
    path = cfg.results_dir / adaptive.FILE
    saved = path.read_text()
    try:
        tampered = json.loads(saved)
        tampered["checkpoints"]["victim_all"] = "0" * 64
        path.write_text(json.dumps(tampered))
        stale, why = adaptive.load(plain)
        assert stale is None and "victim_all.pt" in why
        assert adaptive.COMMAND in adaptive.missing_message(why)
    finally:
        path.write_text(saved)
    missing, why = adaptive.load(config.get_profile("smoke", tag="nowhere"))
    assert missing is None and "no adaptive.json" in why
    agg = adaptive.aggregate([result, {**result, "seed": 1}])
    assert all(r["n"] == 2 for r in agg)
    assert all(r.get("surrogate_acc_sd") in (None, 0.0) for r in agg)
