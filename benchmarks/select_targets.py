"""Label-free selection against random: malignancy accuracy at 1% and 10% labels.

For every strategy of ``credanno select`` (random, kmeans, typiclust, probcover, coreset)
and label fraction (1%, 10%), the labelled subsets of 5 seeds are drawn by the strategy
(``SubsetSpec(strategy=...)``, as ``credanno knn/probe --strategy NAME`` draws them) and
scored with the k-NN (k = 10 at 1%, 20 at 10%) and with the linear probe (whatever
``ProbeSpec(kind=None)`` defaults to; last4 where the store has it). Targets (issue 13):
at 1% the best label-free strategy beats random by >= 4 points with k-NN and with the
probe, with at most half random's seed sd; at 10% no strategy is worse than random by
more than 1 point.

Not part of the test suite; run on a phantom store:
``python benchmarks/select_targets.py STORE [STORE ...] [--no-probe] [--markdown]``.
"""

from __future__ import annotations

import sys
import time
import warnings

import pandas as pd

STRATEGIES = ("random", "kmeans", "typiclust", "probcover", "coreset")
FRACS = (0.01, 0.1)
K_AT = {0.01: 10, 0.1: 20}


def measure(store: str, seeds=range(5), strategies=STRATEGIES, fracs=FRACS,
            probe: bool = True) -> pd.DataFrame:
    """Rows ``store, strategy, frac, method, mean, sd, seconds`` (malignancy accuracy)."""
    from credanno.errors import CredannoWarning
    from credanno.eval import KnnSpec, ProbeSpec, SubsetSpec, knn_sweep, probe_sweep

    rows = []
    for name in strategies:
        for frac in fracs:
            spec = SubsetSpec(fracs=(frac,), seeds=tuple(seeds), strategy=name)
            runs = [("k-NN", lambda s=spec, f=frac: knn_sweep(
                store, s, KnnSpec(ks=(K_AT[f],)), labels=["malignancy"], n_boot=0))]
            if probe:
                runs.append(("probe", lambda s=spec: probe_sweep(store, s, ProbeSpec(kind=None),
                                                                 n_boot=0)))
            for method, fn in runs:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CredannoWarning)
                    res = fn()
                acc = res.results.query("label == 'malignancy'")["acc"] * 100
                rows.append({"store": store, "strategy": name, "frac": frac,
                             "method": method, "mean": acc.mean(), "sd": acc.std(ddof=1),
                             "seconds": round(time.perf_counter() - t0, 1)})
                print(rows[-1], file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def verdict(df: pd.DataFrame) -> list[str]:
    """The targets, one line each, per store and method."""
    out = []
    for (store, method), g in df.groupby(["store", "method"], sort=False):
        r1 = g[(g.frac == 0.01) & (g.strategy == "random")].iloc[0]
        best = g[(g.frac == 0.01) & (g.strategy != "random")].sort_values("mean").iloc[-1]
        gain, half = best["mean"] - r1["mean"], best["sd"] <= r1["sd"] / 2
        ok1 = gain >= 4 and half
        r10 = g[(g.frac == 0.1) & (g.strategy == "random")]["mean"].iloc[0]
        worst = g[(g.frac == 0.1) & (g.strategy != "random")].sort_values("mean").iloc[0]
        ok10 = worst["mean"] >= r10 - 1
        out.append(f"{store} {method}: 1% best {best.strategy} {gain:+.1f} points "
                   f"(sd {best.sd:.1f} vs random {r1.sd:.1f}) -> {'ok' if ok1 else 'MISSED'}; "
                   f"10% worst {worst.strategy} {worst['mean'] - r10:+.1f} -> "
                   f"{'ok' if ok10 else 'MISSED'}")
    return out


def markdown(df: pd.DataFrame) -> str:
    """One row per strategy, a column per (method, fraction): mean ± sd."""
    from credanno.numerics import mean_sd

    df = df.assign(cell=[mean_sd(m / 100, s / 100) for m, s in zip(df["mean"], df["sd"],
                                                                       strict=True)])
    wide = df.pivot_table(index=["store", "strategy"], columns=["method", "frac"],
                          values="cell", aggfunc="first", sort=False)
    wide.columns = [f"{m} {f:.0%}" for m, f in wide.columns]
    wide = wide.reset_index()
    lines = ["| " + " | ".join(wide.columns) + " |", "|" + "---|" * len(wide.columns)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in wide.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    table = pd.concat([measure(s, probe="--no-probe" not in sys.argv) for s in args])
    print(markdown(table) if "--markdown" in sys.argv else table.to_string(index=False))
    print("\n".join(verdict(table)))
