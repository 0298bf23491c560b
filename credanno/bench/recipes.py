"""The two probe recipes side by side: tuned (the default) and the paper's, beside the
best constant prediction, at 1%, 10% and 100% labels.

The paper's recipe (section 3: SGD, lr 2.5e-4 with partial labels, 100 epochs, N(0, 0.01)
weights, zero biases) leaves the heads near their random start when 1% of the images are
labelled, so on attributes with a dominant rating it can fall below always predicting
that rating; the tuned recipe (:mod:`credanno.eval.tuned`) is built never to. This table
shows both on a store, per label, so the difference is measured where it is claimed
(``credanno demo`` reports it for the teacher; ``benchmarks/probe_targets.py`` adds
scikit-learn's ``LogisticRegressionCV``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from credanno.numerics import mean_sd
from credanno.outputs import write_csv

#: the label fractions of the comparison: the paper's 1%, 10% and all labels
RECIPE_FRACS: tuple[float, ...] = (0.01, 0.1, 1.0)
RECIPES: tuple[str, ...] = ("tuned", "paper")


@dataclass
class RecipeComparison:
    """``raw``: one row per (recipe, frac, seed, label) with ``acc`` and ``baseline_acc``
    (the paper's metric: +/-1 for attributes, exact for malignancy; fractions)."""

    raw: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Per (label, frac): mean and sd over seeds of each recipe, and the constant."""
        g = self.raw.groupby(["label", "frac", "recipe"])["acc"].agg(["mean", "std"])
        wide = g.unstack("recipe")
        wide.columns = [f"{r}_{stat}" for stat, r in wide.columns]
        const = self.raw.groupby(["label", "frac"])["baseline_acc"].mean().rename("const")
        return wide.join(const).reset_index()

    def shortfalls(self, points: float = 3.0) -> pd.DataFrame:
        """Rows where a recipe's mean falls more than ``points`` below the constant
        (attributes below 100% labels: the tuned recipe's target)."""
        s = self.summary()
        rows = []
        for r in RECIPES:
            low = s[(s[f"{r}_mean"] < s["const"] - points / 100) & (s["frac"] < 1)
                    & (s["label"] != "malignancy")]
            rows += [{"recipe": r, "label": x.label, "frac": x.frac,
                      "below_const": (x.const - getattr(x, f"{r}_mean")) * 100}
                     for x in low.itertuples()]
        return pd.DataFrame(rows, columns=["recipe", "label", "frac", "below_const"])

    def markdown(self) -> str:
        """One row per label; per fraction the tuned and paper recipes (mean ± sd, %)
        and the constant."""
        s = self.summary()
        fracs = sorted(s["frac"].unique())
        head = ["label"] + [f"{name} {f:.0%}" for f in fracs
                            for name in ("tuned", "paper", "const")]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for label, g in s.groupby("label", sort=False):
            g = g.set_index("frac")
            cells = [label]
            for f in fracs:
                x = g.loc[f]
                cells += [mean_sd(x["tuned_mean"], x["tuned_std"]),
                          mean_sd(x["paper_mean"], x["paper_std"]), mean_sd(x["const"])]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike, *, option: str = "--csv") -> Path:
        return write_csv(self.summary(), path, option=option)


def run_recipes(store, seeds: Sequence[int] = (0, 1, 2),
                fracs: Sequence[float] = RECIPE_FRACS,
                device: str | None = None) -> RecipeComparison:
    """Both probe recipes on ``store`` (a path or an open
    :class:`~credanno.eval.data.EvalData`) over the same label subsets (the paper's random
    per-annotation draw of every fraction and seed)."""
    from credanno.errors import CredannoWarning
    from credanno.eval.probe import probe_sweep
    from credanno.eval.specs import ProbeSpec, SubsetSpec

    subsets = SubsetSpec(fracs=tuple(fracs), seeds=tuple(seeds))
    frames = []
    for recipe in RECIPES:
        spec = ProbeSpec(recipe=recipe, device=device)
        with warnings.catch_warnings():  # absent classes at 1%: the table shows the effect
            warnings.simplefilter("ignore", CredannoWarning)
            res = probe_sweep(store, subsets, spec, n_boot=0)
        frames.append(res.results.assign(recipe=recipe))
    raw = pd.concat(frames, ignore_index=True)
    return RecipeComparison(raw[["recipe", "frac", "seed", "label", "acc", "baseline_acc"]])
