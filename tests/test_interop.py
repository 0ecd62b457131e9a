"""Issue 14, case 10: other people's attack code calls a defense through numpy and ART
(cip_helpers.tools.interop). The smoke victims are trained once for this module into a private
temporary results root (6-18 s on 2 CPU cores, depending on load)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cip_helpers.course import attacks, config, data, pipeline
from cip_helpers.method.defenses import NoDefense
from cip_helpers.tools.interop import art_classifier, numpy_predict
from cip_helpers.method.models import build_model
from conftest import one_thread_smoke

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def smoke_cfg(tmp_path_factory):
    """The smoke profile, results in a temporary root shared by this module's tests (victims,
    OE victim and thresholds are trained on first use), on one torch thread (on a busy 2-core
    CPU, 2 threads ran up to 8x slower). Not ``smoke_results_root``: the notebook tests'
    reproducibility run must not load checkpoints trained in this process."""
    with one_thread_smoke(tmp_path_factory.mktemp("interop_results")) as cfg:
        yield cfg


def smoke_queries(cfg: config.Profile, n: int = 100) -> torch.Tensor:
    """n ID test digits and n adapted KnockoffNets photo crops: CIP routes the digits mostly to
    ID and the crops to high-ES OOD, so a comparison covers several branches."""
    return torch.cat([data.id_data(cfg).split("test")[0][:n], attacks.knockoff_queries(cfg, n)])


def test_case10_numpy_predict_matches_the_defense(smoke_cfg):
    cfg = smoke_cfg
    x = smoke_queries(cfg)
    for name in ("none", "dp", "dawn", "cip"):
        # three fresh instances with the same settings (CIP's noise generator starts at its seed)
        torch_api, np_api, np64_api = (pipeline.get_defense(cfg, name) for _ in range(3))
        expected = torch_api(x).numpy()
        got = numpy_predict(np_api)(x.numpy())
        got64 = numpy_predict(np64_api)(x.numpy().astype(np.float64))
        for out in (got, got64):
            assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (200, 10), name
            assert np.array_equal(out, expected), name
        if name == "cip":
            routes = torch_api.route_counts()
            assert routes["ID"] >= 50 and routes["high-ES OOD"] >= 50, routes
            assert np_api.route_counts() == routes
        if name == "dawn":  # 1 watermarked test digit (fixed bytes) + 3 crops here
            assert len(torch_api.trigger_set) >= 1
        if name in ("dawn", "cip"):  # the trigger set sees the same queries
            assert len(np_api.trigger_set) == len(torch_api.trigger_set)
            assert torch.equal(np_api.trigger_set.x, torch_api.trigger_set.x)

    api = pipeline.get_defense(cfg, "none")
    predict = numpy_predict(api)
    assert predict(np.zeros((0, *SHAPE), np.float32)).shape == (0, 10)
    channels_last = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))
    view = channels_last.transpose(0, 3, 1, 2)  # channels first again, but not C-contiguous
    view.flags.writeable = False
    assert np.array_equal(predict(view), api(x).numpy())

    # bad input: the defense's own error, word for word, as for the same torch tensor
    u8 = (x.numpy() * 255).round().astype(np.uint8)
    bad = {"uint8": u8, "0..255 floats": u8.astype(np.float64), "no channel axis": x.numpy()[:, 0],
           "NaN": np.full((2, *SHAPE), np.nan, np.float32)}
    for what, arr in bad.items():
        with pytest.raises(ValueError) as from_numpy:
            predict(arr)
        with pytest.raises(ValueError) as from_torch:
            api(torch.from_numpy(arr.astype(np.float32) if arr.dtype == np.float64 else arr))
        assert str(from_numpy.value) == str(from_torch.value), what
    with pytest.raises(TypeError, match="Defense"):
        numpy_predict(api.model)  # a bare model is not a defense


def test_case10_art_classifier_answers_like_the_defense(smoke_cfg):
    cfg = smoke_cfg
    x = smoke_queries(cfg).numpy()
    for name in ("none", "dp"):  # deterministic answers: ART's batching cannot matter
        api = pipeline.get_defense(cfg, name)
        clf = art_classifier(api)
        assert clf.input_shape == SHAPE and clf.nb_classes == 10
        assert np.array_equal(np.asarray(clf.clip_values, dtype=float), [0.0, 1.0])
        got = clf.predict(x, batch_size=64)
        assert got.dtype == np.float32 and np.array_equal(got, api(torch.from_numpy(x)).numpy()), name
    # CIP draws noise per call: one ART batch against one torch call of a twin instance
    twin, api = pipeline.get_defense(cfg, "cip"), pipeline.get_defense(cfg, "cip")
    got = art_classifier(api).predict(x, batch_size=len(x))
    assert np.array_equal(got, twin(torch.from_numpy(x)).numpy())
    assert api.route_counts() == twin.route_counts() and api.route_counts()["high-ES OOD"] >= 50
    with pytest.raises(TypeError, match="nb_classes"):
        art_classifier(api, nb_classes=3)


def test_case10_art_classifier_without_art_names_the_install_command(monkeypatch):
    api = NoDefense(build_model("cnn", 1, 10, 28), SHAPE)
    for module in ("art", "art.estimators", "art.estimators.classification"):
        monkeypatch.setitem(sys.modules, module, None)  # "import art..." now raises ImportError
    with pytest.raises(ImportError, match=r"pip install adversarial-robustness-toolbox.*\.\[art\]"):
        art_classifier(api)


def test_case10_importing_interop_does_not_import_art():
    code = "import sys, cip_helpers.tools.interop; print('art' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def art_knockoff_accuracy(victim, pool: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          seed: int) -> float:
    """Test accuracy of the surrogate that ART's KnockoffNets (random sampling, hard labels) steals
    from the ART classifier ``victim`` with the queries ``pool``: the course's surrogate (small
    CNN, width 16), Adam 2e-3, 5 epochs in batches of 64; queries go to the victim in calls of 256
    (ART's default is 1 per call). Seeded; restores the global numpy and torch random states."""
    from art.attacks.extraction import KnockoffNets
    from art.estimators.classification import PyTorchClassifier

    np_state = np.random.get_state()
    with torch.random.fork_rng():
        try:
            np.random.seed(seed)  # KnockoffNets picks its queries with np.random
            torch.manual_seed(seed)  # the surrogate's data order and dropout
            model = attacks.build_surrogate("cnn", 16, SHAPE, 10, seed=seed)
            thief = PyTorchClassifier(model, torch.nn.CrossEntropyLoss(), SHAPE, 10,
                                      optimizer=torch.optim.Adam(model.parameters(), lr=2e-3),
                                      clip_values=(0.0, 1.0), device_type="cpu")
            attack = KnockoffNets(victim, batch_size_fit=64, batch_size_query=256, nb_epochs=5,
                                  nb_stolen=len(pool), sampling_strategy="random",
                                  use_probability=False, verbose=False)
            stolen = attack.extract(pool, thieved_classifier=thief)
            return float((stolen.predict(test_x, batch_size=256).argmax(1) == test_y).mean())
        finally:
            np.random.set_state(np_state)


def test_case10_art_knockoffnets_cip_surrogate_is_worst(smoke_cfg):
    """ART's own KnockoffNets against the smoke victim behind none, DP and CIP, with the smoke
    KnockoffNets pool (600 photo crops, adapted as in notebook 07); accuracies are means over the
    attacker seeds 0, 1, 2 (200 ID test digits; the victim itself answers 0.40 of them right).

    Measured with victims trained on 1, 2, 3 and 4 torch threads (our stand-in for other
    machines): none 0.245-0.250, DP 0.203-0.217, CIP 0.083-0.113; CIP below min(none, DP) by
    0.104-0.120 and below none by 0.132-0.165. Single attacker seeds: CIP 0.035-0.145.
    Hard labels on purpose: with soft labels DP's reverse sigmoid alone drives the surrogate to
    chance (0.10, as in the quick table), so DP and CIP tie. Not a general law at this scale: the
    smoke victim of seed 2 answers most photo crops with p_max < 0.5, where reverse sigmoid may
    move the top-1, and DP relabels 52 % of them, mostly to one class; its DP surrogate (0.04-0.08)
    then falls below CIP's chance-level one (0.05-0.105). The margin to none held on every victim."""
    test_x, test_y = (t.numpy() for t in data.id_data(smoke_cfg).split("test"))
    pool = attacks.knockoff_queries(smoke_cfg).numpy()
    victims = {name: art_classifier(pipeline.get_defense(smoke_cfg, name)) for name in ("none", "dp", "cip")}
    start = time.perf_counter()
    runs = {name: [art_knockoff_accuracy(victim, pool, test_x, test_y, seed) for seed in (0, 1, 2)]
            for name, victim in victims.items()}
    acc = {name: float(np.mean(a)) for name, a in runs.items()}
    print(f"ART KnockoffNets surrogate accuracy, seeds 0-2: {runs}, mean {acc} "
          f"({time.perf_counter() - start:.1f} s)")

    assert acc["none"] >= 0.18, acc  # the undefended attack learns something (measured >= 0.245)
    assert acc["cip"] <= 0.15, acc  # near chance (0.10) behind CIP (measured <= 0.113)
    assert acc["cip"] <= min(acc["none"], acc["dp"]) - 0.05, acc  # CIP's surrogate is the worst
    assert acc["none"] - acc["cip"] >= 0.08, acc  # measured >= 0.13
