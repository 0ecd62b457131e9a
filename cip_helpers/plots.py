"""Figures of the course (seaborn/matplotlib). Each function returns the figure; notebooks pass it
to :func:`save_figure`, which writes ``results/<profile>/figures/<name>.png`` and shows it."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from .config import Profile


def _sns():
    """seaborn, imported on first use: it pulls in scipy.stats (about 2 s of start-up here), which
    notebooks 04, 05, 06, 08 and 10 never need."""
    import seaborn

    return seaborn


def save_figure(fig: plt.Figure, cfg: Profile, name: str) -> Path:
    """Save ``fig`` as ``<results>/figures/<name>.png`` (atomically) and return the path."""
    path = cfg.figures_dir / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, bbox_inches="tight", dpi=110)
    os.replace(tmp, path)
    return path


def image_grid(x: Tensor, titles: Sequence[str] | None = None, ncols: int = 10,
               title: str | None = None, size: float = 1.1) -> plt.Figure:
    """Show images (N, C, H, W) in [0, 1] in a grid, with optional per-image titles."""
    n = len(x)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * 1.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = x[i].detach().cpu()
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1))
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def learning_curves(histories: Mapping[str, Sequence[Mapping[str, float]]],
                    keys: Sequence[str] = ("loss", "train_acc", "test_acc")) -> plt.Figure:
    """One panel per metric in ``keys``, one line per named run (e.g. victims ``all``/``half``)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip(np.atleast_1d(axes), keys):
        for name, hist in histories.items():
            if hist and key in hist[0]:
                ax.plot([h["epoch"] for h in hist], [h[key] for h in hist], marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix(y_true: Tensor, y_pred: Tensor, classes: Sequence[str],
                     title: str = "") -> plt.Figure:
    """Counts of (true, predicted) class pairs as an annotated heat map."""
    k = len(classes)
    cm = torch.bincount(y_true * k + y_pred, minlength=k * k).view(k, k).numpy()
    fig, ax = plt.subplots(figsize=(0.45 * k + 2, 0.4 * k + 1.5))
    _sns().heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax,
                   xticklabels=classes, yticklabels=classes, annot_kws={"fontsize": 7})
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def energy_histograms(energies: Mapping[str, Tensor], thresholds: tuple[float, float] | None = None,
                      ax: plt.Axes | None = None, title: str = "", bins: np.ndarray | None = None
                      ) -> plt.Axes:
    """Overlaid histograms (same bins, density) of energy scores per query set, with optional
    vertical lines at E1 and E2."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    if bins is None:
        allv = torch.cat([e.flatten() for e in energies.values()]).numpy()
        bins = np.linspace(np.percentile(allv, 0.5), np.percentile(allv, 99.5), 60)
    sns = _sns()
    for name, e in energies.items():
        sns.histplot(np.clip(e.numpy(), bins[0], bins[-1]), bins=bins, stat="density",
                     element="step", fill=True, alpha=0.3, label=name, ax=ax)
    if thresholds is not None:
        for value, label, style in zip(thresholds, ("E1", "E2"), ("--", ":")):
            ax.axvline(value, color="k", linestyle=style, label=f"{label} = {value:.2f}")
    ax.set_xlabel("energy score E(x)   (higher = more OOD)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


def probability_bars(rows: Mapping[str, Tensor], classes: Sequence[str], title: str = "",
                     ax: plt.Axes | None = None) -> plt.Axes:
    """Grouped bars of several probability vectors over the same classes (e.g. clean vs poisoned)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 2.6))
    k = len(classes)
    width = 0.8 / max(len(rows), 1)
    for i, (name, p) in enumerate(rows.items()):
        ax.bar(np.arange(k) + (i - (len(rows) - 1) / 2) * width, p.detach().cpu().numpy(), width,
               label=name)
    ax.set_xticks(np.arange(k), classes, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


def threshold_explorer(logits_by_set: Mapping[str, Tensor], id_train_logits: Tensor, p1: float = 95.0,
                       p2: float = 99.9, temperature: float = 1.0):
    """Recompute E1/E2 from ID-training energies at percentiles (p1, p2) and temperature T, draw the
    energy histograms with both lines, and return ``(figure, routing table)``. The slider widgets of
    notebook 03 call exactly this function; a plain call renders the defaults."""
    import pandas as pd

    from .scores import energy_score, route_fractions, select_thresholds

    e1, e2 = select_thresholds(energy_score(id_train_logits, temperature), p1, p2)
    energy = {name: energy_score(lg, temperature) for name, lg in logits_by_set.items()}
    fig, ax = plt.subplots(figsize=(7, 3.4))
    energy_histograms(energy, (e1, e2), ax=ax, title=f"p1 = {p1}, p2 = {p2}, T = {temperature}")
    table = pd.DataFrame({name: route_fractions(e, e1, e2) for name, e in energy.items()}).T
    table.attrs.update({"E1": e1, "E2": e2})
    return fig, table


# --- defenses (notebooks 04-06) ------------------------------------------------------------


def poisoned_bars(clean: Tensor, variants: Mapping[str, Tensor], classes: Sequence[str],
                  row_titles: Sequence[str] | None = None) -> plt.Figure:
    """One row per query, one column per perturbation: each panel shows the clean probability
    bars next to the perturbed ones (``variants[name]`` has the same rows as ``clean``)."""
    n, names = len(clean), list(variants)
    fig, axes = plt.subplots(n, len(names), figsize=(2.9 * len(names), 2.1 * n), squeeze=False,
                             sharey=True)
    for i in range(n):
        for j, name in enumerate(names):
            ax = axes[i, j]
            q = variants[name][i]
            probability_bars({"clean": clean[i], name.split(" ")[0]: q}, classes, ax=ax)
            changed = int(q.argmax()) != int(clean[i].argmax())
            ax.set_title(f"{name}\ntop-1 {classes[int(clean[i].argmax())]} → {classes[int(q.argmax())]}"
                         f"{' (changed)' if changed else ''}", fontsize=8)
            ax.legend(fontsize=6, loc="upper right")
            if j:
                ax.set_ylabel("")
            elif row_titles is not None:
                ax.set_ylabel(f"{row_titles[i]}\nprobability", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_histograms(scores: Mapping[str, Tensor], r1: float | None = None,
                           ax: plt.Axes | None = None, title: str = "") -> plt.Axes:
    """Overlaid density histograms (log y axis) of reliability scores per query set, with an
    optional vertical line at R1."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.2))
    values = [s.detach().double().flatten().numpy() for s in scores.values() if len(s)]
    lo = min(float(np.min(v)) for v in values)
    bins = np.linspace(lo, 1.0, 50)
    for name, s in scores.items():
        if len(s):
            ax.hist(s.detach().double().numpy(), bins=bins, density=True, histtype="stepfilled",
                    alpha=0.35, label=f"{name} (n={len(s)})")
    if r1 is not None:
        ax.axvline(r1, color="k", linestyle="--", label=f"R1 = {r1:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("reliability score R   (low = ambiguous query)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


def r1_threshold(scores: Tensor, percentile: float, queries: Tensor | None = None,
                 query_name: str = "benign queries") -> tuple[plt.Figure, int]:
    """R1 = the ``percentile``-th percentile of ``scores`` (ID TRAINING reliability scores); draw
    both distributions with R1 and return ``(figure, count)``, count = how many of ``queries``
    (default: ``scores`` themselves) fall below R1, i.e. would be flipped by online PBD. Notebook
    05's slider calls exactly this function; a plain call renders the default."""
    from .defenses import r1_from_scores

    r1 = r1_from_scores(scores, percentile)
    target = scores if queries is None else queries
    count = int((target.detach().double() < r1).sum())
    sets = {"ID train": scores} if queries is None else {"ID train": scores, query_name: queries}
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    reliability_histograms(sets, r1, ax=ax)
    ax.set_title(f"R1 = {percentile:g}th percentile of ID-train R: {count} of {len(target)} "
                 f"{query_name} ({100 * count / max(len(target), 1):.2f} %) would be flipped", fontsize=9)
    fig.tight_layout()
    return fig, count


def change_rate_bars(table, title: str = "") -> plt.Figure:
    """Bar chart of a :func:`cip_helpers.defenses.change_rate_by_pmax` table: top-1 change rate
    per clean-p_max bin, with each bin's query count on its bar."""
    fig, ax = plt.subplots(figsize=(6.5, 3))
    rates = table["change_rate"].fillna(0).to_numpy()
    bars = ax.bar(table["bin"], rates, color=["tab:red" if r > 0 else "tab:gray" for r in rates])
    for bar, n, c in zip(bars, table["n"], table["changed"]):
        ax.annotate(f"{c}/{n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=7)
    half = [b.startswith("[0.50") for b in table["bin"]]
    if any(half):  # where p_max reaches 0.5: reverse sigmoid keeps the top-1 from here on
        ax.axvline(half.index(True) - 0.5, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("clean p_max of the query")
    ax.set_ylabel("top-1 change rate")
    ax.set_ylim(0, max(0.05, float(rates.max()) * 1.25))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def watermark_rate(marked: Tensor, rate: float, title: str = "") -> plt.Figure:
    """Running fraction of watermarked queries over a batch, with the target ``rate`` and its
    binomial 3-sigma band (rate +- 3 sqrt(rate (1 - rate) / n))."""
    n = torch.arange(1, len(marked) + 1, dtype=torch.float64)
    running = marked.double().cumsum(0) / n
    band = 3 * torch.sqrt(rate * (1 - rate) / n)
    fig, ax = plt.subplots(figsize=(6.5, 3))
    ax.plot(n.numpy(), running.numpy(), label="watermarked so far")
    ax.fill_between(n.numpy(), (rate - band).clamp_min(0).numpy(), (rate + band).numpy(), alpha=0.2,
                    color="tab:orange", label="rate ± 3σ (binomial)")
    ax.axhline(rate, color="tab:orange", linestyle="--", label=f"r = {rate}")
    ax.set_xscale("log")
    ax.set_ylim(0, min(1, max(4 * rate, float(running[len(running) // 10:].max()) * 1.2)))
    ax.set_xlabel("queries answered")
    ax.set_ylabel("fraction watermarked")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def defense_comparison(rows: Sequence[Mapping], metrics: Sequence[str] = (
        "fidelity", "test_top1_change", "knockoff_top1_change")) -> plt.Figure:
    """Grouped bars: one group per metric of :func:`cip_helpers.defenses.compare_defenses` rows,
    one bar per defense (values are fractions)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["defense"] for r in rows]
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        values = [row.get(m, np.nan) for m in metrics]
        bars = ax.bar(np.arange(len(metrics)) + (i - (len(rows) - 1) / 2) * width, values, width,
                      label=names[i])
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=6)
    ax.set_xticks(np.arange(len(metrics)), metrics, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction")
    ax.legend(fontsize=7, ncol=len(rows))
    fig.tight_layout()
    return fig


# --- attacks (notebooks 07-10) -------------------------------------------------------------


def attack_bars(table, x: str = "defense", hue: str = "label_type", value: str = "surrogate_acc",
                reference: float | None = None, title: str = "") -> plt.Figure:
    """Grouped bars of ``value`` (default the surrogate's test accuracy) per defense from a results
    table (a pandas DataFrame of attack records), with an optional dashed reference line (the
    victim's accuracy) and the value printed on each bar."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    order = [d for d in DEFENSE_COLORS if d in set(table[x])]
    _sns().barplot(data=table, x=x, y=value, hue=hue if hue in table else None, order=order, ax=ax)
    for container in ax.containers:
        ax.bar_label(container, fmt="%.2f", fontsize=7)
    if reference is not None:
        ax.axhline(reference, color="k", linestyle="--", linewidth=1, label=f"victim {reference:.2f}")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(value.replace("_", " "))
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def _finish(fig: plt.Figure, ax: plt.Axes, xlabel: str, ylabel: str, title: str,
            ylim: tuple[float, float] = (0, 1.02)) -> plt.Figure:
    """Axis labels, y range, title, a small legend and a tight layout: the last lines of every
    accuracy plot here."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _defense_colour(name: str) -> str | None:
    """The :data:`DEFENSE_COLORS` entry of a label that starts with a defense name ("dp, ...")."""
    head = name.replace(",", " ").split()[0] if name.strip() else ""
    return DEFENSE_COLORS.get(head)


def accuracy_vs_queries(curves: Mapping[str, Sequence[tuple[int, float]]],
                        reference: float | None = None, title: str = "",
                        ylabel: str = "surrogate test accuracy",
                        dashed: Sequence[str] = ()) -> plt.Figure:
    """One line per curve ``{label: [(queries, accuracy), ...]}``: accuracy of the stolen model
    against the number of queries spent. A label that starts with a defense name gets that
    defense's colour (:data:`DEFENSE_COLORS`); labels in ``dashed`` are drawn dashed."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name, points in curves.items():
        q, a = zip(*points) if points else ((), ())
        ax.plot(q, a, marker="o", label=name, color=_defense_colour(name),
                linestyle="--" if name in dashed else "-")
    if reference is not None:
        ax.axhline(reference, color="k", linestyle="--", linewidth=1, label=f"victim {reference:.2f}")
    ax.axhline(0.1, color="grey", linestyle=":", linewidth=1, label="chance")
    return _finish(fig, ax, "queries to the API", ylabel, title)


TRADEOFF_KEYS = (("fidelity", "API fidelity on ID test digits", "-"),
                 ("poisoned_share", "share of the mixed pool poisoned", "--"),
                 ("strong_share", "... of it with strong PPD", (0, (5, 1, 1, 1))),
                 ("surrogate_acc", "stolen surrogate accuracy", "-."),
                 ("trigger_acc", "trigger accuracy", ":"))
"""(key, legend label, line style) of :func:`threshold_tradeoff`'s lines."""


def threshold_tradeoff(tradeoff: Mapping[str, object], p1: float | None = None,
                       p2: float | None = None) -> plt.Figure:
    """Notebook 03's trade-off figure from ``attacks.threshold_tradeoff``: left, the ``p1`` grid
    (fidelity, poisoned and strongly poisoned share, mixed-pool KnockoffNets surrogate and trigger
    accuracy, all in [0, 1]); right, the ``p2`` grid (fidelity and the two shares only). Optional vertical lines
    mark a slider setting. Every line is CIP's, in CIP's colour, told apart by line style."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
    colour = DEFENSE_COLORS["cip"]
    for ax, grid, mark in ((axes[0], "p1", p1), (axes[1], "p2", p2)):
        rows = tradeoff[grid]
        xs = [r[grid] for r in rows]
        for key, label, style in TRADEOFF_KEYS:
            pts = [(x, r.get(key)) for x, r in zip(xs, rows) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle=style, color=colour, label=label)
        if mark is not None:
            ax.axvline(mark, color="k", linewidth=1, alpha=0.5)
        other = "p2" if grid == "p1" else "p1"
        _finish(fig, ax, f"{grid} (percentile of ID-train energies; {other} = {rows[0][other]:g})",
                "fraction" if grid == "p1" else "", f"moving E{grid[1]}", ylim=(0, 1.05))
    label = tradeoff.get("label_type", "")
    fig.suptitle(f"CIP threshold trade-off (surrogates: mixed-pool KnockoffNets, {label} labels)", fontsize=10)
    fig.tight_layout()
    return fig


def history_curves(histories: Mapping[str, Sequence[Mapping[str, float]]],
                   keys: Sequence[str] = ("test_acc", "trigger_acc"), title: str = "") -> plt.Figure:
    """Per-epoch accuracies of training runs (``{label: history}``, a history being the
    ``[{"epoch": 1, "test_acc": ..., ...}, ...]`` list a record stores): one line per (run, key),
    solid for the first key, dashed for the others; integer epoch ticks."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    styles = ["-", "--", ":", "-."]
    for i, (name, history) in enumerate(histories.items()):
        for j, key in enumerate(keys):
            pts = [(h["epoch"], h[key]) for h in history or [] if h.get(key) is not None]
            if pts:
                e, a = zip(*pts)
                ax.plot(e, a, marker="o", ms=3, linestyle=styles[j % len(styles)],
                        color=_defense_colour(name) if len(histories) == 1 else f"C{i}",
                        label=f"{name}: {key.replace('_acc', ' accuracy')}")
    ax.axhline(0.1, color="grey", linestyle=":", linewidth=1, label="chance (10 classes)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, "epoch", "accuracy", title)


def generated_images(x: Tensor, energies: Tensor, e1: float, e2: float, ncols: int = 8,
                     title: str = "") -> plt.Figure:
    """A grid of (generated) images titled with their energy score and CIP's route for it."""
    def route_name(e: float) -> str:
        return "ID" if e < e1 else ("low-ES" if e < e2 else "high-ES")

    titles = [f"E={float(e):.1f}\n{route_name(float(e))}" for e in energies]
    return image_grid(x, titles, ncols=ncols, title=title, size=1.4)


def trigger_vs_ratio(table, title: str = "") -> plt.Figure:
    """DQA: trigger accuracy of DAWN and CIP against the ratio r = (ID queries) / (noise queries),
    with the number of triggers T next to every point."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name in ("dawn", "cip"):
        rows = table[table["defense"] == name].sort_values("dqa_ratio", ascending=False)
        if rows.empty:
            continue
        ax.plot(rows["dqa_ratio"], rows["trigger_acc"], marker="o", label=name)
        for r, acc, t in zip(rows["dqa_ratio"], rows["trigger_acc"], rows["n_triggers"]):
            ax.annotate(f"T={int(t)}", (r, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    ratios = sorted(set(table["dqa_ratio"].dropna()), reverse=True)
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.minorticks_off()
    ax.invert_xaxis()
    return _finish(fig, ax, "r = ID queries / noise queries  (more noise to the right)", "trigger accuracy",
                   title, ylim=(0, 1.12))


# --- across seeds (notebook 11) ---------------------------------------------------------------

DEFENSE_COLORS = {"none": "#7f7f7f", "oe": "#9467bd", "dp": "#1f77b4", "dawn": "#2ca02c", "cip": "#d62728"}
"""One colour per defense for the figures that compare defenses across seeds."""


def seed_spread(long, value: str = "Test(M_S)", title: str = "", ylabel: str = "") -> plt.Figure:
    """Every seed as a dot and the mean ± sd over seeds as a bar with error bar, per run (attack and
    setting) and defense. ``long`` is :func:`cip_helpers.report.seed_table`'s output (one row per
    seed and run, percent values); rows without ``value`` (e.g. no trigger set) are left out."""
    import numpy as np

    df = long.dropna(subset=[value])
    runs = list(dict.fromkeys(df["attack"] + " " + df["setting"]))
    defenses = [d for d in DEFENSE_COLORS if d in set(df["defense"])]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(runs) + 2), 3.6))
    width = 0.8 / max(len(defenses), 1)
    for j, d in enumerate(defenses):
        for i, run in enumerate(runs):
            vals = df[(df["attack"] + " " + df["setting"] == run) & (df["defense"] == d)][value].astype(float)
            if vals.empty:
                continue
            x = i + (j - (len(defenses) - 1) / 2) * width
            sd = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            ax.bar(x, float(vals.mean()), width * 0.9, color=DEFENSE_COLORS[d], alpha=0.35,
                   yerr=sd, capsize=2, label=d if i == 0 else None)
            ax.scatter(np.full(len(vals), x), vals, s=10, color=DEFENSE_COLORS[d], zorder=3)
    ax.set_xticks(range(len(runs)), runs, rotation=30, ha="right")
    ax.set_ylabel(ylabel or value)
    n = df["seed"].nunique() if "seed" in df else 1
    ax.set_title(title or f"{value}: mean ± sd over {n} seed(s), dots = seeds")
    ax.legend(fontsize=8, ncol=len(defenses))
    fig.tight_layout()
    return fig


# --- ownership verification (notebook 11) ------------------------------------------------------

def verification_pvalues(verdicts: Sequence[Mapping], alpha: float = 0.01, title: str = "") -> plt.Figure:
    """-log10 p per suspect and trigger set (x axis): stolen surrogates as large dots in their
    defense's colour, innocent models (leave-one-out) as small grey dots, the flagging line at
    -log10 alpha. ``verdicts`` are :func:`cip_helpers.report.verification_verdicts` dicts
    (keys ``kind``, ``defense``, ``trigger_set``, ``p_value``); p is floored at 1e-300."""
    sets = list(dict.fromkeys(v["trigger_set"] for v in verdicts))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(sets) + 2), 3.8))
    rng = np.random.default_rng(0)
    labelled = set()
    for v in verdicts:
        x = sets.index(v["trigger_set"])
        y = -np.log10(max(float(v["p_value"]), 1e-300))
        if v["kind"] == "stolen":
            label = f"stolen ({v['defense']})"
            ax.scatter(x, y, s=60, color=DEFENSE_COLORS[v["defense"]], edgecolor="black", zorder=3,
                       label=None if label in labelled else label)
        else:
            label = "innocent (leave-one-out)"
            ax.scatter(x + rng.uniform(-0.2, 0.2), y, s=12, color="#9e9e9e", alpha=0.7, zorder=2,
                       label=None if label in labelled else label)
        labelled.add(label)
    ax.axhline(-np.log10(alpha), color="black", ls="--", lw=1, label=f"alpha = {alpha:g}")
    ax.set_xticks(range(len(sets)), sets, rotation=35, ha="right")
    ax.set_ylabel("-log10 p  (higher = stronger evidence)")
    ax.set_title(title or "ownership test per suspect: flagged above the dashed line")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def agreement_matrix(rows: Mapping[str, np.ndarray], ood: np.ndarray, labels: np.ndarray,
                     title: str = "") -> plt.Figure:
    """Which model (row) agrees with which trigger (column) of one trigger set: ``rows`` maps a
    model name to its (T,) bool agreements; columns are sorted in-distribution first, then
    OOD triggers by altered label (``ood`` (T,) bool, ``labels`` (T,) int), with a line between."""
    ood, labels = np.asarray(ood, dtype=bool), np.asarray(labels)
    order = np.lexsort((labels, ood))
    mat = np.stack([np.asarray(a, dtype=float)[order] for a in rows.values()])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(order) + 3), 0.32 * len(rows) + 1.4))
    ax.imshow(mat, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    n_id = int((~ood).sum())
    if 0 < n_id < len(order):
        ax.axvline(n_id - 0.5, color=DEFENSE_COLORS["cip"], lw=1.5)
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xticks(range(len(order)), [str(int(lab)) for lab in labels[order]], fontsize=6)
    ax.set_xlabel(f"triggers (altered label): {n_id} in-distribution | {len(order) - n_id} OOD, by label")
    ax.set_title(title or "black = the model gives the trigger's altered label")
    fig.tight_layout()
    return fig


# --- sliders (notebooks 03 and 05) --------------------------------------------------------------

BATCH_ENV = "CIP_BATCH"
"""Set (to anything non-empty) by the batch runner for every kernel it starts: slider cells then
render their default view without creating widgets (see :func:`slider_view`)."""


def trigger_counts_by_call_size(counts: Mapping[str, Mapping[str, int]], title: str = "") -> plt.Figure:
    """Grouped bars: trigger-set size per call-size setting (x axis, the keys of each inner
    mapping, e.g. from :func:`defenses.triggers_by_call_size`) for each PBD mode (the outer
    keys); the online mode in CIP's colour, others in grey shades."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    modes = list(counts)
    labels = list(next(iter(counts.values()))) if counts else []
    width = 0.8 / max(len(modes), 1)
    greys = ["#7f7f7f", "#bdbdbd", "#525252"]
    for j, mode in enumerate(modes):
        colour = DEFENSE_COLORS["cip"] if mode.startswith("online") else greys[j % len(greys)]
        xs = np.arange(len(labels)) + (j - (len(modes) - 1) / 2) * width
        values = [counts[mode][k] for k in labels]
        bars = ax.bar(xs, values, width * 0.9, color=colour, label=mode)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_ylabel("triggers (flipped answers)")
    ax.margins(y=0.15)  # room for the bar labels
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def slider_view(function: Callable[..., None], **sliders: dict) -> None:
    """Live sliders in JupyterLab; the default view, drawn once, in a batch run.

    ``sliders`` maps each keyword of ``function`` to a ``FloatSlider`` spec (``value``, ``min``,
    ``max``, ``step``, optional ``description``). Interactively this displays
    ``ipywidgets.interactive(function, ...)``. With ``$CIP_BATCH`` set (the runner sets it) it
    calls ``function`` once with every ``value`` and creates no widget: interact/Output widgets
    can deadlock headless execution (papermill #723, nbclient #312; measured here: notebook 03
    hung at this cell in 1 of 3 seeds of a quick run), and a batch run has nobody to move them."""
    if os.environ.get(BATCH_ENV):
        function(**{name: spec["value"] for name, spec in sliders.items()})
        return
    import ipywidgets as widgets
    from IPython.display import display

    controls = {name: widgets.FloatSlider(**{"continuous_update": False, "readout_format": ".1f", **spec})
                for name, spec in sliders.items()}
    display(widgets.interactive(function, **controls))
