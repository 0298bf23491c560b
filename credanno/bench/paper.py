"""The paper's published figures (Tables 1 and 2), shipped as CSV package data.

``paper/table1_paper.csv`` and ``paper/table2_paper.csv`` are copies of the reference
tables read from the paper (accuracy in percent; empty = not reported). They are data,
not code, so that the comparison rows of every table we print come from one place.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd

from credanno.labels import ATTRIBUTE_NAMES, SUMMARY_ATTRIBUTES

#: the 8 columns of Table 1: the 7 summary attributes and malignancy
TABLE1_ITEMS: tuple[str, ...] = (*SUMMARY_ATTRIBUTES, "malignancy")
#: the 8 nodule attributes whose correct predictions Fig. 2 counts (internalStructure is
#: reported by none of the comparison methods, so it counts as 100% for them)
FIG2_ATTRIBUTES: tuple[str, ...] = ATTRIBUTE_NAMES
#: methods of Table 1 that Fig. 2 compares against (MTMR reports malignancy only)
FIG2_METHODS: tuple[str, ...] = ("HSCNN", "X-Caps", "MSN-JCN", "WeakSup")


def _read(name: str) -> pd.DataFrame:
    with resources.files("credanno.bench").joinpath("paper", name).open("r") as f:
        return pd.read_csv(f, comment="#", keep_default_na=False, na_values=[""])


def paper_table1() -> pd.DataFrame:
    """Table 1 as published: group, method, setting, one column per item (%), n_nodules,
    extra_info. Not-reported cells are NaN."""
    df = _read("table1_paper.csv")
    df["setting"] = df["setting"].fillna("").astype(str)
    return df


def paper_table2() -> pd.DataFrame:
    """Table 2 as published: arch, params_millions, strategy, imagenet_pretrain, malignancy."""
    return _read("table2_paper.csv")


#: Fig. 4's published points at 1% (from the paper's text) and 100% (Table 2), in percent
PAPER_FIG4: tuple[tuple[str, float, float], ...] = (
    ("cRedAnno (paper, real LIDC)", 0.01, 86.09),
    ("cRedAnno (paper, real LIDC)", 1.0, 88.30),
    ("end-to-end ResNet-50 (paper, real LIDC)", 0.01, 74.38),
    ("end-to-end ResNet-50 (paper, real LIDC)", 1.0, 86.74),
)


def n_correct_distribution(accuracies: np.ndarray | list[float]) -> np.ndarray:
    """P(exactly m of the items are correct), m = 0..len, for independent items.

    The paper's Fig. 2 computes the comparison methods' curves this way from their
    per-attribute accuracies (a Poisson-binomial distribution); NaN (not reported) counts
    as 100%, as the figure's caption says.
    """
    p = np.nan_to_num(np.asarray(accuracies, dtype=np.float64), nan=1.0)
    dist = np.array([1.0])
    for pi in p:
        dist = np.convolve(dist, [1.0 - pi, pi])
    return dist


def paper_fig2(methods: tuple[str, ...] = FIG2_METHODS) -> dict[str, np.ndarray]:
    """The comparison methods' Fig. 2 distributions from their Table 1 accuracies."""
    t1 = paper_table1()
    out = {}
    for _, row in t1[t1["method"].isin(methods)].iterrows():
        name = row["method"] + (f" ({row['setting']})" if row["setting"] else "")
        accs = [row[a] / 100 if a in row.index else np.nan for a in FIG2_ATTRIBUTES]
        out[name] = n_correct_distribution(np.asarray(accs, dtype=float))
    return out
