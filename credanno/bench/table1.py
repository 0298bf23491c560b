"""Table 1 of the paper: attribute and malignancy accuracy, ours beside the published rows.

The paper's configurations (section 3.1): with all labels, 50-NN, 250-NN and the trained
linear predictors (G_exp, G_cls, Eq. 3); with 10% of the training labels, 50-NN and
150-NN; with 1%, the trained predictors. Each runs over seeds (label subsets) and is
shown as mean +/- sd, beside the majority baseline (the best constant prediction, scored
the same way) that the weak +/-1 attribute metric calls for, and beside the paper's rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from credanno.bench.paper import TABLE1_ITEMS, paper_table1
from credanno.labels import label_spec
from credanno.numerics import mean_sd
from credanno.outputs import md_code, write_csv
from credanno.viz.source import DataSource, describe_source


@dataclass(frozen=True)
class Table1Config:
    """One of the paper's evaluated settings."""

    group: str  # "full" or "partial" annotation
    setting: str
    method: str  # "knn" or "probe"
    frac: float
    k: int | None = None


TABLE1_CONFIGS: tuple[Table1Config, ...] = (
    Table1Config("full", "50-NN", "knn", 1.0, 50),
    Table1Config("full", "250-NN", "knn", 1.0, 250),
    Table1Config("full", "trained", "probe", 1.0),
    Table1Config("partial", "10% 50-NN", "knn", 0.1, 50),
    Table1Config("partial", "10% 150-NN", "knn", 0.1, 150),
    Table1Config("partial", "1% trained", "probe", 0.01),
)

_METRICS = ("acc", "exact_acc", "balanced_acc")


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds of each metric, per (label, k, frac)."""
    df = results.copy()
    df["k"] = pd.to_numeric(df["k"], errors="coerce").fillna(-1).astype(int)
    agg = {f"{m}_{s}": (m, s) for m in _METRICS for s in ("mean", "std")}
    agg["n_seeds"] = ("seed", "nunique")
    agg["baseline_acc"] = ("baseline_acc", "mean")
    out = df.groupby(["label", "k", "frac"], sort=False).agg(**agg).reset_index()
    return out.rename(columns={f"{m}_std": f"{m}_sd" for m in _METRICS})


def config_rows(summary: pd.DataFrame, cfg: Table1Config) -> pd.DataFrame:
    """The summary rows (one per label) of one configuration."""
    k = cfg.k if cfg.k is not None else -1
    sel = (summary["k"] == k) & np.isclose(summary["frac"].astype(float), cfg.frac)
    return summary[sel]


@dataclass
class Table1Result:
    """Our rows, the baseline row and the paper's rows, in one long table."""

    rows: pd.DataFrame
    data: DataSource
    store: Path
    seeds: tuple[int, ...]
    n_nodules: int
    n_test_images: int
    #: the sweeps' own results (``knn``, ``probe``), e.g. for Fig. 2
    raw: dict[str, Any] = field(default_factory=dict)

    def markdown(self, metric: str = "acc") -> str:
        """Table 1 in Markdown (accuracy in %, mean +/- sd over seeds for our rows)."""
        return table1_markdown(self.rows, metric=metric, paper=metric == "acc")

    def exact_markdown(self) -> str:
        """Exact-match and balanced accuracy of our rows (the +/-1 metric is weak)."""
        return "\n\n".join([
            "Exact-match accuracy (%):", table1_markdown(self.rows, "exact_acc", paper=False),
            "Balanced accuracy (%, mean per-class recall, exact match):",
            table1_markdown(self.rows, "balanced_acc", paper=False)])

    def header(self) -> str:
        # the store's name is file-system contents: a code span, on one line
        return (f"Data: {self.data.text}. Store: {md_code(self.store)}. {self.n_nodules} nodules, "
                f"{self.n_test_images} test images; seeds {list(self.seeds)}.")

    def to_csv(self, path: str | os.PathLike, *, option: str = "--csv") -> Path:
        """Write the table as CSV (atomic, spreadsheet formulas neutralised)."""
        return write_csv(self.rows, path, option=option, index=False)


def _fmt(mean: float, sd: float, n_seeds: int) -> str:
    return mean_sd(mean, sd if n_seeds > 1 else None)


def table1_markdown(rows: pd.DataFrame, metric: str = "acc", paper: bool = True) -> str:
    """Markdown of a long Table 1 (see :func:`run_table1`), one row per method setting."""
    heads = [label_spec(n).short for n in TABLE1_ITEMS]
    lines = ["| | Method | Setting | " + " | ".join(heads) + " | #nodules | Extra info |",
             "|---|---|---|" + "---:|" * len(heads) + "---:|---|"]
    sources = ("ours", "baseline", "paper") if paper else ("ours", "baseline")
    keyed = rows[rows["source"].isin(sources)]
    for (source, group, method, setting), g in keyed.groupby(
            ["source", "group", "method", "setting"], sort=False):
        by_label = g.set_index("label")
        cells = []
        for name in TABLE1_ITEMS:
            if name not in by_label.index:
                cells.append("")
                continue
            r = by_label.loc[name]
            if source == "ours":
                cells.append(_fmt(r[f"{metric}_mean"], r[f"{metric}_sd"], int(r["n_seeds"])))
            else:
                cells.append(_fmt(r[f"{metric}_mean"], np.nan, 1))
        first = g.iloc[0]
        nod = "" if pd.isna(first["n_nodules"]) else str(int(first["n_nodules"]))
        lines.append(f"| {group} | {method} | {setting} | " + " | ".join(cells)
                     + f" | {nod} | {first['extra_info']} |")
    return "\n".join(lines)


def paper_rows() -> pd.DataFrame:
    """The paper's Table 1 in the long layout of :class:`Table1Result` (fractions)."""
    recs = []
    for _, r in paper_table1().iterrows():
        for name in TABLE1_ITEMS:
            v = r[name]
            recs.append({"source": "paper", "group": r["group"], "method": r["method"],
                         "setting": r["setting"], "label": name,
                         "acc_mean": np.nan if pd.isna(v) else float(v) / 100,
                         "n_nodules": int(r["n_nodules"]), "extra_info": r["extra_info"],
                         "data": "real LIDC-IDRI CT (as published)"})
    return pd.DataFrame(recs)


def _constant_scores(y: np.ndarray) -> dict[str, float]:
    """Exact and balanced accuracy of the best constant prediction on test labels ``y``."""
    y = y[y >= 0]
    if not len(y):
        return {"exact_acc_mean": np.nan, "balanced_acc_mean": np.nan}
    counts = np.bincount(y)
    # a constant scores recall 1 on its class and 0 on every other class present
    return {"exact_acc_mean": counts.max() / len(y),
            "balanced_acc_mean": 1.0 / int((counts > 0).sum())}


def run_table1(store: str | os.PathLike | None = None, seeds: Sequence[int] = (0, 1, 2),
               configs: Sequence[Table1Config] = TABLE1_CONFIGS, probe_epochs: int = 100,
               device: str | None = None, method_name: str = "credanno (this run)",
               progress: bool = False) -> Table1Result:
    """Run the paper's Table 1 configurations on a store over ``seeds``."""
    from credanno import checks, stores
    from credanno.eval import knn_sweep, probe_sweep
    from credanno.eval.specs import KnnSpec, ProbeSpec, SubsetSpec
    from credanno.viz.tsne import resolve_store

    # checked before the k-NN runs, so that a bad probe setting does not waste it
    probe = ProbeSpec(epochs=checks.count(probe_epochs, "--probe-epochs"), device=device)
    seeds = tuple(checks.seeds(seeds))
    path = resolve_store(store)
    with stores.open(path) as s:
        data = describe_source(s.provenance, path)
        table = s.table()
        probe_kind = "last4" if "last4" in s.feature_sets else s.feature_sets[0]
        knn_kind = "cls" if "cls" in s.feature_sets else s.feature_sets[0]
    n_nodules = int(table["nodule_id"].nunique())
    n_test = int((table["split"] == "test").sum())

    knn_cfgs = [c for c in configs if c.method == "knn"]
    probe_cfgs = [c for c in configs if c.method == "probe"]
    raw: dict[str, Any] = {}
    summaries = []
    if knn_cfgs:
        res = knn_sweep(path, SubsetSpec(fracs=sorted({c.frac for c in knn_cfgs}), seeds=seeds),
                        KnnSpec(ks=sorted({c.k for c in knn_cfgs}), kind=knn_kind),
                        progress=progress)
        raw["knn"] = res
        summaries += [(c, config_rows(summarise(res.results), c)) for c in knn_cfgs]
    if probe_cfgs:
        subsets = SubsetSpec(fracs=sorted({c.frac for c in probe_cfgs}), seeds=seeds)
        res = probe_sweep(path, subsets, replace(probe, kind=probe_kind), progress=progress)
        raw["probe"] = res
        summaries += [(c, config_rows(summarise(res.results), c)) for c in probe_cfgs]

    recs = []
    order = {c: i for i, c in enumerate(configs)}
    for cfg, summ in sorted(summaries, key=lambda t: order[t[0]]):
        for _, r in summ.iterrows():
            recs.append({"source": "ours", "group": cfg.group, "method": method_name,
                         "setting": cfg.setting, "label": r["label"],
                         **{c: r[c] for c in summ.columns if c.endswith(("_mean", "_sd"))},
                         "n_seeds": int(r["n_seeds"]), "n_nodules": n_nodules,
                         "extra_info": "none", "data": data.text})
    ours = pd.DataFrame(recs)

    # the baseline is scored on the same test rows as every configuration: take it from one
    first = next(iter(raw.values())).results
    base = first.groupby("label", sort=False)["baseline_acc"].mean()
    test = table[table["split"] == "test"]
    base_rows = pd.DataFrame([{"source": "baseline", "group": "-", "method": "majority baseline",
                               "setting": "constant prediction", "label": lab,
                               "acc_mean": float(v), **_constant_scores(test[lab].to_numpy()),
                               "n_seeds": 1, "n_nodules": n_nodules,
                               "extra_info": "none", "data": data.text}
                              for lab, v in base.items()])
    rows = pd.concat([ours, base_rows, paper_rows()], ignore_index=True)
    rows = rows[rows["label"].isin(TABLE1_ITEMS)].reset_index(drop=True)
    return Table1Result(rows=rows, data=data, store=path, seeds=seeds, n_nodules=n_nodules,
                        n_test_images=n_test, raw=raw)
