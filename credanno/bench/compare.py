"""Does pretraining help? The same evaluation on several encoders' stores, side by side.

``credanno demo`` runs Table 1 on three stores (the DINO-pretrained teacher, the same
architecture with random weights, raw pixels) and reports malignancy accuracy per encoder,
a one-sentence verdict and the malignancy t-SNE maps side by side. The numbers and the
figure are made here, so that a ``bench`` command can reuse them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from credanno.numerics import mean_sd

#: the encoders the demo compares, in the report's column order, with their descriptions
ENCODERS: tuple[tuple[str, str], ...] = (
    ("teacher", "DINO-pretrained teacher"),
    ("random", "same architecture, random weights"),
    ("pixels", "raw pixels"),
)


def malignancy_comparison(t1: Mapping[str, Any]) -> pd.DataFrame:
    """Malignancy accuracy (fraction) of each Table 1 configuration for each encoder.

    ``t1`` maps encoder names (those of :data:`ENCODERS`) to their
    :class:`~credanno.bench.table1.Table1Result`. Rows are the settings in Table 1's order;
    columns ``<encoder>`` hold the mean over seeds and ``<encoder>_sd`` the sd (NaN with
    one seed)."""
    recs = []
    for name, res in t1.items():
        r = res.rows
        r = r[(r["source"] == "ours") & (r["label"] == "malignancy")]
        for _, row in r.iterrows():
            recs.append({"setting": row["setting"], "encoder": name, "acc": row["acc_mean"],
                         "sd": row["acc_sd"] if row["n_seeds"] > 1 else np.nan})
    df = pd.DataFrame(recs)
    order = list(dict.fromkeys(df["setting"]))
    names = [n for n, _ in ENCODERS if n in t1]
    acc = df.pivot(index="setting", columns="encoder", values="acc").reindex(order)[names]
    sd = df.pivot(index="setting", columns="encoder", values="sd").reindex(order)[names]
    return pd.concat([acc, sd.add_suffix("_sd")], axis=1)


def comparison_markdown(comp: pd.DataFrame) -> str:
    """:func:`malignancy_comparison` as a Markdown table, in %, mean ± sd per encoder."""
    names = [c for c in comp.columns if not c.endswith("_sd")]
    lines = ["| setting | " + " | ".join(dict(ENCODERS)[c] for c in names) + " |",
             "|---|" + "---:|" * len(names)]
    for setting, row in comp.iterrows():
        cells = [mean_sd(row[c], row[f"{c}_sd"]) for c in names]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_verdict(comp: pd.DataFrame) -> str:
    """One sentence: in how many settings the teacher beats each baseline (mean over seeds)."""
    if "teacher" not in comp:
        return ""
    parts = []
    for name, words in ENCODERS[1:]:
        if name in comp:
            wins = int((comp["teacher"] > comp[name]).sum())
            parts.append(f"{words} in {wins} of {len(comp)}")
    return "The pretrained teacher beats " + " and ".join(parts) + " settings."


def malignancy_baseline(t1_teacher: Any) -> float | None:
    """Accuracy of the best constant malignancy prediction (Table 1's majority baseline)."""
    rows = t1_teacher.rows
    base = rows[(rows["source"] == "baseline") & (rows["label"] == "malignancy")]["acc_mean"]
    return float(base.iloc[0]) if len(base) else None


def encoder_tsne_figure(maps: Mapping[str, Any], caption_source: str):
    """Malignancy on the t-SNE maps (:class:`credanno.viz.TSNEMap`) of several encoders,
    side by side, captioned with the data they ran on."""
    from matplotlib.figure import Figure

    from credanno.labels import label_spec
    from credanno.viz.figures import plot_tsne_panel

    spec = label_spec("malignancy")
    fig = Figure(figsize=(3.8 * len(maps), 4.6), layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False).ravel()
    titles = dict(ENCODERS)
    for ax, (name, m) in zip(axes, maps.items(), strict=True):
        plot_tsne_panel(ax, m.coords, m.table["malignancy"].to_numpy(), spec,
                        title=titles.get(name, name))
    fig.suptitle("Malignancy of the test images on each encoder's t-SNE map", fontsize=12)
    fig.text(0.5, -0.01, f"Data: {caption_source}.", ha="center", va="top", fontsize=9,
             color="#444444")
    return fig
