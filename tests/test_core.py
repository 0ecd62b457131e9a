"""Unit tests for config, data splits, scores, checkpoints and training helpers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cip_helpers.method import scores
from cip_helpers.course import config, data, store, training
from cip_helpers.method.inputs import as_images
from cip_helpers.method.models import ARCHS, build_model

# ------------------------------------------------------------------ config


def test_profiles_exist_and_smoke_is_smaller_than_quick():
    quick, smoke, full = (config.get_profile(n) for n in ("quick", "smoke", "full"))
    assert smoke.n_train < quick.n_train and smoke.victim_epochs < quick.victim_epochs
    assert full.victim_arch == "wrn28_10" and full.victim_epochs == 100
    assert full.knockoff_queries == 50_000
    assert (quick.p1, quick.p2) == (95.0, 99.9)


def test_overrides_replace_fields_and_reject_unknown():
    cfg = config.get_profile("smoke", victim_epochs=3, knockoff_curve=[10, 20])
    assert cfg.victim_epochs == 3 and cfg.knockoff_curve == (10, 20)
    with pytest.raises(ValueError, match="unknown profile field"):
        config.get_profile("smoke", victim_epoch=3)
    with pytest.raises(ValueError, match="unknown profile"):
        config.get_profile("huge")


def test_results_dir_follows_env(results_root):
    cfg = config.get_profile("smoke")
    assert cfg.profile_dir == results_root / "smoke" and cfg.results_dir == results_root / "smoke" / "seed-0"
    assert config.get_profile("smoke", tag="mine").results_dir == results_root / "mine" / "seed-0"
    assert config.get_profile("smoke", seed=2).results_dir == results_root / "smoke" / "seed-2"


# ------------------------------------------------------------------ data


def test_embedded_split_sizes_balance_and_disjointness():
    d = data.id_data(config.get_profile("quick"))
    assert d.train_x.shape == (4000, 1, 28, 28) and d.test_x.shape == (1000, 1, 28, 28)
    assert 0.0 <= float(d.train_x.min()) and float(d.train_x.max()) <= 1.0
    assert d.train_y.bincount().tolist() == [400] * 10
    assert d.test_y.bincount().tolist() == [100] * 10
    half, attacker = set(d.half_idx.tolist()), set(d.attacker_idx.tolist())
    assert not half & attacker and len(half | attacker) == 4000
    assert d.split("half")[1].bincount().tolist() == [200] * 10
    assert d.split("attacker")[1].bincount().tolist() == [200] * 10
    # train and test images are different digits (no image appears in both)
    train_keys = {hash(x.numpy().tobytes()) for x in d.train_x}
    assert not any(hash(x.numpy().tobytes()) in train_keys for x in d.test_x)


def test_split_is_deterministic_and_smoke_is_a_stratified_subset():
    a = data._id_data.__wrapped__("mnist_embedded", 600, 200)
    b = data._id_data.__wrapped__("mnist_embedded", 600, 200)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.half_idx, b.half_idx)
    assert a.train_y.bincount().tolist() == [60] * 10 and len(a.test_y) == 200


def test_class_balanced_half_handles_odd_counts():
    y = torch.tensor([0] * 5 + [1] * 4 + [2] * 1)
    first, second = data.class_balanced_half(y, seed=1)
    assert y[first].bincount(minlength=3).tolist() == [2, 2, 0]
    assert sorted(first.tolist() + second.tolist()) == list(range(10))
    with pytest.raises(ValueError):
        data.class_balanced_half(torch.empty(0, dtype=torch.long))


def test_photo_pools_are_disjoint_and_pools_have_the_right_shape():
    assert not set(data.OE_PHOTOS) & set(data.KNOCKOFF_PHOTOS)
    assert not (set(data.OE_PHOTOS) | set(data.KNOCKOFF_PHOTOS)) & set(data.TEXTURE_PHOTOS)
    cfg = config.get_profile("smoke")
    for name in data.POOLS:
        pool = data.query_pool(cfg, name)
        assert pool.shape == (data._pool_size(cfg, name), 1, 28, 28)
        assert 0.0 <= float(pool.min()) and float(pool.max()) <= 1.0
    assert not torch.equal(data.query_pool(cfg, "outlier")[:50], data.query_pool(cfg, "knockoff")[:50])
    with pytest.raises(ValueError, match="unknown query pool"):
        data.query_pool(cfg, "imagenet")


def test_random_crops_are_seeded():
    img = [np.random.default_rng(0).random((64, 80)).astype(np.float32)]
    a, b = data.random_crops(img, 5, 28, seed=3), data.random_crops(img, 5, 28, seed=3)
    assert torch.equal(a, b) and a.shape == (5, 1, 28, 28)
    assert not torch.equal(a, data.random_crops(img, 5, 28, seed=4))


# ------------------------------------------------------------------ scores


def test_energy_of_zero_logits_is_minus_log_k():
    e = scores.energy_score(torch.zeros(3, 10))
    assert torch.allclose(e, torch.full((3,), -math.log(10)))
    # temperature scales: T * log K for zero logits
    assert torch.allclose(scores.energy_score(torch.zeros(1, 4), 2.0), torch.tensor([-2 * math.log(4)]))
    with pytest.raises(ValueError):
        scores.energy_score(torch.zeros(10))


def test_oe_loss_is_cross_entropy_when_margins_are_met():
    logits_in = torch.tensor([[30.0, 0.0, 0.0]])  # E_in ~ -30 < m_in
    logits_out = torch.zeros(2, 3)  # E_out = -ln 3 > m_out
    y = torch.tensor([0])
    loss = scores.oe_energy_loss(logits_in, y, logits_out, m_in=-20, m_out=-5, lam=0.1)
    assert torch.allclose(loss, nn.functional.cross_entropy(logits_in, y))
    # an outlier with E_out = -10 violates m_out = -5 by 5: adds lam * 25 / 2 (mean over 2)
    logits_out2 = torch.tensor([[10.0, -50, -50], [0.0, 0, 0]])
    loss2 = scores.oe_energy_loss(logits_in, y, logits_out2, m_in=-20, m_out=-5, lam=0.1)
    expected = nn.functional.cross_entropy(logits_in, y) + 0.1 * (5.0 ** 2) / 2
    assert torch.allclose(loss2, expected, atol=1e-3)


def test_fpr95_and_auroc_on_hand_made_scores():
    id_energy = -torch.arange(1.0, 101.0)  # detector scores 1..100; 5th percentile = 5.95
    ood_energy = -torch.tensor([0.5, 3.0, 6.0, 50.0])  # scores 0.5, 3, 6, 50: two pass 5.95
    m = scores.ood_metrics(id_energy, ood_energy)
    assert m["fpr95"] == 0.5
    separated = scores.ood_metrics(-torch.ones(10) * 5, torch.zeros(10))
    assert separated == {"auroc": 1.0, "fpr95": 0.0}


def test_thresholds_are_percentiles():
    e1, e2 = scores.select_thresholds(torch.arange(1001.0), 95, 99.9)
    assert (e1, e2) == pytest.approx((950.0, 999.0))
    with pytest.raises(ValueError):
        scores.select_thresholds(torch.arange(10.0), 99, 95)
    with pytest.raises(ValueError):
        scores.select_thresholds(torch.tensor([1.0, float("nan")]))


def test_routing_at_exact_boundaries():
    e = torch.tensor([-5.0001, -5.0, -4.0, -2.0, -1.9999, 0.0])
    r = scores.route(e, e1=-5.0, e2=-2.0)
    assert r.tolist() == [scores.ID, scores.LOW_ES, scores.LOW_ES, scores.HIGH_ES, scores.HIGH_ES,
                          scores.HIGH_ES]
    assert scores.route_fractions(e, -5.0, -2.0) == pytest.approx(
        {"ID": 1 / 6, "low-ES OOD": 2 / 6, "high-ES OOD": 3 / 6})


def test_reliability_score_matches_hand_computation():
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    r = scores.reliability_score(p)
    # row 0: (0.49 - 0.25) / (std([.1,.1,.1]) = 0 + 1 - 1/16) = 0.24 / 0.9375
    # row 1: (0.0625 - 0.25) / (0 + 0.9375) = -0.2
    assert r.tolist() == pytest.approx([0.256, -0.2])
    rest_std = float(np.std([0.3, 0.0, 0.0]))  # population std of the non-max entries
    r2 = scores.reliability_score(torch.tensor([[0.7, 0.3, 0.0, 0.0]]))
    assert float(r2) == pytest.approx((0.49 - 0.25) / (rest_std + 0.9375))


# ------------------------------------------------------------------ models, training


@pytest.mark.parametrize("arch", ["cnn", "cnn_wide", "mlp"])
def test_small_models_map_raw_images_to_logits(arch):
    model = build_model(arch, 1, 10, 28)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_paper_scale_models_build():
    assert set(ARCHS) >= {"resnet18", "wrn28_10"}
    assert build_model("resnet18", 3, 10, 32)(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg", 1, 10, 28)


def test_as_images_rejects_bad_input():
    assert as_images(torch.rand(2, 1, 28, 28), (1, 28, 28)).shape == (2, 1, 28, 28)
    for bad, msg in [(torch.rand(1, 28, 28), "rank 3"), (torch.rand(2, 3, 28, 28), "shape"),
                     (torch.full((1, 1, 28, 28), float("nan")), "NaN"),
                     (torch.ones(1, 1, 28, 28, dtype=torch.uint8), "float"),
                     (torch.full((1, 1, 28, 28), 2.0), r"\[0, 1\]")]:
        with pytest.raises(ValueError, match=msg):
            as_images(bad, (1, 28, 28))


def test_training_learns_a_separable_problem_with_hard_and_soft_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 8, 8, generator=g) * 0.5
    y = (torch.arange(200) % 2)
    x[y == 1, :, :4] += 0.5  # class 1: bright top half
    for target in (y, nn.functional.one_hot(y, 2).float()):
        model = build_model("mlp", 1, 2, 8)
        hist = training.train_classifier(model, x, target, training.TrainRecipe(epochs=15, lr=5e-3, batch_size=32),
                                         progress=False)
        assert hist[-1]["loss"] < hist[0]["loss"]
        assert training.accuracy(model, x, y) > 0.95


def test_random_affine_keeps_shape_and_is_identity_without_shift():
    x = torch.rand(4, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert training.random_affine(x, 0, g) is x
    out = training.random_affine(x, 2, g)
    assert out.shape == x.shape and not torch.equal(out, x)


# ------------------------------------------------------------------ checkpoints


def _tiny():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_load_or_train_reuses_matching_and_retrains_mismatched(tmp_path, capsys):
    calls = []

    def train(model):
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(len(calls))
        return {"history": [len(calls)]}

    path = tmp_path / "m.pt"
    m1, info1 = store.load_or_train(path, {"epochs": 1}, _tiny, train)
    m2, info2 = store.load_or_train(path, {"epochs": 1}, _tiny, train)
    assert (info1["loaded"], info2["loaded"], len(calls)) == (False, True, 1)
    assert torch.equal(m1.weight, m2.weight) and info2["history"] == [1]
    assert "loaded checkpoint" in capsys.readouterr().out
    m3, info3 = store.load_or_train(path, {"epochs": 2}, _tiny, train)
    assert not info3["loaded"] and len(calls) == 2 and float(m3.weight[0, 0].detach()) == 2.0
    assert "other settings (epochs)" in capsys.readouterr().out


def test_corrupt_checkpoint_raises_with_the_fix(tmp_path):
    path = tmp_path / "m.pt"
    store.save_checkpoint(path, _tiny(), {"a": 1})
    path.write_bytes(path.read_bytes()[:100])  # truncated file
    with pytest.raises(store.CheckpointError, match="Delete it to retrain"):
        store.load_or_train(path, {"a": 1}, _tiny, lambda m: {})


def test_checkpoint_with_wrong_weights_is_not_silently_loaded(tmp_path):
    path = tmp_path / "m.pt"
    store.save_checkpoint(path, nn.Linear(5, 2), {"a": 1})  # same spec, different shapes
    with pytest.raises(store.CheckpointError, match="does not fit"):
        store.load_or_train(path, {"a": 1}, _tiny, lambda m: {})


def test_write_json_is_atomic_and_rejects_nan(tmp_path):
    path = tmp_path / "x" / "a.json"
    store.write_json(path, {"a": 1})
    assert store.read_json(path) == {"a": 1}
    with pytest.raises(ValueError):
        store.write_json(path, {"a": float("nan")})
    assert store.read_json(path) == {"a": 1}  # the failed write left the old file intact
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]
    with pytest.raises(FileNotFoundError, match="run the notebook"):
        store.read_json(tmp_path / "missing.json")
