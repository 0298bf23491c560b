"""Click options shared by ``credanno knn`` and ``credanno probe`` (which store, which
labelled subset, where the results go)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from credanno.commands._types import POSITIVE

PATH = click.Path(dir_okay=False, path_type=Path)


def _apply(f: Callable, options: list[Callable]) -> Callable:
    for option in reversed(options):
        f = option(f)
    return f


def store_options(f: Callable) -> Callable:
    """``--store``, or ``--train-store`` with ``--test-store``."""
    return _apply(f, [
        click.option("--store", type=PATH, default=None,
                     help="Feature store (default: the newest under stores/)."),
        click.option("--train-store", type=PATH, default=None,
                     help="Take the training rows from this store "
                          "(same provenance as --test-store)."),
        click.option("--test-store", type=PATH, default=None,
                     help="Take the test rows from this store."),
    ])


def subset_options(f: Callable) -> Callable:
    """The labelled subset: ``--frac`` or ``--n-labels``, ``--subset``, ``--stratify``."""
    return _apply(f, [
        click.option("--frac", "fracs", default="1", show_default=True,
                     help="Label fractions of the training images, comma-separated, in (0, 1]."),
        click.option("--n-labels", type=POSITIVE, default=None,
                     help="Label this many training images instead of a fraction."),
        click.option("--subset", type=click.Choice(["annotation", "nodule"]),
                     default="annotation", show_default=True,
                     help="Draw labelled images one by one or as whole nodules."),
        click.option("--stratify", is_flag=True,
                     help="Stratify the labelled subset by malignancy."),
    ])


def output_options(f: Callable) -> Callable:
    """``--json``, ``--csv``, ``--predictions``, ``--progress``."""
    return _apply(f, [
        click.option("--json", "as_json", is_flag=True,
                     help="Print one JSON object instead of tables."),
        click.option("--csv", type=PATH, default=None,
                     help="Also write the per-seed records as CSV."),
        click.option("--predictions", type=PATH, default=None,
                     help="Also write per-test-image predictions and probabilities as CSV."),
        click.option("--progress/--no-progress", default=False, help="Progress bar on stderr."),
    ])
