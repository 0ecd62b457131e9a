"""Figures (issue 18, "one visual language"): one colour per defense from ``plots`` alone, legible
grids, honest energy histograms, sliders, labels. Every figure is drawn with small fake data on the
Agg canvas (conftest) except :func:`plots.overview`, which reads the committed quick summary."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import matplotlib.colors as mcolors
from matplotlib.patches import FancyBboxPatch
import numpy as np
import pandas as pd
import pytest
import torch

from cip_helpers.course import plots, progress

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plots.plt.close("all")


# ------------------------------------------------------------------ helpers


def _hex(colour) -> str:
    """``"#rrggbb"`` of any matplotlib colour (alpha dropped)."""
    return mcolors.to_hex(mcolors.to_rgba(colour)[:3])


def _colour(artist) -> str | None:
    """The colour an artist is seen in: a line's colour, a patch's or collection's face (its edge
    when unfilled)."""
    from matplotlib.collections import Collection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if isinstance(artist, Line2D):  # markers only (error bar caps): the markers' colour
        return _hex(artist.get_markeredgecolor() if artist.get_linestyle() in ("None", "")
                    else artist.get_color())
    if isinstance(artist, Patch):
        face = artist.get_facecolor()
        return _hex(face if face[3] > 0 else artist.get_edgecolor())
    if isinstance(artist, Collection):
        faces = artist.get_facecolor()
        if len(faces) and faces[0][3] > 0:
            return _hex(faces[0])
        edges = artist.get_edgecolor()
        return _hex(edges[0]) if len(edges) else None
    return None


def _drawn(fig):
    """Every line, patch and collection drawn in the figure's axes (not legend proxies)."""
    for ax in fig.axes:
        yield from ax.lines
        yield from ax.patches
        yield from ax.collections


def _check_defense_colours(fig, expected: set[str]) -> dict[str, int]:
    """Each artist drawn for a defense (gid ``defense=<name>``) has exactly that defense's colour;
    every defense of ``expected`` has at least one; no other artist wears a defense colour (an
    untagged one in, say, the default cycle's blue would pass for DP). Returns counts per defense."""
    palette = {c.lower(): d for d, c in plots.DEFENSE_COLORS.items()}
    counts: dict[str, int] = {}
    for artist in _drawn(fig):
        gid, colour = artist.get_gid(), _colour(artist)
        if isinstance(artist, FancyBboxPatch):  # a diagram box: a light tint inside, the colour outside
            colour = _hex(artist.get_edgecolor())
        if gid and gid.startswith("defense="):
            defense = gid.split("=", 1)[1]
            assert colour == plots.DEFENSE_COLORS[defense], (artist, defense, colour)
            counts[defense] = counts.get(defense, 0) + 1
        elif colour is not None:
            assert colour not in palette, f"{artist} drawn in {palette[colour]}'s colour {colour} without being {palette[colour]}'s"
    assert set(counts) == expected, counts
    return counts


def _labelled_lines(fig) -> dict[str, str]:
    return {line.get_label(): _hex(line.get_color()) for ax in fig.axes for line in ax.lines
            if not line.get_label().startswith("_")}


# ------------------------------------------------------------------ 1. one colour per defense

_NEUTRAL_OK = {"k", "black", "w", "white", "none", "gray", "grey"}
_HEX = re.compile(r"""["'](#(?:[0-9a-fA-F]{8}|[0-9a-fA-F]{6}|[0-9a-fA-F]{3}))["']""")
_TAB = re.compile(r"""["'](tab:[a-z]+)["']""")
_CYCLE = re.compile(r"""["'](C\d)["']""")
_KEYWORD = re.compile(r"""\b(colou?rs?|facecolors?|edgecolors?|ecolor|fc|ec|mfc|mec|markerfacecolor"""
                      r"""|markeredgecolor|palette)\s*=\s*["']([^"']+)["']""")


def colour_literals(text: str) -> list[str]:
    """Colour literals in source text: hex strings, "tab:..." names, "C0".."C9" cycle references,
    and a named colour (other than black/white/grey) or any palette name passed as a colour."""
    found = [m.group(1) for pat in (_HEX, _TAB, _CYCLE) for m in pat.finditer(text)]
    for m in _KEYWORD.finditer(text):
        key, value = m.group(1), m.group(2)
        if key == "palette" or (mcolors.is_color_like(value) and value.lower() not in _NEUTRAL_OK
                                and not re.fullmatch(r"[01]?\.\d+|[01]", value)):
            found.append(f"{key}={value!r}")
    return found


def test_colour_literal_scanner_finds_what_it_should():
    assert colour_literals('ax.plot(x, color="tab:orange")') == ["tab:orange", "color='tab:orange'"]
    assert colour_literals("c = '#1f77b4'") == ["#1f77b4"]
    assert colour_literals('ax.bar(x, h, color="C3")') == ["C3", "color='C3'"]
    assert colour_literals('ax.axvline(m, color="red")') == ["color='red'"]
    assert colour_literals('sns.barplot(palette="Set1")') == ["palette='Set1'"]
    assert colour_literals('ax.axhline(1, color="k"); ax.plot(color="0.5"); x = "#3 of 5"') == []
    assert colour_literals("palette=plots.DEFENSE_COLORS") == []


def test_plots_is_the_single_source_of_defense_colours():
    """No module of the package but ``plots`` and no notebook code cell spells a colour: figures
    take defense colours from ``plots.DEFENSE_COLORS`` / ``plots.defense_color``."""
    offenders = []
    for path in sorted((REPO / "cip_helpers").glob("*.py")):
        if path.name == "plots.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            offenders += [f"{path.relative_to(REPO)}:{lineno}: {lit}" for lit in colour_literals(line)]
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            for lineno, line in enumerate("".join(cell["source"]).splitlines(), 1):
                offenders += [f"{path.relative_to(REPO)} cell {i} line {lineno}: {lit}"
                              for lit in colour_literals(line)]
    assert not offenders, "colour literals outside cip_helpers/course/plots.py:\n" + "\n".join(offenders)


def test_defense_color_accepts_labels_and_rejects_others():
    c = plots.DEFENSE_COLORS
    assert list(c) == ["none", "oe", "dp", "dawn", "cip", "am"] and len(set(c.values())) == 6
    for label, key in [("cip", "cip"), ("CIP", "cip"), ("dp, soft", "dp"), ("DAWN r=1", "dawn"),
                       ("undefended", "none"), ("OE only", "oe"), ("none: test accuracy", "none"),
                       ("dp_victim-grad", "dp"), ("  Dawn hard ", "dawn")]:
        assert plots.defense_color(label) == c[key], label
    for label in ("cipher", "ID test", "", "open", "knockoff"):
        with pytest.raises(ValueError, match="known defenses: none, oe, dp, dawn, cip"):
            plots.defense_color(label)
    assert not set(plots.OTHER_COLORS) & set(c.values())


def _rows():
    return [{"defense": d, "fidelity": 0.9 + 0.01 * i, "test_top1_change": 0.01 * i,
             "knockoff_top1_change": None if d == "cip" else 0.02 * i}
            for i, d in enumerate(("none", "oe", "dp", "dawn", "cip"))]


def test_defense_comparison_bars_wear_their_defense_colour():
    fig = plots.defense_comparison(_rows())
    counts = _check_defense_colours(fig, {"none", "oe", "dp", "dawn", "cip"})
    assert all(n == 3 for n in counts.values())
    for container in fig.axes[0].containers:  # one bar group per defense, labelled by it
        assert {_hex(p.get_facecolor()) for p in container.patches} == {plots.defense_color(container.get_label())}
    assert "n/a" in [t.get_text() for t in fig.axes[0].texts]  # cip's missing metric


def _ida_table():
    rows = [("none", "hard", .953, None), ("none", "soft", .962, None), ("dp", "hard", .950, None),
            ("dp", "soft", .10, None), ("dawn", "hard", .958, 1.0), ("dawn", "soft", .961, 1.0),
            ("cip", "hard", .956, 1.0), ("cip", "soft", .944, .8)]
    return pd.DataFrame([{"defense": d, "label_type": lt, "surrogate_acc": v, "trigger_acc": t}
                         for d, lt, v, t in rows])


def _bars_by_tick(fig):
    """(tick label under the bar, hatch, colour) of every bar of the first axes."""
    ax = fig.axes[0]
    ticks = {round(t, 6): lab.get_text() for t, lab in zip(ax.get_xticks(), ax.get_xticklabels())}
    out = []
    for p in ax.patches:
        centre = p.get_x() + p.get_width() / 2
        tick = min(ticks, key=lambda t: abs(t - centre))
        out.append((ticks[tick], p.get_hatch() or "", _hex(p.get_facecolor())))
    return out


def test_attack_bars_colour_each_bar_by_its_defense_and_hatch_soft_labels():
    table = _ida_table()
    fig = plots.attack_bars(table, reference=0.965, title="IDA")
    _check_defense_colours(fig, {"none", "dp", "dawn", "cip"})
    bars = _bars_by_tick(fig)
    assert len(bars) == 8
    for defense, hatch, colour in bars:  # the bar above each tick is in that defense's colour
        assert colour == plots.DEFENSE_COLORS[defense]
    assert sorted(h for d, h, _ in bars if d == "cip") == ["", "////"]  # hard solid, soft hatched
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[:2] == ["hard (solid)", "soft (hatched)"] and "victim 0.965" in labels
    # notebook 09's call (hue = the x column): one bar per defense, rows as dots
    fig = plots.attack_bars(table, hue="defense", reference=0.965)
    assert sorted(d for d, *_ in _bars_by_tick(fig)) == ["cip", "dawn", "dp", "none"]
    _check_defense_colours(fig, {"none", "dp", "dawn", "cip"})


def test_attack_bars_zoom_onto_close_values_and_say_so():
    table = pd.DataFrame({"defense": ["none", "dp", "cip"], "label_type": "hard",
                          "surrogate_acc": [0.95, 0.94, 0.93]})
    fig = plots.attack_bars(table, reference=0.96)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert 0.5 < lo < 0.93 and 0.96 < hi <= 1.05
    assert "not 0" in ax.get_ylabel() and f"{lo:g}" in ax.get_ylabel()
    texts = [t.get_text() for t in ax.texts]
    assert {"0.950", "0.940", "0.930"} <= set(texts)  # values still printed on the bars
    heights = sorted(p.get_y() + p.get_height() for p in ax.patches)
    assert heights == pytest.approx([0.93, 0.94, 0.95])
    # a low value: the axis starts at 0, no note
    fig = plots.attack_bars(pd.concat([table, pd.DataFrame({"defense": ["dawn"], "label_type": "hard",
                                                            "surrogate_acc": [0.1]})]))
    assert fig.axes[0].get_ylim()[0] == 0 and "not 0" not in fig.axes[0].get_ylabel()
    # an explicit ylim wins
    fig = plots.attack_bars(table, ylim=(0.0, 1.0))
    assert fig.axes[0].get_ylim() == (0.0, 1.0)
    # missing values say so
    fig = plots.attack_bars(_ida_table(), value="trigger_acc")
    assert [t.get_text() for t in fig.axes[0].texts].count("n/a") == 4


def test_line_figures_draw_each_defense_in_its_colour():
    c = plots.DEFENSE_COLORS
    curves = {"none": [(1000, .5), (2000, .7)], "cip": [(1000, .2), (2000, .3)],
              "dp, clean gradient queries": [(1000, .3), (2000, .4)], "ID only": [(1000, .6), (2000, .8)]}
    fig = plots.accuracy_vs_queries(curves, reference=0.97, dashed=["dp, clean gradient queries"])
    _check_defense_colours(fig, {"none", "cip", "dp"})
    lines = _labelled_lines(fig)
    assert lines["none"] == c["none"] and lines["cip"] == c["cip"]
    assert lines["dp, clean gradient queries"] == c["dp"] and lines["ID only"] == plots.OTHER_COLORS[0]

    hist = [{"epoch": e, "train_acc": 0.5 + 0.05 * e, "trigger_acc": 0.1 * e} for e in range(1, 5)]
    fig = plots.history_curves({"dawn hard": hist, "dawn soft": hist, "cip": hist}, keys=("train_acc", "trigger_acc"))
    counts = _check_defense_colours(fig, {"dawn", "cip"})
    assert counts == {"dawn": 4, "cip": 2}
    faces = {line.get_label(): line.get_markerfacecolor() for line in fig.axes[0].lines}
    assert _hex(faces["dawn soft: train accuracy"]) == "#ffffff"  # a second DAWN run: open markers
    assert fig.axes[0].lines[0].get_marker() != fig.axes[0].lines[2].get_marker()
    fig = plots.history_curves({"run A": hist, "run B": hist})  # no defense: the non-defense colours
    assert {_hex(line.get_color()) for line in fig.axes[0].lines[:-1]} == set(plots.OTHER_COLORS[:2])

    dqa = pd.DataFrame([{"defense": d, "dqa_ratio": r, "trigger_acc": a, "n_triggers": 10}
                        for d in ("dawn", "cip", "dp") for r, a in ((0.25, .3), (0.5, .5), (1.0, .8))])
    fig = plots.trigger_vs_ratio(dqa)
    _check_defense_colours(fig, {"dawn", "cip"})
    assert fig.axes[0].xaxis_inverted()  # r falls to the right: more noise to the right

    grid = {"label_type": "soft", "p1": [{"p1": p, "p2": 99.9, "fidelity": .9, "poisoned_share": .1,
                                           "strong_share": .05, "surrogate_acc": .5, "trigger_acc": .4}
                                          for p in (80, 95)],
            "p2": [{"p2": p, "p1": 95, "fidelity": .9, "poisoned_share": .1, "strong_share": .05}
                   for p in (99, 99.9)]}
    fig = plots.threshold_tradeoff(grid, 95, 99.9)
    assert _check_defense_colours(fig, {"cip"})["cip"] == 8


def test_single_defense_figures_use_that_defense_colour():
    fig = plots.watermark_rate(torch.rand(2000, generator=torch.Generator().manual_seed(0)) < 0.01, 0.01)
    _check_defense_colours(fig, {"dawn"})
    table = pd.DataFrame({"bin": ["[0.10, 0.20)", "[0.50, 0.60)"], "n": [10, 30], "changed": [3, 0],
                          "change_rate": [0.3, 0.0]})
    fig = plots.change_rate_bars(table)
    assert _check_defense_colours(fig, {"dp"}) == {"dp": 1}
    p = torch.softmax(torch.randn(2, 10, generator=torch.Generator().manual_seed(0)), 1)
    fig = plots.poisoned_bars(p, {"DP (reverse sigmoid)": p.flip(1), "weak (reverse_sigmoid)": p}, list("0123456789"))
    _check_defense_colours(fig, {"none", "dp", "cip"})
    ax = plots.probability_bars({"none": p[0], "cip": p[1], "authors": p[0]}, list("0123456789"))
    _check_defense_colours(ax.figure, {"none", "cip"})
    verdicts = [{"kind": "stolen", "defense": d, "trigger_set": f"ida_{d}", "p_value": 1e-5} for d in ("dawn", "cip")]
    verdicts.append({"kind": "innocent", "defense": "cip", "trigger_set": "ida_cip", "p_value": 0.5})
    _check_defense_colours(plots.verification_pvalues(verdicts), {"dawn", "cip"})
    fig = plots.trigger_counts_by_call_size({"online (R < R1)": {"1": 3, "100": 3}, "offline": {"1": 0, "100": 2}})
    _check_defense_colours(fig, {"cip"})


def _long():
    rows = []
    for attack, setting in (("knockoff", "hard"), ("dqa", "r0.25"), ("dqa", "r0.5"), ("dqa", "r1")):
        for d in ("none", "dp", "dawn", "cip"):
            for seed in range(3):
                trig = None if d in ("none", "dp") or (setting == "r0.5" and d == "dawn") else 50.0 + seed
                rows.append({"attack": attack, "setting": setting, "defense": d, "seed": seed,
                             "Test(M_S)": 90.0 - 10 * (d == "cip") + seed, "Trig(M_S)": trig})
    return pd.DataFrame(rows)


def test_seed_spread_colours_marks_missing_pairs_and_puts_more_noise_right():
    fig = plots.seed_spread(_long(), "Trig(M_S)", ylabel="trigger accuracy (%)")
    _check_defense_colours(fig, {"dawn", "cip"})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["knockoff hard", "dqa r1", "dqa r0.5", "dqa r0.25"]
    na = [t for t in ax.texts if t.get_text() == "n/a"]
    assert len(na) == 1 and 1.5 < na[0].xy[0] < 2.0  # dawn's slot of "dqa r0.5" (left of centre)
    fig = plots.seed_spread(_long(), "Test(M_S)")
    _check_defense_colours(fig, {"none", "dp", "dawn", "cip"})


def test_trigger_vs_ratio_reads_dqa_with_more_noise_to_the_right():
    # notebook 10's DQA table (attacks.results_table columns; fractions), one seed's T missing
    dqa = pd.DataFrame({"defense": ["dawn", "dawn", "cip", "cip"], "dqa_ratio": [0.25, 1.0, 0.25, 1.0],
                        "trigger_acc": [0.3, 0.8, 0.4, 0.9], "n_triggers": [12, 10, 6, None]})
    fig = plots.trigger_vs_ratio(dqa)
    ax = fig.axes[0]
    assert ax.xaxis_inverted() and ax.get_ylim() == pytest.approx((0, 1.12))
    assert _labelled_lines(fig) == {"dawn": plots.DEFENSE_COLORS["dawn"], "cip": plots.DEFENSE_COLORS["cip"]}
    assert sorted(t.get_text() for t in ax.texts) == ["T=10", "T=12", "T=6"]  # no "T=nan"


def test_overview_of_the_committed_quick_summary():
    summary = json.loads((REPO / "results" / "quick" / "summary.json").read_text())
    fig = plots.overview(summary)
    ax = fig.axes[0]
    main = [r for r in summary["rows"] if not r.get("ablation")]
    _check_defense_colours(fig, {r["defense"] for r in main})
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    served = {(r["attack"], r["setting"]) for r in main if str(r.get("setting")).endswith("_online")}
    assert served  # the served CIP's rows exist in the summary, and the overview leaves them out
    assert len(ticks) == len({(r["attack"], r.get("setting") or r.get("label_type")) for r in main}) - len(served)
    assert not any("online" in t for t in ticks)
    dqa = [t for t in ticks if t.startswith("DQA")]
    assert dqa == ["DQA\nr = 1", "DQA\nr = 0.5", "DQA\nr = 0.25"]  # more noise to the right
    # every (run, defense) pair: its seeds as dots, the mean as the bar
    row = next(r for r in main if r["attack"] == "knockoff" and r["setting"] == "hard" and r["defense"] == "cip")
    dots = [c for c in ax.collections if c.get_gid() == "defense=cip"]
    assert any(sorted(c.get_offsets()[:, 1]) == pytest.approx(sorted(100 * v for v in row["surrogate_acc"]["values"]))
               for c in dots)
    bars = [p for p in ax.patches if p.get_gid() == "defense=cip"]
    assert any(p.get_height() == pytest.approx(100 * row["surrogate_acc"]["mean"]) for p in bars)
    # reference lines: chance at 10 % and the victims' accuracy
    assert any(line.get_label().startswith("chance") and line.get_ydata()[0] == pytest.approx(10) for line in ax.lines)
    victim = [c for c in ax.collections if c.get_label().startswith("victim")]
    assert victim and victim[0].get_segments()[0][0][1] == pytest.approx(100 * summary["victims"]["all"]["mean"])
    assert ax.get_ylim() == (0, 105)


# ------------------------------------------------------------------ 2. image grid, sampling


def test_image_grid_titles_never_overlap_the_row_above():
    n, ncols = 20, 10  # notebook 03's branch grids: the old layout overlapped them by 1.3 px
    fig = plots.image_grid(torch.rand(n, 1, 28, 28), [f"near-dist{i}\nE=-{i}.5" for i in range(n)],
                           ncols=ncols, title="routed to ID (2748 of 20000)")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = np.array(fig.axes).reshape(-1, ncols)
    for row in range(1, len(axes)):
        for col in range(ncols):
            title = axes[row, col].title.get_window_extent(renderer)
            above = axes[row - 1, col].get_window_extent(renderer)
            assert title.y1 < above.y0, (row, col, title, above)
    top_title = axes[0, 0].title.get_window_extent(renderer)
    assert fig._suptitle.get_window_extent(renderer).y0 >= top_title.y1
    assert top_title.y1 <= fig.bbox.y1
    # one-line titles and no titles draw too
    plots.image_grid(torch.rand(3, 3, 8, 8), ["a", "b", "c"], ncols=2)
    plots.image_grid(torch.rand(3, 1, 8, 8))


def test_sample_indices_is_a_seeded_shuffled_sample_without_replacement():
    a = plots.sample_indices(100, 30, seed=0)
    assert a.dtype == torch.int64 and a.shape == (30,)
    assert len(set(a.tolist())) == 30 and 0 <= int(a.min()) and int(a.max()) < 100
    assert torch.equal(a, plots.sample_indices(100, 30, seed=0))
    assert not torch.equal(a, plots.sample_indices(100, 30, seed=1))
    assert a.tolist() != sorted(a.tolist())  # shuffled, not sorted
    assert sorted(plots.sample_indices(5, 30, seed=0).tolist()) == [0, 1, 2, 3, 4]  # k clipped
    assert plots.sample_indices(0, 3, seed=0).numel() == 0 and plots.sample_indices(5, 0, seed=0).numel() == 0
    for bad in ((-1, 3), (5, -1)):
        with pytest.raises(ValueError):
            plots.sample_indices(*bad, seed=0)


# ------------------------------------------------------------------ 3. energy histograms


def _energies():
    g = torch.Generator().manual_seed(0)
    e = {"ID test": torch.randn(500, generator=g) * 7 - 40, "noise": torch.randn(300, generator=g) * 0.2 - 3,
         "textures": torch.randn(300, generator=g) * 0.2 - 2.7}
    e["ID test"][:2] = -90.0  # outliers
    return e


def test_energy_histograms_show_every_value_or_say_what_is_beyond_the_axis():
    e = _energies()
    ax = plots.energy_histograms(e, thresholds=(-20.0, -5.0), title="after OE")
    lo, hi = ax.get_xlim()
    assert lo <= -90 and hi >= max(float(v.max()) for v in e.values())  # no value off the axis
    assert not any("beyond" in t.get_text() for t in ax.texts)
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["ID test (n=500)", "noise (n=300)", "textures (n=300)"]
    # every set drawn in its own row, scaled to its tallest bin: the narrow OOD sets are as tall
    outlines = [p for p in ax.patches if not p.get_fill()]
    assert len(outlines) == 3
    # a fixed axis: values beyond it are counted in the label
    ax = plots.energy_histograms(e, xlim=(-60.0, 0.0))
    assert ax.get_xlim() == (-60.0, 0.0)
    beyond = int((e["ID test"] < -60).sum())
    assert beyond >= 2
    assert f"ID test (n=500)\n{beyond} beyond the axis, drawn at the edge" in [t.get_text() for t in ax.texts]
    # notebook 02's calls: a 1 x 2 figure, and one set with the OE margins
    fig, axes = plots.plt.subplots(1, 2, figsize=(13, 3.6))
    assert plots.energy_histograms(e, ax=axes[0], title="before") is axes[0]
    plots.energy_histograms(e, ax=axes[1], layout="overlay")
    ax = plots.energy_histograms({"ID train": e["ID test"]}, marks={"m_in": -25.0, "m_out": -7.0})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["m_in = -25", "m_out = -7"]
    with pytest.raises(ValueError, match="layout"):
        plots.energy_histograms(e, layout="stacked")


def test_threshold_explorer_keeps_its_axis_for_every_temperature():
    g = torch.Generator().manual_seed(0)
    logits = {"ID test": torch.randn(200, 10, generator=g) * 5, "noise": torch.randn(100, 10, generator=g)}
    train = torch.randn(400, 10, generator=g) * 5
    temps = np.arange(0.5, 10.01, 0.5)
    lo, hi = plots.energy_range(logits, train, temps)
    from cip_helpers.method.scores import energy_score
    for t in temps:
        for lg in (*logits.values(), train):
            e = energy_score(lg, float(t))
            assert lo <= float(e.min()) and float(e.max()) <= hi
    limits = []
    for t in (1.0, 7.5):
        fig, table = plots.threshold_explorer(logits, train, 90.0, 99.0, t, xlim=(lo, hi))
        limits.append(fig.axes[0].get_xlim())
        assert list(table.columns) == ["ID", "low-ES OOD", "high-ES OOD"]
    assert limits[0] == limits[1] == (lo, hi)
    fig, _ = plots.threshold_explorer(logits, train)  # the old call still works
    with pytest.raises(ValueError):
        plots.energy_range(logits, train, [])


# ------------------------------------------------------------------ 4. sliders


def test_slider_widgets_are_wide_and_p2_min_follows_p1():
    pytest.importorskip("ipywidgets")
    specs = {"p1": dict(value=95.0, min=50.0, max=99.5, step=0.5, description="p1: ID-train percentile for E1"),
             "p2": dict(value=96.0, min=90.0, max=100.0, step=0.1, min_from="p1", readout_format=".2f"),
             "T": dict(value=1.0, min=0.5, max=10.0, step=0.5)}
    w = plots._slider_widgets(**specs)
    assert w["p1"].layout.width == plots.SLIDER_WIDTH and w["p1"].style.description_width == "initial"
    assert w["p1"].description == "p1: ID-train percentile for E1" and w["T"].description == "T"
    assert w["p2"].readout_format == ".2f" and w["p1"].readout_format == ".1f"
    assert w["p2"].min == pytest.approx(95.1) and w["p2"].value == pytest.approx(96.0)
    w["p1"].value = 97.0  # p2 was 96: its min and value move up
    assert w["p2"].min == pytest.approx(97.1) and w["p2"].value == pytest.approx(97.1)
    w["p1"].value = 60.0  # p1 down: p2's min falls back to its own floor, its value stays
    assert w["p2"].min == pytest.approx(90.0) and w["p2"].value == pytest.approx(97.1)
    w["p1"].value = 99.5
    assert w["p2"].min == pytest.approx(99.6) and w["p2"].value == pytest.approx(99.6)
    with pytest.raises(ValueError, match="min_from"):
        plots._slider_widgets(p2=dict(value=1.0, min=0.0, max=2.0, step=0.1, min_from="p1"))
    with pytest.raises(ValueError, match="unknown spec keys"):
        plots._slider_widgets(p1=dict(value=1.0, min=0.0, max=2.0, step=0.1, colour="red"))


def test_slider_view_in_batch_ignores_min_from(monkeypatch):
    calls = []
    monkeypatch.setenv(progress.BATCH_ENV, "1")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    plots.slider_view(lambda p1, p2: calls.append((p1, p2)), p1=dict(value=95.0, min=50, max=99.5, step=0.5),
                      p2=dict(value=99.9, min=90, max=100, step=0.1, min_from="p1"))
    assert calls == [(95.0, 99.9)]


def test_slider_view_interactive_passes_the_widgets(monkeypatch):
    made = {}
    fake = types.ModuleType("ipywidgets")
    fake.FloatSlider = lambda **spec: ("slider", spec)
    fake.interactive = lambda function, **controls: made.update(controls=controls) or "ui"
    monkeypatch.setitem(sys.modules, "ipywidgets", fake)
    monkeypatch.setattr("IPython.display.display", lambda obj: made.update(shown=obj))
    monkeypatch.delenv(progress.BATCH_ENV, raising=False)
    plots.slider_view(lambda T: None, T=dict(value=1.0, min=0.5, max=10.0, step=0.5, description="T: temperature"))
    spec = made["controls"]["T"][1]
    assert made["shown"] == "ui" and spec["description"] == "T: temperature"
    assert spec["layout"] == {"width": plots.SLIDER_WIDTH} and spec["style"] == {"description_width": "initial"}


# ------------------------------------------------------------------ 5. labels


def test_learning_curves_have_readable_titles_labels_and_integer_epochs():
    hist = [{"epoch": e, "loss": 1 / e, "train_acc": 0.8, "test_acc": 0.7, "e_in": -20.0, "e_out": -3.0}
            for e in range(1, 4)]
    fig = plots.learning_curves({"all": hist, "half": hist})
    assert [ax.get_title() for ax in fig.axes] == ["training loss", "train accuracy", "test accuracy"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "accuracy", "accuracy"]
    assert all(ax.get_xlabel() == "epoch" for ax in fig.axes)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(float(t).is_integer() for t in ticks), ticks
    fig = plots.learning_curves({"all": hist}, keys=("loss", "e_in", "e_out", "test_acc"))
    assert fig.axes[1].get_ylabel() == "energy score" and "E_in" in fig.axes[1].get_title()


def test_reliability_histograms_count_queries_on_a_log_axis():
    g = torch.Generator().manual_seed(0)
    scores = {"ID train": torch.rand(400, generator=g), "misclassified": torch.rand(7, generator=g)}
    ax = plots.reliability_histograms(scores, r1=0.2)
    assert ax.get_ylabel() == "queries (count)" and ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["ID train (n=400)", "misclassified (n=7)"]
    filled = [p for p in ax.patches if p.get_fill()]
    heights = [max(v[1] for v in p.get_path().vertices) for p in filled]
    assert heights[1] <= 7  # counts, not a density


# ------------------------------------------------------------------ 6., 7. save_figure, pipeline


def test_save_figure_writes_the_png_and_returns_none(tmp_path):
    cfg = types.SimpleNamespace(figures_dir=tmp_path / "figures")
    fig, _ = plots.plt.subplots()
    assert plots.save_figure(fig, cfg, "x") is None
    assert (tmp_path / "figures" / "x.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in (tmp_path / "figures").iterdir()] == ["x.png"]  # no temporary file left


def test_cip_pipeline_names_every_notebook_in_cip_colours():
    fig = plots.cip_pipeline()
    text = " ".join(t.get_text() for t in fig.axes[0].texts)
    for k in range(1, 12):
        assert f"[{k:02d}]" in text, k
    assert tuple(fig.get_size_inches()) == pytest.approx((11, 5.45))
    edges = {_hex(p.get_edgecolor()) for p in fig.axes[0].patches}
    assert plots.DEFENSE_COLORS["cip"] in edges
    counts = _check_defense_colours(fig, {"cip", "dp", "dawn"})
    assert counts["cip"] >= 8 and counts["dp"] == counts["dawn"] == 1
    fig.canvas.draw()  # every box text inside its box
    renderer = fig.canvas.get_renderer()
    boxes = [p.get_window_extent(renderer) for p in fig.axes[0].patches if isinstance(p, FancyBboxPatch)]
    for t in fig.axes[0].texts:
        if t.get_text().startswith("["):
            bb = t.get_window_extent(renderer)
            assert any(b.x0 <= bb.x0 and bb.x1 <= b.x1 and b.y0 <= bb.y0 and bb.y1 <= b.y1 for b in boxes), t.get_text()
    fig, axes = plots.plt.subplots(1, 2, figsize=(8, 3))
    assert plots.cip_pipeline(axes[0]) is fig


def test_importing_plots_does_not_import_seaborn():
    code = "import sys, cip_helpers.course.plots; print('seaborn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_accuracy_vs_queries_marks_a_curve_hidden_under_an_equal_one():
    same = [(100, 0.1), (200, 0.1)]
    fig = plots.accuracy_vs_queries({"dp": same, "cip": [(100, 0.1), (200, 0.102)], "none": [(100, 0.5), (200, 0.8)]})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[:3] == ["dp (hidden)", "cip", "none"]
    assert fig.axes[0].get_legend().get_title().get_text() == "ring (hidden): under an equal curve"
    alone = plots.accuracy_vs_queries({"dp": same, "none": [(100, 0.5), (200, 0.8)]})
    assert "(hidden)" not in " ".join(t.get_text() for t in alone.axes[0].get_legend().get_texts())
    plots.plt.close("all")


def test_a_slider_default_off_its_grid_is_refused_with_a_step_that_holds_it(monkeypatch):
    """The failing case of issue 27's browser run: notebook 05's R1 slider had step 0.1, the new
    default percentile 0.75 was snapped to 0.8 by the widget, and the first live view was not the
    profile's (the batch view was). Every slider default must lie on its grid, headless or not."""
    from cip_helpers.course import progress

    drawn = []
    monkeypatch.setattr(progress, "batch_mode", lambda: True)
    monkeypatch.setattr(plots, "batch_mode", lambda: True)
    with pytest.raises(ValueError, match=r"0.75 is not on its grid 0 \+ k x 0.1.*show 0.8.*e.g. 0.05"):
        plots.slider_view(lambda percentile: drawn.append(percentile),
                          percentile=dict(value=0.75, min=0.0, max=10.0, step=0.1))
    with pytest.raises(ValueError, match="within"):
        plots.slider_view(lambda p: None, p=dict(value=12.0, min=0.0, max=10.0, step=0.5))
    plots.slider_view(lambda percentile: drawn.append(percentile),
                      percentile=dict(value=0.75, min=0.0, max=10.0, step=0.05))
    assert drawn == [0.75]
