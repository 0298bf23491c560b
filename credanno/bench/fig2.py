"""Fig. 2 of the paper: the probability of the number of correctly predicted attributes.

Ours is measured: per test image, how many of the 8 nodule attributes the configuration
predicts within +/-1 (``EvalResult.n_correct_attributes``, averaged over seeds). The
comparison methods' curves are computed as the paper's caption says: from their reported
per-attribute accuracies, assuming independent attributes and counting not-reported
attributes as 100% correct (:func:`credanno.bench.paper.paper_fig2`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from credanno.bench.paper import FIG2_ATTRIBUTES, paper_fig2
from credanno.bench.table1 import Table1Config, Table1Result
from credanno.outputs import write_csv

#: the three representative configurations that the paper's Fig. 2 shows for cRedAnno
FIG2_CONFIGS: tuple[tuple[str, str, float, int | None], ...] = (
    ("trained, all labels", "probe", 1.0, None),
    ("10% 50-NN", "knn", 0.1, 50),
    ("1% trained", "probe", 0.01, None),
)


def measured_distribution(result, frac: float, k: int | None,
                          attributes: str = "all") -> np.ndarray:
    """P(n attributes correct), n = 0..A, of one configuration, mean over seeds."""
    d = result.n_correct_attributes
    kk = d["k"].map(lambda v: -1 if v is None or pd.isna(v) else int(v))
    sel = d[(d["attributes"] == attributes) & np.isclose(d["frac"].astype(float), frac)
            & (kk == (-1 if k is None else int(k)))]
    if sel.empty:
        return np.array([])
    return sel.groupby("n_correct")["prob"].mean().sort_index().to_numpy()


@dataclass
class Fig2Result:
    measured: dict[str, np.ndarray]
    reported: dict[str, np.ndarray]
    n_attributes: int
    caption: str

    def frame(self) -> pd.DataFrame:
        """One row per curve: source, name, then P(n correct) for n = 0..A (fractions)."""
        recs = []
        for source, curves in (("measured", self.measured), ("paper-style", self.reported)):
            for name, p in curves.items():
                recs.append({"source": source, "name": name,
                             **{str(n): float(v) for n, v in enumerate(p)}})
        return pd.DataFrame(recs)

    def markdown(self) -> str:
        df = self.frame()
        ns = [str(n) for n in range(self.n_attributes + 1)]
        lines = ["| curve | source | " + " | ".join(ns) + " |",
                 "|---|---|" + "---:|" * len(ns)]
        for _, r in df.iterrows():
            lines.append(f"| {r['name']} | {r['source']} | "
                         + " | ".join(f"{100 * r[n]:.1f}" for n in ns) + " |")
        return "\n".join(lines)

    def figure(self):
        from credanno.viz.figures import n_correct_figure

        return n_correct_figure(self.measured, self.reported, self.n_attributes,
                                caption=self.caption)

    def to_csv(self, path: str | os.PathLike, *, option: str = "--csv") -> Path:
        """Write the table as CSV (atomic, spreadsheet formulas neutralised)."""
        return write_csv(self.frame(), path, option=option, index=False)


def fig2_from_table1(t1: Table1Result,
                     configs: Sequence[tuple[str, str, float, int | None]] = FIG2_CONFIGS,
                     paper: bool = True) -> Fig2Result:
    """Fig. 2 from the sweeps that :func:`credanno.bench.table1.run_table1` ran."""
    measured = {}
    for name, method, frac, k in configs:
        if method in t1.raw:
            p = measured_distribution(t1.raw[method], frac, k)
            if len(p):
                measured[f"ours: {name}"] = p
    n_attr = len(FIG2_ATTRIBUTES)
    caption = (f"Ours measured on {t1.data.text} ({t1.n_test_images} test images, mean over "
               f"seeds {list(t1.seeds)}). Comparison methods (dashed): computed from the "
               "per-attribute accuracies published in the paper's Table 1 (real LIDC), "
               "assuming independence, not-reported attributes counted as 100%.")
    return Fig2Result(measured=measured, reported=paper_fig2() if paper else {},
                      n_attributes=n_attr, caption=caption)


def fig2_configs() -> tuple[Table1Config, ...]:
    """The Table 1 configurations Fig. 2 needs (a cheaper run than the whole table)."""
    return tuple(Table1Config("fig2", name, method, frac, k)
                 for name, method, frac, k in FIG2_CONFIGS)
