"""Adaptive Misinformation (AM; Kariyappa & Qureshi, CVPR 2020), the baseline defense "am":
the method (cip_helpers.method.misinformation), its training loop, and the course's load-or-train,
calibration, attack records and report rows. Tiny synthetic models; the smoke runs take seconds."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cip_helpers.course import attacks, config, pipeline, plots
from cip_helpers.course.store import load_checkpoint, save_checkpoint
from cip_helpers.course.training import TrainRecipe, train_misinformation
from cip_helpers.method import misinformation as mis
from cip_helpers.method.defenses import softmax
from cip_helpers.method.misinformation import AM_NU, AdaptiveMisinformation, misinformation_loss
from cip_helpers.method.models import build_model, predict_logits
from cip_helpers.tools import report

SHAPE = (1, 28, 28)
K = 10
TINY = dict(n_train=200, n_test=100, n_outlier=100, victim_epochs=1, oe_epochs=1, n_knockoff=200,
            knockoff_queries=200, surrogate_epochs=1, surrogate_width=8)


class TableModel(nn.Module):
    """Returns ``table[i]`` for an image whose pixel (0, 0, 0) is i / (len(table) - 1): the test
    chooses every logit exactly, and each row depends on its own image only (batch-exact)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[(x[:, 0, 0, 0] * (len(self.table) - 1)).round().long()]

    def images(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.float32)
        x = torch.zeros(len(idx), *SHAPE)
        x[:, 0, 0, 0] = idx / (len(self.table) - 1)
        return x


def logits_with_pmax(pmax: float, top: int = 0) -> torch.Tensor:
    """Logits whose softmax puts ``pmax`` on class ``top`` and the rest evenly on the others."""
    row = torch.full((K,), math.log((1 - pmax) / (K - 1)))
    row[top] = math.log(pmax)
    return row


PMAX = (0.99, 0.95, 0.9, 0.8, 0.6, 0.5, 0.3, 0.15)


@pytest.fixture
def tables() -> tuple[TableModel, TableModel]:
    """A victim with the max softmax probabilities of :data:`PMAX` (class i % K) and a
    misinformation model that answers confidently with the next class."""
    f = torch.stack([logits_with_pmax(p, i % K) for i, p in enumerate(PMAX)])
    g = torch.stack([logits_with_pmax(0.9, (i + 1) % K) for i in range(len(PMAX))])
    return TableModel(f), TableModel(g)


def tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", 1, K, 28).eval()


# ------------------------------------------------------------------ the method


def test_misinformation_loss_is_nll_of_one_minus_q_at_the_victims_class():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
    y = torch.tensor([1, 0])  # q = 0.25 and q = 0.5 at the victim's class
    expected = -(math.log(0.75 + 1e-7) + math.log(0.5 + 1e-7)) / 2
    assert float(misinformation_loss(logits, y)) == pytest.approx(expected, rel=1e-6)
    # a row that avoids the victim's class costs ~0, one that agrees with it costs a lot
    assert float(misinformation_loss(torch.tensor([[-20.0, 20.0]]), torch.tensor([0]))) < 1e-6
    assert float(misinformation_loss(torch.tensor([[20.0, -20.0]]), torch.tensor([0]))) > 10
    with pytest.raises(ValueError, match="labels"):
        misinformation_loss(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


def test_answers_are_valid_probability_rows_numpy_in_numpy_out():
    am = AdaptiveMisinformation(tiny_cnn(0), tiny_cnn(1), SHAPE, tau=0.5)
    x = torch.rand(40, *SHAPE, generator=torch.Generator().manual_seed(0))
    x[:10] = 0.0
    for tau in (0.0, 0.112, 0.5, 1.0):  # nothing, some, everything misinformed
        am = AdaptiveMisinformation(am.model, am.misinformation_model, SHAPE, tau=tau)
        y = am(x)
        assert y.shape == (40, K) and y.dtype == torch.float32
        assert float(y.min()) >= 0 and float((y.sum(1) - 1).abs().max()) <= 1e-6
    out = am(x.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (40, K) and np.allclose(out.sum(1), 1, atol=1e-6)
    assert am.totals["calls"] == 2 and am.totals["misinformed"] == 80  # tau = 1 > every p_max, two calls


def test_alpha_is_a_step_at_tau(tables):
    f, g = tables
    x = f.images(range(len(PMAX)))
    p, q = softmax(f(x)), softmax(g(x))
    am = AdaptiveMisinformation(f, g, SHAPE, tau=0.7)
    y = am(x)
    above = torch.tensor(PMAX) > 0.7
    # well above tau: exactly the victim's own softmax, a = 0
    assert torch.equal(y[above], p[above]) and bool((am.last_alpha[above] == 0).all())
    # well below: the misinformation answer (a = 1 up to e^-1000), top-1 never the victim's
    assert torch.allclose(y[~above], q[~above], atol=1e-6) and bool((am.last_alpha[~above] > 1 - 1e-12).all())
    assert bool((y[~above].argmax(1) != p[~above].argmax(1)).all())
    assert am.totals["misinformed"] == int((~above).sum()) == 4
    # at tau exactly a = 1/2: the average of the two answers; 0.001 (10/nu) either side a step
    s = float(am.ood_score(f(x[3:4]))[0])  # p_max 0.8
    for tau, alpha in ((s, 0.5), (s + 1e-3, 1 / (1 + math.exp(-10))), (s - 1e-3, 1 / (1 + math.exp(10)))):
        y = AdaptiveMisinformation(f, g, SHAPE, tau=tau)(x[3:4])
        assert torch.allclose(y, (1 - alpha) * p[3:4] + alpha * q[3:4], atol=1e-6), tau
    assert 1 / (1 + math.exp(-10)) > 0.9999  # nu = 10,000 makes AM a step at tau


def test_energy_score_steps_on_the_negative_energy(tables):
    _, g = tables
    # the same softmax rows shifted by 0, 2, 4, ...: -E(x) = logsumexp = the shift (log-probabilities sum to 1)
    f = TableModel(torch.stack([logits_with_pmax(0.9, i % K) + 2.0 * i for i in range(len(PMAX))]))
    x = f.images(range(len(PMAX)))
    logits = f(x)
    neg_energy = torch.logsumexp(logits.double(), 1)  # -E(x), T = 1
    assert torch.allclose(neg_energy, 2.0 * torch.arange(len(PMAX)).double(), atol=1e-5)
    tau = 7.0
    am = AdaptiveMisinformation(f, g, SHAPE, tau=tau, score="energy")
    y = am(x)
    low = neg_energy < tau
    assert low.tolist() == [True] * 4 + [False] * 4
    assert torch.equal(y[~low], softmax(logits)[~low]) and torch.allclose(y[low], softmax(g(x))[low], atol=1e-6)
    # the temperature scales the score: T * logsumexp(f / T)
    hot = AdaptiveMisinformation(f, g, SHAPE, tau=tau, score="energy", temperature=2.0)
    assert torch.allclose(hot.ood_score(logits), 2 * torch.logsumexp(logits.double() / 2, 1))


def test_same_image_same_answer_whatever_the_batching(tables):
    f, g = tables
    x = f.images([7, 0, 3, 5, 3, 6, 1, 2, 4, 7])
    am = AdaptiveMisinformation(f, g, SHAPE, tau=0.7)
    one_call = am(x)
    per_query = torch.cat([am(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(one_call, per_query)  # row-exact models: bit for bit
    assert torch.equal(am(x.flip(0)), one_call.flip(0))
    # real CNNs: batched kernels round differently, the answers agree to float rounding
    f_cnn, xs = tiny_cnn(0), torch.rand(30, *SHAPE, generator=torch.Generator().manual_seed(3))
    xs[:15] *= 0.3
    tau = float(softmax(predict_logits(f_cnn, xs)).amax(1).median())
    cnn = AdaptiveMisinformation(f_cnn, tiny_cnn(1), SHAPE, tau=tau)
    a = cnn(xs)
    assert 0 < cnn.totals["misinformed"] < len(xs)  # both branches are exercised
    b = torch.cat([cnn(xs[i:i + 1]) for i in range(len(xs))])
    assert float((a - b).abs().max()) < 1e-5 and torch.equal(a.argmax(1), b.argmax(1))


def test_non_finite_victim_logits_get_the_misinformation_answer(tables):
    f, g = tables
    table = f.table.clone()
    table[0, 3] = float("nan")  # a confident row (p_max 0.99) broken by one NaN
    table[1, 0] = float("inf")
    bad = TableModel(table)
    x = bad.images([0, 1, 2])
    am = AdaptiveMisinformation(bad, g, SHAPE, tau=0.7)
    y = am(x)
    assert torch.allclose(y[:2], softmax(g(x[:2])), atol=1e-6) and bool(torch.isfinite(y).all())
    assert am.last_alpha[:2].tolist() == [1.0, 1.0] and float(am.last_alpha[2]) == 0.0
    assert torch.equal(y[2], softmax(f(x[2:3]))[0])  # the finite row keeps its own answer
    assert am.totals["misinformed"] == 2


def test_a_misinformation_model_with_non_finite_logits_refuses_to_answer(tables):
    f, g = tables
    table = g.table.clone()
    table[6, 2] = float("inf")
    am = AdaptiveMisinformation(f, TableModel(table), SHAPE, tau=0.7)
    assert am(f.images([0, 1]).clone()).shape == (2, K)  # confident rows never reach fhat
    with pytest.raises(RuntimeError, match="misinformation model returned non-finite logits"):
        am(f.images([6]))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"tau": float("nan")}, ValueError, "tau"),
    ({"tau": 1.5}, ValueError, r"in \[0, 1\]"),
    ({"tau": -0.1}, ValueError, r"in \[0, 1\]"),
    ({"tau": "0.5"}, ValueError, "tau"),
    ({"tau": 0.5, "nu": 0}, ValueError, "nu"),
    ({"tau": 0.5, "nu": -5.0}, ValueError, "nu"),
    ({"tau": 0.5, "nu": float("inf")}, ValueError, "nu"),
    ({"tau": 0.5, "score": "maxlogit"}, ValueError, "msp"),
    ({"tau": 0.5, "temperature": 2.0}, ValueError, "energy"),
    ({"tau": -3.0, "score": "energy", "temperature": 0.0}, ValueError, "temperature"),
])
def test_bad_parameters_raise_naming_the_valid_range(tables, kwargs, error, message):
    f, g = tables
    with pytest.raises(error, match=message):
        AdaptiveMisinformation(f, g, SHAPE, **kwargs)


def test_bad_misinformation_models_are_refused(tables):
    f, g = tables
    with pytest.raises(ValueError, match="K = 10"):
        AdaptiveMisinformation(f, nn.Sequential(nn.Flatten(), nn.Linear(784, 3)), SHAPE, tau=0.5)
    with pytest.raises(ValueError, match="does not take images"):
        AdaptiveMisinformation(f, nn.Sequential(nn.Flatten(), nn.Linear(100, K)), SHAPE, tau=0.5)
    with pytest.raises(ValueError, match="victim itself"):
        AdaptiveMisinformation(f, f, SHAPE, tau=0.5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        AdaptiveMisinformation(f, lambda x: x, SHAPE, tau=0.5)
    AdaptiveMisinformation(f, g, SHAPE, tau=-40.0, score="energy")  # energy's tau is unbounded


def band_images(n: int, seed: int = 0) -> torch.Tensor:
    """Class k (of 3) is a bright horizontal band in rows 8k+1..8k+5, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.2 * torch.rand(n, *SHAPE, generator=g)
    for k in range(3):
        x[y == k, :, 8 * k + 1: 8 * k + 6, 3:25] += 0.7
    return x.clamp(0, 1)


class BandVictim(nn.Module):
    """A fixed 'victim': logits = 5 x the mean brightness of each band (3 of the 10 classes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = torch.stack([x[:, 0, 8 * k + 1: 8 * k + 6, 3:25].mean((1, 2)) for k in range(3)], 1)
        return torch.cat([20 * bands, torch.zeros(len(x), K - 3)], 1)


def test_a_few_steps_of_training_put_less_than_chance_on_the_victims_class():
    victim = BandVictim()
    x_in, x_out, x_test = band_images(192), torch.rand(96, *SHAPE), band_images(90, seed=1)
    labels = victim(x_test).argmax(1)
    assert labels.tolist() == (torch.arange(90) % 3).tolist()  # the victim is right on the toy data
    torch.manual_seed(0)
    fhat = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, K))
    before = float(softmax(predict_logits(fhat, x_test)).gather(1, labels[:, None]).mean())
    recipe = TrainRecipe(epochs=2, lr=1e-2, batch_size=32, optimizer="adam")
    history = train_misinformation(fhat, victim, x_in, x_out, recipe, seed=0, eval_x=x_test, progress=False)
    mass = softmax(predict_logits(fhat, x_test)).gather(1, labels[:, None])
    assert before > 0.05 and float(mass.mean()) < 0.02 < 1 / K  # well below chance (0.1)
    assert float((predict_logits(fhat, x_test).argmax(1) == labels).float().mean()) == 0.0
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["test_victim_mass"] == pytest.approx(
        float(mass.mean()), rel=1e-4)
    assert history[-1]["loss"] < history[0]["loss"]
    assert not victim.training and not fhat.training
    with pytest.raises(ValueError, match="non-empty"):
        train_misinformation(fhat, victim, x_in[:0], x_out, recipe, progress=False)


@pytest.mark.parametrize("score", ["msp", "energy"])
def test_calibrate_hits_the_target_share_on_training_images_without_exceeding_it(score):
    f, g = tiny_cnn(0), tiny_cnn(1)
    x = torch.rand(400, *SHAPE, generator=torch.Generator().manual_seed(5))
    x[:100] *= torch.linspace(0, 1, 100)[:, None, None, None]  # a spread of confidences
    lf, lg = predict_logits(f, x), predict_logits(g, x)
    s = mis.ood_score(lf, score)
    # brute force: the largest share any tau on a fine grid reaches without passing the target
    grid = torch.linspace(float(s.min()) - 0.01, float(s.max()) + 0.01, 2001).tolist()
    shares = [float(mis.changed_top1(lf, lg, t, AM_NU, score).double().mean()) for t in grid]
    for target in (0.0, 0.0125, 0.05, 0.2, 0.9, 1.0):
        am = AdaptiveMisinformation.calibrate(f, g, x, target, score=score)
        reached = float((am(x).argmax(1) != am.last_clean.argmax(1)).double().mean())
        best = max(v for v in shares if v <= target)
        assert reached <= target and reached >= best, (target, reached, best)
        assert reached >= min(target, max(shares)) - 1 / len(x) - 1e-12, (target, reached)
        assert am.tau == mis.tau_for_fidelity(lf, lg, target, score)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        mis.tau_for_fidelity(lf, lg, 1.5, score)
    with pytest.raises(ValueError, match="finite logits"):
        mis.tau_for_fidelity(lf.index_fill(0, torch.tensor([0]), float("nan")), lg, 0.1, score)


# ------------------------------------------------------------------ the course


def test_profile_fields_and_allowed_scores():
    assert config.AM_SCORES == mis.AM_SCORES
    quick, smoke = config.get_profile("quick"), config.get_profile("smoke")
    assert quick.am_nu == AM_NU and quick.am_score == "msp" and smoke.am_epochs < quick.am_epochs
    for bad, message in (({"am_score": "odin"}, "am_score"), ({"am_nu": 0}, "am_nu"), ({"am_epochs": 0}, "am_epochs")):
        with pytest.raises(ValueError, match=message):
            config.get_profile("smoke", **bad)
    assert "am" in pipeline.DEFENSES and "am" in attacks.OE_DEFENSES and attacks.answering_checkpoint("am") == "oe_victim"


def test_am_has_its_own_colour_and_aliases():
    c = plots.DEFENSE_COLORS
    assert plots.defense_color("AM") == plots.defense_color("am, soft") == c["am"]
    assert plots.defense_color("Adaptive Misinformation") == c["am"]
    assert c["am"] not in set(plots.OTHER_COLORS) | set(plots.NEUTRAL.values())
    assert len(set(c.values())) == len(c) and list(c) == list(pipeline.DEFENSES)


def test_knockoff_against_am_writes_a_record_tied_to_both_models(results_root):
    cfg = config.get_profile("smoke", **TINY)
    rec = attacks.run_knockoff(cfg, "am", "soft", verbose=False)
    c = pipeline.get_am_calibration(cfg, "all")
    assert rec["defense"] == "am" and rec["trigger_file"] is None and rec["oe_victim_acc"] is not None
    assert rec["am_tau"] == c["tau"] and rec["am_nu"] == cfg.am_nu and rec["am_score"] == "msp"
    assert 0 <= rec["am_train_top1_change"] <= rec["am_target_top1_change"] == c["target_top1_change"]
    assert 0 <= rec["am_misinformed"] <= 1 and 0 <= rec["defended_acc"] <= 1
    _, oe_info = pipeline.get_oe_victim(cfg, "all", verbose=False)
    fhat, f_info = pipeline.get_misinformation_model(cfg, "all", verbose=False)
    assert f_info["loaded"] and rec["weights_sha256"] == oe_info["weights_sha256"]
    assert rec["misinformation_sha256"] == f_info["weights_sha256"] == c["misinformation_sha256"]
    stored = json.loads((cfg.results_dir / pipeline.AM_FILE).read_text())
    assert stored["all"]["msp"]["tau"] == c["tau"]
    spec = attacks.defense_spec(cfg, "am")
    assert spec["misinformation_sha256"] == rec["misinformation_sha256"] and spec["tau"] == c["tau"]
    attacks.check_record(cfg, rec)
    # the misinformation model retrained with other bits (same settings): the record is stale
    path = cfg.checkpoint_dir / "misinformation_all.pt"
    spec_saved, extra, _ = load_checkpoint(path)
    with torch.no_grad():
        for p in fhat.parameters():
            p.mul_(1.05)
    save_checkpoint(path, fhat, spec_saved, extra)
    with pytest.raises(ValueError, match="misinformation_all.pt now holds .* --only 07"):
        attacks.check_record(cfg, rec)
    (cfg.metrics_dir / f"{rec['name']}.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="other weights"):
        report.load_all_records(cfg)
    # ... and AM's tau is recalibrated for the new weights
    again = pipeline.get_am_calibration(cfg, "all", verbose=False)
    assert again["misinformation_sha256"] != c["misinformation_sha256"]
    assert pipeline.get_defense(cfg, "am").misinformation_sha256 == again["misinformation_sha256"]


def test_report_puts_am_beside_cip_with_its_fidelity(results_root):
    cfg = config.get_profile("smoke", **TINY)
    recs = [attacks.run_knockoff(cfg, d, "hard", verbose=False) for d in ("am", "none", "cip")]
    table = report.table_iv(recs)
    assert table["defense"].tolist() == ["none", "cip", "am"]
    am = table[table["defense"] == "am"].iloc[0]
    assert am["API acc"] == round(100 * recs[0]["defended_acc"], 2) and pd.isna(am["paper Test(M_S)"])
    assert report.paper_row("knockoff", "am", "hard") is None
    assert any(n.startswith("am (not in the paper)") for n in report.table_notes(table, recs))
    # the multi-seed summary and the overview figure carry AM's row in its own colour
    summary = report.seed_summary(cfg.profile_dir, [cfg.seed])
    rows = [r for r in summary["rows"] if r["attack"] == "knockoff"]
    assert [r["defense"] for r in rows] == ["none", "cip", "am"]
    assert rows[2]["defended_acc"]["values"] == [recs[0]["defended_acc"]] and rows[2]["paper"] is None
    fig = plots.overview(summary)
    assert any(a.get_gid() == "defense=am" for ax in fig.axes for a in ax.patches)
    plots.plt.close(fig)
    st = lambda v: {"mean": v, "sd": None, "n": 1, "values": [v]}  # noqa: E731
    summary = {"profile": "smoke", "seeds": [0], "n_seeds": 1, "dataset": "mnist_embedded", "rows": [
        {"attack": "knockoff", "setting": "soft", "defense": d, "surrogate_acc": st(v), "defended_acc": st(0.9)}
        for d, v in (("none", 0.7), ("cip", 0.1), ("am", 0.4))], "victims": {}}
    block = report.readme_block(summary)
    assert "| attack | no defense | OE only | DP | DAWN | CIP | AM | paper, no defense -> CIP |" in block
    assert "| KnockoffNets, soft labels | 70.0 | n/a | n/a | n/a | **10.0** | 40.0 |" in block
    assert "Behind Adaptive Misinformation" in block
    without = {**summary, "rows": summary["rows"][:2]}
    assert "| AM |" not in report.readme_block(without) and "Adaptive" not in report.readme_block(without)
