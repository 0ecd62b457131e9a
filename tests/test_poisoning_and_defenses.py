"""Poisoning functions (cip_helpers.method.poisoning) and defended APIs (cip_helpers.method.defenses).

Property tests run over random probability rows (Dirichlet with several seeds, sizes and
concentrations, plus adversarial rows: ties, uniform, one-hot, zeros) and over outputs of a tiny
untrained CNN. Exact behaviour (routing at the thresholds, which queries PBD flips) is checked
with a model whose logits are set by hand. Nothing is trained; the whole file runs in seconds.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import Tensor, nn

from cip_helpers.method import poisoning
from cip_helpers.method.defenses import (CIP, DAWN, DP, NoDefense, TriggerSet, branch_examples,
                                  change_rate_by_pmax, compare_defenses, r1_from_scores, softmax)
from cip_helpers.method.models import build_model
from cip_helpers.method.scores import HIGH_ES, ID, LOW_ES, energy_score, reliability_score
from cip_helpers.course.store import load_cip, load_triggers, save_checkpoint, save_triggers
from cip_helpers.method.digests import weights_sha256
from cip_helpers.method.models import predict_logits

SHAPE = (1, 28, 28)
TOP_CHANGING = ("shuffle_noise", "reverse_rank", "inverse", "flip", "permute_top")


# --- helpers ------------------------------------------------------------------------------

def dirichlet(n: int, k: int, alpha: float, seed: int) -> Tensor:
    """n random probability rows over k classes, Dirichlet(alpha) (float32)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gam = torch._standard_gamma(torch.full((n, k), alpha, dtype=torch.float64))  # noqa: SLF001
    gam[gam.sum(1) == 0, 0] = 1.0  # tiny alphas can underflow a whole row
    return (gam / gam.sum(1, keepdim=True)).float()


def tricky_rows(k: int) -> Tensor:
    """Rows that break naive implementations: uniform, two- and three-way ties at the top,
    one-hot, exact zeros, p_max exactly 0.5, near-ties below float32 resolution."""
    rows = [torch.full((k,), 1 / k), torch.eye(k)[0], torch.eye(k)[k - 1]]
    tie2 = torch.zeros(k)
    tie2[[1, 2]] = 0.5
    tie3 = torch.full((k,), 0.1 / max(k - 3, 1))
    tie3[[0, 1, 2]] = 0.3 if k > 3 else 1 / 3
    half = torch.full((k,), 0.5 / (k - 1))
    half[k // 2] = 0.5
    near = torch.full((k,), 0.2 / (k - 2))
    near[0], near[1] = 0.4, 0.4 + 3e-8
    return torch.stack([rows[0], rows[1], rows[2], tie2, tie3, half, near])


def all_rows() -> list[Tensor]:
    """Random and tricky probability rows of several sizes (K = 3, 10, 100)."""
    out = []
    for k in (3, 10, 100):
        for seed, alpha in enumerate((0.05, 0.3, 1.0, 10.0)):
            out.append(dirichlet(300, k, alpha, seed=100 * k + seed))
        out.append(tricky_rows(k))
    return out


def assert_valid_rows(q: Tensor, n: int, k: int) -> None:
    assert q.shape == (n, k)
    assert q.dtype == torch.float32
    assert torch.isfinite(q).all()
    assert (q >= 0).all()
    assert ((q.double().sum(1) - 1).abs() <= 1e-6).all(), (q.double().sum(1) - 1).abs().max()


def strictly_changed(p: Tensor, q: Tensor) -> Tensor:
    """Per row: q's entry at p's argmax is strictly below q's maximum (so q's top-1 differs)."""
    top = p.argmax(1)
    return q.gather(1, top[:, None])[:, 0] < q.max(1).values


def strictly_kept(p: Tensor, q: Tensor) -> Tensor:
    """Per row: q's entry at p's argmax is strictly above every other entry of q."""
    top = p.argmax(1)
    others = q.clone()
    others[torch.arange(len(q)), top] = -1.0
    return q.gather(1, top[:, None])[:, 0] > others.max(1).values


def perturb(name: str, p: Tensor, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "shuffle_noise":
        return poisoning.shuffle_noise(p, 10.0, generator=g)
    if name == "permute_top":
        return poisoning.permute_top(p)
    if name == "reverse_sigmoid":
        return poisoning.reverse_sigmoid(p, 0.9, 0.6)
    return getattr(poisoning, name)(p)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", 1, 10, 28).eval()


def query_images(n: int, seed: int = 0) -> Tensor:
    """A mix of uniform noise, blank, bright and blocky images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    x[: n // 8] = 0.0
    x[n // 8: n // 4] = 1.0
    blocks = torch.rand(n // 4, 1, 7, 7, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    x[n // 4: n // 2] = blocks
    return x


class TableModel(nn.Module):
    """Returns ``table[i]`` for an image whose pixel (0, 0, 0) is i / (len(table) - 1) (:meth:`images`
    sets every pixel to it), so tests
    choose every logit (hence energies, probabilities and reliability scores) exactly."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.float())
        self.calls = 0
        self.rows = 0  # images seen by forward, over all calls

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.rows += len(x)
        idx = (x[:, 0, 0, 0] * (len(self.table) - 1)).round().long()
        return self.table[idx]

    def images(self, idx: list[int] | Tensor) -> Tensor:
        """Image i: every pixel i / (len(table) - 1), so distinct rows are distinct queries in
        the defenses' canonical form too (a one-pixel code would be one query there)."""
        idx = torch.as_tensor(idx, dtype=torch.float32)
        return (idx / (len(self.table) - 1)).reshape(-1, 1, 1, 1).expand(len(idx), *SHAPE).clone()


def logits_with_energy(energy: float, k: int = 10, spread: float = 40.0) -> Tensor:
    """Logits whose energy is exactly ``energy``: top logit -energy, the others ``spread`` lower
    (exp(-spread) vanishes next to 1 in float32, so logsumexp = the top logit exactly)."""
    row = torch.full((k,), -energy - spread)
    row[0] = -energy
    return row


# --- poisoning: every row valid, top-1 as promised ------------------------------------------

@pytest.mark.parametrize("name", ["shuffle_noise", "reverse_rank", "inverse", "flatten",
                                  "reverse_sigmoid", "flip", "permute_top"])
def test_every_perturbation_returns_valid_rows(name):
    for p in all_rows():
        q = perturb(name, p)
        assert_valid_rows(q, *p.shape)


@pytest.mark.parametrize("name", TOP_CHANGING)
def test_top1_always_changes(name):
    for i, p in enumerate(all_rows()):
        q = perturb(name, p, seed=i)
        assert (q.argmax(1) != p.argmax(1)).all(), f"{name}: top-1 kept on rows {torch.nonzero(q.argmax(1) == p.argmax(1)).flatten().tolist()}"
        assert strictly_changed(p, q).all()


def test_flatten_keeps_top1_and_is_nearly_uniform():
    for p in all_rows():
        q = poisoning.flatten(p)
        assert (q.argmax(1) == p.argmax(1)).all()
        distinct = p.max(1).values > p.topk(2, dim=1).values[:, 1]  # a unique top in p
        assert strictly_kept(p, q)[distinct].all()
    p = torch.tensor([[0.98, 0.01, 0.01]])
    q = poisoning.flatten(p)
    # p^(1/30): 0.98^(1/30) = 0.999327, 0.01^(1/30) = 0.857696; normalised by their sum 2.714719
    assert torch.allclose(q, torch.tensor([[0.999327, 0.857696, 0.857696]]) / 2.714719, atol=1e-5)


def test_reverse_sigmoid_keeps_top1_when_confident_and_can_change_it_below():
    for p in all_rows():
        q = poisoning.reverse_sigmoid(p)
        confident = p.max(1).values >= 0.5
        assert (q.argmax(1) == p.argmax(1))[confident].all()
    # Below 0.5 the map is not monotonic: a near-zero class ends up above a 0.35 class.
    # f(y) = y - 0.9 (sigmoid(0.6 logit y) - 1/2): f(0.35) = 0.4326, f(1e-4) = 0.4465.
    p = torch.tensor([[0.35, 0.35, 0.2999, 0.0001]])
    q = poisoning.reverse_sigmoid(p)
    assert int(q.argmax(1)) == 3
    assert poisoning.top1_change_rate(p, q) == 1.0


def test_reverse_rank_exact_hand_example():
    # ascending classes (0, 2, 1) receive the descending values (0.6, 0.3, 0.1)
    q = poisoning.reverse_rank(torch.tensor([[0.1, 0.6, 0.3]]))
    assert torch.allclose(q, torch.tensor([[0.6, 0.1, 0.3]]), atol=1e-7)
    # ascending classes (0, 1, 3, 2) receive (0.5, 0.3, 0.15, 0.05)
    q = poisoning.reverse_rank(torch.tensor([[0.05, 0.15, 0.5, 0.3]]))
    assert torch.allclose(q, torch.tensor([[0.5, 0.3, 0.05, 0.15]]), atol=1e-7)


def test_reverse_rank_maps_argmax_to_argmin_and_keeps_values():
    for k in (3, 10, 100):
        p = dirichlet(200, k, 1.0, seed=k)
        q = poisoning.reverse_rank(p)
        assert (q.argmax(1) == p.argmin(1)).all()
        assert (q.argmin(1) == p.argmax(1)).all()
        assert torch.allclose(q.sort(1).values, p.sort(1).values, atol=1e-6)  # a permutation


def test_inverse_is_one_over_p_normalised():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    # 1/p = (2, 4, 4), sum 10 -> (0.2, 0.4, 0.4)
    assert torch.allclose(poisoning.inverse(p), torch.tensor([[0.2, 0.4, 0.4]]), atol=1e-7)
    assert torch.equal(poisoning.flip(p, "inverse"), poisoning.inverse(p))


def test_shuffle_noise_snr_and_determinism():
    p = dirichlet(2000, 10, 0.5, seed=3)
    q1 = poisoning.shuffle_noise(p, 10.0, generator=torch.Generator().manual_seed(5))
    q2 = poisoning.shuffle_noise(p, 10.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(q1, q2)
    # The multiset of values is p's (a permutation) plus |noise|: before renormalisation the
    # noise power is mean(p^2) / 10 at 10 dB, so q's sorted values stay close to p's.
    gap = (q1.sort(1).values - p.sort(1).values).pow(2).mean(1) / p.pow(2).mean(1)
    assert 0.01 < float(gap.median()) < 0.5
    loud = poisoning.shuffle_noise(p, -10.0, generator=torch.Generator().manual_seed(5))
    assert poisoning.mean_l1(p.sort(1).values, loud.sort(1).values) > 1.5 * poisoning.mean_l1(
        p.sort(1).values, q1.sort(1).values)


def test_permute_top_moves_each_top_entry_and_nothing_else():
    p = dirichlet(500, 10, 1.0, seed=11)
    k = poisoning.dawn_top_k(10)
    assert k == 3 and poisoning.dawn_top_k(100) == 10 and poisoning.dawn_top_k(3) == 2
    for shift in (1, 2):
        q = poisoning.permute_top(p, torch.full((len(p),), shift))
        idx = p.topk(k, dim=1).indices
        assert (q.gather(1, idx) != p.gather(1, idx)).all()  # each of the top-3 entries moved
        assert torch.allclose(q.gather(1, idx).sort(1).values, p.gather(1, idx).sort(1).values,
                              atol=1e-6)  # the same values, permuted
        rest = torch.ones_like(p, dtype=torch.bool).scatter(1, idx, False)
        assert torch.allclose(q[rest], p[rest], atol=1e-6)
    with pytest.raises(ValueError, match="shift must be in 1..2"):
        poisoning.permute_top(p, torch.full((len(p),), 3))


def test_perturbations_reject_non_probability_input():
    with pytest.raises(ValueError, match=r"\(N, K >= 2\)"):
        poisoning.reverse_rank(torch.ones(10))
    with pytest.raises(ValueError, match="float"):
        poisoning.inverse(torch.ones(2, 3, dtype=torch.long))


def test_all_variants_names_and_table():
    p = dirichlet(100, 10, 1.0, seed=1)
    variants = poisoning.all_variants(p, generator=torch.Generator().manual_seed(0))
    assert list(variants) == ["shuffle_noise", "reverse_rank", "inverse", "flatten",
                              "weak (reverse_sigmoid)", "flip", "flip (inverse)"]
    table = poisoning.perturbation_table(p, variants)
    assert list(table.columns) == ["top1_change_rate", "mean_l1", "mean_kl"]
    assert table.loc["reverse_rank", "top1_change_rate"] == 1.0
    assert table.loc["flatten", "top1_change_rate"] == 0.0
    assert (table["mean_kl"] > 0).all() and (table["mean_l1"] > 0).all()


def test_perturbation_metrics_hand_values():
    clean = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    poisoned = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    # row 0: argmax 0 -> 1 (changed); row 1 unchanged -> 1/2
    assert poisoning.top1_change_rate(clean, poisoned) == 0.5
    # L1 row 0 = 0.25 + 0.25 = 0.5, row 1 = 0 -> mean 0.25
    assert math.isclose(poisoning.mean_l1(clean, poisoned), 0.25, abs_tol=1e-7)
    # KL row 0 = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 (0.693147 - 0.405465) = 0.143841
    assert math.isclose(poisoning.mean_kl(clean, poisoned), 0.143841 / 2, abs_tol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        poisoning.mean_kl(clean, poisoned[:1])
    assert math.isnan(poisoning.top1_change_rate(clean[:0], poisoned[:0]))


# --- reliability score ---------------------------------------------------------------------

def test_reliability_score_hand_computed():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    # N = 3: p_max^2 - 1/N = 0.25 - 0.333333 = -0.083333
    #        rest (0.3, 0.2): population std = 0.05; denominator = 0.05 + 1 - 1/9 = 0.938889
    #        R = -0.083333 / 0.938889 = -0.088757
    assert math.isclose(float(reliability_score(p)[0]), -0.088757, abs_tol=1e-5)
    q = torch.tensor([[0.1, 0.7, 0.1, 0.1]])
    # N = 4: 0.49 - 0.25 = 0.24; rest all 0.1 -> std 0; denominator 1 - 1/16 = 0.9375; R = 0.256
    assert math.isclose(float(reliability_score(q)[0]), 0.256, abs_tol=1e-6)


def test_r1_from_scores_is_a_percentile_of_training_scores():
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert r1_from_scores(scores, 50) == 2.5  # linear interpolation between 2 and 3
    assert r1_from_scores(scores, 0) == 1.0
    with pytest.raises(ValueError, match="percentile"):
        r1_from_scores(scores, 101)


def test_r1_is_calibrated_among_the_training_images_cip_routes_id():
    """R1 as the percentile of R over the ID-routed training images only (energy < E1): the low-R
    images that route OOD (here the two with high energy) no longer pull R1 down, so the
    percentile is the share of ID-routed queries online PBD flips."""
    from cip_helpers.method.defenses import R1_AMONG, r1_population

    scores = torch.tensor([0.05, 0.1, 0.5, 0.6, 0.7, 0.8])
    energy = torch.tensor([-1.0, -2.0, -9.0, -9.5, -10.0, -11.0])  # the two lowest R: high energy
    mask = r1_population(energy, e1=-5.0)
    assert mask.tolist() == [False, False, True, True, True, True]
    assert r1_from_scores(scores, 0, routed_id=mask) == 0.5
    assert r1_from_scores(scores, 0) == pytest.approx(0.05)
    assert r1_population(energy, -5.0, "all") is None and R1_AMONG == ("id_routed", "all")
    with pytest.raises(ValueError, match="r1_among"):
        r1_population(energy, -5.0, "ood")
    with pytest.raises(ValueError, match="raise p1"):
        r1_from_scores(scores, 1, routed_id=torch.zeros(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        r1_from_scores(scores, 1, routed_id=torch.ones(3, dtype=torch.bool))


# --- defenses on a real (tiny, untrained) CNN --------------------------------------------------

def cip_for(model: nn.Module, x: Tensor, strong: str = "shuffle_noise", logits: Tensor | None = None,
            **kw) -> CIP:
    """CIP with E1/E2 at the 40th/80th energy percentiles of ``x`` (all three branches occur) and
    R1 at the 25th percentile of the ID-routed queries' reliability (some of them flip)."""
    logits = predict_logits(model, x) if logits is None else logits
    e = energy_score(logits)
    e1, e2 = (float(v) for v in torch.quantile(e, torch.tensor([0.4, 0.8])))
    r = reliability_score(softmax(logits))[e < e1]
    kw.setdefault("r1", float(torch.quantile(r, 0.25)))
    return CIP(model, SHAPE, e1, e2, strong=strong, **kw)


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return tiny_cnn()


@pytest.fixture(scope="module")
def queries() -> Tensor:
    return query_images(128)


@pytest.fixture(scope="module")
def defenses(cnn, queries) -> dict:
    return all_defenses(cnn, queries)


def all_defenses(model: nn.Module, x: Tensor) -> dict:
    """NoDefense, DP, DAWN and CIP with every strong PPD (online PBD) and with offline / no PBD."""
    out = {"none": NoDefense(model, SHAPE), "dp": DP(model, SHAPE),
           "dawn": DAWN(model, SHAPE, rate=0.3, key="k")}
    logits = predict_logits(model, x)
    for strong in poisoning.STRONG_PPD:
        out[f"cip/{strong}/online"] = cip_for(model, x, strong, logits, pbd="online")
    for pbd in ("offline_top_T", None):
        out[f"cip/reverse_rank/{pbd}"] = cip_for(model, x, "reverse_rank", logits, pbd=pbd, pbd_T=0.05)
    return out


def test_every_defense_returns_valid_rows_on_model_outputs(cnn, queries):
    for scale in (1.0, 30.0):  # near-uniform and confident outputs
        model = nn.Sequential(cnn, _Scale(scale)).eval()
        for name, defense in all_defenses(model, queries).items():
            out = defense(queries)
            assert_valid_rows(out, len(queries), 10)


class _Scale(nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s


@pytest.mark.parametrize("strong", list(poisoning.STRONG_PPD))
def test_cip_branches_match_the_poisoning_functions(cnn, queries, strong):
    model = nn.Sequential(cnn, _Scale(20.0)).eval()
    cip = cip_for(model, queries, strong, pbd="online", seed=1)
    out = cip(queries)
    logits = predict_logits(model, queries)
    p = softmax(logits)
    routes = cip.last_routes
    expected = ((energy_score(logits) >= cip.e1).long() + (energy_score(logits) >= cip.e2).long())
    assert torch.equal(routes, expected)
    assert set(routes.tolist()) == {ID, LOW_ES, HIGH_ES}
    plain_id = (routes == ID) & ~cip.last_flipped
    assert torch.equal(out[plain_id], p[plain_id])  # ID answers are the victim's own
    low = routes == LOW_ES
    assert torch.allclose(out[low], poisoning.reverse_sigmoid(p[low], 0.9, 0.6), atol=1e-7)
    high = routes == HIGH_ES
    changed = out[high].argmax(1) != p[high].argmax(1)
    assert changed.all() if strong != "flatten" else (~changed).all()
    if strong != "shuffle_noise":
        assert torch.allclose(out[high], poisoning.STRONG_PPD[strong](p[high]), atol=1e-7)
    flipped = cip.last_flipped
    assert flipped.any() and (routes[flipped] == ID).all()
    assert (out[flipped].argmax(1) != p[flipped].argmax(1)).all()
    assert cip.route_counts()["PBD flipped"] == int(flipped.sum())
    assert sum(v for k, v in cip.route_counts().items() if k != "PBD flipped") == len(queries)


def test_cip_uses_one_forward_pass():
    """Energy, softmax and reliability all come from one pass of each query through the victim
    (in chunks of ``forward_batch`` queries), never a second call per branch."""
    table = torch.stack([logits_with_energy(-20.0 + i) for i in range(30)])
    model = TableModel(table)
    cip = CIP(model, SHAPE, e1=-12.0, e2=-5.0, r1=0.0)
    model.calls = model.rows = 0
    cip(model.images(list(range(30))))
    assert (model.calls, model.rows) == (1, 30)
    model.calls = model.rows = 0
    cip(model.images(torch.arange(10_000) % 30))  # the issue's 10,000-query batch
    assert model.rows == 10_000
    assert model.calls == -(-10_000 // cip.forward_batch) > 1
    one_chunk = CIP(model, SHAPE, e1=-12.0, e2=-5.0, r1=0.0)
    one_chunk.forward_batch = 10_000  # chunking changes neither the victim's answers nor the routes
    one_chunk(model.images(torch.arange(10_000) % 30))
    assert torch.equal(one_chunk.last_clean, cip.last_clean)
    assert one_chunk.route_counts() == cip.route_counts()


def test_routing_at_exact_thresholds():
    e1, e2 = -8.0, -3.0
    below, above = torch.tensor(-math.inf), torch.tensor(math.inf)
    t1, t2 = torch.tensor(e1), torch.tensor(e2)  # float32: neighbours are one float32 ulp away
    energies = [torch.nextafter(t1, below), t1, torch.nextafter(t1, above),
                torch.nextafter(t2, below), t2, torch.tensor(5.0), torch.tensor(-20.0)]
    energies = [float(e) for e in energies]
    table = torch.stack([logits_with_energy(e) for e in energies])
    model = TableModel(table)
    assert torch.equal(energy_score(table), torch.tensor(energies, dtype=torch.float32))
    assert energies[0] < e1 < energies[2] and energies[3] < e2
    cip = CIP(model, SHAPE, e1, e2, strong="reverse_rank", pbd=None)
    cip(model.images(list(range(len(energies)))))
    # E < E1 -> ID; E1 <= E < E2 -> low-ES; E >= E2 -> high-ES
    assert cip.last_routes.tolist() == [ID, LOW_ES, LOW_ES, LOW_ES, HIGH_ES, HIGH_ES, ID]
    with pytest.raises(ValueError, match="E1 <= E2"):
        CIP(model, SHAPE, e2, e1, pbd=None)


def pbd_table() -> tuple[TableModel, Tensor]:
    """8 ID rows (energy ~ -30) with increasing confidence, then 2 high-ES rows (energy ~ 0)
    that are the least reliable of all (must never be flipped)."""
    base = torch.tensor([3.0, 1.0, 0.5, 0.2, 0.0, 0.0, -0.2, -0.5, -1.0, -1.5])
    rows = [30.0 + torch.log_softmax(t * base, 0) for t in (0.3, 0.6, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)]
    rows += [torch.log_softmax(t * base, 0) for t in (0.01, 0.05)]
    table = torch.stack(rows)
    r = reliability_score(table.softmax(1))
    assert (r[:8].diff() > 0).all() and (r[8:] < r[0]).all()  # the intended order
    return TableModel(table), r


def test_online_pbd_flips_exactly_id_queries_below_r1():
    model, r = pbd_table()
    r1 = float((r[2] + r[3]) / 2)  # rows 0, 1, 2 are below R1
    cip = CIP(model, SHAPE, e1=-10.0, e2=-5.0, pbd="online", r1=r1)
    x = model.images(list(range(10)))
    out = cip(x)
    assert cip.last_routes.tolist() == [ID] * 8 + [HIGH_ES] * 2
    assert torch.nonzero(cip.last_flipped).flatten().tolist() == [0, 1, 2]
    p = softmax(model.table)
    assert torch.allclose(out[:3], poisoning.flip(p[:3], "authors", u=cip.pbd_randoms(x[:3])), atol=1e-7)
    assert len(cip.trigger_set) == 3
    assert torch.equal(cip.trigger_set.x, x[:3])
    assert torch.equal(cip.trigger_set.original, p[:3])
    assert (cip.trigger_set.labels != p[:3].argmax(1)).all()
    cip(x[[5, 1]])  # a second call: row 1 flips again, but it is already a trigger (issue 13)
    assert cip.last_flipped.tolist() == [False, True] and len(cip.trigger_set) == 3
    assert cip.totals["PBD flipped"] == 4  # the totals still count every flipped answer


@pytest.mark.parametrize("pbd_T, expected", [(3, [0, 1, 2]), (0.3, [0, 1]), (0.1, [0]), (1, [0]),
                                              (0.05, []), (50, list(range(8)))])
def test_offline_pbd_flips_the_T_lowest_r_id_queries(pbd_T, expected):
    model, _ = pbd_table()
    order = [7, 8, 2, 0, 9, 5, 1, 3, 6, 4]  # shuffled, so position != reliability rank
    cip = CIP(model, SHAPE, e1=-10.0, e2=-5.0, pbd="offline_top_T", pbd_T=pbd_T, r1=None)
    cip(model.images(order))
    flipped_rows = sorted(order[i] for i in torch.nonzero(cip.last_flipped).flatten().tolist())
    assert flipped_rows == expected  # fraction of the 8 ID-routed: round(0.3 x 8) = 2 (not 0.3 x 10 = 3)
    assert len(cip.trigger_set) == len(expected)


def test_cip_rejects_bad_configuration(cnn):
    with pytest.raises(ValueError, match="strong PPD"):
        CIP(cnn, SHAPE, 0.0, 1.0, strong="nope", r1=0.0)
    with pytest.raises(ValueError, match="pbd must be"):
        CIP(cnn, SHAPE, 0.0, 1.0, pbd="sometimes", r1=0.0)
    with pytest.raises(ValueError, match="needs a finite r1"):
        CIP(cnn, SHAPE, 0.0, 1.0, pbd="online")


# --- DP, DAWN --------------------------------------------------------------------------------

def test_dp_keeps_confident_top1_and_changes_some_below():
    table = torch.log(torch.cat([dirichlet(400, 10, 0.05, seed=1), dirichlet(400, 10, 0.5, seed=2)]))
    model = TableModel(table.clamp_min(-80))
    dp = DP(model, SHAPE)
    x = model.images(torch.arange(len(table)))
    out = dp(x)
    p = softmax(model.table)
    confident = p.max(1).values >= 0.5
    assert confident.sum() > 100 and (~confident).sum() > 100
    assert (out.argmax(1) == p.argmax(1))[confident].all()
    table_bins = change_rate_by_pmax(p, out)
    below = table_bins[table_bins["bin"].str.startswith(("[0.00", "[0.20", "[0.30", "[0.40"))]
    above = table_bins[~table_bins.index.isin(below.index)]
    assert (above["changed"] == 0).all()
    assert below["changed"].sum() > 0  # reverse sigmoid does flip some uncertain answers
    assert table_bins["n"].sum() == len(p)


def test_change_rate_by_pmax_hand_example():
    clean = torch.tensor([[0.4, 0.35, 0.25], [0.45, 0.3, 0.25], [0.9, 0.05, 0.05], [1.0, 0.0, 0.0]])
    defended = torch.tensor([[0.3, 0.4, 0.3], [0.5, 0.3, 0.2], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1]])
    t = change_rate_by_pmax(clean, defended, edges=(0.0, 0.5, 1.0))
    assert t["n"].tolist() == [2, 2] and t["changed"].tolist() == [1, 1]
    assert t["change_rate"].tolist() == [0.5, 0.5] and t["bin"].tolist() == ["[0.00, 0.50)", "[0.50, 1.00]"]


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()


def test_dawn_rate_determinism_and_trigger_set():
    model = linear_model()
    dawn = DAWN(model, SHAPE, rate=0.1, key="secret")
    x = torch.rand(20_000, *SHAPE, generator=torch.Generator().manual_seed(0))
    out = dawn(x)
    marked = dawn.last_watermarked
    n = len(x)
    # Binomial(20000, 0.1): mean 2000, std sqrt(20000 x 0.1 x 0.9) = 42.4; allow 5 std
    assert abs(int(marked.sum()) - 0.1 * n) < 5 * math.sqrt(n * 0.1 * 0.9)
    assert len(dawn.trigger_set) == int(marked.sum())
    p = softmax(predict_logits(model, x))
    assert (out[marked].argmax(1) != p[marked].argmax(1)).all()
    assert torch.allclose(out[~marked], p[~marked], atol=1e-6)
    # deterministic per input: a permuted sub-batch gets the same marks and answers
    perm = torch.randperm(3000, generator=torch.Generator().manual_seed(1))
    again = dawn(x[perm])
    assert torch.equal(dawn.last_watermarked, marked[perm])
    assert torch.allclose(again, out[perm], atol=1e-6)
    assert torch.equal(again.argmax(1), out[perm].argmax(1))
    assert torch.equal(dawn.is_watermarked(x[:500]), marked[:500])
    assert len(dawn.trigger_set) == int(marked.sum())  # re-asked queries are not new triggers (issue 13)
    # another key marks other queries
    other = DAWN(model, SHAPE, rate=0.1, key="other")
    assert not torch.equal(other.is_watermarked(x[:3000]), marked[:3000])
    with pytest.raises(ValueError, match="rate"):
        DAWN(model, SHAPE, rate=1.5)


def test_dawn_watermark_permutes_top_entries():
    model = linear_model(3)
    dawn = DAWN(model, SHAPE, rate=1.0, key="all")
    x = torch.rand(200, *SHAPE, generator=torch.Generator().manual_seed(2))
    out = dawn(x)
    p = softmax(predict_logits(model, x))
    idx = p.topk(3, dim=1).indices
    assert dawn.last_watermarked.all()
    assert (out.gather(1, idx) != p.gather(1, idx)).all()
    assert torch.allclose(out.gather(1, idx).sort(1).values, p.gather(1, idx).sort(1).values, atol=1e-6)


# --- input validation, empty batches ---------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (lambda: torch.full((2, *SHAPE), float("nan")), "NaN"),
    (lambda: torch.rand(2, 3, 28, 28), "channel"),
    (lambda: torch.rand(*SHAPE), r"rank 3.*unsqueeze"),
    (lambda: torch.randint(0, 255, (2, *SHAPE), dtype=torch.uint8), r"dtype.*float"),
    (lambda: torch.rand(2, 1, 32, 32), r"shape"),
    (lambda: torch.rand(2, *SHAPE) * 255, r"\[0, 1\]"),
])
def test_bad_input_raises_helpful_value_error(defenses, bad, message):
    for name, defense in defenses.items():
        with pytest.raises(ValueError, match=message):
            defense(bad())


def test_last_clean_is_the_wrapped_models_softmax(defenses, queries):
    expected = softmax(predict_logits(defenses["none"].model, queries[:20]))
    for name, defense in defenses.items():
        answer = defense(queries[:20])
        assert torch.equal(defense.last_clean, expected), name
        if name == "none":
            assert torch.equal(answer, expected)


def test_empty_batch_returns_empty_rows(defenses, queries):
    for name, defense in defenses.items():
        defense.reset_totals()  # re-arms the one-call offline_top_T instance
        defense(queries[:5])
        defense.reset_totals()
        out = defense(queries[:0])
        assert out.shape == (0, 10), name
        if isinstance(defense, CIP):
            assert len(defense.last_routes) == 0 and len(defense.last_flipped) == 0
        if isinstance(defense, DAWN):
            assert len(defense.last_watermarked) == 0


# --- trigger sets and rebuilding CIP from a run ----------------------------------------------

def test_trigger_set_save_load_roundtrip(tmp_path):
    ts = TriggerSet()
    assert len(ts) == 0 and ts.labels.shape == (0,)
    x = torch.rand(4, *SHAPE)
    orig = dirichlet(4, 10, 1.0, seed=0)
    ts.append(x, orig, poisoning.flip(orig, "inverse"))
    ts.append(x[:1], orig[:1], poisoning.flip(orig[:1], "inverse"))  # asked again: not a new trigger
    ts.append(x[:1] * 0.5, orig[:1], poisoning.flip(orig[:1], "inverse"))  # another image: a new one
    path = tmp_path / "sub" / "triggers.pt"
    save_triggers(path, ts)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"x", "original", "altered"}
    back = load_triggers(path)
    assert len(back) == 5 and torch.equal(back.x[4], x[0] * 0.5)
    for a, b in ((back.x, ts.x), (back.original, ts.original), (back.altered, ts.altered)):
        assert torch.equal(a, b)
    expected = torch.cat([poisoning.flip(orig, "inverse"), poisoning.flip(orig[:1], "inverse")]).argmax(1)
    assert torch.equal(back.labels, expected)
    assert (back.labels != back.original.argmax(1)).all()
    (tmp_path / "junk.pt").write_text("not a tensor file")
    with pytest.raises(ValueError, match="not a readable trigger set"):
        load_triggers(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="same length"):
        ts.append(x, orig[:2], orig[:2])


def write_run(root, model: nn.Module, thresholds: dict, name: str = "oe_victim_all.pt") -> None:
    """A minimal finished run: one OE checkpoint and thresholds.json; entries that lack a weights
    hash get the model's (as pipeline.get_thresholds writes them)."""
    spec = {"stage": "oe", "victim": {"stage": "victim", "arch": "cnn", "input_shape": list(SHAPE),
                                      "n_classes": 10}}
    save_checkpoint(root / "checkpoints" / name, model, spec)
    thresholds = json.loads(json.dumps(thresholds))
    for entry in (thresholds, thresholds.get("half", {})):
        entry.setdefault("weights_sha256", weights_sha256(model))
    (root / "thresholds.json").write_text(json.dumps(thresholds))


def test_load_cip_rebuilds_the_same_defense(tmp_path, cnn, queries):
    direct = cip_for(cnn, queries, "reverse_rank", pbd="online")
    thresholds = {"E1": direct.e1, "E2": direct.e2, "T": 1.0, "R1": direct.r1,
                  "half": {"E1": -1e9, "E2": 1e9, "T": 1.0, "R1": -1.0}}
    write_run(tmp_path, cnn, thresholds)
    rebuilt = load_cip(tmp_path, strong="reverse_rank")
    assert (rebuilt.e1, rebuilt.e2, rebuilt.r1) == (direct.e1, direct.e2, direct.r1)
    assert torch.equal(rebuilt(queries), direct(queries))
    assert torch.equal(rebuilt.last_routes, direct.last_routes)
    assert torch.equal(rebuilt.last_flipped, direct.last_flipped)
    # the half victim's entry
    write_run(tmp_path, cnn, thresholds, name="oe_victim_half.pt")
    half = load_cip(tmp_path, split="half")
    half(queries)
    assert (half.last_routes == LOW_ES).all() and not half.last_flipped.any()


def test_load_cip_explains_missing_artifacts(tmp_path, cnn):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cip(tmp_path)
    write_run(tmp_path, cnn, {"E1": 0.0, "E2": 1.0, "T": 1.0})
    with pytest.raises(ValueError, match="R1"):
        load_cip(tmp_path)
    assert load_cip(tmp_path, pbd=None).r1 is None
    write_run(tmp_path, cnn, {"E1": 0.0, "E2": 1.0, "T": 1.0}, name="oe_victim_half.pt")
    with pytest.raises(ValueError, match="'half'"):
        load_cip(tmp_path, split="half")


def test_load_cip_refuses_thresholds_of_other_weights(tmp_path, cnn, queries):
    """Issue 12: a checkpoint retrained with identical settings but different weights must not be
    paired with thresholds computed for the old weights."""
    direct = cip_for(cnn, queries, "reverse_rank", pbd="online")
    write_run(tmp_path, cnn, {"E1": direct.e1, "E2": direct.e2, "T": 1.0, "R1": direct.r1})
    assert load_cip(tmp_path).e1 == direct.e1
    other = copy.deepcopy(cnn)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # same architecture and settings, other bits
    spec = {"stage": "oe", "victim": {"stage": "victim", "arch": "cnn", "input_shape": list(SHAPE),
                                      "n_classes": 10}}
    save_checkpoint(tmp_path / "checkpoints" / "oe_victim_all.pt", other, spec)
    with pytest.raises(ValueError, match=r"computed for weights .* pipeline\.get_thresholds"):
        load_cip(tmp_path)
    stale = json.loads((tmp_path / "thresholds.json").read_text())
    del stale["weights_sha256"]  # an entry without a hash (older format) is refused too
    (tmp_path / "thresholds.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="unknown hash"):
        load_cip(tmp_path)


# --- notebook helpers --------------------------------------------------------------------------

def test_branch_examples_and_compare_defenses():
    energies = [-20.0, -19.0, -6.0, -5.5, 1.0, 2.0, 3.0]
    table = torch.stack([logits_with_energy(e) for e in energies])
    model = TableModel(table)
    cip = CIP(model, SHAPE, e1=-8.0, e2=0.0, strong="inverse", pbd=None)
    x = model.images(list(range(len(energies))))
    ex = branch_examples(cip, {"a": x[:3], "b": x[3:]}, per_branch=1)  # a: ID ID low, b: low high x3
    assert ex["route"].tolist() == [ID, LOW_ES, LOW_ES, HIGH_ES]
    assert ex["energy"].tolist() == [-20.0, -6.0, -5.5, 1.0]
    assert ex["source"].tolist() == [0, 0, 1, 1]
    assert torch.equal(ex["answer"][0], ex["clean"][0])
    assert int(ex["answer"][3].argmax()) != int(ex["clean"][3].argmax())
    assert len(branch_examples(cip, {"a": x[:3], "b": x[3:]}, per_branch=2)["x"]) == 6

    y = torch.zeros(3, dtype=torch.long)
    rows = compare_defenses({"none": NoDefense(model, SHAPE), "cip": cip}, (x[:3], y), {"ood": x[4:]})
    none, cip_row = rows
    assert none["fidelity"] == 1.0 and none["test_top1_change"] == 0.0
    assert cip_row["victim_accuracy"] == 1.0
    assert cip_row["fidelity"] == 1.0  # ID and low-ES confident rows keep top-1
    assert cip_row["ood_top1_change"] == 1.0  # every OOD query high-ES, inverted
    assert cip_row["ood_routes"]["high-ES OOD"] == 1.0
    json.dumps(rows)  # JSON-able
