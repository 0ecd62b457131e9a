"""The served CIP (online PBD) is verifiable: on the smoke profile, a surrogate stolen from its answers
is flagged, a model trained on the same images with their true labels is not, and online PBD flips
the share of ID-routed queries it was calibrated for (issue 27).

Smoke at its defaults cannot convict anyone: 3 innocent models give every unit a null rate of
1 - 0.05^(1/2) = 0.78, and 0.75 % of its ~240 ID-routed attacker digits is about 2 triggers. So
the tests set, and say why:

* ``n_innocent=8``: 7-model sub-pools, null floor 0.35, so 5 reproduced triggers give p = 0.005;
* ``pbd_r1_percentile=5``: about 12 triggers among the thief's ID-routed digits;
* ``victim_epochs=3``, ``ida_epochs=40``, ``surrogate_batch=32``: a victim worth stealing and a
  thief that fits its training answers, flips included (smoke's one or two epochs train
  neither; 15 epochs at batch 64 reproduced 4 of 19 flips, as many as an honest model).
"""
from __future__ import annotations

import pytest
import torch

from cip_helpers.course import attacks, config, data, pipeline
from cip_helpers.method import verification
from cip_helpers.method.scores import ID, energy_score, reliability_score
from cip_helpers.method.defenses import softmax
from cip_helpers.method.models import predict_logits
from cip_helpers.tools import report

from conftest import one_thread_smoke

OVERRIDES = {"n_innocent": 8, "pbd_r1_percentile": 5.0, "victim_epochs": 3, "ida_epochs": 40, "surrogate_batch": 32}
"""What smoke needs to convict at all (module docstring)."""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The smoke profile with :data:`OVERRIDES`, the hard-label IDA thief against the served CIP,
    and the innocent pool."""
    with one_thread_smoke(tmp_path_factory.mktemp("deployed")):
        cfg = config.get_profile("smoke", **OVERRIDES)
        record = attacks.run_ida(cfg, "cip", "hard", verbose=False, pbd="online")
        innocents = pipeline.get_innocent_models(cfg, verbose=False)
        yield cfg, record, innocents


def test_a_surrogate_stolen_from_the_served_cip_is_flagged(served):
    cfg, record, innocents = served
    assert record["defense_kwargs"]["pbd"] == "online" and record["setting"] == "hard_online"
    assert record["n_triggers"] >= 5, record["routes"]  # enough to convict at all (docstring)
    verdicts = report.verification_verdicts(cfg, [record], innocents, 10)
    stolen = [v for v in verdicts if v["kind"] == "stolen"]
    assert len(stolen) == 1 and stolen[0]["pbd"] == "online"
    assert stolen[0]["p_value"] < cfg.alpha and stolen[0]["flagged"], stolen[0]
    innocent = [v for v in verdicts if v["kind"] == "innocent"]
    assert len(innocent) == cfg.n_innocent and not any(v["flagged"] for v in innocent)


def test_a_model_trained_on_the_same_images_with_true_labels_is_not_flagged(served):
    cfg, record, innocents = served
    x, y = data.id_data(cfg).split("attacker")
    honest, _ = attacks.train_surrogate(cfg, x, torch.nn.functional.one_hot(y, 10).float(), "hard",
                                        epochs=cfg.ida_epochs, verbose=False, desc="honest")
    triggers = attacks.load_trigger_set(cfg, record["name"])
    owner, _ = pipeline.get_oe_victim(cfg, "half", verbose=False)
    th = pipeline.get_thresholds(cfg, "half", verbose=False)
    ood = verification.ood_flags(owner, triggers.x, th["E1"], th["T"])
    honest_verdict = verification.ownership_test(honest, innocents, triggers.x, triggers.labels, ood, cfg.alpha)
    stolen_verdict = verification.ownership_test(attacks.load_surrogate(cfg, record["name"]), innocents,
                                                 triggers.x, triggers.labels, ood, cfg.alpha)
    assert not honest_verdict["flagged"] and honest_verdict["p_value"] > 0.1, honest_verdict
    assert stolen_verdict["flagged"] and stolen_verdict["m"] > honest_verdict["m"], (stolen_verdict, honest_verdict)


def test_online_pbd_flips_the_calibrated_share_of_id_routed_queries(served):
    """Tolerance: on the owner's calibration digits the share is the percentile up to one digit
    (an interpolated quantile); on digits the owner never saw (the thief's half, the test split)
    it is a sample of them, so within 3 binomial standard deviations of the share, plus one digit."""
    cfg, _, _ = served
    share = cfg.pbd_r1_percentile / 100
    api = pipeline.get_defense(cfg, "cip", "half", strong="reverse_rank")
    for split in ("half", "attacker", "test"):
        x, _ = data.id_data(cfg).split(split)
        fresh = api.fresh()  # a fresh API per split: its counts are this split's
        fresh(x)
        n_id, flipped = int((fresh.last_routes == ID).sum()), int(fresh.last_flipped.sum())
        assert n_id > 50
        measured = flipped / n_id
        tol = 1 / n_id if split == "half" else 3 * (share * (1 - share) / n_id) ** 0.5 + 1 / n_id
        assert abs(measured - share) <= tol, (split, flipped, n_id, measured, tol)
    # and the calibration is the one the profile names: the percentile among ID-routed training digits
    th = pipeline.get_thresholds(cfg, "half", verbose=False)
    x, _ = data.id_data(cfg).split("half")
    logits = predict_logits(api.model, x)
    routed = energy_score(logits, th["T"]) < th["E1"]
    r = reliability_score(softmax(logits))[routed]
    assert th["r1_among"] == "id_routed" and th["r1_population"] == int(routed.sum())
    assert abs(float((r < th["R1"]).double().mean()) - share) <= 1 / len(r)


def test_the_earlier_calibration_stays_reachable(served):
    cfg, _, _ = served
    earlier = config.get_profile("smoke", **{**OVERRIDES, "pbd_r1_among": "all"})
    x, _ = data.id_data(cfg).split("attacker")
    counts = {}
    for c in (cfg, earlier):
        api = pipeline.get_defense(c, "cip", "half", strong="reverse_rank")
        api(x)
        counts[c.pbd_r1_among] = int(api.last_flipped.sum())
    th = pipeline.get_thresholds(earlier, "half", verbose=False)
    assert th["r1_among"] == "all" and th["r1_population"] == len(data.id_data(cfg).split("half")[0])
    # (on quick the earlier calibration flips far fewer of them, notebook 05; smoke's 3-epoch victim
    # routes most low-R digits ID, so here the two can tie)
    assert counts["all"] <= counts["id_routed"], counts
