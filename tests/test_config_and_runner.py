"""Issue 14, cases 7, 8 and 11: typed and range-checked profile values, a results root resolved
once for every kernel, and a batch runner that always ends (cell timeouts, no kernel left behind,
slider cells without widgets in batch runs).

The runner tests execute tiny temporary notebooks (one kernel each, seconds), never the course."""
from __future__ import annotations

import json
import os
import sys
import time
import types
import uuid
from pathlib import Path

import nbformat
import psutil
import pytest

from cip_helpers.course import config
from cip_helpers.tools import run
from cip_helpers.course.config import PROFILES, get_profile

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _write_notebook(path: Path, *sources: str) -> Path:
    """A notebook with the course's parameters cell followed by code cells ``sources``."""
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('profile = "quick"\noverrides = {}', metadata={"tags": ["parameters"]}),
        *(nbformat.v4.new_code_cell(src) for src in sources)])
    nb.metadata["kernelspec"] = KERNELSPEC
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


PROBE = """\
import json, os
from cip_helpers.course import config
cfg = config.get_profile(profile, **overrides)
cfg.results_dir.mkdir(parents=True, exist_ok=True)
(cfg.results_dir / "probe.json").write_text(json.dumps({
    "cwd": os.getcwd(), "results_root": os.environ.get("CIP_RESULTS_ROOT"),
    "data_root": os.environ.get("CIP_DATA_ROOT"), "batch": os.environ.get("CIP_BATCH"),
    "results_dir": str(cfg.results_dir), "tag": cfg.tag, "dawn_key": cfg.dawn_key,
    "dqa_ratios": repr(cfg.dqa_ratios), "victim_epochs": repr(cfg.victim_epochs)}))
"""
"""A notebook cell that records what the kernel sees: its cwd, the roots and the profile's types."""


# ------------------------------------------------------------------ case 7: typed parameters


def test_case7_papermill_tuple_string_is_coerced():
    from papermill.translators import PythonTranslator

    # what papermill really does with a tuple inside the overrides dict: it becomes its repr string
    namespace: dict = {}
    exec(PythonTranslator.codify({"overrides": {"dqa_ratios": (1.0, 0.5), "dfme_gen_channels": (8, 4)}}),
         namespace)
    overrides = namespace["overrides"]
    assert overrides == {"dqa_ratios": "(1.0, 0.5)", "dfme_gen_channels": "(8, 4)"}
    cfg = get_profile("smoke", **overrides)
    assert cfg.dqa_ratios == (1.0, 0.5) and all(type(r) is float for r in cfg.dqa_ratios)
    assert cfg.dfme_gen_channels == (8, 4) and all(type(c) is int for c in cfg.dfme_gen_channels)
    # ints where floats are declared become floats; a string that is not a list/tuple literal fails
    assert get_profile("smoke", dqa_ratios="[1, 2]").dqa_ratios == (1.0, 2.0)
    with pytest.raises(ValueError, match=r"'dqa_ratios' expects tuple\[float, \.\.\.\], got '1.0, x'"):
        get_profile("smoke", dqa_ratios="1.0, x")
    with pytest.raises(ValueError, match=r"'dqa_ratios' expects tuple\[float, \.\.\.\], got '0.5' \(str\)"):
        get_profile("smoke", dqa_ratios="0.5")  # a number, not a tuple


def test_case7_set_tag_2024_is_a_string(results_root):
    overrides = run.parse_overrides(["tag=2024", "victim_epochs=2", "knockoff_curve=[100, 200]"])
    assert overrides == {"tag": "2024", "victim_epochs": 2, "knockoff_curve": (100, 200)}
    assert type(overrides["tag"]) is str and type(overrides["victim_epochs"]) is int
    cfg = get_profile("smoke", **overrides)
    assert cfg.tag == "2024" and cfg.profile_dir == results_root / "2024"  # the TypeError site


def test_case7_set_dawn_key_12345_is_a_string():
    overrides = run.parse_overrides(["dawn_key=12345", "dataset=mnist", "seed=3"])
    assert overrides == {"dawn_key": "12345", "dataset": "mnist", "seed": 3}
    cfg = get_profile("smoke", **overrides)
    assert cfg.dawn_key == "12345" and cfg.dawn_key.encode() == b"12345"  # was int: AttributeError
    # the raw text is the value of a str field, also when it looks like JSON
    assert run.parse_overrides(['dawn_key="quoted"', "tag=[1]"]) == {"dawn_key": '"quoted"', "tag": "[1]"}


def test_case7_bad_value_names_field_and_type():
    with pytest.raises(ValueError, match=r"profile field 'tag' expects str, got 2024 \(int\)"):
        get_profile("smoke", tag=2024)  # through get_profile a str field takes only a str
    with pytest.raises(ValueError, match=r"profile field 'victim_epochs' expects int, got '2.5' \(str\)"):
        get_profile("smoke", victim_epochs="2.5")
    with pytest.raises(ValueError, match=r"profile field 'cell_timeout' expects int, got True \(bool\)"):
        get_profile("smoke", cell_timeout=True)
    with pytest.raises(ValueError, match=r"profile field 'temperature' expects float, got False \(bool\)"):
        get_profile("smoke", temperature=False)
    with pytest.raises(ValueError, match=r"profile field 'lr' expects float, got nan \(float\)"):
        get_profile("smoke", lr=float("nan"))
    with pytest.raises(ValueError, match=r"'dfme_gen_channels' expects tuple\[int, int\], got \[8, 4, 2\]"):
        get_profile("smoke", dfme_gen_channels=[8, 4, 2])
    with pytest.raises(ValueError, match=r"'knockoff_curve' expects tuple\[int, \.\.\.\].*element 1 \('x'\)"):
        get_profile("smoke", knockoff_curve=[100, "x"])
    # what converts: integral floats and numeric strings
    cfg = get_profile("smoke", victim_epochs=2.0, n_noise="50", knockoff_queries="1e3", lr=1, temperature="0.5")
    assert (cfg.victim_epochs, cfg.n_noise, cfg.knockoff_queries) == (2, 50, 1000)
    assert type(cfg.victim_epochs) is int and type(cfg.lr) is float and cfg.lr == 1.0 and cfg.temperature == 0.5
    import numpy as np  # notebook users pass numpy scalars: numbers, but numpy's bool is no number

    cfg = get_profile("smoke", seed=np.int64(2), lr=np.float32(0.5), victim_epochs=np.float64(3.0))
    assert (cfg.seed, cfg.lr, cfg.victim_epochs) == (2, 0.5, 3) and type(cfg.seed) is int and type(cfg.lr) is float
    with pytest.raises(ValueError, match=r"profile field 'seed' expects int, got .*True.* \(bool\)"):
        get_profile("smoke", seed=np.bool_(True))
    # the runner's --set: a command-line error (SystemExit) carrying the same message
    with pytest.raises(SystemExit, match=r"--set victim_epochs=abc: profile field 'victim_epochs' expects int"):
        run.parse_overrides(["victim_epochs=abc"])
    with pytest.raises(SystemExit, match=r"unknown profile field 'victim_epoch'"):
        run.parse_overrides(["victim_epoch=3"])
    with pytest.raises(SystemExit, match=r"--set expects FIELD=VALUE"):
        run.parse_overrides(["victim_epochs"])


def test_case7_every_field_type_is_coerced_by_declared_type():
    """Coercion comes from the dataclass declaration: every field's type is one coerce_field
    knows, and every profile's own values pass through it unchanged."""
    known = {str, int, float, bool, tuple[int, ...], tuple[float, ...], tuple[int, int]}
    types_ = config.field_types()
    assert set(types_) == {f for f in config.Profile.__dataclass_fields__}
    assert set(types_.values()) <= known, set(types_.values()) - known
    for profile in PROFILES.values():
        for name, value in profile.as_dict().items():
            assert config.coerce_field(name, value) == value, (profile.name, name)


RANGE_CASES = [
    ({"p1": 99.95}, r"p1=99.95, p2=99.9: must be 0 <= p1 < p2 <= 100"),
    ({"p1": -1.0}, r"p1=-1.0, p2=99.9: must be 0 <= p1 < p2 <= 100"),
    ({"p2": 100.5}, r"must be 0 <= p1 < p2 <= 100"),
    ({"temperature": 0}, r"temperature=0.0: must be > 0"),
    ({"rs_beta": 0}, r"rs_beta=0.0: must be > 0"),
    ({"rs_gamma": -0.1}, r"rs_gamma=-0.1: must be > 0"),
    ({"dawn_rate": 1.5}, r"dawn_rate=1.5: must be in \[0, 1\]"),
    ({"pbd_offline_T": -1}, r"pbd_offline_T=-1.0: must be a fraction in \[0, 1\) or a whole count >= 1"),
    ({"pbd_offline_T": 2.5}, r"pbd_offline_T=2.5: must be a fraction in \[0, 1\) or a whole count >= 1"),
    ({"pbd_r1_percentile": 101}, r"pbd_r1_percentile=101.0: must be in \[0, 100\]"),
    ({"alpha": 1}, r"alpha=1.0: must be in \(0, 1\)"),
    ({"alpha": 0}, r"alpha=0.0: must be in \(0, 1\)"),
    ({"seed": -1}, r"seed=-1: must be >= 0"),
    ({"victim_epochs": 0}, r"victim_epochs=0: must be >= 1"),
    ({"batch_size": 0}, r"batch_size=0: must be >= 1"),
    ({"n_noise": 0}, r"n_noise=0: must be >= 1"),
    ({"n_knockoff": 0}, r"n_knockoff=0: must be >= 1 with pools='embedded'"),
    ({"pools": "stored"}, r"pools='stored', dataset='mnist_embedded': must be 'embedded' with dataset='mnist_embedded'"),
    ({"near_source": "mnist_digits"}, r"near_source='mnist_digits', dataset='mnist_embedded': must be 'characters' on MNIST"),
    ({"dataset": "fashionmnist", "near_source": "mnist_digits", "n_near": 5001},
     r"n_near=5001, near_source='mnist_digits': must be <= 5000"),
    ({"near_source": "emnist"}, r"near_source='emnist': must be one of \['characters', 'mnist_digits'\]"),
    ({"cell_timeout": -5}, r"cell_timeout=-5: must be >= 0 \(0 = no limit\)"),
    ({"knockoff_gamma": -1}, r"knockoff_gamma=-1.0: must be >= 0"),
    ({"oe_m_in": -3.0, "oe_m_out": -20.0}, r"oe_m_in=-3.0, oe_m_out=-20.0: must be oe_m_in < oe_m_out"),
    ({"ida_label_type": "logits"}, r"ida_label_type='logits': must be one of \['hard', 'soft'\]"),
    ({"knockoff_curve_label_type": "Soft"}, r"must be one of \['hard', 'soft'\]"),
    ({"dfme_lr_schedule": "step"}, r"dfme_lr_schedule='step': must be one of \['constant', 'cosine', 'drop'\]"),
    ({"victim_arch": "vgg"}, r"victim_arch='vgg': must be one of \["),
    ({"dataset": "svhn"}, r"dataset='svhn': must be one of \["),
    ({"knockoff_curve": ()}, r"knockoff_curve=\(\): must be a non-empty tuple"),
    ({"dqa_ratios": (1.0, 0.0)}, r"dqa_ratios=\(1.0, 0.0\): must be a non-empty tuple of ratios > 0"),
    ({"dfme_queries": 100}, r"dfme_queries=100: must be >= the queries of one DFME round.* = 160"),
    ({"tag": "../elsewhere"}, r"tag='../elsewhere': must be a single directory name"),
]
"""(overrides, the message fragment naming field, value and valid range) on the smoke profile."""


@pytest.mark.parametrize(("overrides", "message"), RANGE_CASES,
                         ids=["-".join(f"{k}={v}" for k, v in o.items()) for o, _ in RANGE_CASES])
def test_case7_out_of_range_values_name_the_valid_range(overrides, message):
    with pytest.raises(ValueError, match=r"invalid profile 'smoke': .*" + message):
        get_profile("smoke", **overrides)


def test_case7_several_problems_are_reported_together_and_the_runner_stops_before_any_notebook(tmp_path):
    with pytest.raises(ValueError) as err:
        get_profile("smoke", temperature=-1, dawn_rate=2)
    message = str(err.value)
    assert "temperature=-1.0: must be > 0" in message and "dawn_rate=2.0: must be in [0, 1]" in message
    _write_notebook(tmp_path / "01_never.ipynb", "raise RuntimeError('must not run')")
    with pytest.raises(SystemExit, match=r"--set: invalid profile 'smoke': p1=120.0, p2=99.9"):
        run.main(["--profile", "smoke", "--set", "p1=120"], notebook_dir=tmp_path)


def test_case7_every_profile_validates_and_meaningful_zeros_are_accepted():
    for name, profile in PROFILES.items():
        assert config.check_ranges(profile) == [], name
        assert get_profile(name) == profile
    full = PROFILES["full"]
    zeros = (full.n_train, full.n_test, full.cell_timeout, full.dfme_replay, full.knockoff_gamma)
    assert zeros == (0, 0, 0, 0, 0.0)  # "all", "all", no limit, no replay, raw pool images
    edge = get_profile("smoke", dawn_rate=0, pbd_offline_T=0, pbd_r1_percentile=100, p1=0, p2=100,
                       knockoff_gamma=0, dfme_replay=0, cell_timeout=0, n_train=0, n_test=0, seed=0)
    assert (edge.dawn_rate, edge.pbd_offline_T, edge.p1, edge.p2) == (0.0, 0.0, 0.0, 100.0)
    assert get_profile("smoke", dawn_rate=1).dawn_rate == 1.0
    # stored datasets read 0 as "the whole pool"; the embedded set cannot
    assert get_profile("full", n_outlier=0).n_outlier == 0
    # dataclasses.replace (used inside attacks.make_defense) is checked as well
    import dataclasses

    with pytest.raises(ValueError, match=r"dawn_rate=-0.5: must be in \[0, 1\]"):
        dataclasses.replace(PROFILES["smoke"], dawn_rate=-0.5)


def test_case7_allowed_value_sets_match_the_modules_that_use_them():
    from cip_helpers.method import models
    from cip_helpers.course import attacks, data, data_full, dfme

    assert config.LABEL_TYPES == attacks.LABEL_TYPES
    assert config.LR_SCHEDULES == dfme.LR_SCHEDULES
    assert config.ARCHS == models.ARCHS
    assert set(config.DATASETS) == {"mnist_embedded", *data_full.DATASETS}
    assert config.NEAR_SOURCES == data.NEAR_SOURCES


def test_case7_set_values_reach_the_kernel_typed(tmp_path, results_root):
    """End to end: --set values go runner -> worker (JSON) -> papermill -> get_profile in the kernel."""
    _write_notebook(tmp_path / "nbs" / "01_probe.ipynb", PROBE)
    status = run.main(["--profile", "smoke", "--set", "tag=2024", "--set", "dawn_key=12345",
                       "--set", "dqa_ratios=(1.0, 0.5)", "--set", "victim_epochs=2"],
                      notebook_dir=tmp_path / "nbs")
    assert status == 0
    probe = json.loads((results_root / "2024" / "seed-0" / "probe.json").read_text())
    assert probe["tag"] == "2024" and probe["dawn_key"] == "12345"
    assert probe["dqa_ratios"] == "(1.0, 0.5)" and probe["victim_epochs"] == "2"
    assert (results_root / "2024" / "seed-0" / "executed" / "01_probe.ipynb").exists()


# ------------------------------------------------------------------ case 8: relative results root


def test_case8_relative_results_root_is_resolved_once(tmp_path, monkeypatch):
    """Kernels run in the notebook directory; a relative CIP_RESULTS_ROOT / CIP_DATA_ROOT must
    still mean the directory the runner was started from, for the runner AND every kernel."""
    user_dir, nb_dir = tmp_path / "user", tmp_path / "user" / "nbs"
    _write_notebook(nb_dir / "01_probe.ipynb", PROBE)
    monkeypatch.chdir(user_dir)
    monkeypatch.setenv("CIP_RESULTS_ROOT", "relresults")
    monkeypatch.setenv("CIP_DATA_ROOT", "reldata")
    assert run.main(["--profile", "smoke"], notebook_dir=Path("nbs")) == 0
    seed_dir = user_dir / "relresults" / "smoke" / "seed-0"
    probe = json.loads((seed_dir / "probe.json").read_text())  # written by the kernel
    assert Path(probe["cwd"]).resolve() == nb_dir.resolve()  # the kernel really ran elsewhere
    assert probe["results_root"] == str((user_dir / "relresults").resolve())
    assert probe["data_root"] == str((user_dir / "reldata").resolve())
    assert probe["results_dir"] == str(seed_dir.resolve())
    assert probe["batch"] == "1"  # every kernel of the runner draws slider cells without widgets
    assert (seed_dir / "executed" / "01_probe.ipynb").exists()  # the runner's copy: same root
    assert (seed_dir.parent / "timings.json").exists()
    assert not (nb_dir / "relresults").exists() and not (nb_dir / "reldata").exists()
    # resolved in place, once: the runner's own environment now holds the absolute path
    assert os.environ["CIP_RESULTS_ROOT"] == str((user_dir / "relresults").resolve())


# ------------------------------------------------------------------ case 11: a runner that ends


def _processes_with(marker: str) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment holds ``CIP_TEST_MARKER=marker``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("CIP_TEST_MARKER") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_case11_cell_timeout_names_notebook_and_cell_and_leaves_no_kernel(tmp_path, results_root,
                                                                         monkeypatch, capsys):
    marker = uuid.uuid4().hex  # inherited by the worker and its kernel: finds them even if orphaned
    monkeypatch.setenv("CIP_TEST_MARKER", marker)
    pids = tmp_path / "pids.json"
    _write_notebook(tmp_path / "nbs" / "01_sleepy.ipynb",
                    f"import json, os\nopen({str(pids)!r}, 'w').write(json.dumps([os.getpid(), os.getppid()]))",
                    "import time; time.sleep(60)",
                    "never = 1")
    start = time.perf_counter()
    status = run.main(["--profile", "smoke", "--set", "cell_timeout=5"], notebook_dir=tmp_path / "nbs")
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert status == 1
    assert seconds < 55, f"the 5 s cell timeout did not stop the 60 s cell ({seconds:.0f} s)"
    assert "01_sleepy.ipynb (seed 0) failed in cell [4]: CellTimeoutError:" in err, err
    assert "`import time; time.sleep(60)`" in err and "cell_timeout = 5 s" in err, err
    # the partly executed copy marks the cell that timed out
    executed = nbformat.read(results_root / "smoke" / "seed-0" / "executed" / "01_sleepy.ipynb", as_version=4)
    cell = next(c for c in executed.cells if "time.sleep(60)" in c.source)
    assert cell.metadata.papermill.status == "failed"
    errors = [o.ename for o in cell.outputs if o.output_type == "error"]
    assert errors[-1] == "CellTimeoutError", errors  # after the kernel's KeyboardInterrupt, if recorded
    assert all(c.execution_count is None for c in executed.cells if c.source == "never = 1")
    # no kernel and no worker left: the kernel wrote its pid and its parent's (the worker's)
    kernel_pid, worker_pid = json.loads(pids.read_text())
    assert worker_pid != os.getpid() and kernel_pid != worker_pid
    left = _processes_with(marker)
    assert not left, [(p.pid, p.cmdline()[:4]) for p in left]
    for pid in (kernel_pid, worker_pid):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).environ().get("CIP_TEST_MARKER") != marker
    assert not [c for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]


def test_case11_widget_notebooks_render_without_widgets_in_batch(monkeypatch):
    from cip_helpers.course import plots, progress

    calls: list[dict] = []

    def view(threshold: float, width: float) -> None:
        calls.append({"threshold": threshold, "width": width})

    sliders = {"threshold": {"value": 95.0, "min": 80.0, "max": 99.9, "step": 0.1},
               "width": {"value": 2.0, "min": 0.0, "max": 5.0, "step": 0.5, "description": "w"}}
    # batch (the runner sets CIP_BATCH): the default view once, and ipywidgets is never imported
    monkeypatch.setenv(progress.BATCH_ENV, "1")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # `import ipywidgets` now raises ImportError
    assert plots.slider_view(view, **sliders) is None
    assert calls == [{"threshold": 95.0, "width": 2.0}]
    # interactive (JupyterLab): live sliders, built from the same specs, and no eager batch call
    made: dict = {}
    fake = types.ModuleType("ipywidgets")
    fake.FloatSlider = lambda **spec: ("slider", spec)
    fake.interactive = lambda function, **controls: made.update(function=function, controls=controls) or "ui"
    shown: list = []
    monkeypatch.setitem(sys.modules, "ipywidgets", fake)
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    monkeypatch.delenv(progress.BATCH_ENV)
    calls.clear()
    plots.slider_view(view, **sliders)
    assert calls == [] and shown == ["ui"] and made["function"] is view
    assert made["controls"]["threshold"][1]["value"] == 95.0 and made["controls"]["width"][1]["description"] == "w"


def test_bool_fields_take_bools_and_their_text_only():
    assert config.get_profile("smoke", evidence="true").evidence is True
    assert config.get_profile("smoke", evidence="0").evidence is False
    assert config.coerce_field("evidence", "True", from_text=True) is True
    for bad in (0.5, "yes", None, 2):
        with pytest.raises(ValueError, match="evidence"):
            config.get_profile("smoke", evidence=bad)
    with pytest.raises(ValueError, match="pbd_r1_among"):
        config.get_profile("smoke", pbd_r1_among="some")
