"""``credanno bench budget``: the label-efficiency benchmark, a generalised Fig. 4.

Budgets (label fractions) x label-free selection strategies x methods x seeds, every label:
the k-NN, the joint linear probe (G_exp/G_cls) trained on the picked images, and the probe
with cRedAnno+'s semi-supervised rounds (Lu et al., ISBI 2023: half the budget picked by the
strategy, pseudo-labels for the confident rest, the other half requested by least confidence
over ``semi_rounds`` rounds, each retrained briefly). Accuracy is the paper's (exact for
malignancy, +/-1 for attributes), mean +/- sd over seeds, with the constant baseline; the
table also carries cRedAnno and cRedAnno+'s published real-CT rows for reference.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from credanno.errors import CredannoError
from credanno.numerics import mean_sd
from credanno.outputs import md_text, one_line, write_csv

BUDGET_FRACS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 1.0)
BUDGET_STRATEGIES: tuple[str, ...] = ("random", "kmeans", "typiclust", "probcover", "coreset")
METHODS: tuple[str, ...] = ("knn", "probe", "semi")
METHOD_NAMES = {"knn": "k-NN", "probe": "probe", "semi": "probe + semi-supervised rounds"}

#: cRedAnno (Lu et al., 2022) and cRedAnno+ (Lu et al., ISBI 2023) published malignancy
#: accuracy on real CT (LIDC-IDRI, ViT-S/16): (setting, frac, mean %, sd %)
PUBLISHED: tuple[tuple[str, float, float, float | None], ...] = (
    ("cRedAnno, random", 0.01, 80.02, 8.56), ("cRedAnno+", 0.01, 86.22, 2.51),
    ("cRedAnno, random", 0.1, 86.65, 1.39), ("cRedAnno+", 0.1, 87.86, 1.99),
    ("cRedAnno+", 1.0, 87.56, 0.61),
)
REAL_CT = "published, real CT (LIDC-IDRI), not this data"
#: the strategy name of a full budget's cell while the grid runs (every image labelled)
FULL = "(all)"


@dataclass(frozen=True)
class BudgetSpec:
    """The grid: ``fracs`` (budgets as label fractions), ``strategies`` (label-free,
    registry names), ``methods`` (of :data:`METHODS`), ``seeds``; ``k`` of the k-NN;
    ``semi_rounds`` of the semi-supervised loop; ``kind`` the feature set; ``device``.
    The probes are the tuned recipe (fitted to convergence, no epochs to set)."""

    fracs: tuple[float, ...] = BUDGET_FRACS
    strategies: tuple[str, ...] = BUDGET_STRATEGIES
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    k: int = 10
    semi_rounds: int = 2
    kind: str = "cls"
    device: str | None = None


@dataclass
class BudgetResult:
    """Per-seed accuracies (``raw``: frac, n_labelled, strategy, method, seed, label, acc,
    baseline) and what ran (``params``)."""

    raw: pd.DataFrame
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self, label: str = "malignancy") -> pd.DataFrame:
        """Mean and sd over seeds of ``label``: frac, strategy, method, mean, sd, n_seeds."""
        r = self.raw[self.raw["label"] == label]
        g = r.groupby(["frac", "strategy", "method"], sort=False)["acc"]
        return g.agg(mean="mean", sd="std", n_seeds="count").reset_index()

    def gain_over_random(self, frac: float, method: str = "knn") -> tuple[str, float]:
        """The best strategy at ``frac`` (malignancy, ``method``) and its gain over random
        in accuracy points (NaN when either is missing)."""
        s = self.summary()
        s = s[np.isclose(s["frac"], frac) & (s["method"] == method)].set_index("strategy")
        if s.empty or "random" not in s.index:
            return "", float("nan")
        best = str(s["mean"].idxmax())
        return best, 100 * float(s.loc[best, "mean"] - s.loc["random", "mean"])

    def markdown(self, label: str = "malignancy") -> str:
        """Accuracy (%) per method and strategy (rows) and budget (columns), the constant
        baseline and the published real-CT rows."""
        s = self.summary(label)
        fracs = sorted(s["frac"].unique())
        lines = ["| method | strategy | " + " | ".join(f"{f:.1%}" for f in fracs) + " |",
                 "|---|---|" + "---:|" * len(fracs)]
        for (method, strat), g in s.groupby(["method", "strategy"], sort=False):
            cells = [_cell(g, f) for f in fracs]
            lines.append(f"| {METHOD_NAMES[method]} | {md_text(strat)} | "
                         + " | ".join(cells) + " |")
        base = self.raw[self.raw["label"] == label].groupby("frac")["baseline"].first()
        lines.append("| constant | | " + " | ".join(f"{100 * base[f]:.2f}" for f in fracs)
                     + " |")
        if label == "malignancy":
            for setting, f, m, sd in PUBLISHED:
                cells = [mean_sd(m / 100, sd / 100) if np.isclose(f, x) else "" for x in fracs]
                lines.append(f"| {setting} ({REAL_CT}) | | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike, *, option: str = "--csv") -> Path:
        """Write the per-seed rows and the published real-CT rows (``source`` tells them
        apart) as CSV."""
        ours = self.raw.assign(source="this run")
        pub = pd.DataFrame([{"frac": f, "strategy": s, "method": "published", "label":
                             "malignancy", "acc": m / 100, "sd": sd / 100, "source": REAL_CT}
                            for s, f, m, sd in PUBLISHED])
        return write_csv(pd.concat([ours, pub], ignore_index=True), path, option=option,
                         index=False)

    def figure(self, method: str | None = None):
        """Malignancy accuracy against budget, one line per strategy (log x, seed bands)."""
        from credanno.viz.figures import budget_figure

        method = method or ("semi" if "semi" in set(self.raw["method"]) else
                            str(self.raw["method"].iloc[0]))
        s = self.summary()
        mal = self.raw[self.raw["label"] == "malignancy"]
        seeds = sorted(int(x) for x in mal["seed"].unique())
        caption = (f"Data: {self.params.get('data', 'unknown source')}. Store "
                   f"{one_line(Path(str(self.params.get('store', ''))).name)}; seeds {seeds}. "
                   "Dotted: the constant baseline (the most frequent class).")
        return budget_figure(s[s["method"] == method], title=f"malignancy, "
                             f"{METHOD_NAMES[method]}: accuracy vs labelling budget",
                             caption=caption, baseline=float(mal["baseline"].iloc[0]))


def _cell(g: pd.DataFrame, frac: float) -> str:
    r = g[np.isclose(g["frac"], frac)]
    return "" if r.empty else mean_sd(float(r["mean"].iloc[0]), float(r["sd"].iloc[0]))


def check_budget_spec(spec: BudgetSpec, n_train: int) -> None:
    """Budgets of 0 or above the training split, unknown or label-reading strategies and
    unknown methods: one line each."""
    from credanno import checks
    from credanno.eval.active import ActiveSpec, check_spec

    for f in spec.fracs:
        checks.finite(f, "--frac", low=0, high=1, example="0.01")
    bad = [m for m in spec.methods if m not in METHODS]
    if bad or not spec.methods:
        raise CredannoError(f"unknown method {bad[0] if bad else ''!r}; choose from "
                            f"{', '.join(METHODS)}")
    if not spec.strategies:
        raise CredannoError("no --strategy given; pass e.g. --strategy random,kmeans")
    for s in spec.strategies:
        check_spec(ActiveSpec(start=min(spec.fracs), budget=1.0, strategy=s, query=s,
                              rounds=spec.semi_rounds), n_train)


def run_budget(store: Any = None, spec: BudgetSpec | None = None) -> BudgetResult:
    """Run the grid of ``spec`` on ``store`` (a path, an open store, or None for the newest
    under ``stores/``)."""
    from credanno.eval.active import check_store_kind
    from credanno.eval.data import open_eval_data
    from credanno.runtime import resolve_device

    spec = spec or BudgetSpec()
    started = time.perf_counter()
    check_store_kind(store, spec.kind)
    device = resolve_device(spec.device)
    with open_eval_data(store, spec.kind) as data:
        if "malignancy" not in data.labels:
            raise CredannoError("bench budget needs malignancy labels; the store has none")
        check_budget_spec(spec, len(data.train_x))
        grid = _Grid(data, spec, device)
        rows = grid.run()
        params = {"command": "credanno bench budget", "store": data.paths["train"],
                  "kind": data.kind, "n_train": len(data.train_x), "n_test": len(data.test_x),
                  **{k: list(v) if isinstance(v, tuple) else v
                     for k, v in spec.__dict__.items()}, "device": device,
                  "probe_recipe": "tuned", "standardize": "training split",
                  "seconds_by_part": grid.seconds, "data": _data_text(data)}
    params["seconds"] = round(time.perf_counter() - started, 2)
    return BudgetResult(pd.DataFrame(rows), params)


def _data_text(data: Any) -> str:
    """One line naming the data the store was computed from (phantom, LIDC, ...)."""
    from credanno.viz.source import describe_source

    return describe_source(data.provenance, data.paths.get("train")).text


class _Cell(NamedTuple):
    """One (budget, strategy, seed) of the grid and its labelled training rows."""

    frac: float
    n: int
    strategy: str
    seed: int
    rows: np.ndarray


class _Grid:
    """One store's evaluation: the picks of every (budget, strategy, seed), the probes of
    every cell and semi seed set as one batched sweep, then each method per cell; a full
    budget (every image labelled, whatever the strategy) is evaluated once per seed."""

    def __init__(self, data: Any, spec: BudgetSpec, device: str) -> None:
        from credanno.labels import label_spec

        self.data, self.spec, self.device = data, spec, device
        self.x = np.asarray(data.train_x, dtype=np.float32)
        self.y = data.train_table[data.labels].to_numpy().astype(np.int64)
        self.test_y = data.test_table[data.labels].to_numpy().astype(np.int64)
        self.specs = [label_spec(n) for n in data.labels]

    def run(self) -> list[dict[str, Any]]:
        """Every cell's rows; ``self.seconds``: the time of each part."""
        self.seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        cells = self._cells()
        self._fit_probes(cells)
        t1 = time.perf_counter()
        self.seconds.update(picks=round(self._pick_seconds, 2),
                            probe_sweep=round(t1 - t0 - self._pick_seconds, 2))
        out = []
        for method in self.spec.methods:
            for cell in cells:
                out += self._score(getattr(self, f"_{method}")(cell), cell, method)
            t2 = time.perf_counter()
            self.seconds[method] = round(t2 - t1, 2)  # probe: decisions only (fitted above)
            t1 = t2
        return self._with_full_rows(out)

    def _n(self, frac: float) -> int:
        return max(1, int(round(frac * len(self.x))))

    def _pick(self, strategy: str, n: int, seed: int) -> np.ndarray:
        """The strategy's picks (cached: the semi loop's seed set of one budget is often a
        smaller budget's pick)."""
        from credanno.eval.strategies import pick

        key = (strategy, n, seed)
        if key not in self._picks:
            t0 = time.perf_counter()
            self._picks[key] = pick(strategy, self.data.train_table, self.x, n, seed,
                                    device=self.device).rows
            self._pick_seconds += time.perf_counter() - t0
        return self._picks[key]

    def _cells(self) -> list[_Cell]:
        n_train, cells = len(self.x), []
        self._picks: dict[tuple, np.ndarray] = {}
        self._pick_seconds = 0.0
        for f in self.spec.fracs:
            n = self._n(f)
            for seed in self.spec.seeds:
                if n >= n_train:  # every image labelled: one cell, whatever the strategy
                    cells.append(_Cell(f, n_train, FULL, seed, np.arange(n_train)))
                    continue
                cells += [_Cell(f, n, s, seed, self._pick(s, n, seed))
                          for s in self.spec.strategies]
        return cells

    def _with_full_rows(self, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The full budget's rows repeated under every strategy's name (one line each)."""
        rows = []
        for r in out:
            if r["strategy"] != FULL:
                rows.append(r)
            else:
                rows += [{**r, "strategy": s} for s in self.spec.strategies]
        return rows

    def _semi_seed(self, cell: _Cell) -> np.ndarray | None:
        """The semi loop's seed set of ``cell``: half its budget, by its strategy."""
        if "semi" not in self.spec.methods or cell.strategy == FULL or cell.n < 2:
            return None
        from credanno.eval.active import check_spec

        n_start = check_spec(self._semi_spec(cell), len(self.x))[0]
        return self._pick(cell.strategy, n_start, cell.seed)

    def _semi_spec(self, cell: _Cell):
        from credanno.eval.active import ActiveSpec

        # the strategy seeds, the model queries (least confidence: no re-clustering)
        return ActiveSpec(start=cell.frac / 2, budget=cell.frac, strategy=cell.strategy,
                          rounds=self.spec.semi_rounds, seed=cell.seed, device=self.device,
                          score_rounds=False)

    def _fit_probes(self, cells: list[_Cell]) -> None:
        """The tuned probe of every cell and of every semi loop's seed set, as one batched
        sweep (:func:`credanno.eval.estimator.fit_many`: features scaled by the whole
        training split; identical subsets fitted once, equal sizes together)."""
        from credanno.eval.estimator import JointLinearProbe, fit_many

        todo: dict[bytes, np.ndarray] = {}
        if "probe" in self.spec.methods or "semi" in self.spec.methods:
            for c in cells:
                todo.setdefault(c.rows.tobytes(), c.rows)
                seed_rows = self._semi_seed(c)
                if seed_rows is not None:
                    todo.setdefault(seed_rows.tobytes(), seed_rows)
        self._models: dict[bytes, Any] = {}
        if not todo:
            return
        table = self.data.train_table
        groups = table["nodule_id"].to_numpy() if "nodule_id" in table else None
        probe = JointLinearProbe(device=self.device)
        models = fit_many(probe, self.x, table[self.data.labels], list(todo.values()), groups)
        self._models = dict(zip(todo, models, strict=True))

    def _knn(self, cell: _Cell) -> list[np.ndarray]:
        from credanno.eval.knn import knn_classify, knn_search, knn_vote

        rows = cell.rows
        k = min(self.spec.k, len(rows))
        y = self.y[rows]
        if (y < 0).any():  # a missing label: each label's bank without its missing rows
            return [knn_classify(self.x[rows], y[:, i], self.data.test_x, k, s.n_classes,
                                 device=self.device, warn=False)[k]
                    for i, s in enumerate(self.specs)]
        # one search serves every label (the same bank), then one vote pass
        sims, idx = knn_search(self.x[rows], self.data.test_x, k, device=self.device)
        pred = knn_vote(sims, y[idx], [k], [s.n_classes for s in self.specs])[k][0]
        return [pred[:, i] for i in range(len(self.specs))]

    def _probe(self, cell: _Cell) -> list[np.ndarray]:
        """The tuned probe's decisions for the paper's metric (as ``credanno probe``)."""
        return list(self._models[cell.rows.tobytes()].decide(self.data.test_x).T)

    def _semi(self, cell: _Cell) -> list[np.ndarray]:
        from credanno.eval.active import ActiveSeed, run_active_arrays

        seed_rows = self._semi_seed(cell)
        if seed_rows is None:  # no unlabelled rest / no half to seed: the probe
            return self._probe(cell)
        seed = ActiveSeed(seed_rows, self._models[seed_rows.tobytes()])
        res = run_active_arrays(self.x, self.data.train_table, self.data.test_x,
                                self.data.test_table, self.data.labels,
                                self._semi_spec(cell), seed=seed)
        return list(res.model.decide(self.data.test_x).T)

    def _score(self, preds: list[np.ndarray], cell: _Cell, method: str) -> list[dict[str, Any]]:
        from credanno.eval.metrics import accuracy, baseline_accuracy

        out = []
        for i, (s, pred) in enumerate(zip(self.specs, preds, strict=True)):
            true = self.test_y[:, i]
            ok = true >= 0
            out.append({"frac": cell.frac, "n_labelled": cell.n, "strategy": cell.strategy,
                        "method": method, "seed": cell.seed, "label": s.name,
                        "acc": accuracy(pred[ok], true[ok], s.tolerance),
                        "baseline": baseline_accuracy(true[ok], s.n_classes, s.tolerance)})
        return out
