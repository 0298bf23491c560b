"""What a k-NN or probe sweep returns, and how it is shown and written.

:class:`EvalResult` holds one record per (method, label, k, frac, seed) with the metrics
of :mod:`credanno.eval.metrics`, their mean and sd over seeds, per-test-image predictions
(built on demand) and the paper's Fig. 2 distribution. Accuracies are fractions in the
API, percent in tables. Files are written by :func:`credanno.outputs.write_csv` (atomic,
spreadsheet formulas neutralised).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from credanno.eval import metrics
from credanno.labels import ATTRIBUTE_NAMES, LABEL_NAMES, SUMMARY_ATTRIBUTES, label_spec
from credanno.numerics import mean_sd
from credanno.outputs import write_csv

RESULT_COLUMNS: tuple[str, ...] = ("method", "label", "k", "frac", "seed", "acc", "exact_acc",
                                   "balanced_acc", "baseline_acc", "ci95", "n_labelled",
                                   "n_test")
METRICS: tuple[str, ...] = ("acc", "exact_acc", "balanced_acc", "baseline_acc")
ID_COLUMNS: tuple[str, ...] = ("annotation_id", "nodule_id", "scan_id", "patient_id")
KEYS: tuple[str, ...] = ("method", "k", "frac")


@dataclass
class ConfigPredictions:
    """Test-set predictions of one configuration (method, k, label fraction, seed)."""

    method: str
    k: int | None
    frac: float
    seed: int
    n_labelled: int
    preds: dict[str, np.ndarray]    # label -> (n_test,) int
    probas: dict[str, np.ndarray]   # label -> (n_test, C) float


@dataclass
class EvalResult:
    """Records, seed summary, predictions and Fig. 2 counts of one sweep."""

    results: pd.DataFrame
    summary: pd.DataFrame
    n_correct_attributes: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)
    _configs: list[ConfigPredictions] = field(default_factory=list, repr=False)
    _test_table: pd.DataFrame | None = field(default=None, repr=False)
    _predictions: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def configs(self) -> list[ConfigPredictions]:
        """Each configuration's test predictions and probabilities, in sweep order."""
        return list(self._configs)

    @property
    def predictions(self) -> pd.DataFrame:
        """One row per (configuration, test image): ids, and per label ``<label>_true``,
        ``<label>_pred`` and the class probabilities ``<label>_p<c>``."""
        if self._predictions is None:
            self._predictions = _predictions_frame(self._configs, self._test_table)
        return self._predictions

    def records(self, which: str = "results") -> list[dict[str, Any]]:
        """JSON-ready records (NaN -> None, ``ci95`` -> [lo, hi])."""
        df = self.results if which == "results" else self.summary
        return [_jsonable(r) for r in df.to_dict(orient="records")]

    def to_json(self) -> str:
        """``{"results": [...], "summary": [...], "config": {...}}`` as one JSON object
        (``config``: what ran, e.g. the subset strategy, subset file and ``--where``)."""
        return json.dumps({"results": self.records("results"),
                           "summary": self.records("summary"),
                           "config": _plain(self.config)}, allow_nan=False)

    def to_table(self) -> str:
        """A readable table in percent: mean +/- sd over seeds, the constant baseline beside;
        headed by the subset file and the ``--where`` sub-population when there are."""
        return "\n".join([*describe_subsets(self.config), format_summary(self.summary)])

    def fig2_table(self) -> str:
        """The Fig. 2 distribution (probability of n attributes correct), in percent."""
        return format_fig2(self.n_correct_attributes)

    def write_csv(self, path: str | Path, *, option: str = "--csv") -> Path:
        """Per-seed records as CSV (``ci95`` split into ``ci95_lo`` and ``ci95_hi``).

        ``option`` names the command-line option that chose ``path``, for errors."""
        df = self.results.copy()
        ci = np.array([c if c is not None else (np.nan, np.nan) for c in df["ci95"]],
                      dtype=float).reshape(-1, 2)
        df = df.drop(columns="ci95")
        df.insert(list(RESULT_COLUMNS).index("ci95"), "ci95_lo", ci[:, 0])
        df.insert(list(RESULT_COLUMNS).index("ci95") + 1, "ci95_hi", ci[:, 1])
        return write_csv(df, path, option=option, index=False)

    def write_predictions(self, path: str | Path, *, option: str = "--predictions") -> Path:
        """Per-test-image predictions, probabilities and ground truth as CSV (ids from the
        store, such as ``patient_id``, with spreadsheet formulas neutralised)."""
        return write_csv(self.predictions, path, option=option, index=False,
                         float_format="%.6g")


def describe_subsets(config: dict[str, Any]) -> list[str]:
    """One line each for the subset file (path, sha256) and the ``--where`` sub-population
    (expression, row counts) a result records; none for the paper's random draws."""
    lines = []
    sf = config.get("subset_file")
    if sf:
        lines.append(f"subset file: {sf['path']} (sha256 {sf['sha256'][:12]})")
    where = config.get("where")
    if where:
        lines.append(f"where {where['expr']}: {where['n_train']} of {where['n_train_total']} "
                     f"training and {where['n_test']} of {where['n_test_total']} test images")
    return lines


def _plain(value: Any) -> Any:
    """``value`` as plain JSON types (numpy scalars and arrays, paths; NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _jsonable(rec: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, val in rec.items():
        if isinstance(val, (tuple, list, np.ndarray)):
            val = [_jsonable({"v": v})["v"] for v in val]
        elif isinstance(val, (np.integer,)):
            val = int(val)
        elif isinstance(val, (float, np.floating)):
            val = None if math.isnan(val) else float(val)
        elif val is pd.NA or val is None:
            val = None
        out[key] = val
    return out


def build_result(configs: list[ConfigPredictions], test_table: pd.DataFrame,
                 labels: list[str], n_boot: int = 1000, ci_seed: int = 0,
                 config: dict[str, Any] | None = None) -> EvalResult:
    """Score every configuration on the test rows: metrics, nodule bootstrap, Fig. 2."""
    test_table = test_table.reset_index(drop=True)
    nodules = test_table["nodule_id"].to_numpy()
    rows: list[dict[str, Any]] = []
    resamples: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # one per set of test rows
    for label in labels:
        spec = label_spec(label)
        true_all = test_table[label].to_numpy().astype(np.int64)
        keep = true_all >= 0
        true = true_all[keep]
        if len(configs):
            pred = np.stack([c.preds[label][keep] for c in configs], axis=1)  # (n, R)
            ok = metrics.correct(pred, true[:, None], spec.tolerance)
            key = keep.tobytes()
            if key not in resamples:
                resamples[key] = metrics.bootstrap_counts(nodules[keep], n_boot, ci_seed)
            ci = metrics.bootstrap_ci(ok, nodules[keep], counts=resamples[key])
        baseline = metrics.baseline_accuracy(true, spec.n_classes, spec.tolerance)
        if not len(configs):
            continue
        n = max(len(true), 1)
        acc = ok.sum(axis=0) / n
        exact = (pred == true[:, None]).sum(axis=0) / n
        balanced = metrics.balanced_accuracy_columns(pred, true)
        for j, c in enumerate(configs):
            rows.append({
                "method": c.method, "label": label, "k": c.k, "frac": float(c.frac),
                "seed": int(c.seed),
                "acc": float(acc[j]) if len(true) else float("nan"),
                "exact_acc": float(exact[j]) if len(true) else float("nan"),
                "balanced_acc": float(balanced[j]),
                "baseline_acc": baseline,
                "ci95": (float(ci[j, 0]), float(ci[j, 1])),
                "n_labelled": int(c.n_labelled), "n_test": int(keep.sum()),
            })
    results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    results["k"] = results["k"].astype(object).where(results["k"].notna(), None)
    return EvalResult(results=results, summary=summarize(results),
                      n_correct_attributes=_fig2(configs, test_table, labels),
                      config=dict(config or {}), _configs=configs, _test_table=test_table)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (ddof=1; NaN for one seed) over seeds per (method, label, k, frac).

    ``ci95`` of the summary is the mean of the per-seed bounds.
    """
    cols = ["method", "label", "k", "frac", "n_seeds", "acc", "acc_sd", "exact_acc",
            "exact_acc_sd", "balanced_acc", "balanced_acc_sd", "baseline_acc", "ci95",
            "n_labelled", "n_test"]
    if results.empty:
        return pd.DataFrame(columns=cols)
    df = results.drop(columns="ci95").assign(
        _k=results["k"].map(lambda v: -1 if v is None else int(v)),
        _lo=[c[0] for c in results["ci95"]], _hi=[c[1] for c in results["ci95"]])
    g = df.groupby(["method", "label", "_k", "frac"], sort=False)
    mean = g[["acc", "exact_acc", "balanced_acc", "baseline_acc", "_lo", "_hi",
              "n_labelled"]].mean()
    sd = g[["acc", "exact_acc", "balanced_acc"]].std(ddof=1)
    first = g[["k", "n_test"]].first()
    out = pd.DataFrame({
        "method": mean.index.get_level_values("method"),
        "label": mean.index.get_level_values("label"),
        "k": first["k"].to_numpy(), "frac": mean.index.get_level_values("frac"),
        "n_seeds": g.size().to_numpy(),
        "acc": mean["acc"].to_numpy(), "acc_sd": sd["acc"].to_numpy(),
        "exact_acc": mean["exact_acc"].to_numpy(), "exact_acc_sd": sd["exact_acc"].to_numpy(),
        "balanced_acc": mean["balanced_acc"].to_numpy(),
        "balanced_acc_sd": sd["balanced_acc"].to_numpy(),
        "baseline_acc": mean["baseline_acc"].to_numpy(),
        "ci95": list(zip(mean["_lo"].to_numpy(dtype=float), mean["_hi"].to_numpy(dtype=float),
                         strict=True)),
        "n_labelled": mean["n_labelled"].to_numpy(dtype=float),
        "n_test": first["n_test"].to_numpy(),
    }, columns=cols)
    out["k"] = out["k"].astype(object).where(out["k"].notna(), None)
    return out


def _fig2(configs: list[ConfigPredictions], test_table: pd.DataFrame,
          labels: list[str]) -> pd.DataFrame:
    """Per configuration: how many images have n of the attributes correct (Fig. 2),
    over all requested attributes ("all", the paper's 8) and the summary ones ("summary")."""
    attrs = [a for a in ATTRIBUTE_NAMES if a in labels]
    sets = {"all": attrs, "summary": [a for a in attrs if a in SUMMARY_ATTRIBUTES]}
    rows = []
    for name, group in sets.items():
        if not group or (name == "summary" and group == attrs):
            continue
        truth = test_table[group].to_numpy().astype(np.int64)
        keep = (truth >= 0).all(axis=1)
        tol = np.array([label_spec(a).tolerance for a in group])
        for c in configs:
            pred = np.stack([c.preds[a] for a in group], axis=1)[keep]
            counts = metrics.n_correct_distribution(np.abs(pred - truth[keep]) <= tol)
            total = max(int(counts.sum()), 1)
            for n_ok, cnt in enumerate(counts):
                rows.append({"method": c.method, "k": c.k, "frac": float(c.frac),
                             "seed": int(c.seed), "attributes": name,
                             "n_attributes": len(group), "n_correct": n_ok,
                             "count": int(cnt), "prob": cnt / total})
    return pd.DataFrame(rows, columns=["method", "k", "frac", "seed", "attributes",
                                       "n_attributes", "n_correct", "count", "prob"])


def _predictions_frame(configs: list[ConfigPredictions],
                       test_table: pd.DataFrame | None) -> pd.DataFrame:
    if test_table is None or not configs:
        return pd.DataFrame()
    ids = [c for c in ID_COLUMNS if c in test_table.columns]
    labels = [n for n in LABEL_NAMES if n in configs[0].preds]
    frames = []
    for c in configs:
        cols: dict[str, Any] = {"method": c.method, "k": c.k, "frac": c.frac, "seed": c.seed}
        for col in ids:
            cols[col] = test_table[col].to_numpy()
        for label in labels:
            cols[f"{label}_true"] = test_table[label].to_numpy()
            cols[f"{label}_pred"] = c.preds[label]
            for j in range(c.probas[label].shape[1]):
                cols[f"{label}_p{j}"] = c.probas[label][:, j]
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def _pct(v: float) -> str:
    return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"


def format_summary(summary: pd.DataFrame) -> str:
    """Fixed-width table of the summary in percent (internalStructure marked as not in the
    paper's summaries)."""
    if summary.empty:
        return "(no results)"
    head = (f"{'method':<7}{'label':<19}{'k':>5}{'frac':>7}{'seeds':>6}  {'acc':>15}"
            f"{'baseline':>9}{'exact':>8}{'balanced':>9}  {'95% CI (nodules)':<17}"
            f"{'n_lab':>7}{'n_test':>7}")
    lines = [head, "-" * len(head)]
    order = {n: i for i, n in enumerate(LABEL_NAMES)}
    s = summary.assign(_o=summary["label"].map(order)).sort_values(
        ["method", "frac", "k", "_o"], key=lambda c: c.map(lambda v: -1 if v is None else v),
        kind="stable")
    for r in s.itertuples(index=False):
        acc = mean_sd(r.acc, r.acc_sd, pm="+/-", sd_width=5)
        label = r.label + ("*" if r.label not in ("malignancy", *SUMMARY_ATTRIBUTES) else "")
        k = "-" if r.k is None else str(int(r.k))
        lo, hi = r.ci95
        ci = f"[{_pct(lo).strip()}, {_pct(hi).strip()}]"
        lines.append(f"{r.method:<7}{label:<19}{k:>5}{r.frac:>7.3g}{r.n_seeds:>6}  {acc:>15}"
                     f"{_pct(r.baseline_acc):>9}{_pct(r.exact_acc):>8}"
                     f"{_pct(r.balanced_acc):>9}  {ci:<17}{r.n_labelled:>7.0f}{r.n_test:>7}")
    lines.append("acc: within +/-1 for attributes, exact for malignancy (the paper's metric); "
                 "baseline: best constant prediction; * left out of the paper's summaries")
    return "\n".join(lines)


def format_fig2(fig2: pd.DataFrame) -> str:
    """Fig. 2 as text: percent of test images with n attributes correct, mean over seeds."""
    if fig2.empty:
        return ""
    d = fig2[fig2["attributes"] == "all"]
    key = d["k"].map(lambda v: -1 if v is None else int(v))
    mean = d.groupby([d["method"], key.rename("kk"), d["frac"], d["n_correct"]])["prob"].mean()
    table = mean.unstack("n_correct")
    n_attr = int(d["n_attributes"].iat[0])
    lines = [f"Fig. 2: % of test images with n of {n_attr} attributes correct (mean over seeds)",
             f"{'method':<7}{'k':>5}{'frac':>7}  " + "".join(f"{n:>7}" for n in table.columns)]
    for (method, kk, frac), row in table.iterrows():
        k = "-" if kk < 0 else str(kk)
        lines.append(f"{method:<7}{k:>5}{frac:>7.3g}  "
                     + "".join(f"{100 * v:7.2f}" for v in row.to_numpy()))
    return "\n".join(lines)
