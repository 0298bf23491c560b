"""Learning from the unlabelled rest: the cRedAnno+ loop (``credanno active``).

cRedAnno+ (Lu et al., "Annotation Exploitation in Self-Explanatory Lung Nodule Diagnosis",
ISBI 2023) keeps the frozen features and the joint heads (G_exp per attribute, G_cls for
malignancy) and changes how the few labels are chosen and used:

1. *sparse seeding*: a label-free strategy (k-means by default) picks the seed set
   (``start`` of the training images) and the heads train on it;
2. *pseudo-labels*: every unlabelled training image whose malignancy confidence (max
   softmax probability) exceeds ``threshold`` keeps the heads' predictions as labels:
   the predicted probabilities of every head as soft targets (``pseudo="soft"``, the
   default, cRedAnno+'s option) or the predicted classes (``pseudo="hard"``);
3. *semi-supervised active rounds*: over ``rounds`` rounds more true labels are requested
   (by ``query``: least confidence, margin, or a label-free strategy complementing the
   labelled set) until the total reaches ``budget``, and the heads are retrained on true
   labels + pseudo-labels with a short schedule (*training quenching*, ``quench_epochs``).

The store's labels act as the oracle: a training image's labels are read only once it is
requested. Nothing here reads a test label except to score each round, and the only model
selection (the tuned recipe's penalty) is cross-validated inside the seed set's labelled
images, so the test split cannot leak into the loop; the public cRedAnno+ code picks
epochs on the test split. With the tuned recipe each round is *quenched*: refitted from
the previous heads at their penalties for a few L-BFGS iterations
(:func:`credanno.eval.tuned.quench_tuned`). Soft pseudo-labels train
the tuned recipe of :class:`~credanno.eval.probe.JointLinearProbe` on probability targets
(cross-entropy ``-sum_c q_c log p_c``, :mod:`credanno.eval.tuned`); the pseudo-label
accuracy reported per round is that of their most probable malignancy class either way.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from credanno.errors import CredannoError

#: model-based query rules; any label-free strategy of the registry is accepted too
QUERY_RULES: tuple[str, ...] = ("least-confidence", "margin")
#: pseudo-label kinds: predicted classes, or every head's predicted probabilities
PSEUDO_KINDS: tuple[str, ...] = ("hard", "soft")


@dataclass(frozen=True)
class ActiveSpec:
    """One cRedAnno+ run.

    ``start``/``budget``: label fractions of the training split (in (0, 1]) of the seed set
    and of the final labelled set (``budget >= start``); ``strategy``: the label-free seed
    strategy; ``query``: a rule of :data:`QUERY_RULES` or a label-free strategy; ``rounds``:
    active rounds (0: seed set + pseudo-labels only); ``threshold``: malignancy confidence a
    pseudo-label needs; ``pseudo``: ``"soft"`` (default: every head's predicted
    probabilities as soft targets) or ``"hard"`` (predicted classes); ``recipe``: how the
    heads train, ``"tuned"`` (default: the seed set fitted to convergence, its L2 penalty
    per head cross-validated inside the labelled images; each round then *quenched*,
    cRedAnno+'s short retraining: refitted on true + pseudo-labels from the previous
    heads at their penalties for a few L-BFGS iterations,
    :func:`credanno.eval.tuned.quench_tuned`) or ``"paper"`` (SGD as the paper: ``epochs``
    on the seed set, then each round retrained from scratch for ``quench_epochs``, at
    learning rate ``lr``, the paper's partial-label 2.5e-4); ``epochs``,
    ``quench_epochs`` and ``lr`` apply to the paper recipe only; ``score_rounds``: score
    the test split after every round (False: the last only).
    """

    start: float = 0.01
    budget: float = 0.02
    strategy: str = "kmeans"
    query: str = "least-confidence"
    rounds: int = 5
    threshold: float = 0.9
    pseudo: str = "soft"
    recipe: str = "tuned"
    epochs: int = 100
    quench_epochs: int = 10
    lr: float = 2.5e-4
    kind: str = "cls"
    seed: int = 0
    device: str | None = None
    score_rounds: bool = True


@dataclass
class ActiveResult:
    """Every round of one run: ``rounds`` (round, n_labelled, budget_frac, n_queried,
    n_pseudo, pseudo_acc, seconds) and ``accuracy`` (round, label, acc, baseline, n_test);
    ``labelled``: training rows labelled in the order requested; ``pseudo``: the final
    pseudo-labelled training rows and their malignancy classes; ``params``: what ran;
    ``model``: the final heads."""

    rounds: pd.DataFrame
    accuracy: pd.DataFrame
    labelled: np.ndarray
    pseudo: pd.DataFrame
    params: dict[str, Any] = field(default_factory=dict)
    model: Any = field(default=None, repr=False)  # the final heads (JointLinearProbe)

    def table(self) -> pd.DataFrame:
        """One row per round: the round record and the test accuracy of every label."""
        wide = self.accuracy.pivot(index="round", columns="label", values="acc")
        labels = list(dict.fromkeys(self.accuracy["label"]))
        return self.rounds.merge(wide[labels].reset_index(), on="round")

    def markdown(self) -> str:
        """The rounds as a Markdown table (accuracies in %, constant baseline last)."""
        from credanno.labels import label_spec

        t = self.table()
        labels = list(dict.fromkeys(self.accuracy["label"]))
        head = ["round", "labelled", "queried", "pseudo", "pseudo acc",
                *[label_spec(n).short for n in labels]]
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for _, r in t.iterrows():
            cells = [str(int(r["round"])), f"{int(r['n_labelled'])} ({r['budget_frac']:.1%})",
                     str(int(r["n_queried"])), str(int(r["n_pseudo"])),
                     _pct(r["pseudo_acc"]), *[_pct(r[n]) for n in labels]]
            lines.append("| " + " | ".join(cells) + " |")
        first = self.accuracy["round"].min()  # the baseline is the same every round
        base = self.accuracy[self.accuracy["round"] == first].set_index("label")["baseline"]
        lines.append("| constant | | | | | " + " | ".join(_pct(base[n]) for n in labels)
                     + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The run as one JSON-ready object."""
        def records(df: pd.DataFrame) -> list[dict[str, Any]]:
            # NaN (no pseudo-labels in a round) is not JSON: null instead
            return df.astype(object).where(df.notna(), None).to_dict(orient="records")

        return {"params": self.params, "rounds": records(self.table()),
                "accuracy": records(self.accuracy),
                "labelled_rows": self.labelled.tolist()}


def _pct(v: float) -> str:
    return "" if not np.isfinite(v) else f"{100 * v:.2f}"


def check_spec(spec: ActiveSpec, n_train: int) -> tuple[int, int]:
    """The seed and final label counts of ``spec`` on ``n_train`` training images; budgets
    of 0, above the split, or below the seed set are one-line errors."""
    from credanno import checks
    from credanno.eval.strategies import STRATEGIES, get_strategy

    for name, v in (("--start", spec.start), ("--budget", spec.budget)):
        checks.finite(v, name, low=0, high=1, example="0.01")  # (0, 1]: 0 is refused
    n_start = max(1, int(round(spec.start * n_train)))
    n_budget = max(1, int(round(spec.budget * n_train)))
    if n_budget < n_start:
        raise CredannoError(f"--budget {spec.budget:g} ({n_budget} images) is below --start "
                            f"{spec.start:g} ({n_start}); pass a budget >= the seed set")
    if not 0 < spec.threshold <= 1:
        raise CredannoError(f"--threshold must be in (0, 1], got {spec.threshold:g}")
    if spec.rounds < 0:
        raise CredannoError(f"--rounds must be >= 0, got {spec.rounds}")
    if spec.recipe not in ("tuned", "paper"):
        raise CredannoError(f"unknown recipe {spec.recipe!r}; use tuned or paper")
    if spec.pseudo not in PSEUDO_KINDS:
        raise CredannoError(f"--pseudo {spec.pseudo!r}: choose one of {', '.join(PSEUDO_KINDS)}")
    for opt, name in (("--strategy", spec.strategy), ("--query", spec.query)):
        if opt == "--query" and name in QUERY_RULES:
            continue
        strat = get_strategy(name)
        if strat.reads_labels or "annotation" not in strat.modes:
            free = [n for n, s in STRATEGIES.items() if not s.reads_labels
                    and "annotation" in s.modes]
            extra = ", ".join(QUERY_RULES) + ", " if opt == "--query" else ""
            raise CredannoError(f"{opt} {name!r} cannot pick images one by one without "
                                f"labels; choose one of {extra}{', '.join(free)}")
    return n_start, n_budget


def schedule(n_start: int, n_budget: int, rounds: int) -> list[int]:
    """The labelled count after each round: from ``n_start`` up to exactly ``n_budget``,
    in near-equal steps (rounds with nothing to add are dropped)."""
    if rounds == 0 or n_budget == n_start:
        return []
    steps = [n_start + int(round((n_budget - n_start) * r / rounds)) for r in range(1, rounds + 1)]
    return [s for i, s in enumerate(steps) if s > (steps[i - 1] if i else n_start)]


class _Oracle:
    """The store's training labels, handed out one image at a time as they are requested
    (the rest stay hidden: used only to score the pseudo-labels afterwards)."""

    def __init__(self, labels: np.ndarray) -> None:
        self._labels = labels

    def ask(self, rows: np.ndarray) -> np.ndarray:
        return self._labels[rows]

    def score_pseudo(self, rows: np.ndarray, classes: np.ndarray) -> float:
        """Malignancy accuracy of pseudo-labels against the hidden truth (rows labelled
        -1 are left out)."""
        true = self._labels[rows, 0]
        ok = true >= 0
        return float((classes[ok] == true[ok]).mean()) if ok.any() else float("nan")


def run_active(store: Any, spec: ActiveSpec | None = None) -> ActiveResult:
    """Run the cRedAnno+ loop of ``spec`` on ``store`` (a path, an open store, or None for
    the newest under ``stores/``), the store's labels acting as the oracle."""
    from credanno.eval.data import open_eval_data

    spec = spec or ActiveSpec()
    check_store_kind(store, spec.kind)
    with open_eval_data(store, spec.kind) as data:
        return run_active_arrays(data.train_x, data.train_table, data.test_x,
                                 data.test_table, data.labels, spec,
                                 provenance={"store": data.paths["train"],
                                             "kind": data.kind})


def check_store_kind(store: Any, kind: str) -> None:
    """A store without the feature set asked for: one line naming the sets it has."""
    from credanno.eval.data import _open

    s, owned = _open(store)
    try:
        if kind not in s.feature_sets:
            raise CredannoError(f"store {s.path} has no feature set {kind!r} (it has "
                                f"{', '.join(s.feature_sets)}); pass --kind "
                                f"{next(iter(s.feature_sets))}")
    finally:
        if owned:
            s.close()


class ActiveSeed(NamedTuple):
    """A seed set already picked and its heads already fitted (e.g. many runs' seed sets
    fitted as one batch by :func:`credanno.eval.estimator.fit_many`): ``rows`` (training
    positions), ``model`` (a fitted :class:`~credanno.eval.estimator.JointLinearProbe`
    with the run's recipe)."""

    rows: np.ndarray
    model: Any


def run_active_arrays(train_x: np.ndarray, train_table: pd.DataFrame, test_x: np.ndarray,
                      test_table: pd.DataFrame, labels: list[str], spec: ActiveSpec,
                      provenance: dict[str, Any] | None = None,
                      seed: ActiveSeed | None = None) -> ActiveResult:
    """:func:`run_active` on arrays: training features and table (rows in order), test
    features and table, the label columns (malignancy first); ``seed``: the seed set and
    its fitted heads, instead of picking it by ``spec.strategy`` and fitting them."""
    if labels[0] != "malignancy":
        raise CredannoError("the cRedAnno+ loop needs malignancy labels; the store has none")
    from dataclasses import replace

    from credanno.runtime import resolve_device

    started = time.perf_counter()
    n_start, n_budget = check_spec(spec, len(train_x))
    spec = replace(spec, device=resolve_device(spec.device))
    oracle = _Oracle(train_table[labels].to_numpy().astype(np.int64))
    train_x = np.asarray(train_x, dtype=np.float32)
    loop = _Loop(train_x, train_table, oracle, labels, spec)
    if seed is None:
        loop.seed(n_start)
    elif len(seed.rows) != n_start:
        raise CredannoError(f"a seed set of {len(seed.rows)} images for --start "
                            f"{spec.start:g} ({n_start} images)")
    else:
        loop.seed_with(seed)
    rounds, accs = [], []
    steps = [n_start, *schedule(n_start, n_budget, spec.rounds)]
    for r, target in enumerate(steps):
        t0 = time.perf_counter()
        queried = 0 if r == 0 else loop.query(target - len(loop.labelled))
        if r > 0 or seed is None:
            loop.fit(spec.epochs if r == 0 else spec.quench_epochs, with_pseudo=r > 0)
        n_pseudo, pseudo_acc = loop.refresh_pseudo()
        rounds.append({"round": r, "n_labelled": len(loop.labelled),
                       "budget_frac": len(loop.labelled) / len(train_x),
                       "n_queried": queried, "n_pseudo": n_pseudo, "pseudo_acc": pseudo_acc,
                       "seconds": round(time.perf_counter() - t0, 3)})
        if spec.score_rounds or r == len(steps) - 1:
            accs += _test_accuracy(loop.model, test_x, test_table, labels, r)
    params = {"command": "credanno active", **asdict(spec), "n_train": len(train_x),
              "n_start": n_start, "n_budget": n_budget, "n_test": len(test_x),
              "pseudo_labels": spec.pseudo, "model_selection": _selection_record(spec.recipe),
              "seconds": round(time.perf_counter() - started, 3), **(provenance or {})}
    pseudo = pd.DataFrame({"row": loop.pseudo_rows,
                           "malignancy": loop.pseudo_y[:, 0] if len(loop.pseudo_rows)
                           else np.zeros(0, np.int64)})
    return ActiveResult(pd.DataFrame(rounds), pd.DataFrame(accs), loop.labelled.copy(),
                        pseudo, params, loop.model)


class _Loop:
    """The state of one run: labelled rows (in request order), their true labels, the
    current pseudo-labels and heads."""

    def __init__(self, x: np.ndarray, table: pd.DataFrame, oracle: _Oracle,
                 labels: list[str], spec: ActiveSpec) -> None:
        self.x, self.table, self.oracle, self.labels, self.spec = x, table, oracle, labels, spec
        self.labelled = np.zeros(0, np.int64)
        self.y = np.zeros((0, len(labels)), np.int64)
        self.pseudo_rows = np.zeros(0, np.int64)
        self.pseudo_y = np.zeros((0, len(labels)), np.int64)
        self.pseudo_q: list[np.ndarray] = []  # per label: (n_pseudo, C_l) probabilities
        self.conf = np.zeros(0)
        self.model = None
        self.probs: np.ndarray | None = None

    def _pick(self, name: str, n: int) -> np.ndarray:
        """``n`` new rows by a label-free registry strategy complementing the labelled."""
        from credanno.eval.strategies import pick

        rows = pick(name, self.table, self.x, n, self.spec.seed, labelled=self.labelled,
                    device=self.spec.device).rows
        if len(rows) != n or np.isin(rows, self.labelled).any():
            raise CredannoError(f"strategy {name!r} returned {len(rows)} rows for {n} "
                                "unlabelled images")
        return rows

    def _request(self, rows: np.ndarray) -> None:
        self.labelled = np.concatenate([self.labelled, rows])
        self.y = np.concatenate([self.y, self.oracle.ask(rows)])

    def seed(self, n: int) -> None:
        self._request(self._pick(self.spec.strategy, n))

    def seed_with(self, seed: ActiveSeed) -> None:
        """Start from a seed set picked and fitted elsewhere."""
        self._request(np.asarray(seed.rows, dtype=np.int64))
        self.model = seed.model

    def query(self, n: int) -> int:
        """Request ``n`` more true labels by the query rule; returns ``n``."""
        if n <= 0:
            return 0
        rule = self.spec.query
        if rule not in QUERY_RULES:
            self._request(self._pick(rule, n))
            return n
        free = np.setdiff1d(np.arange(len(self.x)), self.labelled)
        p = np.sort(self.probs[free], axis=1)
        # least confident first; margin: smallest gap between the two likeliest classes
        score = p[:, -1] if rule == "least-confidence" else p[:, -1] - p[:, -2]
        order = np.lexsort((free, score))  # ties broken by row: deterministic
        self._request(free[order[:n]])
        return n

    def fit(self, epochs: int, with_pseudo: bool) -> None:
        """Train the joint heads on the true labels (+ the current pseudo-labels: their
        classes, or with ``pseudo="soft"`` their probabilities as soft targets)."""
        from credanno.eval.probe import JointLinearProbe

        keep = ~np.isin(self.pseudo_rows, self.labelled) if with_pseudo else np.zeros(
            len(self.pseudo_rows), bool)
        rows = np.concatenate([self.labelled, self.pseudo_rows[keep]])
        y = np.concatenate([self.y, self.pseudo_y[keep]])
        Y = pd.DataFrame(y, columns=self.labels)
        soft = None
        if self.spec.pseudo == "soft" and keep.any():  # true labels stay hard (NaN rows)
            soft = [np.concatenate([np.full((len(self.labelled), q.shape[1]), np.nan),
                                    q[keep]]) for q in self.pseudo_q]
        from credanno.eval.specs import PaperRecipe

        paper = PaperRecipe(epochs=epochs, lr=self.spec.lr)  # unused by the tuned recipe
        rest = np.setdiff1d(np.arange(len(self.x)), rows)  # scaled as the whole split
        # tuned rounds: quenched from the previous heads (their penalties, chosen on true
        # labels only; a short refit); the paper recipe retrains from scratch for `epochs`
        init = self.model if with_pseudo and self.spec.recipe == "tuned" else None
        self.model = JointLinearProbe(recipe=self.spec.recipe, paper=paper, seed=self.spec.seed,
                                      device=self.spec.device).fit(
            self.x[rows], Y, groups=self._nodules(rows), soft=soft, unlabelled=self.x[rest],
            init=init)

    def _nodules(self, rows: np.ndarray) -> np.ndarray | None:
        """The rows' nodules: the tuned recipe's CV folds then keep whole nodules (as
        ``credanno probe``), so a nodule's other readings never score its own fit."""
        if "nodule_id" not in self.table:
            return None
        return self.table["nodule_id"].to_numpy()[rows]

    def refresh_pseudo(self) -> tuple[int, float]:
        """Pseudo-label the unlabelled images the heads are confident about; returns their
        number and their malignancy accuracy against the hidden labels."""
        free = np.setdiff1d(np.arange(len(self.x)), self.labelled)
        if not len(free):  # everything labelled: no pseudo-labels left
            self.pseudo_rows = np.zeros(0, np.int64)
            self.pseudo_y = np.zeros((0, len(self.labels)), np.int64)
            self.pseudo_q = []
            return 0, float("nan")
        probs = self.model.predict_proba(self.x[free])  # the unlabelled only: cheaper
        self.probs = np.zeros((len(self.x), probs[0].shape[1]))
        self.probs[free] = probs[0]
        probs = [_scatter(p, free, len(self.x)) for p in probs]
        conf = self.probs[free].max(axis=1)
        rows = free[conf > self.spec.threshold]
        self.pseudo_rows = rows
        self.pseudo_q = [p[rows].astype(np.float64) for p in probs]
        self.pseudo_y = np.stack([p[rows].argmax(axis=1) for p in probs], axis=1).astype(
            np.int64) if len(rows) else np.zeros((0, len(self.labels)), np.int64)
        acc = self.oracle.score_pseudo(rows, self.pseudo_y[:, 0]) if len(rows) else float(
            "nan")
        return len(rows), acc


def _selection_record(recipe: str) -> str:
    """What the run selected a model on (recorded in ``params``): never the test split."""
    if recipe == "paper":
        return "none (last epoch)"
    return ("L2 penalty per head by CV inside the seed set's labelled images; rounds "
            "quenched at those penalties")


def _scatter(p: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """(n, C) with ``p`` at ``rows`` and zeros elsewhere."""
    out = np.zeros((n, p.shape[1]), p.dtype)
    out[rows] = p
    return out


def _test_accuracy(model: Any, test_x: np.ndarray, test_table: pd.DataFrame,
                   labels: list[str], r: int) -> list[dict[str, Any]]:
    """Test accuracy per label (the paper's +/-1 for attributes) with the constant
    baseline; the only place a test label is read."""
    from credanno.eval.metrics import accuracy, baseline_accuracy
    from credanno.labels import label_spec

    # the decision `credanno probe` scores (tuned: the class the metric most likely
    # counts correct, among those the labelled rows hold)
    preds = model.decide(np.asarray(test_x, dtype=np.float32))
    out = []
    for i, name in enumerate(labels):
        spec = label_spec(name)
        true = test_table[name].to_numpy().astype(np.int64)
        ok = true >= 0
        pred = preds[:, i]
        out.append({"round": r, "label": name,
                    "acc": accuracy(pred[ok], true[ok], spec.tolerance),
                    "baseline": baseline_accuracy(true[ok], spec.n_classes, spec.tolerance),
                    "n_test": int(ok.sum())})
    return out


def write_active(result: ActiveResult, *, json_path: str | os.PathLike | None = None,
                 csv_path: str | os.PathLike | None = None) -> list[Path]:
    """Write the rounds as JSON and/or CSV (one row per round) through
    :mod:`credanno.outputs`."""
    from credanno.outputs import write_csv, write_json

    out = []
    if json_path is not None:
        out.append(write_json(result.to_json(), json_path, option="--json"))
    if csv_path is not None:
        out.append(write_csv(result.table(), csv_path, option="--csv", index=False))
    return out
