"""Figures in the paper's style, with legends in the radiologists' words.

- :func:`tsne_figure`: the paper's Fig. 3 (t-SNE of test features coloured by each rating);
- :func:`n_correct_figure`: Fig. 2 (probability of the number of correctly predicted items);
- :func:`annotation_reduction_figure`: Fig. 4 (malignancy accuracy vs annotation fraction).

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), never pyplot,
so that no global figure state or GUI backend is involved. Every figure carries a caption
naming the data it shows (see :mod:`credanno.viz.source`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from credanno._atomic import atomic_path
from credanno.errors import CredannoError
from credanno.labels import LABEL_NAMES, SUMMARY_ATTRIBUTES, LabelSpec, label_spec

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
#: the 8 panels of the paper's Fig. 3: malignancy and the 7 summary attributes
FIG3_LABELS: tuple[str, ...] = ("malignancy", *SUMMARY_ATTRIBUTES)
MISSING_COLOUR = "#d9d9d9"

#: labels whose levels are kinds, not an ordered scale (a qualitative palette reads better)
_QUALITATIVE: dict[str, tuple[str, ...]] = {
    "malignancy": ("#2f6db5", "#d62728"),
    "calcification": ("#8c564b", "#9467bd", "#ff7f0e", "#2ca02c", "#17becf", "#1f3b73"),
    "internalStructure": ("#1f77b4", "#17becf", "#ff7f0e", "#7f7f7f"),
}


def label_colours(spec: LabelSpec) -> list[str]:
    """One colour per class: qualitative for kinds, a dark-to-light ramp for ordered ratings."""
    if spec.name in _QUALITATIVE:
        return list(_QUALITATIVE[spec.name])
    cmap = colormaps["viridis"]
    # stop short of viridis' pale yellow end, which vanishes on white
    return [_hex(cmap(v)) for v in np.linspace(0.0, 0.85, spec.n_classes)]


def _hex(rgba) -> str:
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgba[:3])


def color_names(color: str) -> tuple[str, ...]:
    """``--color`` value -> label names: one label, or ``all`` for the 8 panels of Fig. 3."""
    if color == "all":
        return FIG3_LABELS
    if color not in LABEL_NAMES:
        raise CredannoError(f"unknown --color {color!r}; use 'all' or one of "
                            f"{', '.join(LABEL_NAMES)}")
    return (color,)


def legend_entries(spec: LabelSpec, labels: np.ndarray) -> list[tuple[str, str]]:
    """(colour, text) for each class present, in the radiologists' words with counts."""
    colours = label_colours(spec)
    entries = []
    for c, word in enumerate(spec.words):
        n = int((labels == c).sum())
        if n:
            entries.append((colours[c], f"{word} ({n})"))
    n_missing = int((labels < 0).sum())
    if n_missing:
        entries.append((MISSING_COLOUR, f"not rated ({n_missing})"))
    return entries


def plot_tsne_panel(ax, coords: np.ndarray, labels: np.ndarray, spec: LabelSpec,
                    title: str | None = None, legend_below: bool = True,
                    point_size: float | None = None, seed: int = 0) -> None:
    """One t-SNE scatter coloured by ``labels`` (0-based classes, -1 = missing)."""
    labels = np.asarray(labels)
    palette = np.array(label_colours(spec) + [MISSING_COLOUR])
    idx = np.where(labels < 0, len(palette) - 1, labels)
    # common classes first, rare ones on top (so a few "poorly defined" margins are not
    # buried under hundreds of "sharp" ones); random order within a class
    shuffle = np.random.default_rng(seed).permutation(len(labels))
    counts = np.bincount(idx, minlength=len(palette))
    order = shuffle[np.argsort(-counts[idx[shuffle]], kind="stable")]
    size = point_size or float(np.clip(6000 / max(len(labels), 1), 4, 30))
    ax.scatter(coords[order, 0], coords[order, 1], c=palette[idx[order]], s=size,
               linewidths=0, alpha=0.85, rasterized=len(labels) > 5000)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    for spine in ax.spines.values():  # t-SNE axes carry no units
        spine.set_color("#cccccc")
    ax.set_title(title or spec.name, fontsize=11)
    handles = [Line2D([], [], marker="o", linestyle="", markersize=6, markerfacecolor=col,
                      markeredgewidth=0, label=text)
               for col, text in legend_entries(spec, labels)]
    if legend_below:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02),
                  fontsize=8, frameon=False, ncol=1, handletextpad=0.2, borderaxespad=0.2)
    else:
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  fontsize=9, frameon=False, handletextpad=0.2)


def tsne_figure(coords: np.ndarray, table: pd.DataFrame, color: str | Sequence[str] = "all",
                caption: str = "", title: str | None = None) -> Figure:
    """The paper's Fig. 3: one panel per label, or a single panel for one label."""
    names = color_names(color) if isinstance(color, str) else tuple(color)
    specs = [label_spec(n) for n in names]
    missing = [s.name for s in specs if s.name not in table.columns]
    if missing:
        raise CredannoError(f"the store's table has no labels {missing}; colour by one of "
                            f"{', '.join(c for c in LABEL_NAMES if c in table.columns)}")
    if len(specs) == 1:
        fig = Figure(figsize=(7.2, 5.2), layout="constrained")
        ax = fig.add_subplot()
        plot_tsne_panel(ax, coords, table[specs[0].name].to_numpy(), specs[0],
                        title=title or f"t-SNE coloured by {specs[0].name}", legend_below=False)
    else:
        ncol = 4 if len(specs) > 3 else len(specs)
        nrow = int(np.ceil(len(specs) / ncol))
        fig = Figure(figsize=(3.6 * ncol, 4.9 * nrow), layout="constrained")
        axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
        for i, (ax, spec) in enumerate(zip(axes, specs, strict=False)):
            plot_tsne_panel(ax, coords, table[spec.name].to_numpy(), spec,
                            title=f"({chr(97 + i)}) {spec.name}")
        for ax in axes[len(specs):]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title, fontsize=13)
    if caption:
        fig.text(0.5, -0.01, caption, ha="center", va="top", fontsize=9, color="#444444",
                 wrap=True)
    return fig


def n_correct_figure(measured: Mapping[str, np.ndarray], reported: Mapping[str, np.ndarray],
                     n_items: int, caption: str = "") -> Figure:
    """Fig. 2: P(number of correctly predicted attributes = m), m = 0..n_items.

    ``measured``: our distributions (solid lines); ``reported``: the comparison methods'
    paper-style distributions computed from their per-attribute accuracies (dashed).
    """
    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    m = np.arange(n_items + 1)
    # one palette, ours first, so that no comparison curve shares a colour with ours
    tab = colormaps["tab10"]
    markers = "o^vD"  # distinct markers keep overlapping curves of ours apart
    for i, (name, p) in enumerate(measured.items()):
        ax.plot(m, np.asarray(p) * 100, "-", marker=markers[i % 4], color=tab(i % 10), lw=2.2,
                ms=6, label=f"{name} (measured)")
    for j, (name, p) in enumerate(reported.items(), start=len(measured)):
        ax.plot(m, np.asarray(p) * 100, "--s", color=tab(j % 10), lw=1.2, ms=4, alpha=0.9,
                label=f"{name} (paper-style)")
    ax.set_xticks(m)
    ax.set_xlabel(f"number of correctly predicted nodule attributes (of {n_items})")
    ax.set_ylabel("probability (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    ax.set_title("Fig. 2: correctly predicted nodule attributes per test image")
    if caption:
        fig.text(0.5, -0.01, caption, ha="center", va="top", fontsize=8.5, color="#444444",
                 wrap=True)
    return fig


def _band_curves(ax, curves: pd.DataFrame, by: str, band_alpha: float,
                 dashed: str | None = None) -> None:
    """One line per ``by`` group of ``curves`` (``frac, mean, sd`` as fractions) in percent,
    with a +/- 1 sd band over seeds; the group named ``dashed`` is drawn dashed."""
    cmap = colormaps["tab10"]
    for i, (name, g) in enumerate(curves.groupby(by, sort=False)):
        g = g.sort_values("frac")
        x = g["frac"].to_numpy() * 100
        mean = g["mean"].to_numpy() * 100
        sd = np.nan_to_num(g["sd"].to_numpy() * 100)
        ax.plot(x, mean, "--o" if name == dashed else "-o", color=cmap(i), lw=2, ms=5,
                label=name)
        ax.fill_between(x, mean - sd, mean + sd, color=cmap(i), alpha=band_alpha, linewidth=0)


def _finish_budget_axes(fig: Figure, ax, ticks: list[float], labels: tuple[str, str],
                        title: str, caption: str) -> None:
    """Log x axis ticked at the label fractions, axis labels, grid, legend, title, caption."""
    ax.set_xscale("log")
    ax.set_xticks([t * 100 for t in ticks])
    ax.set_xticklabels([f"{t * 100:g}%" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, frameon=False, loc="lower right")
    ax.set_title(title)
    if caption:
        fig.text(0.5, -0.01, caption, ha="center", va="top", fontsize=8.5, color="#444444",
                 wrap=True)


def annotation_reduction_figure(curves: pd.DataFrame,
                                reference: pd.DataFrame | None = None,
                                caption: str = "") -> Figure:
    """Fig. 4: malignancy accuracy (%) against annotation fraction on a log axis.

    ``curves``: columns ``series, frac, mean, sd`` (accuracy fractions); drawn as lines with
    a +/- 1 sd band over seeds. ``reference``: optional points ``series, frac, acc``
    (e.g. the paper's published figures), drawn as open markers.
    """
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    _band_curves(ax, curves, "series", 0.18)
    if reference is not None and len(reference):
        # greys, so that published points are never read as one of our coloured curves
        styles = [("#444444", "D"), ("#9a9a9a", "s"), ("#444444", "^"), ("#9a9a9a", "v")]
        for j, (name, g) in enumerate(reference.groupby("series", sort=False)):
            colour, marker = styles[j % len(styles)]
            ax.plot(g["frac"].to_numpy() * 100, g["acc"].to_numpy() * 100, linestyle=":",
                    marker=marker, mfc="none", color=colour, ms=7, label=name)
    _finish_budget_axes(fig, ax, sorted(set(curves["frac"].round(6)) | {0.01, 1.0}),
                        ("annotated training images (log scale)", "malignancy accuracy (%)"),
                        "Fig. 4: annotation reduction (mean ± sd over seeds)", caption)
    return fig


def budget_figure(curves: pd.DataFrame, title: str = "", caption: str = "",
                  baseline: float | None = None) -> Figure:
    """Accuracy (%) against the labelling budget on a log axis, one line per selection
    strategy with a +/- 1 sd band over seeds (``credanno bench budget``, a generalised
    Fig. 4 after cRedAnno+, Lu et al., ISBI 2023).

    ``curves``: columns ``strategy, frac, mean, sd`` (accuracy fractions); ``baseline``:
    the constant guess's accuracy (a fraction), drawn dotted.
    """
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    if baseline is not None:
        ax.axhline(100 * baseline, color="#777777", linestyle=":", linewidth=1.2,
                   label="constant")
    # random, the paper's draw, dashed: every other line is a label-free pick
    _band_curves(ax, curves, "strategy", 0.15, dashed="random")
    _finish_budget_axes(fig, ax, sorted(set(curves["frac"].round(6))),
                        ("labelling budget: annotated training images (log scale)",
                         "accuracy (%)"),
                        title or "accuracy vs labelling budget (mean ± sd over seeds)", caption)
    return fig


def save_figure(fig: Figure, out: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` to ``out`` (format from the extension: .png, .svg or .pdf), atomically."""
    out = Path(out)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise CredannoError(f"cannot tell the figure format of {out}; end --out with "
                            f"{', '.join(FORMATS)}")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    return out
