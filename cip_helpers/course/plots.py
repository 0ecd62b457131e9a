"""Figures of the course (matplotlib; seaborn only for the confusion matrix, imported on first use).

Each function returns the figure (or the axes it drew on); notebooks pass the figure to
:func:`save_figure`, which writes ``results/<profile>/figures/<name>.png``. In a notebook the
inline backend shows every open figure once when the cell ends; nothing here displays a figure.

One visual language: every artist drawn for a defense has that defense's colour from
:data:`DEFENSE_COLORS` (look-ups through :func:`defense_color`) and carries ``gid`` ``"defense=<name>"``;
series that are not defenses (query sets, victims, PBD answers) take :data:`OTHER_COLORS`, which
share no colour with the defenses. No other module or notebook spells a colour."""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from .config import Profile
from .progress import batch_mode  # headless: sliders draw their default view
from .store import write_png

DEFENSE_COLORS: dict[str, str] = {"none": "#7f7f7f", "oe": "#9467bd", "dp": "#1f77b4",
                                  "dawn": "#2ca02c", "cip": "#d62728", "am": "#e6ab02"}
"""The one colour of each defense (keys as in ``pipeline.DEFENSES``), in every figure of the
course: undefended grey, OE only purple, DP blue, DAWN green, CIP red, Adaptive Misinformation
amber."""

DEFENSE_ALIASES: dict[str, str] = {"undefended": "none", "no defense": "none", "no_defense": "none",
                                   "oe only": "oe", "oe_only": "oe", "adaptive misinformation": "am",
                                   "adaptive_misinformation": "am"}
"""Whole labels (lower case) that name a defense without starting with its key."""

OTHER_COLORS: tuple[str, ...] = ("#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#393b79")
"""Colours of series that are not defenses (query sets, victims, answers), in order; none of them
is a defense colour, so a figure never suggests a defense that is not there."""

NEUTRAL = {"reference": "#000000", "chance": "#9e9e9e", "inactive": "#c7c7c7"}
"""Colours of reference lines (victim accuracy, thresholds), the chance line and inactive bars."""


def _defense_key(label: str) -> str | None:
    """The :data:`DEFENSE_COLORS` key a label names ("cip", "CIP", "dp, soft", "DAWN r=1",
    "undefended", "OE only"), else ``None``."""
    text = str(label).strip().lower()
    if text in DEFENSE_ALIASES:
        return DEFENSE_ALIASES[text]
    head = re.split(r"[^a-z0-9]+", text, maxsplit=1)[0] if text else ""
    if head in DEFENSE_COLORS:
        return head
    return DEFENSE_ALIASES.get(head)


def defense_color(name: str) -> str:
    """The colour (``"#rrggbb"``) of the defense a label names: its first word ("cip", "CIP",
    "dp, soft", "DAWN r=1", "none: ...") or a whole alias ("undefended" -> none, "OE only" -> oe).
    Raises ``ValueError`` naming the known defenses for any other label."""
    key = _defense_key(name)
    if key is None:
        raise ValueError(f"{name!r} names no defense; known defenses: {', '.join(DEFENSE_COLORS)} "
                         f"(or {', '.join(repr(a) for a in DEFENSE_ALIASES)})")
    return DEFENSE_COLORS[key]


def _series_colors(names: Sequence[str], defenses: bool = True) -> list[str]:
    """One colour per name: the defense's colour where ``defenses`` and the name names one, else
    the next of :data:`OTHER_COLORS` (cycled)."""
    out, k = [], 0
    for name in names:
        key = _defense_key(name) if defenses else None
        if key is not None:
            out.append(DEFENSE_COLORS[key])
        else:
            out.append(OTHER_COLORS[k % len(OTHER_COLORS)])
            k += 1
    return out


def _tag(artist: Any, defense: str) -> None:
    """Mark ``artist`` (or every artist of a container) as drawn for ``defense`` (gid ``defense=<key>``)."""
    key = _defense_key(defense)
    for a in (artist if isinstance(artist, (list, tuple)) else getattr(artist, "patches", None) or [artist]):
        a.set_gid(f"defense={key}")


def _sns():
    """seaborn, imported on first use: it pulls in scipy.stats (about 2 s of start-up here), and only
    :func:`confusion_matrix` needs it."""
    import seaborn

    return seaborn


def save_figure(fig: plt.Figure, cfg: Profile, name: str) -> None:
    """Save ``fig`` as ``cfg.figures_dir / f"{name}.png"`` (110 dpi, tight bounding box), written to
    a temporary file and renamed (atomic). Returns ``None``, so a notebook cell that ends with this
    call echoes nothing; the path is ``cfg.figures_dir / f"{name}.png"``. It displays nothing
    itself: in a notebook the inline backend shows the (still open) figure once when the cell ends."""
    write_png(cfg.figures_dir / f"{name}.png", fig, dpi=110)


def sample_indices(n_total: int, k: int, seed: int) -> Tensor:
    """``min(k, n_total)`` distinct indices into a set of ``n_total`` items, drawn without
    replacement by a generator seeded with ``seed`` and left in their random order (not sorted):
    ``x[plots.sample_indices(len(x), 30, cfg.seed)]`` shows a seeded random sample instead of the
    first 30 (the embedded data are sorted by class). Returns a (min(k, n_total),) int64 tensor.
    Raises ``ValueError`` for ``n_total < 0`` or ``k < 0``."""
    if n_total < 0 or k < 0:
        raise ValueError(f"need n_total >= 0 and k >= 0, got n_total={n_total}, k={k}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(n_total), generator=g)[: min(int(k), int(n_total))]


TITLE_FONTSIZE = 7
"""Font size (points) of :func:`image_grid`'s per-image titles."""


def image_grid(x: Tensor, titles: Sequence[str] | None = None, ncols: int = 10,
               title: str | None = None, size: float = 1.1) -> plt.Figure:
    """Show images ``x`` (N, C, H, W), float in [0, 1], C = 1 (grey) or 3, in a grid of ``ncols``
    columns, each image ``size`` inches wide, with optional per-image ``titles`` (N strings, may
    contain newlines) and a figure ``title``. Every row gets room for the tallest title (its line
    count), so a title never overlaps the images of the row above."""
    n = len(x)
    ncols = max(1, int(ncols))
    nrows = max(1, int(np.ceil(n / ncols)))
    shown = [str(t) for t in titles[:n]] if titles is not None else []
    lines = max((t.count("\n") + 1 for t in shown), default=0)
    pt = 1 / 72
    # title pad (6 pt) + each line at 1.2 line spacing, plus 3 pt of air
    title_h = (6 + lines * TITLE_FONTSIZE * 1.2 + 3) * pt if lines else 0.08
    longest = max((len(line) for t in shown for line in t.split("\n")), default=0)
    col_w = max(size, longest * 0.6 * TITLE_FONTSIZE * pt + 0.1)  # ~0.6 em per character
    sup_h = 0.4 if title else 0.0
    bottom = 0.05
    fig_w = ncols * col_w
    fig_h = nrows * (size + title_h) + sup_h + bottom
    fig, axes = plt.subplots(nrows, ncols, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=0.0, right=1.0, bottom=bottom / fig_h, top=1 - (sup_h + title_h) / fig_h,
                        hspace=title_h / size, wspace=(col_w - size) / size + 0.05)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = x[i].detach().cpu().float()
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
        if shown:
            ax.set_title(shown[i], fontsize=TITLE_FONTSIZE)
    if title:
        fig.suptitle(title, y=1 - 0.08 / fig_h, va="top")
    return fig


METRIC_TITLES = {"loss": "training loss", "train_acc": "train accuracy", "test_acc": "test accuracy",
                 "trigger_acc": "trigger accuracy", "e_in": "mean energy of ID batches (E_in)",
                 "e_out": "mean energy of outlier batches (E_out)"}
"""Readable panel titles of history keys (:func:`learning_curves`)."""


def _metric_ylabel(key: str) -> str:
    if key.endswith("acc"):
        return "accuracy"
    if "loss" in key:
        return "loss"
    if key.startswith("e_"):
        return "energy score"
    return key.replace("_", " ")


def learning_curves(histories: Mapping[str, Sequence[Mapping[str, float]]],
                    keys: Sequence[str] = ("loss", "train_acc", "test_acc")) -> plt.Figure:
    """One panel per metric in ``keys``, one line per named run (e.g. victims ``all``/``half``);
    ``histories[name]`` is a list of ``{"epoch": int, key: float, ...}`` rows. Titles from
    :data:`METRIC_TITLES`, y label "loss"/"accuracy"/"energy score", integer epoch ticks."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.1), squeeze=False)
    colors = _series_colors(list(histories))
    for ax, key in zip(axes[0], keys):
        for colour, (name, hist) in zip(colors, histories.items()):
            pts = [(h["epoch"], h[key]) for h in hist or [] if h.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=4, color=colour, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(_metric_ylabel(key))
        ax.set_title(METRIC_TITLES.get(key, key.replace("_", " ")))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_matrix(y_true: Tensor, y_pred: Tensor, classes: Sequence[str],
                     title: str = "") -> plt.Figure:
    """Counts of (true, predicted) class pairs as an annotated heat map; ``y_true``/``y_pred`` (N,)
    int64 in [0, len(classes))."""
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


# --- energy scores and thresholds (notebooks 02, 03) ------------------------------------------

ENERGY_BINS = 120
"""Bins across the energy axis of :func:`energy_histograms` when no ``bins`` are given."""


def energy_range(logits_by_set: Mapping[str, Tensor], id_train_logits: Tensor,
                 temperatures: Sequence[float], pad: float = 0.02) -> tuple[float, float]:
    """One energy-axis range ``(lo, hi)`` that holds every energy score E(x) = -T logsumexp(f(x)/T)
    of every set in ``logits_by_set`` ((N, K) float logits each) and of ``id_train_logits`` (the
    percentiles E1, E2 come from these) at every temperature in ``temperatures``, widened by
    ``pad`` of its span on each side: pass it as ``xlim`` to :func:`threshold_explorer` so the axis
    stays put while the T slider moves. Raises ``ValueError`` for no temperatures, no logits, or a
    non-finite energy (and :func:`cip_helpers.method.scores.energy_score`'s errors for a bad T)."""
    from ..method.scores import energy_score

    if len(temperatures) == 0:
        raise ValueError("need at least one temperature")
    sets = [lg for lg in [*logits_by_set.values(), id_train_logits] if len(lg)]
    if not sets:
        raise ValueError("need at least one non-empty logits tensor")
    lo, hi = np.inf, -np.inf
    for t in temperatures:
        for lg in sets:
            e = energy_score(lg.detach(), float(t)).double()
            if not torch.isfinite(e).all():
                raise ValueError(f"non-finite energy score at T = {t}")
            lo, hi = min(lo, float(e.min())), max(hi, float(e.max()))
    span = max(hi - lo, 1e-6)
    return lo - pad * span, hi + pad * span


def energy_histograms(energies: Mapping[str, Tensor], thresholds: tuple[float, float] | None = None,
                      ax: plt.Axes | None = None, title: str = "", bins: np.ndarray | None = None, *,
                      xlim: tuple[float, float] | None = None, layout: str = "rows",
                      marks: Mapping[str, float] | None = None) -> plt.Axes:
    """Histograms of energy scores per query set (``energies[name]``: (N,) float tensor; higher =
    more OOD) on one shared set of bins, with optional dashed/dotted black lines at
    ``thresholds = (E1, E2)`` and labelled dash-dot lines at ``marks`` (``{name: energy}``, e.g. the
    OE margins ``{"m_in": cfg.oe_m_in, "m_out": cfg.oe_m_out}``).

    The bins span ``bins`` if given, else ``xlim`` (``ENERGY_BINS`` bins) if given, else every value
    (and every line): nothing is clipped silently. Values outside given ``bins``/``xlim`` are drawn
    in the edge bin and counted in the set's label ("3 beyond the axis, drawn at the edge").
    ``layout="rows"`` (default): one row per set, each scaled to its own tallest bin, so a set whose
    scores pile up in a narrow range (OOD sets after OE) and a wide one stay readable side by side;
    ``layout="overlay"``: overlaid densities on one baseline. Returns the axes drawn on (a new
    figure when ``ax`` is None). Raises ``ValueError`` for an unknown ``layout`` or an empty
    ``xlim``/``bins`` range."""
    if layout not in ("rows", "overlay"):
        raise ValueError(f"layout must be 'rows' or 'overlay', got {layout!r}")
    values = {name: e.detach().double().flatten().cpu().numpy() for name, e in energies.items()}
    lines = [*(thresholds or ()), *(marks or {}).values()]
    if bins is None:
        if xlim is None:
            pooled = np.concatenate([*values.values(), np.asarray(lines, dtype=float)])
            lo, hi = (float(pooled.min()), float(pooled.max())) if pooled.size else (0.0, 1.0)
            span = max(hi - lo, 1e-6)
            xlim = (lo - 0.02 * span, hi + 0.02 * span)
        bins = np.linspace(float(xlim[0]), float(xlim[1]), ENERGY_BINS + 1)
    bins = np.asarray(bins, dtype=float)
    if not bins[-1] > bins[0]:
        raise ValueError(f"empty energy range {bins[0]} .. {bins[-1]}")
    if ax is None:
        height = max(2.6, 0.45 * len(values) + 1.3) if layout == "rows" else 3.2
        _, ax = plt.subplots(figsize=(7, height))
    colors = _series_colors(list(values), defenses=False)
    n_sets = len(values)
    for i, ((name, v), colour) in enumerate(zip(values.items(), colors)):
        beyond = int(((v < bins[0]) | (v > bins[-1])).sum())
        label = f"{name} (n={len(v)})"
        if beyond:
            label += f"\n{beyond} beyond the axis, drawn at the edge"
        counts, _ = np.histogram(np.clip(v, bins[0], bins[-1]), bins=bins)
        if layout == "rows":
            base = n_sets - 1 - i
            h = counts / max(counts.max(), 1) * 0.85
            ax.stairs(h + base, bins, baseline=base, fill=True, color=colour, alpha=0.35)
            ax.stairs(h + base, bins, baseline=base, color=colour, linewidth=1)
            quarter = max(len(counts) // 4, 1)  # the label goes to the emptier side of its row
            left = counts[:quarter].sum() <= counts[-quarter:].sum()
            ax.annotate(label, (0.005 if left else 0.995, base + 0.45), xycoords=("axes fraction", "data"),
                        ha="left" if left else "right", va="center", fontsize=8, color=colour,
                        bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "alpha": 0.7,
                              "edgecolor": "none"})
        else:
            dens = counts / max(counts.sum(), 1) / np.diff(bins)
            ax.stairs(dens, bins, fill=True, color=colour, alpha=0.3, label=label)
            ax.stairs(dens, bins, color=colour, linewidth=1)
    if layout == "rows":
        ax.set_yticks([])
        ax.set_ylim(-0.1, max(n_sets, 1) - 0.05)
    else:
        ax.set_ylabel("density")
    if thresholds is not None:
        for value, label, style in zip(thresholds, ("E1", "E2"), ("--", ":")):
            ax.axvline(value, color=NEUTRAL["reference"], linestyle=style, linewidth=1.2,
                       label=f"{label} = {value:.2f}")
    mark_styles = ["-.", (0, (5, 2, 1, 2, 1, 2)), (0, (1, 1))]
    for k, (name, value) in enumerate((marks or {}).items()):
        ax.axvline(value, color=NEUTRAL["reference"], linestyle=mark_styles[k % len(mark_styles)],
                   linewidth=1.2, alpha=0.7, label=f"{name} = {value:g}")
    ax.set_xlim(bins[0], bins[-1])
    ax.set_xlabel("energy score E(x)   (higher = more OOD)"
                  + ("\neach row scaled to its tallest bin" if layout == "rows" else ""))
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left" if layout == "rows" else "best", framealpha=0.9)
    return ax


def probability_bars(rows: Mapping[str, Tensor], classes: Sequence[str], title: str = "",
                     ax: plt.Axes | None = None, colors: Mapping[str, str] | None = None) -> plt.Axes:
    """Grouped bars of several probability vectors (``rows[name]``: (K,) float in [0, 1]) over the
    same ``classes`` (K names), e.g. clean vs poisoned. A row named after a defense ("none",
    "cip") gets its colour, others :data:`OTHER_COLORS`; ``colors`` overrides per name."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 2.6))
    k = len(classes)
    width = 0.8 / max(len(rows), 1)
    auto = _series_colors(list(rows))
    for i, (name, p) in enumerate(rows.items()):
        colour = (colors or {}).get(name, auto[i])
        bars = ax.bar(np.arange(k) + (i - (len(rows) - 1) / 2) * width, p.detach().cpu().numpy(), width,
                      label=name, color=colour)
        key = {c: d for d, c in DEFENSE_COLORS.items()}.get(colour)
        if key is not None:  # a defense's answer (the clean one is the undefended "none")
            _tag(bars, key)
    ax.set_xticks(np.arange(k), classes, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


def threshold_explorer(logits_by_set: Mapping[str, Tensor], id_train_logits: Tensor, p1: float = 95.0,
                       p2: float = 99.9, temperature: float = 1.0,
                       xlim: tuple[float, float] | None = None):
    """Recompute E1/E2 as the (p1, p2) percentiles of the ID-training energies at temperature T,
    draw the energy histograms (:func:`energy_histograms`) with both lines, and return
    ``(figure, routing table)`` (a DataFrame, one row per set, columns the route fractions;
    ``table.attrs`` holds E1 and E2). ``xlim`` fixes the energy axis and the bins, e.g.
    :func:`energy_range` over every T of the slider, so the axis stays put while T moves; values
    beyond it are drawn at the edge and counted in the labels. The slider widgets of notebook 03
    call exactly this function; a plain call renders the defaults."""
    import pandas as pd

    from ..method.scores import energy_score, route_fractions, select_thresholds

    e1, e2 = select_thresholds(energy_score(id_train_logits, temperature), p1, p2)
    energy = {name: energy_score(lg, temperature) for name, lg in logits_by_set.items()}
    fig, ax = plt.subplots(figsize=(7.5, max(2.8, 0.45 * len(energy) + 1.4)))
    energy_histograms(energy, (e1, e2), ax=ax, title=f"p1 = {p1:g}, p2 = {p2:g}, T = {temperature:g}",
                      xlim=xlim)
    fig.tight_layout()
    table = pd.DataFrame({name: route_fractions(e, e1, e2) for name, e in energy.items()}).T
    table.attrs.update({"E1": e1, "E2": e2})
    return fig, table


# --- defenses (notebooks 04-06) ------------------------------------------------------------


def poisoned_bars(clean: Tensor, variants: Mapping[str, Tensor], classes: Sequence[str],
                  row_titles: Sequence[str] | None = None, defense: str = "cip") -> plt.Figure:
    """One row per query, one column per perturbation: each panel shows the clean probability
    bars (``clean`` (N, K), the undefended answer, in the colour of "none") next to the perturbed
    ones (``variants[name]``, (N, K) each) in the colour of the defense the name starts with
    ("DP (reverse sigmoid)"), else of ``defense`` (default CIP, whose perturbations notebook 04
    shows). Raises ``ValueError`` if ``defense`` names no defense."""
    n, names = len(clean), list(variants)
    fallback = defense_color(defense)
    fig, axes = plt.subplots(n, len(names), figsize=(2.9 * len(names), 2.1 * n), squeeze=False,
                             sharey=True)
    for i in range(n):
        for j, name in enumerate(names):
            ax = axes[i, j]
            q = variants[name][i]
            short = name.split(" ")[0]
            colour = DEFENSE_COLORS[_defense_key(name)] if _defense_key(name) else fallback
            probability_bars({"clean": clean[i], short: q}, classes, ax=ax,
                             colors={"clean": DEFENSE_COLORS["none"], short: colour})
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
    """Overlaid count histograms (log y axis) of reliability scores per query set
    (``scores[name]``: (N,) float, at most 1; sets may differ in size, n is in the legend), with
    an optional dashed line at R1. Returns the axes (a new figure when ``ax`` is None)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.2))
    values = {name: s.detach().double().flatten().cpu().numpy() for name, s in scores.items() if len(s)}
    lo = min((float(np.min(v)) for v in values.values()), default=0.0)
    if r1 is not None:
        lo = min(lo, float(r1))
    bins = np.linspace(lo, 1.0, 50) if lo < 1.0 else np.linspace(0.0, 1.0, 50)
    for (name, v), colour in zip(values.items(), _series_colors(list(values), defenses=False)):
        ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.35, color=colour, label=f"{name} (n={len(v)})")
        ax.hist(v, bins=bins, histtype="step", color=colour, linewidth=1)
    if r1 is not None:
        ax.axvline(r1, color=NEUTRAL["reference"], linestyle="--", label=f"R1 = {r1:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("reliability score R   (low = ambiguous query)")
    ax.set_ylabel("queries (count)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


def r1_threshold(scores: Tensor, percentile: float, queries: Tensor | None = None,
                 query_name: str = "benign queries", population: str = "ID train") -> tuple[plt.Figure, int]:
    """R1 = the ``percentile``-th percentile of ``scores`` (the reliability scores R1 is calibrated
    on, ID TRAINING images named ``population``, e.g. those CIP routes ID); draw both
    distributions with R1 and return ``(figure, count)``, count = how many of ``queries`` (default:
    ``scores`` themselves) fall below R1, i.e. would be flipped by online PBD if they route ID.
    Notebook 05's slider calls exactly this function; a plain call renders the default."""
    from ..method.defenses import r1_from_scores

    r1 = r1_from_scores(scores, percentile)
    target = scores if queries is None else queries
    count = int((target.detach().double() < r1).sum())
    sets = {population: scores} if queries is None else {population: scores, query_name: queries}
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    reliability_histograms(sets, r1, ax=ax)
    ax.set_title(f"R1 = {percentile:g}th percentile of {population} R: {count} of {len(target)} "
                 f"{query_name} ({100 * count / max(len(target), 1):.2f} %) would be flipped", fontsize=9)
    fig.tight_layout()
    return fig, count


def change_rate_bars(table, title: str = "") -> plt.Figure:
    """Bar chart of a :func:`cip_helpers.method.defenses.change_rate_by_pmax` table (columns ``bin``,
    ``n``, ``changed``, ``change_rate``): DP's top-1 change rate per clean-p_max bin, bins with
    changes in DP's colour, the others light grey, each bin's ``changed/n`` on its bar."""
    fig, ax = plt.subplots(figsize=(6.5, 3))
    rates = table["change_rate"].fillna(0).to_numpy()
    bars = ax.bar(table["bin"], rates, color=[DEFENSE_COLORS["dp"] if r > 0 else NEUTRAL["inactive"]
                                              for r in rates])
    for bar, r in zip(bars, rates):
        if r > 0:
            _tag(bar, "dp")
    for bar, n, c in zip(bars, table["n"], table["changed"]):
        ax.annotate(f"{c}/{n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=7)
    half = [b.startswith("[0.50") for b in table["bin"]]
    if any(half):  # where p_max reaches 0.5: reverse sigmoid keeps the top-1 from here on
        ax.axvline(half.index(True) - 0.5, color=NEUTRAL["reference"], linestyle=":", linewidth=1)
    ax.set_xlabel("clean p_max of the query")
    ax.set_ylabel("top-1 change rate")
    ax.set_ylim(0, max(0.05, float(rates.max()) * 1.25))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def watermark_rate(marked: Tensor, rate: float, title: str = "") -> plt.Figure:
    """Running fraction of watermarked queries over a batch (``marked``: (N,) bool), with DAWN's
    target ``rate`` and its binomial 3-sigma band (rate +- 3 sqrt(rate (1 - rate) / n)) in DAWN's
    colour."""
    n = torch.arange(1, len(marked) + 1, dtype=torch.float64)
    running = marked.double().cumsum(0) / n
    band = 3 * torch.sqrt(rate * (1 - rate) / n)
    colour = DEFENSE_COLORS["dawn"]
    fig, ax = plt.subplots(figsize=(6.5, 3))
    ax.plot(n.numpy(), running.numpy(), color=NEUTRAL["reference"], linewidth=1, label="watermarked so far")
    _tag(ax.fill_between(n.numpy(), (rate - band).clamp_min(0).numpy(), (rate + band).numpy(), alpha=0.2,
                         color=colour, label="rate ± 3σ (binomial)"), "dawn")
    _tag(ax.axhline(rate, color=colour, linestyle="--", label=f"DAWN rate r = {rate}"), "dawn")
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
    """Grouped bars: one group per metric of :func:`cip_helpers.method.defenses.compare_defenses` rows
    (``row["defense"]`` a defense name, metric values fractions or ``None``), one bar per defense
    in its colour; a missing value is marked "n/a". Raises ``ValueError`` for a row whose
    ``defense`` names no defense."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        colour = defense_color(row["defense"])
        xs = np.arange(len(metrics)) + (i - (len(rows) - 1) / 2) * width
        values = [row.get(m) for m in metrics]
        heights = [np.nan if v is None else float(v) for v in values]
        bars = ax.bar(xs, heights, width, label=row["defense"], color=colour)
        _tag(bars, row["defense"])
        for x, h in zip(xs, heights):
            ax.annotate("n/a" if np.isnan(h) else f"{h:.3f}", (x, 0 if np.isnan(h) else h),
                        ha="center", va="bottom", fontsize=6, rotation=90 if len(rows) > 3 else 0)
    ax.set_xticks(np.arange(len(metrics)), [m.replace("_", " ") for m in metrics], fontsize=8)
    ax.set_ylim(0, 1.25)  # room for the (rotated) value labels above a bar at 1.0
    ax.set_ylabel("fraction")
    ax.legend(fontsize=7, ncol=max(len(rows), 1), loc="upper center", bbox_to_anchor=(0.5, -0.12),
              frameon=False)  # below the axes: never over a bar or its label
    fig.tight_layout()
    return fig


# --- attacks (notebooks 07-10) -------------------------------------------------------------

HUE_HATCHES = ("", "////", "xx", "..", "\\\\\\\\")
"""Hatches that tell the levels of a non-defense hue (hard/soft labels) apart in :func:`attack_bars`;
the first level is solid."""

LABEL_TYPE_ORDER = ("hard", "soft", "logits")


def _ordered(values: Sequence, first: Sequence = ()) -> list:
    """Distinct ``values`` (missing ones dropped): those in ``first`` in its order, then the rest in
    order of appearance."""
    seen = [v for v in dict.fromkeys(values) if v is not None and v == v]
    return [v for v in first if v in seen] + [v for v in seen if v not in first]


def _zoom_ylim(values: Sequence[float]) -> tuple[float, float, bool]:
    """``(lo, hi, zoomed)``: when every value is a fraction above 0.5, a range around them that shows
    their differences (zoomed), else ``(0, ~1.05 or 1.15 * max)``."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size and v.min() > 0.5 and v.max() <= 1.0:
        margin = max(float(v.max() - v.min()), 0.02)
        lo = max(0.0, np.floor((v.min() - margin) * 100) / 100)
        hi = np.ceil((v.max() + 0.6 * margin) * 100) / 100
        return float(lo), float(hi), True
    top = float(v.max()) if v.size else 1.0
    return 0.0, (1.05 if top <= 1.0 else 1.15 * top), False


def attack_bars(table, x: str = "defense", hue: str | None = "label_type", value: str = "surrogate_acc",
                reference: float | None = None, title: str = "",
                ylim: tuple[float, float] | None = None) -> plt.Figure:
    """Grouped bars of ``value`` (default the surrogate's test accuracy, a fraction) from a results
    table (a pandas DataFrame of attack records, e.g. ``attacks.results_table``): one group per
    ``x`` value (defenses in :data:`DEFENSE_COLORS` order), one bar per ``hue`` value (hard/soft
    labels, told apart by hatch: solid = first level). Bars take the colour of the defense they
    belong to (the ``x`` or ``hue`` column named "defense"). Several rows in one bar (``hue`` None
    or equal to ``x``) give their mean, with each row as a dot; a bar without a value says "n/a".
    The value is printed on each bar, an optional dashed line marks ``reference`` (the victim's
    accuracy). ``ylim`` None: from 0, unless every value (and ``reference``) is above 0.5, then
    zoomed onto the values so close bars (0.93, 0.94, 0.95) differ visibly, with the y label saying
    where the axis starts. Raises ``KeyError`` for a missing ``x``/``value`` column."""
    from matplotlib.patches import Patch

    for col in (x, value):
        if col not in table:
            raise KeyError(f"results table has no column {col!r}")
    use_hue = hue is not None and hue != x and hue in table
    xcats = _ordered(list(table[x]), tuple(DEFENSE_COLORS) if x == "defense" else ())
    hcats = _ordered(list(table[hue]), LABEL_TYPE_ORDER) if use_hue else [None]
    width = 0.8 / max(len(hcats), 1)
    bars = []  # (position, mean, values, colour, hatch, defense)
    for i, xv in enumerate(xcats):
        for j, hv in enumerate(hcats):
            sub = table[table[x] == xv]
            if use_hue:
                sub = sub[sub[hue] == hv]
            vals = [float(v) for v in sub[value] if v is not None and v == v]
            defense = xv if x == "defense" else (hv if use_hue and hue == "defense" else None)
            key = _defense_key(defense) if defense is not None else None
            colour = DEFENSE_COLORS[key] if key else OTHER_COLORS[(j if use_hue else i) % len(OTHER_COLORS)]
            hatch = HUE_HATCHES[j % len(HUE_HATCHES)] if use_hue and hue != "defense" else ""
            bars.append((i + (j - (len(hcats) - 1) / 2) * width, vals, colour, hatch, key))
    points = [p for _, v, *_ in bars for p in v]
    lo, hi, zoomed = _zoom_ylim(points + ([reference] if reference is not None else []))
    if ylim is not None:
        lo, hi = ylim
        zoomed = lo > 0
    fig, ax = plt.subplots(figsize=(7, 3.4))
    digits = 3 if zoomed and hi - lo < 0.25 else 2
    for pos, vals, colour, hatch, key in bars:
        if not vals:
            ax.text(pos, lo + 0.02 * (hi - lo), "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
            continue
        mean = float(np.mean(vals))
        (bar,) = ax.bar(pos, mean - lo, width * 0.92, bottom=lo, color=colour, hatch=hatch,
                        edgecolor="white" if hatch else colour, linewidth=0.5)
        if key:
            _tag(bar, key)
        if len(vals) > 1:
            ax.scatter([pos] * len(vals), vals, s=9, color=NEUTRAL["reference"], zorder=3)
        ax.annotate(f"{mean:.{digits}f}", (pos, mean), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 1), textcoords="offset points")
    handles = []
    if use_hue and hue != "defense":
        handles = [Patch(facecolor="#4d4d4d", edgecolor="white", hatch=HUE_HATCHES[j % len(HUE_HATCHES)],
                         label=f"{hv} ({'solid' if j == 0 else 'hatched'})") for j, hv in enumerate(hcats)]
    if reference is not None:
        handles.append(ax.axhline(reference, color=NEUTRAL["reference"], linestyle="--", linewidth=1,
                                  label=f"victim {reference:.3f}"))
    if any(len(v) > 1 for _, v, *_ in bars):
        handles.append(ax.scatter([], [], s=9, color=NEUTRAL["reference"], label="rows (bar = mean)"))
    ax.set_xticks(range(len(xcats)), [str(c) for c in xcats])
    ax.set_xlim(-0.5, len(xcats) - 0.5)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylim(lo, hi)
    label = value.replace("_", " ")
    ax.set_ylabel(f"{label}\n(axis starts at {lo:g}, not 0)" if zoomed else label)
    ax.set_title(title)
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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


def accuracy_vs_queries(curves: Mapping[str, Sequence[tuple[int, float]]],
                        reference: float | None = None, title: str = "",
                        ylabel: str = "surrogate test accuracy",
                        dashed: Sequence[str] = ()) -> plt.Figure:
    """One line per curve ``{label: [(queries, accuracy), ...]}`` (accuracy a fraction): accuracy
    of the stolen model against the number of queries spent. A label that names a defense
    ("cip", "dp, all defended") gets that defense's colour (:func:`defense_color`), other labels
    :data:`OTHER_COLORS`; labels in ``dashed`` are drawn dashed. A curve with the same points as a
    later one (which would hide it) is drawn with larger hollow markers, one size step per later
    copy, so every curve stays visible as a ring; its legend label ends in ``(hidden)`` and the
    legend's title says why."""
    names = list(curves)
    same = {name: [other for other in names[i + 1:] if _same_points(curves[name], curves[other])]
            for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for (name, points), colour in zip(curves.items(), _series_colors(names)):
        q, a = zip(*points) if points else ((), ())
        hidden = len(same[name])  # how many curves drawn later lie on top of this one
        hollow = name in dashed or hidden > 0  # dashed curves get hollow markers: a filled dot hides the dashes
        label = f"{name} (hidden)" if hidden else name
        (line,) = ax.plot(q, a, marker="o", label=label, color=colour, linestyle="--" if name in dashed else "-",
                          markerfacecolor="white" if hollow else colour,
                          markersize=6 + 4 * hidden if hidden else (5 if hollow else 6),
                          markeredgewidth=1.5 if hidden else None)
        if _defense_key(name):
            _tag(line, name)
    if reference is not None:
        ax.axhline(reference, color=NEUTRAL["reference"], linestyle="--", linewidth=1,
                   label=f"victim {reference:.2f}")
    ax.axhline(0.1, color=NEUTRAL["chance"], linestyle=":", linewidth=1, label="chance")
    _finish(fig, ax, "queries to the API", ylabel, title)
    if any(same.values()):
        ax.get_legend().set_title("ring (hidden): under an equal curve",
                                  prop={"size": 7})
        fig.tight_layout()
    return fig


def _same_points(a: Sequence[tuple[int, float]], b: Sequence[tuple[int, float]], tol: float = 0.005) -> bool:
    """Whether two curves of :func:`accuracy_vs_queries` would draw on top of each other: the same
    query counts and accuracies within ``tol`` (half a percentage point) at every point."""
    return (len(a) == len(b) > 0 and
            all(qa == qb and abs(ya - yb) <= tol for (qa, ya), (qb, yb) in zip(a, b)))


TRADEOFF_KEYS = (("fidelity", "API fidelity on ID test digits", "-", "o"),
                 ("poisoned_share", "share of the mixed pool poisoned", "--", "s"),
                 ("strong_share", "... of it with strong PPD", (0, (5, 1, 1, 1)), "^"),
                 ("surrogate_acc", "stolen surrogate accuracy", "-.", "D"),
                 ("trigger_acc", "trigger accuracy", ":", "v"))
"""(key, legend label, line style, marker) of :func:`threshold_tradeoff`'s lines: all CIP's, so
one colour, told apart by line style AND marker (two dash patterns alone look alike in a legend)."""


def threshold_tradeoff(tradeoff: Mapping[str, object], p1: float | None = None,
                       p2: float | None = None) -> plt.Figure:
    """Notebook 03's trade-off figure from ``attacks.threshold_tradeoff``: left, the ``p1`` grid
    (fidelity, poisoned and strongly poisoned share, mixed-pool KnockoffNets surrogate and trigger
    accuracy, all in [0, 1]); right, the ``p2`` grid (fidelity and the two shares only). Optional vertical lines
    mark a slider setting. Every line is CIP's, in CIP's colour, told apart by line style and marker."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
    colour = DEFENSE_COLORS["cip"]
    for ax, grid, mark in ((axes[0], "p1", p1), (axes[1], "p2", p2)):
        rows = tradeoff[grid]
        xs = [r[grid] for r in rows]
        for key, label, style, marker in TRADEOFF_KEYS:
            pts = [(x, r.get(key)) for x, r in zip(xs, rows) if r.get(key) is not None]
            if pts:
                _tag(ax.plot(*zip(*pts), marker=marker, linestyle=style, color=colour, label=label), "cip")
        if mark is not None:
            ax.axvline(mark, color=NEUTRAL["reference"], linewidth=1, alpha=0.5)
        other = "p2" if grid == "p1" else "p1"
        _finish(fig, ax, f"{grid} (percentile of ID-train energies; {other} = {rows[0][other]:g})",
                "fraction" if grid == "p1" else "", f"moving E{grid[1]}", ylim=(0, 1.05))
    label = tradeoff.get("label_type", "")
    fig.suptitle(f"CIP threshold trade-off (surrogates: mixed-pool KnockoffNets, {label} labels)", fontsize=10)
    fig.tight_layout()
    return fig


RUN_MARKERS = ("o", "s", "^", "D", "v")


def history_curves(histories: Mapping[str, Sequence[Mapping[str, float]]],
                   keys: Sequence[str] = ("test_acc", "trigger_acc"), title: str = "") -> plt.Figure:
    """Per-epoch accuracies of training runs (``{label: history}``, a history being the
    ``[{"epoch": 1, "test_acc": ..., ...}, ...]`` list a record stores): one line per (run, key),
    solid for the first key, dashed/dotted for the others; integer epoch ticks. A run whose label
    names a defense ("dawn hard") is in that defense's colour, others in :data:`OTHER_COLORS`;
    runs are also told apart by marker (o, s, ^, ...), open for a later run of the same colour."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    styles = ["-", "--", ":", "-."]
    colors = _series_colors(list(histories))
    for i, ((name, history), colour) in enumerate(zip(histories.items(), colors)):
        hollow = colour in colors[:i]  # a second run of one defense: open markers
        for j, key in enumerate(keys):
            pts = [(h["epoch"], h[key]) for h in history or [] if h.get(key) is not None]
            if pts:
                e, a = zip(*pts)
                (line,) = ax.plot(e, a, marker=RUN_MARKERS[i % len(RUN_MARKERS)], ms=5,
                                  linestyle=styles[j % len(styles)], color=colour,
                                  markerfacecolor="white" if hollow else colour,
                                  label=f"{name}: {key.replace('_acc', ' accuracy')}")
                if _defense_key(name):
                    _tag(line, name)
    ax.axhline(0.1, color=NEUTRAL["chance"], linestyle=":", linewidth=1, label="chance (10 classes)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, "epoch", "accuracy", title)


def generated_images(x: Tensor, energies: Tensor, e1: float, e2: float, ncols: int = 8,
                     title: str = "") -> plt.Figure:
    """A grid of (generated) images ``x`` (N, C, H, W) in [0, 1] titled with their energy score
    (``energies`` (N,)) and CIP's route for it (thresholds ``e1`` < ``e2``)."""
    def route_name(e: float) -> str:
        return "ID" if e < e1 else ("low-ES" if e < e2 else "high-ES")

    titles = [f"E={float(e):.1f}\n{route_name(float(e))}" for e in energies]
    return image_grid(x, titles, ncols=ncols, title=title, size=1.4)


def trigger_vs_ratio(table, title: str = "") -> plt.Figure:
    """DQA: trigger accuracy of DAWN and CIP (in their colours) against the ratio
    r = (ID queries) / (noise queries) on a log2 axis read with MORE NOISE TO THE RIGHT (r falls
    from left to right), with the mean number of triggers T next to every point. ``table`` is an
    ``attacks.results_table`` of DQA (columns ``defense``, ``dqa_ratio``, ``trigger_acc`` and
    ``n_triggers``, fractions); several rows of one (defense, r), e.g. seeds, are averaged."""
    import pandas as pd

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name in ("dawn", "cip"):
        rows = table[(table["defense"] == name) & table["dqa_ratio"].notna() & table["trigger_acc"].notna()]
        if rows.empty:
            continue
        agg = rows.groupby("dqa_ratio")[["trigger_acc", "n_triggers"]].mean().sort_index(ascending=False)
        (line,) = ax.plot(agg.index, agg["trigger_acc"], marker="o", label=name, color=DEFENSE_COLORS[name])
        _tag(line, name)
        for r, acc, t in zip(agg.index, agg["trigger_acc"], agg["n_triggers"]):
            if not pd.isna(t):
                ax.annotate(f"T={float(t):.3g}", (r, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    ratios = sorted(set(table["dqa_ratio"].dropna()), reverse=True)
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.minorticks_off()
    ax.invert_xaxis()
    return _finish(fig, ax, "r = ID queries / noise queries  (more noise to the right)", "trigger accuracy",
                   title, ylim=(0, 1.12))


# --- across seeds (notebook 11, README) -----------------------------------------------------------

ATTACK_NAMES = {"knockoff": "KnockoffNets", "dfme": "DFME", "ida": "IDA", "dqa": "DQA"}
"""Display names of the attacks (keys as in the records' ``attack``)."""


def _dqa_ratio(attack: str, setting: str) -> float | None:
    """r of a DQA setting "r0.25" -> 0.25, else None."""
    m = re.fullmatch(r"r(\d*\.?\d+)", str(setting)) if attack == "dqa" else None
    return float(m.group(1)) if m else None


def _more_noise_right(runs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``runs`` ((attack, setting) pairs) with the DQA runs, in their own slots, sorted by falling
    r = ID / noise queries: more noise to the right, as in :func:`trigger_vs_ratio`."""
    slots = [i for i, (a, s) in enumerate(runs) if _dqa_ratio(a, s) is not None]
    ordered = sorted((runs[i] for i in slots), key=lambda run: -_dqa_ratio(*run))
    out = list(runs)
    for i, run in zip(slots, ordered):
        out[i] = run
    return out


def _spread_bars(ax: plt.Axes, runs: Sequence, defenses: Sequence[str],
                 values: Callable[[Any, str], Sequence[float | None]],
                 bounds: tuple[float, float] = (0.0, 100.0)) -> None:
    """Per run (x slot) and defense: the mean over ``values(run, defense)`` (percent) as a bar in
    the defense's colour with a ± sd error bar (sample sd; none for one value) cut at ``bounds``
    (an accuracy cannot leave [0, 100]) and every value as a dot; "n/a" where there is no value."""
    width = 0.8 / max(len(defenses), 1)
    for j, d in enumerate(defenses):
        colour = defense_color(d)
        labelled = False
        for i, run in enumerate(runs):
            x = i + (j - (len(defenses) - 1) / 2) * width
            vals = np.asarray([float(v) for v in values(run, d) if v is not None and v == v], dtype=float)
            if vals.size == 0:
                ax.annotate("n/a", (x, 0), xytext=(0, 2), textcoords="offset points", rotation=90,
                            ha="center", va="bottom", fontsize=7, color=NEUTRAL["reference"])
                continue
            sd = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
            mean = float(vals.mean())
            yerr = [[min(sd, mean - bounds[0])], [min(sd, bounds[1] - mean)]]  # mean ± sd, cut at the bounds
            bars = ax.bar(x, mean, width * 0.9, color=colour, alpha=0.4, yerr=yerr, capsize=2,
                          error_kw={"ecolor": NEUTRAL["reference"], "elinewidth": 1},
                          label=None if labelled else d)
            _tag(bars, d)
            _tag(ax.scatter(np.full(vals.size, x), vals, s=10, color=colour, zorder=3), d)
            labelled = True


def seed_spread(long, value: str = "Test(M_S)", title: str = "", ylabel: str = "") -> plt.Figure:
    """Every seed as a dot and the mean ± sd over seeds as a bar with error bar, per run (attack and
    setting) and defense, in the defense's colour; "n/a" where a (run, defense) pair has no value
    (e.g. no trigger set), DQA runs with more noise to the right. ``long`` is
    :func:`cip_helpers.tools.report.seed_table`'s output (one row per seed and run, percent values);
    defenses without any ``value`` are left out."""
    df = long.dropna(subset=[value])
    runs = _more_noise_right(list(dict.fromkeys(zip(df["attack"], df["setting"]))))
    defenses = [d for d in DEFENSE_COLORS if d in set(df["defense"])]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(runs) + 2), 3.6))

    def values(run: tuple[str, str], d: str) -> list[float]:
        pick = (df["attack"] == run[0]) & (df["setting"] == run[1]) & (df["defense"] == d)
        return list(df[pick][value].astype(float))

    _spread_bars(ax, runs, defenses, values)
    ax.set_xticks(range(len(runs)), [f"{a} {s}" for a, s in runs], rotation=30, ha="right")
    ax.set_ylabel(ylabel or value)
    n = df["seed"].nunique() if "seed" in df else 1
    ax.set_title(title or f"{value}: mean ± sd over {n} seed(s), dots = seeds")
    if any(_dqa_ratio(*r) is not None for r in runs):
        ax.set_xlabel("DQA: r = ID queries / noise queries, more noise to the right", fontsize=8)
    ax.legend(fontsize=8, ncol=max(len(defenses), 1))
    fig.tight_layout()
    return fig


def _setting_label(attack: str, setting: str) -> str:
    r = _dqa_ratio(attack, setting)
    if r is not None:
        return f"r = {r:g}"
    return str(setting).replace("mixed_", "mixed pool, ").replace("_", " ")


def overview(summary: Mapping, value: str = "surrogate_acc", n_classes: int = 10) -> plt.Figure:
    """The README's overview: per attack setting (x) and defense, the stolen surrogate's test
    accuracy in percent over seeds: mean as a bar in the defense's colour, ± sd error bar, each seed
    as a dot, "n/a" where a pair was not run; per setting a dashed black line at the attacked
    victim's test accuracy (mean over seeds), and a dotted line at chance (1 / ``n_classes``).
    ``summary`` is a multi-seed ``summary.json`` (:func:`cip_helpers.tools.report.seed_summary`): its
    ``rows`` (``attack``, ``setting`` or ``label_type``, ``defense``, ``victim``, ``ablation``,
    ``value`` = ``{"mean", "sd", "n", "values"}`` with fractions) and ``victims``; ablation rows are
    left out; DQA settings are ordered with more noise to the right. Raises ``ValueError`` without
    main rows. The served CIP's rows (setting ``*_online``: CIP alone, beside the paper's offline
    row of the same attack) are left out too."""
    rows = [r for r in summary.get("rows", []) if not r.get("ablation")
            and not str(r.get("setting") or "").endswith("_online")]
    if not rows:
        raise ValueError("summary has no main (non-ablation) rows")

    def run_of(r: Mapping) -> tuple[str, str]:
        return r["attack"], str(r.get("setting") or r.get("label_type") or "")

    attacks_order = _ordered([r["attack"] for r in rows], tuple(ATTACK_NAMES))
    runs = list(dict.fromkeys(run_of(r) for r in sorted(rows, key=lambda r: attacks_order.index(r["attack"]))))
    runs = _more_noise_right(runs)
    by_key = {(*run_of(r), r["defense"]): r for r in rows}
    defenses = [d for d in DEFENSE_COLORS if any(r["defense"] == d for r in rows)]

    def values(run: tuple[str, str], d: str) -> list[float]:
        st = (by_key.get((*run, d)) or {}).get(value) or {}
        return [100 * v for v in st.get("values", []) if v is not None]

    fig, ax = plt.subplots(figsize=(max(8.0, 0.95 * len(runs) + 2.5), 4.4))
    _spread_bars(ax, runs, defenses, values)
    victims = summary.get("victims", {})
    labelled = False
    for i, run in enumerate(runs):
        victim = next((r.get("victim") for r in rows if run_of(r) == run), None)
        acc = (victims.get(victim) or {}).get("mean") if victim else None
        if acc is not None:
            ax.hlines(100 * acc, i - 0.45, i + 0.45, colors=NEUTRAL["reference"], linestyles="--",
                      linewidth=1.2, label=None if labelled else "victim test accuracy (its own split)")
            labelled = True
    ax.axhline(100 / n_classes, color=NEUTRAL["chance"], linestyle=":", linewidth=1.2,
               label=f"chance ({100 / n_classes:g} %)")
    for i in range(1, len(runs)):  # thin separators between attacks
        if runs[i][0] != runs[i - 1][0]:
            ax.axvline(i - 0.5, color=NEUTRAL["inactive"], linewidth=1)
    ax.set_xticks(range(len(runs)), [f"{ATTACK_NAMES.get(a, a)}\n{_setting_label(a, s)}" for a, s in runs],
                  fontsize=8)
    ax.set_xlim(-0.6, len(runs) - 0.4)
    if any(_dqa_ratio(*r) is not None for r in runs):
        ax.set_xlabel("DQA: r = ID queries / noise queries, more noise to the right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("surrogate test accuracy (%)" if value == "surrogate_acc" else f"{value} (%)")
    n = summary.get("n_seeds") or max((len(values(run, d)) for run in runs for d in defenses), default=0)
    ax.set_title(f"Stolen surrogate per attack setting and defense: bar = mean ± sd over {n} seeds, "
                 f"dots = seeds ({summary.get('profile', '')} profile, {summary.get('dataset', '')})",
                 fontsize=10)
    ax.legend(fontsize=8, ncol=len(defenses) + 2, loc="lower center", bbox_to_anchor=(0.5, 1.07),
              frameon=False)
    fig.tight_layout()
    return fig


# --- ownership verification (notebook 11) ------------------------------------------------------

def verification_pvalues(verdicts: Sequence[Mapping], alpha: float = 0.01, title: str = "") -> plt.Figure:
    """-log10 p per suspect and trigger set (x axis): stolen surrogates as large dots in their
    defense's colour, innocent models (leave-one-out) as small grey dots, the flagging line at
    -log10 alpha. ``verdicts`` are :func:`cip_helpers.tools.report.verification_verdicts` dicts
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
            _tag(ax.scatter(x, y, s=60, color=defense_color(v["defense"]), edgecolor="black", zorder=3,
                            label=None if label in labelled else label), v["defense"])
        else:
            label = "innocent (leave-one-out)"
            ax.scatter(x + rng.uniform(-0.2, 0.2), y, s=12, color=NEUTRAL["chance"], alpha=0.7, zorder=2,
                       label=None if label in labelled else label)
        labelled.add(label)
    ax.axhline(-np.log10(alpha), color=NEUTRAL["reference"], ls="--", lw=1, label=f"alpha = {alpha:g}")
    ax.set_xticks(range(len(sets)), sets, rotation=35, ha="right")
    ax.set_ylabel("-log10 p  (higher = stronger evidence)")
    ax.set_title(title or "ownership test per suspect: flagged above the dashed line")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def conviction_curves(points, alpha: float = 0.01, thieves: Mapping[str, str] | None = None,
                      title: str = "") -> plt.Figure:
    """Queries to conviction: -log10 p of the ownership test (y) against the thief's number of
    queries (x, log scale, ticks at the grid's budgets), one panel per thief (in the order of
    ``thieves``, else as they come), one line per (defense, seed) in the defense's colour (seeds:
    markers), the flagging line at -log10 ``alpha``. ``points`` is a DataFrame with ``thief``,
    ``defense``, ``seed``, ``queries``, ``p_value`` (``report.conviction_rows``); ``thieves`` maps
    thief keys to panel titles. p is floored at 1e-300."""
    present = list(dict.fromkeys(points["thief"]))
    names = [t for t in (thieves or {}) if t in present] + [t for t in present if t not in (thieves or {})]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1.2, 3.4), sharey=True, squeeze=False)
    for ax, thief in zip(axes[0], names):
        sub = points[points["thief"] == thief]
        for (defense, seed), g in sub.groupby(["defense", "seed"], sort=True):
            g = g.sort_values("queries")
            y = -np.log10(np.maximum(g["p_value"].astype(float).to_numpy(), 1e-300))
            marker = RUN_MARKERS[int(seed) % len(RUN_MARKERS)]
            _tag(ax.plot(g["queries"], y, marker=marker, ms=4, lw=1.2, alpha=0.85, color=defense_color(defense),
                         label=f"{defense}, seed {seed}")[0], defense)
        ax.axhline(-np.log10(alpha), color=NEUTRAL["reference"], ls="--", lw=1, label=f"alpha = {alpha:g}")
        ax.set_xscale("log")
        budgets = sorted({int(q) for q in sub["queries"]})
        ax.set_xticks(budgets, [f"{q:,}" for q in budgets], rotation=45, fontsize=7)
        ax.minorticks_off()
        ax.set_title((thieves or {}).get(thief, thief), fontsize=9)
        ax.set_xlabel("queries sent by the thief", fontsize=8)
    axes[0][0].set_ylabel("-log10 p (flagged above the dashed line)", fontsize=8)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    axes[0][-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title or "queries to conviction: the ownership test as the thief queries more", fontsize=10)
    fig.tight_layout()
    return fig


def owner_tradeoff(prices: Sequence[Mapping], planned: Mapping[str, Sequence[tuple[float, float | None]]],
                   measured: Sequence[Mapping] = (), title: str = "") -> plt.Figure:
    """The owner's choice of online-PBD share. Left: the benign price, the share of ID test digits
    whose top-1 the served CIP changes beyond what OE already changes (``prices``: dicts with
    ``share`` in %, ``pbd_part`` a fraction, ``seed``), against the share flipped. Right: queries
    to conviction against the share, as the planning model predicts (``planned``: label ->
    [(share %, queries or None)], e.g. per reproduction rate) and as measured (``measured``:
    dicts with ``share`` %, ``queries`` and ``label``)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.5))
    for i, seed in enumerate(sorted({p["seed"] for p in prices})):
        pts = sorted((p["share"], 100 * p["pbd_part"]) for p in prices if p["seed"] == seed)
        left.plot(*zip(*pts), marker=RUN_MARKERS[i % len(RUN_MARKERS)], color=defense_color("cip"), lw=1,
                  alpha=0.8, label=f"seed {seed}")
    top = max([p["share"] for p in prices] + [1.0])
    left.plot([0, top], [0, top], color=NEUTRAL["chance"], ls=":", lw=1, label="price = share")
    left.set_xlabel("share of ID-routed queries flipped (%)")
    left.set_ylabel("benign price: ID test digits with\na changed top-1, PBD's part (%)")
    left.legend(fontsize=7)
    styles = ("-", "--", ":", "-.")
    for (label, pts), ls in zip(planned.items(), styles):
        pts = [(a, b) for a, b in pts if b is not None]
        if pts:
            right.plot(*zip(*pts), ls=ls, color=NEUTRAL["reference"], lw=1, label=f"planned: {label}")
    for i, m in enumerate(measured):
        right.scatter(m["share"], m["queries"], color=defense_color("cip"), edgecolor="black", zorder=3,
                      marker=RUN_MARKERS[i % len(RUN_MARKERS)], label=m["label"])
    right.set_yscale("log")
    right.set_xlabel("share of ID-routed queries flipped (%)")
    right.set_ylabel("queries to conviction")
    right.legend(fontsize=7)
    fig.suptitle(title or "what the owner pays (left) for how fast it convicts (right)", fontsize=10)
    fig.tight_layout()
    return fig


def memorisation_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], title: str = "") -> plt.Figure:
    """Per epoch, the surrogate's accuracy on its own training answers (left) and on the owner's
    trigger set (right): ``histories`` maps a run label (e.g. ``"seed 0, hard"``; a label with
    "soft" is drawn dashed) to its per-epoch history (keys ``epoch``, ``train_acc``,
    ``trigger_acc``). One marker per run, every line in CIP's colour."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), sharey=True)
    for ax, (key, name) in zip(axes, (("train_acc", "train accuracy (the API's answers)"),
                                      ("trigger_acc", "trigger accuracy (flipped answers)"))):
        for i, (label, history) in enumerate(histories.items()):
            epochs = [h["epoch"] for h in history]
            values = [h.get(key) for h in history]
            _tag(ax.plot(epochs, values, ls="--" if "soft" in label else "-", marker=RUN_MARKERS[i % len(RUN_MARKERS)],
                         ms=3, lw=1.1, alpha=0.8, color=defense_color("cip"), label=label)[0], "cip")
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title or "does the surrogate memorise the flipped answers as it trains longer?", fontsize=10)
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
        _tag(ax.axvline(n_id - 0.5, color=DEFENSE_COLORS["cip"], lw=1.5), "cip")
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xticks(range(len(order)), [str(int(lab)) for lab in labels[order]], fontsize=6)
    ax.set_xlabel(f"triggers (altered label): {n_id} in-distribution | {len(order) - n_id} OOD, by label")
    ax.set_title(title or "black = the model gives the trigger's altered label")
    fig.tight_layout()
    return fig


def trigger_counts_by_call_size(counts: Mapping[str, Mapping[str, int]], title: str = "") -> plt.Figure:
    """Grouped bars: trigger-set size per call-size setting (x axis, the keys of each inner
    mapping, e.g. from :func:`defenses.triggers_by_call_size`) for each PBD mode (the outer
    keys). Every mode is CIP's, so every bar is in CIP's colour; modes after the online one are
    hatched in white (``//``, ``xx``, ``..``)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    modes = list(counts)
    labels = list(next(iter(counts.values()))) if counts else []
    width = 0.8 / max(len(modes), 1)
    hatches = ["//", "xx", ".."]
    colour = DEFENSE_COLORS["cip"]
    for j, mode in enumerate(modes):
        online = mode.startswith("online")
        xs = np.arange(len(labels)) + (j - (len(modes) - 1) / 2) * width
        values = [counts[mode][k] for k in labels]
        bars = ax.bar(xs, values, width * 0.9, color=colour, edgecolor="white" if not online else colour,
                      hatch=None if online else hatches[j % len(hatches)], label=mode)
        _tag(bars, "cip")
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_ylabel("triggers (flipped answers)")
    ax.margins(y=0.15)  # room for the bar labels
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


# --- the course at a glance (notebook 00) -----------------------------------------------------


def _box(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str, colour: str,
         fill: str | None = None, fontsize: float = 10, scale: float = 1.0) -> dict[str, tuple[float, float]]:
    """A rounded box with centred ``text`` (``fontsize * scale`` points, shrunk further until it
    fits) at (x, y) (lower left, data units); returns its anchor points (``"l"``, ``"r"``, ``"t"``,
    ``"b"``, ``"c"``)."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                linewidth=1.6 * scale, edgecolor=colour, facecolor=fill or "white"))
    label = ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize * scale,
                    linespacing=1.25)
    renderer = ax.figure.canvas.get_renderer()
    (x0, y0), (x1, y1) = ax.transData.transform([(x, y), (x + w, y + h)])
    while label.get_fontsize() > 3:  # shrink the text until it fits the box (on a small ``ax``)
        bb = label.get_window_extent(renderer)
        if bb.width <= 0.94 * (x1 - x0) and bb.height <= 0.94 * (y1 - y0):
            break
        label.set_fontsize(label.get_fontsize() - 0.5)
    return {"l": (x, y + h / 2), "r": (x + w, y + h / 2), "t": (x + w / 2, y + h),
            "b": (x + w / 2, y), "c": (x + w / 2, y + h / 2)}


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float], text: str = "",
           colour: str = "#000000", rad: float = 0.0, text_xy: tuple[float, float] | None = None,
           scale: float = 1.0) -> None:
    """An arrow from ``start`` to ``end`` (data units), optionally labelled at ``text_xy`` (default:
    its midpoint); sizes times ``scale``."""
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12 * scale,
                                 linewidth=1.3 * scale, color=colour, connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=2 * scale, shrinkB=2 * scale))
    if text:
        tx, ty = text_xy or ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
        ax.text(tx, ty, text, ha="center", va="center", fontsize=9 * scale, color=colour,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"})


def _tint(colour: str, amount: float = 0.88) -> str:
    """``colour`` mixed with ``amount`` of white (a light fill)."""
    from matplotlib.colors import to_hex, to_rgb

    return to_hex(tuple(c + (1 - c) * amount for c in to_rgb(colour)))


def cip_pipeline(ax: plt.Axes | None = None) -> plt.Figure:
    """The course at a glance (not the paper's figure): one attacker query's path through CIP, the
    attacks that use the answers and the ownership test on the trigger set, each box labelled with
    the notebook that treats it ([01] .. [11]); CIP's parts in CIP's colour, the baselines DP and
    DAWN (notebook 06) aside in theirs. Drawn on ``ax`` if given (box texts shrink to fit a small
    one), else on a new 11 x 5.45 inch figure; returns the figure."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(11, 5.45))
        ax.set_position((0.0, 0.0, 1.0, 1.0))  # one data unit = one inch
    else:
        fig = ax.figure
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 5.45)
    ax.axis("off")
    size = ax.get_position().size * fig.get_size_inches()
    k = float(min(size[0] / 11, size[1] / 5.45))  # 1 on the 11 x 5.45 inch figure
    cip, ink, grey = DEFENSE_COLORS["cip"], NEUTRAL["reference"], "#4d4d4d"
    cip_fill = _tint(cip)

    owner = {c: d for d, c in DEFENSE_COLORS.items()}  # colour -> defense, to tag CIP's parts

    def box(*args: Any) -> dict[str, tuple[float, float]]:
        anchors = _box(ax, *args, scale=k)
        if args[5] in owner:
            _tag(ax.patches[-1], owner[args[5]])
        return anchors

    def arrow(start: tuple[float, float], end: tuple[float, float], text: str = "", colour: str = ink,
              **kwargs: Any) -> None:
        _arrow(ax, start, end, text, colour, scale=k, **kwargs)
        if colour in owner:
            _tag(ax.patches[-1], owner[colour])

    victim = box(0.05, 3.9, 1.65, 1.05, "[01] victim model f\n(trained on\nID data)", grey)
    query = box(0.05, 2.05, 1.65, 0.85, "attacker's query x", grey)
    thresholds = box(2.05, 3.9, 2.35, 1.05, "[03] thresholds E1 < E2:\npercentiles p1, p2 of\n"
                 "the ID-train energies", cip, cip_fill)
    energy = box(2.05, 1.95, 2.35, 1.05, "[02] energy score\nE(x) = −T·logsumexp(f(x)/T)\n"
             "(f fine-tuned with OE)", cip, cip_fill)
    route_id = box(4.8, 3.65, 2.45, 1.5, "E < E1: \"ID\"\n[05] hardest (lowest R)?\n"
               "yes: PBD flips the answer,\nlogs it in the trigger set\nno: clean answer", cip, cip_fill)
    route_low = box(4.8, 1.95, 2.45, 1.05, "E1 ≤ E < E2: \"low-ES OOD\"\n[04] weak PPD\n"
                "(reverse sigmoid)", cip, cip_fill)
    route_high = box(4.8, 0.45, 2.45, 1.05, "E ≥ E2: \"high-ES OOD\"\n[04] strong PPD\n"
                 "(answer replaced)", cip, cip_fill)
    trigger = box(7.6, 4.05, 1.75, 0.85, "trigger set\n(query, flipped label)", cip, cip_fill)
    surrogate = box(7.6, 1.7, 1.75, 1.75, "answers → the\nattacker's surrogate\n"
                "[07] KnockoffNets\n[08] DFME\n[09] IDA · [10] DQA", grey)
    verify = box(9.6, 2.75, 1.35, 1.75, "[11] ownership\nverification:\ndoes the\nsuspect give\n"
             "the flipped\nlabels?", cip, cip_fill)
    box(7.6, 0.15, 1.6, 0.95, "[06] baseline DP:\nreverse sigmoid\non every answer",
        DEFENSE_COLORS["dp"], _tint(DEFENSE_COLORS["dp"]))
    box(9.35, 0.15, 1.6, 0.95, "[06] baseline\nDAWN: watermarks a\nkeyed-hash share",
        DEFENSE_COLORS["dawn"], _tint(DEFENSE_COLORS["dawn"]))

    arrow(query["r"], energy["l"])
    arrow(victim["r"], thresholds["l"], "", ink)
    arrow((victim["b"][0] + 0.5, victim["b"][1]), (energy["l"][0], energy["l"][1] + 0.3), "f(x)",
          ink, text_xy=(1.75, 3.45))
    arrow(thresholds["b"], energy["t"], "E1, E2", cip)
    for route in (route_id, route_low, route_high):
        arrow(energy["r"], route["l"], "", cip)
        arrow(route["r"], surrogate["l"], "", ink)
    arrow((route_id["r"][0], route_id["r"][1] + 0.1), trigger["l"], "", cip)
    arrow(trigger["r"], verify["t"], "", cip, rad=-0.35)
    arrow(surrogate["r"], verify["b"], "suspect", ink, rad=0.3, text_xy=(9.75, 2.4))
    ax.text(0.05, 0.8, "The owner answers each query\nby its energy score.\n"
            "red: CIP's parts\ngrey: victim and attacker\n[nn]: the notebook", fontsize=9.5 * k,
            va="center", color=grey)
    ax.text(5.5, 5.35, "One query's path through CIP", ha="center", va="center", fontsize=12 * k, weight="bold")
    return fig


# --- sliders (notebooks 03 and 05) --------------------------------------------------------------


SLIDER_WIDTH = "520px"
"""Width of every slider (``ipywidgets`` layout), wide enough for a long description."""

SPEC_KEYS = ("value", "min", "max", "step", "description", "readout_format", "min_from")
"""Keys a slider spec of :func:`slider_view` may hold."""


def _readout_format(step: float) -> str:
    """A float format with as many decimals as ``step`` has (0.5 -> ".1f", 0.05 -> ".2f")."""
    text = f"{step:.10f}".rstrip("0")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f".{max(1, min(decimals, 6))}f"


def _follow_min(source: Any, target: Any, floor: float, step: float) -> None:
    """Wire ``target.min`` to ``max(floor, source.value + step)`` (capped at ``target.max``) now and
    on every change of ``source.value``; ``target.value`` is raised to its new min when below."""
    def update(_change: Any = None) -> None:
        new_min = min(max(floor, source.value + step), target.max)
        if target.value < new_min:
            target.min = new_min
            target.value = new_min
        else:
            target.min = new_min

    source.observe(update, names="value")
    update()


def _slider_widgets(**sliders: dict) -> dict[str, Any]:
    """``ipywidgets.FloatSlider`` per spec of :func:`slider_view` (``{name: spec}``): width
    :data:`SLIDER_WIDTH`, the description shown in full (``description_width="initial"``),
    ``continuous_update=False``, ``readout_format`` from the spec or from ``step``'s decimals.
    A spec with ``min_from="<other name>"`` keeps its min at the other slider's value plus its
    own step (and its value at least that) through a widget observer. Raises ``ValueError`` for
    an unknown spec key or a ``min_from`` naming no other slider."""
    import ipywidgets as widgets

    for name, spec in sliders.items():
        unknown = set(spec) - set(SPEC_KEYS)
        if unknown:
            raise ValueError(f"slider {name!r}: unknown spec keys {sorted(unknown)}; known: {SPEC_KEYS}")
        source = spec.get("min_from")
        if source is not None and (source not in sliders or source == name):
            raise ValueError(f"slider {name!r}: min_from={source!r} names no other slider of {list(sliders)}")
    controls = {}
    for name, spec in sliders.items():
        kwargs = {k: v for k, v in spec.items() if k != "min_from"}
        kwargs.setdefault("readout_format", _readout_format(float(spec.get("step", 0.1))))
        kwargs.setdefault("description", name)
        controls[name] = widgets.FloatSlider(continuous_update=False, layout={"width": SLIDER_WIDTH},
                                             style={"description_width": "initial"}, **kwargs)
    for name, spec in sliders.items():
        if spec.get("min_from") is not None:
            target = controls[name]
            _follow_min(controls[spec["min_from"]], target, float(spec.get("min", target.min)),
                        float(spec.get("step", target.step)))
    return controls


def _check_slider_grid(sliders: Mapping[str, dict]) -> None:
    """Every slider's ``value`` lies on its grid ``min + k * step`` inside ``[min, max]`` (see
    :func:`slider_view`); raises ``ValueError`` naming the slider and a step that would hold it."""
    for name, spec in sliders.items():
        value, lo = float(spec["value"]), float(spec.get("min", 0.0))
        hi, step = float(spec.get("max", 100.0)), float(spec.get("step", 0.1))
        k = (value - lo) / step
        if not lo <= value <= hi or abs(k - round(k)) > 1e-6:
            raise ValueError(f"slider {name!r}: value {value:g} is not on its grid {lo:g} + k x {step:g} "
                             f"within [{lo:g}, {hi:g}]; the widget would show {lo + round(k) * step:g} and draw "
                             f"that instead of the default: use a step that divides {value - lo:g} "
                             f"(e.g. {_divisor_step(value - lo, step):g})")


def _divisor_step(span: float, step: float) -> float:
    """A step no larger than ``step`` that divides ``span`` (step / 2, / 4, ... or / 10, ...)."""
    for d in (2, 4, 5, 10, 20, 25, 50, 100):
        k = span / (step / d)
        if abs(k - round(k)) < 1e-6:
            return step / d
    return step / 1000


def slider_view(function: Callable[..., None], drawn_above: bool = False, **sliders: dict) -> None:
    """Live sliders in JupyterLab; the default view, drawn once, in a batch run.

    ``sliders`` maps each keyword of ``function`` to a ``FloatSlider`` spec: ``value``, ``min``,
    ``max``, ``step``, optional ``description`` (shown in full, e.g. "p1: ID-train percentile for
    E1"), ``readout_format`` (default: as many decimals as ``step``) and ``min_from`` (the name of
    another slider: this one's min follows that one's value plus this one's step, and its value is
    raised if needed; e.g. ``p2=dict(..., min_from="p1")``). Interactively this displays
    ``ipywidgets.interactive(function, ...)`` with the widgets of :func:`_slider_widgets`.
    Headless (:func:`progress.batch_mode`: the runner's ``$CIP_BATCH``, or a kernel driven by
    papermill / nbconvert / nbclient) it calls ``function`` once with every ``value`` and creates
    no widget (``min_from`` is ignored): interact/Output widgets can deadlock headless execution
    (papermill #723, nbclient #312; measured here: notebook 03 hung at this cell under plain
    papermill in 1 of 3 tries), and a batch run has nobody to move them. ``drawn_above=True``
    says a cell above already shows the default view: headless, one line says so instead.

    Raises ``ValueError`` for a ``value`` off its slider's grid (``min`` + k ``step``, within
    ``[min, max]``): the widget would snap it to a neighbour and draw another view than the
    default a batch run draws (e.g. 0.75 at step 0.1 shows 0.8)."""
    _check_slider_grid(sliders)
    if batch_mode():
        if drawn_above:
            print(f"sliders {', '.join(sliders)}: live in JupyterLab (python3 tasks.py lab); "
                  "their default view is the one drawn above")
            return
        function(**{name: spec["value"] for name, spec in sliders.items()})
        return
    import ipywidgets as widgets
    from IPython.display import display

    display(widgets.interactive(function, **_slider_widgets(**sliders)))
