"""Unit tests for the attack machinery (cip_helpers.course.attacks, cip_helpers.course.dfme): tiny sizes, < 60 s."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cip_helpers.course import attacks, config, dfme
from cip_helpers.method.defenses import CIP, NoDefense, TriggerSet
from cip_helpers.course.training import TrainRecipe, accuracy, train_classifier

SHAPE = (1, 28, 28)


def band_images(n: int, n_classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A separable toy problem: class k is a bright horizontal band in rows 8k..8k+5, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    x = 0.2 * torch.rand(n, *SHAPE, generator=g)
    for k in range(n_classes):
        x[y == k, :, 8 * k + 1: 8 * k + 6, 3:25] += 0.7
    return x.clamp(0, 1), y


class Lookup(nn.Module):
    """A 'model' answering fixed logits per image, keyed by the image's first pixel (0, 1, 2, ...)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].round().long()]


@pytest.fixture
def cfg(results_root):
    return config.get_profile("smoke", surrogate_epochs=4, surrogate_width=8, surrogate_batch=32)


# ------------------------------------------------------------------ surrogate training


def test_surrogate_learns_a_separable_problem_and_is_reused(cfg):
    x, y = band_images(150)
    answers = torch.nn.functional.one_hot(y, 10).float() * 0.9 + 0.01
    model, info = attacks.train_surrogate(cfg, x, answers, "hard", verbose=False)
    xt, yt = band_images(60, seed=1)
    assert accuracy(model, xt, yt) >= 0.95
    assert info["loaded"] is False and info["checkpoint"].startswith("checkpoints/surrogates/")
    again, info2 = attacks.train_surrogate(cfg, x, answers.clone(), "hard", verbose=False)
    assert info2["loaded"] is True and info2["checkpoint"] == info["checkpoint"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    changed = answers.clone()
    changed[0] = changed[0].roll(1)  # a different answer: a different surrogate
    _, info3 = attacks.train_surrogate(cfg, x, changed, "hard", verbose=False)
    assert info3["loaded"] is False and info3["checkpoint"] != info["checkpoint"]


def test_quiet_training_prints_nothing(cfg, capsys, monkeypatch):
    """``verbose=False`` means silent: no progress bar and no stage line from the surrogate, the
    victim or the OE fine-tuning (the surrogate's bar used to be drawn anyway)."""
    from cip_helpers.course import pipeline, progress

    monkeypatch.delenv(progress.BATCH_ENV, raising=False)
    x, y = band_images(60)
    answers = torch.nn.functional.one_hot(y, 10).float()
    small = config.get_profile("smoke", surrogate_epochs=1, surrogate_width=8, surrogate_batch=32,
                               victim_epochs=1, oe_epochs=1)
    capsys.readouterr()
    attacks.train_surrogate(small, x, answers, "hard", verbose=False)
    pipeline.get_oe_victim(small, "all", verbose=False)  # trains the plain victim on the way
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == "", (quiet.out[-300:], quiet.err[-300:])
    attacks.train_surrogate(small, x, answers.roll(1, 1), "hard", verbose=True)
    loud = capsys.readouterr()
    assert "surrogate" in loud.out + loud.err


def test_hard_and_soft_label_paths_differ_as_intended(cfg):
    x, y = band_images(150)
    answers = torch.full((150, 10), 0.3 / 9)
    answers[torch.arange(150), y] = 0.7  # every answer: 70 % on the true class
    assert attacks.targets_from_answers(answers, "hard").tolist() == y.tolist()
    assert torch.equal(attacks.targets_from_answers(answers, "soft"), answers)
    with pytest.raises(ValueError, match="label_type"):
        attacks.targets_from_answers(answers, "logits")
    hard, _ = attacks.train_surrogate(cfg, x, answers, "hard", epochs=6, verbose=False)
    soft, _ = attacks.train_surrogate(cfg, x, answers, "soft", epochs=6, verbose=False)
    xt, _ = band_images(60, seed=1)
    with torch.no_grad():
        p_hard, p_soft = hard(xt).softmax(1).max(1).values.mean(), soft(xt).softmax(1).max(1).values.mean()
    assert p_hard > 0.85  # hard labels: confident
    assert abs(float(p_soft) - 0.7) < 0.12  # soft labels: the answered confidence is copied


# ------------------------------------------------------------------ trigger accuracy


def test_trigger_accuracy_on_a_hand_made_case():
    logits = torch.eye(10)[[3, 5, 7, 1]] * 5  # the model predicts 3, 5, 7, 1 for images 0..3
    model = Lookup(logits)
    x = torch.arange(4).float().view(4, 1, 1, 1).expand(4, *SHAPE).contiguous() / 1.0
    altered = torch.eye(10)[[3, 5, 2, 2]]  # the defender's altered top-1: 3, 5, 2, 2
    triggers = TriggerSet(x, torch.full((4, 10), 0.1), altered)
    assert attacks.trigger_accuracy(model, triggers) == pytest.approx(0.5)
    assert attacks.trigger_accuracy(model, TriggerSet()) is None


# ------------------------------------------------------------------ DFME pieces


def test_zeroth_order_gradient_agrees_with_the_true_gradient():
    w = torch.linspace(-2, 2, 12)

    def f(a: torch.Tensor) -> torch.Tensor:  # smooth, known gradient 2 w a + cos(a)
        return (w * a.pow(2)).sum(1) + torch.sin(a).sum(1)

    a = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    true = 2 * w * a + torch.cos(a)
    calls = []
    est, value = dfme.zo_gradient(lambda p: calls.append(len(p)) or f(p), a, m=300, eps=1e-3,
                                  generator=torch.Generator().manual_seed(1))
    assert calls == [64 * 301]  # ONE call on all B(m + 1) points
    assert torch.allclose(value, f(a))
    cos = torch.nn.functional.cosine_similarity(est, true, dim=1)
    assert cos.min() > 0.8 and cos.mean() > 0.9
    est1, _ = dfme.zo_gradient(f, a, m=1, eps=1e-3, generator=torch.Generator().manual_seed(2))
    cos1 = torch.nn.functional.cosine_similarity(est1, true, dim=1)
    assert cos1.mean() > 0.15  # one direction: noisy, but positively aligned on average
    assert torch.allclose(est1.norm(dim=1).mean() / true.norm(dim=1).mean(),
                          torch.tensor(12 ** 0.5), rtol=0.5)  # scale d/m: magnitude ~ sqrt(d) |g|


def test_query_counter_counts_every_call_including_gradient_estimation(results_root):
    cfg = config.get_profile("smoke", dfme_queries=1000, dfme_batch=16, dfme_grad_m=2,
                             dfme_s_iter=3, dfme_eval_every=10_000, dfme_nz=8,
                             dfme_gen_channels=(8, 4), surrogate_width=4)
    seen = []

    def black_box(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return torch.softmax(x.flatten(1)[:, :10] * 3, 1)

    api = dfme.CountingAPI(black_box, cfg.dfme_queries)
    student = attacks.build_surrogate("cnn", 4, SHAPE, 10)
    curve = dfme.dfme_train(cfg, api, student, dfme.new_generator(cfg), progress=False)
    per_iter = 16 * (1 * (2 + 1) + 3)  # g_iter * (m + 1) + s_iter batches
    assert seen[0] == 16 * 3  # the first call is the gradient estimate on B(m + 1) points
    assert api.n_queries == sum(seen) == (1000 // per_iter) * per_iter <= 1000
    assert api.n_calls == len(seen) == (1000 // per_iter) * 4
    assert curve[-1]["queries"] == api.n_queries
    with pytest.raises(dfme.QueryBudgetExceeded):
        api(torch.rand(api.remaining + 1, *SHAPE))
    assert api.n_queries == sum(seen)  # a refused call sends (and counts) nothing


def test_recovered_logits_are_mean_corrected_log_probabilities():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    rec = dfme.recovered_logits(logits.softmax(1))
    assert torch.allclose(rec, logits - logits.mean(1, keepdim=True), atol=1e-5)


# ------------------------------------------------------------------ poisoned answers hurt


def test_surrogate_on_poisoned_answers_is_measurably_worse(cfg):
    """A tiny victim behind CIP whose thresholds route every query to the strong PPD
    (shuffle_noise; what OOD queries get) vs the same victim undefended."""
    x, y = band_images(240, n_classes=3)
    victim = attacks.build_surrogate("cnn", 8, SHAPE, 10, seed=3)
    train_classifier(victim, x, y, TrainRecipe(epochs=3, lr=3e-3, batch_size=32), progress=False)
    queries, _ = band_images(150, n_classes=3, seed=2)
    xt, yt = band_images(90, n_classes=3, seed=5)
    assert accuracy(victim, xt, yt) > 0.95
    clean = NoDefense(victim, SHAPE)(queries)
    cip = CIP(victim, SHAPE, e1=-1e9, e2=-1e9, strong="shuffle_noise", pbd=None, seed=0)
    poisoned = cip(queries)
    assert cip.route_counts()["high-ES OOD"] == 150
    accs = {}
    for name, answers in (("clean", clean), ("poisoned", poisoned)):
        model, _ = attacks.train_surrogate(cfg, queries, answers, "soft", epochs=5, verbose=False)
        accs[name] = accuracy(model, xt, yt)
    assert accs["clean"] >= 0.9
    assert accs["poisoned"] <= accs["clean"] - 0.5


# ------------------------------------------------------------------ records and transfer sets


def test_record_has_required_keys_and_round_trips(cfg):
    x, y = band_images(40)
    answers = torch.nn.functional.one_hot(y, 10).float()
    model, info = attacks.train_surrogate(cfg, x, answers, "hard", epochs=1, verbose=False)
    triggers = TriggerSet(x[:3], answers[:3], answers[:3].roll(1, 1))
    record = {k: None for k in attacks.REQUIRED_KEYS if k not in ("trigger_file", "triggers_sha256")}
    record.update(name="ida_cip", attack="ida", defense="cip", surrogate_checkpoint=info["checkpoint"],
                  surrogate_sha256=info["weights_sha256"])
    path = attacks.write_record(cfg, record, triggers)
    saved = json.loads(path.read_text())
    assert saved["triggers_sha256"] == attacks.triggers_sha256(triggers)
    assert set(attacks.REQUIRED_KEYS) <= set(saved)
    assert {"attack", "defense", "dataset", "label_type", "queries", "victim_acc", "defended_acc",
            "surrogate_acc", "trigger_acc", "n_triggers", "dqa_ratio", "seed", "seconds"} <= set(saved)
    assert saved["trigger_file"] == "metrics/ida_cip.triggers.pt"
    loaded = attacks.load_surrogate(cfg, "ida_cip")
    assert torch.equal(loaded(x[:5]), model(x[:5]))
    assert torch.equal(attacks.load_trigger_set(cfg, "ida_cip").labels, triggers.labels)
    del record["seed"]
    with pytest.raises(ValueError, match="seed"):
        attacks.write_record(cfg, {**record, "name": "broken"})


def test_dqa_transfer_set_holds_ida_queries_in_order_plus_noise():
    cfg = config.get_profile("smoke")
    x_id, _ = attacks.data.id_data(cfg).split("attacker")
    for r in (1.0, 0.25):
        q, is_id = attacks.dqa_queries(cfg, r)
        assert int(is_id.sum()) == len(x_id) and int((~is_id).sum()) == round(len(x_id) / r)
        assert torch.equal(q[is_id], x_id)  # the ID part is bit-identical to IDA's transfer set
        assert not is_id[: len(x_id)].all()  # ...but interleaved with the noise
    assert attacks.dawn_rate_for(config.get_profile("smoke", pbd_offline_T=0.01), 500) == 0.01
    assert attacks.dawn_rate_for(config.get_profile("smoke", pbd_offline_T=5), 500) == 0.01


def test_adapt_to_digits_stretches_and_darkens():
    x = torch.tensor([0.2, 0.4, 0.6]).view(1, 1, 1, 3)
    assert torch.allclose(attacks.adapt_to_digits(x, 1.0).flatten(), torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(attacks.adapt_to_digits(x, 3.0).flatten(), torch.tensor([0.0, 0.125, 1.0]))
    assert attacks.adapt_to_digits(x, 0) is x
