"""``report.md``: the template shipped beside this module, filled by small functions.

:func:`report_fields` builds one string per ``$placeholder`` of ``report.md`` (every string
from a file escaped with :func:`credanno.outputs.md_text` / :func:`~credanno.outputs.md_code`,
or already escaped by the result that made it); :func:`report_text` substitutes them. The
numbers come from :mod:`credanno.bench` (:mod:`credanno.bench.compare` for the encoder
comparison); nothing is computed here but layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from credanno.bench.compare import (
    comparison_markdown,
    comparison_verdict,
    malignancy_baseline,
    malignancy_comparison,
)
from credanno.numerics import mean_sd
from credanno.outputs import md_code, md_text

#: the figures the report links, by the keys of :attr:`ReportInputs.figures`
FIGURES: tuple[str, ...] = ("tsne_compare", "tsne", "fig2", "fig4")


@dataclass
class ReportInputs:
    """What the report shows: results of the demo's stages, and how the stages went.

    ``t1`` maps encoder names to Table 1 results (``"teacher"`` at least); ``cfg`` and
    ``run`` are the pretraining config and result; ``timings`` the seconds of each stage
    (by label), ``reused`` which stages reused earlier work, ``notes`` warnings raised on
    the way."""

    out: Path
    t1: dict[str, Any]
    f2: Any
    f4: Any
    figures: dict[str, Path]
    cfg: Any
    run: Any
    patch: Path
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    budget: Any = None  # credanno.bench.budget.BudgetResult (the budget stage)
    recipes: Any = None  # credanno.bench.recipes.RecipeComparison (the recipes stage)


def report_template() -> Template:
    """The report's template (``credanno/demo/report.md``, installed as package data)."""
    text = resources.files("credanno.demo").joinpath("report.md").read_text(encoding="utf-8")
    return Template(text)


def report_text(r: ReportInputs) -> str:
    """The Markdown of ``report.md``."""
    return report_template().substitute(report_fields(r))


def report_fields(r: ReportInputs) -> dict[str, str]:
    """One string for each placeholder of the template."""
    teacher = r.t1["teacher"]
    comp = malignancy_comparison(r.t1)
    baseline = malignancy_baseline(teacher)
    return {
        **_header_fields(r),
        "baseline": mean_sd(baseline) if baseline is not None else "?",
        "comparison_table": comparison_markdown(comp),
        "comparison_verdict": comparison_verdict(comp),
        "table1": teacher.markdown(),
        "table1_exact": teacher.exact_markdown(),
        "fig2_table": r.f2.markdown(),
        "fig4_table": r.f4.markdown(),
        "fig4_caption": r.f4.caption(markdown=True),
        **budget_fields(r),
        **recipe_fields(r),
        "stages_table": stages_markdown(r.timings, r.reused),
        "warnings": warnings_markdown(r.notes),
        **{f"fig_{k}": os.path.relpath(r.figures[k], r.out) for k in FIGURES},
    }


def budget_fields(r: ReportInputs) -> dict[str, str]:
    """The labelling-budget section: table, figure and the sentence on the best strategy's
    gain over random at 1% and 10% (cRedAnno+'s comparison, Lu et al., ISBI 2023)."""
    b = r.budget
    if b is None or "budget" not in r.figures:
        return {"budget_table": "(the budget stage did not run)", "budget_sentence": "",
                "budget_figure": ""}
    parts = []
    for frac in (0.01, 0.1):
        for method, name in (("knn", "k-NN"), ("probe", "the probe")):
            best, gain = b.gain_over_random(frac, method)
            if best == "random":  # the best mean is random's own: say so, not "+0.0"
                parts.append(f"{frac:.0%} with {name}: no strategy beats random")
            elif best:
                parts.append(f"{frac:.0%} with {name}: {md_text(best)} {gain:+.1f} points")
    seeds = sorted(int(s) for s in b.raw["seed"].unique())
    sentence = ("On the phantom, the best label-free strategy's malignancy gain over random "
                "labelling: " + "; ".join(parts) + f" (teacher store, seeds {seeds}; the "
                "demo runs a reduced grid, 1% and 10% with k-NN and the probe; "
                "`credanno bench budget` runs 0.5% to 100% with the semi-supervised rounds)."
                if parts else "")
    rel = os.path.relpath(r.figures["budget"], r.out)
    return {"budget_table": b.markdown(), "budget_sentence": sentence,
            "budget_figure": f"![malignancy accuracy vs labelling budget]({rel})"}


def recipe_fields(r: ReportInputs) -> dict[str, str]:
    """The probe-recipe section: tuned vs the paper's recipe vs the constant, per label,
    and which attributes fall more than 3 points below the constant."""
    c = r.recipes
    if c is None:
        return {"recipe_table": "(the recipes stage did not run)", "recipe_verdict": ""}
    parts = []
    for recipe in ("tuned", "paper"):
        low = c.shortfalls(3.0).query("recipe == @recipe")
        items = [f"{md_text(x.label)} at {x.frac:.0%} ({x.below_const:.1f} points)"
                 for x in low.itertuples()]
        parts.append(f"{recipe} recipe: " + ("; ".join(items) if items else "none"))
    verdict = ("Attributes more than 3 points below the constant at 1% or 10% labels: "
               + "; ".join(parts) + ".")
    return {"recipe_table": c.markdown(), "recipe_verdict": verdict}


def _header_fields(r: ReportInputs) -> dict[str, str]:
    """The data and pretraining paragraph."""
    teacher = r.t1["teacher"]
    data = teacher.data
    return {
        "data_warning": data_warning(data),
        "patch": md_code(r.patch), "data": data.text,
        "n_nodules": str(teacher.n_nodules), "n_test_images": str(teacher.n_test_images),
        "preset": md_code(r.cfg.preset), "arch": md_code(r.cfg.arch),
        "model_kwargs": md_text(r.cfg.model_kwargs or ""), "epochs": str(r.cfg.epochs),
        "run_dir": md_code(r.run.run_dir), "loss": loss_sentence(r.run),
        "seeds": str(list(r.seeds)),
    }


def data_warning(data: Any) -> str:
    """The quoted warning heading a report on data that is not real CT ("" on real CT)."""
    if data.is_real:
        return ""
    return (f"> **{data.text}.** Nothing in this report is a result on real CT; see the "
            "paper's rows for those, and run on LIDC-IDRI (`credanno prepare --source lidc`) "
            "for your own.\n\n")


def loss_sentence(run: Any) -> str:
    """`` DINO loss A (epoch 1) -> B (epoch N).`` from the run's metrics ("" without)."""
    metrics = getattr(run, "metrics", None)
    if not metrics:
        return ""
    first, last = metrics[0], metrics[-1]
    if "loss" not in first or "loss" not in last:
        return ""
    return (f" DINO loss {first['loss']:.3f} (epoch 1) -> {last['loss']:.3f} (epoch "
            f"{last.get('epoch', len(metrics))}).")


def stages_markdown(timings: dict[str, float], reused: dict[str, bool]) -> str:
    """The table of stage timings; a stage is "reused" when all its parts reused work."""
    lines = ["| stage | seconds | reused |", "|---|---:|---|"]
    for name, secs in timings.items():
        key = name.split(" (")[0]
        parts = [v for k, v in reused.items() if k.startswith(key)]
        lines.append(f"| {md_text(name)} | {secs:.1f} | "
                     f"{'yes' if parts and all(parts) else ''} |")
    lines.append(f"| **total (before writing this report)** | **{sum(timings.values()):.1f}** | |")
    return "\n".join(lines)


def warnings_markdown(notes: list[str]) -> str:
    """The list of warnings raised on the way, once each, as a paragraph ("" without)."""
    if not notes:
        return ""
    unique = list(dict.fromkeys(notes))
    return ("Warnings raised on the way (expected with 1% of the labels: some classes get no "
            "labelled example, and k is clamped to the labelled images):\n\n"
            + "\n".join(f"- {md_text(n)}" for n in unique) + "\n\n")
