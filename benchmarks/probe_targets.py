"""Accuracy targets of the linear probes (issue 12), per store and label fraction.

For each store, label fraction (1%, 10%, 100%) and label, the mean ``acc`` (the paper's
metric: +/-1 for attributes, exact for malignancy) over 5 seeds of:

- ``tuned``: ``credanno probe`` (the default recipe);
- ``paper``: ``credanno probe --recipe paper``;
- ``const``: the best constant prediction (``baseline_acc``);
- ``logreg``: scikit-learn ``LogisticRegressionCV`` per label on the same standardised
  features, C from the same grid by 5-fold CV on the labelled subset only.

Targets: tuned >= const - 3 for every attribute at 1% and 10%; malignancy tuned >=
logreg - 1.5 at 10% and 100%. Slow (minutes per store): not part of the test suite.

Run: ``python benchmarks/probe_targets.py STORE [STORE ...] [--markdown] [--all-logreg]``
(``synthetic`` for a synthetic store of the public split's size; the logistic regression
is fitted for malignancy only unless ``--all-logreg``).
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import pandas as pd

FRACS = (0.01, 0.1, 1.0)
SEEDS = tuple(range(5))


def _synthetic():
    from credanno.eval.data import EvalData
    from credanno.synthetic import synthetic_features, synthetic_table

    t = synthetic_table(n_nodules=900, per_nodule=3, seed=0)
    x = synthetic_features(t, dim=256, signal=0.6)
    tr, te = (t["split"] == "train").to_numpy(), (t["split"] == "test").to_numpy()
    return EvalData.from_arrays(x[tr], t[tr].reset_index(drop=True), x[te],
                                t[te].reset_index(drop=True))


def _logreg(X: np.ndarray, y: np.ndarray, Xt: np.ndarray, n_classes: int, Cs) -> tuple:
    """LogisticRegressionCV on the labelled rows (a constant where it cannot fit)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import KFold, StratifiedKFold

    ok = y >= 0
    X, y = X[ok], y[ok]
    classes, counts = np.unique(y, return_counts=True)
    proba = np.zeros((len(Xt), n_classes))
    if len(classes) < 2:
        proba[:, classes[0] if len(classes) else 0] = 1
        return proba.argmax(1), proba
    k = min(5, len(y))
    cv = (StratifiedKFold(k, shuffle=True, random_state=0) if counts.min() >= k
          else KFold(k, shuffle=True, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            m = LogisticRegressionCV(Cs=list(Cs), cv=cv, max_iter=500).fit(X, y)
        except ValueError:  # a training fold with a single class
            from sklearn.linear_model import LogisticRegression
            m = LogisticRegression(C=1e-2, max_iter=500).fit(X, y)
    proba[:, m.classes_] = m.predict_proba(Xt)
    return proba.argmax(1), proba


def logreg_result(data, subsets, labels=("malignancy",)):
    """The scikit-learn reference on every subset of ``subsets`` (an EvalResult), for
    ``labels`` (malignancy: the only label its target compares with; all labels with
    ``--all-logreg``, minutes more on 1,024-d features)."""
    from credanno.eval.probe import _standardizer
    from credanno.eval.results import ConfigPredictions, build_result
    from credanno.eval.subsets import draw_subsets
    from credanno.eval.tuned import TUNED_CS
    from credanno.labels import label_spec

    mean, scale = _standardizer(np.asarray(data.train_x, np.float32))
    X = (data.train_x - mean) / scale
    Xt = (data.test_x - mean) / scale
    labels, configs, done = [x for x in data.labels if x in labels], [], {}
    for s in draw_subsets(subsets, data.train_table):
        key = s.rows.tobytes()
        if key not in done:  # all labels: every seed the same rows
            preds, probas = {}, {}
            for name in labels:
                y = data.train_table[name].to_numpy()[s.rows]
                preds[name], probas[name] = _logreg(X[s.rows], y, Xt,
                                                    label_spec(name).n_classes, TUNED_CS)
            done[key] = preds, probas
        configs.append(ConfigPredictions("logreg", None, s.frac, s.seed, len(s.rows),
                                         *done[key]))
    return build_result(configs, data.test_table, labels, n_boot=10)


def targets(data, name: str, logreg_labels=("malignancy",)) -> pd.DataFrame:
    """One row per (fraction, label): the four accuracies (percent) and the checks."""
    from credanno.eval.probe import probe_sweep
    from credanno.eval.specs import ProbeSpec, SubsetSpec

    subsets = SubsetSpec(fracs=FRACS, seeds=SEEDS)
    runs = {"tuned": lambda: probe_sweep(data, subsets, ProbeSpec(device="cpu"), n_boot=10),
            "paper": lambda: probe_sweep(data, subsets, ProbeSpec(recipe="paper", device="cpu"),
                                         n_boot=10),
            "logreg": lambda: logreg_result(data, subsets, logreg_labels)}
    res = {}
    for key, fn in runs.items():  # each part printed as it lands: a store takes minutes
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res[key] = fn()
        part = res[key].results.groupby(["frac", "label"])["acc"].mean().mul(100).round(1)
        print(f"# {name} {key}: {time.perf_counter() - t0:.0f} s\n"
              f"{part.unstack('frac').to_string()}", file=sys.stderr, flush=True)
    keys = ["frac", "label"]
    out = res["tuned"].results.groupby(keys)[["acc", "baseline_acc"]].mean()
    out = out.rename(columns={"acc": "tuned", "baseline_acc": "const"})
    for k in ("paper", "logreg"):
        out[k] = res[k].results.groupby(keys)["acc"].mean()
    out = (out * 100).round(1).reset_index()
    out.insert(0, "store", name)
    attr = (out["label"] != "malignancy") & (out["frac"] < 1)
    mal = (out["label"] == "malignancy") & (out["frac"] >= 0.1)
    out["check"] = ""
    out.loc[attr, "check"] = np.where(out["tuned"][attr] >= out["const"][attr] - 3, "ok",
                                      "FAIL")
    out.loc[mal, "check"] = np.where(out["tuned"][mal] >= out["logreg"][mal] - 1.5, "ok",
                                     "FAIL")
    return out[["store", "frac", "label", "tuned", "paper", "const", "logreg", "check"]]


def main(paths: list[str]) -> None:
    from credanno.eval.data import open_eval_data
    from credanno.labels import LABEL_NAMES

    frames = []
    logreg = LABEL_NAMES if "--all-logreg" in sys.argv else ("malignancy",)
    for path in paths or ["synthetic"]:
        if path == "synthetic":
            frames.append(targets(_synthetic(), path, logreg))
            continue
        with open_eval_data(path, None, views=True) as data:  # last4 when the store has it
            frames.append(targets(data, path, logreg))
        print(frames[-1].to_string(index=False), flush=True)
    table = pd.concat(frames)
    print(_markdown(table) if "--markdown" in sys.argv else table.to_string(index=False))


def _markdown(df: pd.DataFrame) -> str:
    """A Markdown table (pandas' ``to_markdown`` needs the optional ``tabulate``)."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * df.shape[1]]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--")])
