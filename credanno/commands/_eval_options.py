"""Click options shared by the commands: which store, which labelled subset and where the
results go (``credanno knn``, ``credanno probe``), and the one form of ``--seeds`` /
``--n-seeds`` and ``--device`` every command uses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from credanno.commands._types import DEVICE, FRACS, N_SEEDS, POSITIVE, SEEDS, RegistryChoice
from credanno.errors import CredannoError

if TYPE_CHECKING:
    from credanno.eval.specs import SubsetSpec

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
    """The labelled subset (``--frac`` or ``--n-labels`` drawn by ``--strategy``, or
    ``--subset-file``; ``--subset`` and ``--stratify`` are aliases of strategies) and the
    sub-population (``--where``); the command builds them with :func:`subset_spec_of`."""
    return _apply(f, [
        click.option("--frac", "fracs", type=FRACS, default="1", show_default=True,
                     help="Label fractions of the training images, comma-separated, in (0, 1]."),
        click.option("--n-labels", type=POSITIVE, default=None,
                     help="Label this many training images instead of a fraction."),
        click.option("--strategy", type=RegistryChoice("credanno.eval.strategies:"
                                                       "strategy_names"),
                     default="random", show_default=True,
                     help="How the labelled images are chosen: random (one by one, the "
                          "paper's), nodule (whole nodules), stratified (by malignancy), ..."),
        click.option("--subset", type=click.Choice(["annotation", "nodule"]), default=None,
                     help="Draw images one by one or as whole nodules (--subset nodule is "
                          "--strategy nodule; with stratified, nodule-wise strata)."),
        click.option("--stratify", is_flag=True,
                     help="Stratify by malignancy (the same as --strategy stratified)."),
        click.option("--subset-file", type=PATH, default=None,
                     help="Label exactly these images: a CSV with an annotation_id (or "
                          "nodule_id) column, or one annotation id per line."),
        click.option("--where", default=None, metavar="EXPR",
                     help="Restrict training and test images to a pandas query over the "
                          "image table, e.g. \"diameter >= 10\"."),
    ])


def subset_spec_of(fracs: list[float], n_labels: int | None, strategy: str,
                   subset: str | None, stratify: bool, subset_file: Path | None,
                   seeds: list[int]) -> SubsetSpec:
    """The :class:`SubsetSpec` of :func:`subset_options`' values; ``--subset-file`` with an
    explicit ``--frac`` is an error (the file gives the labelled images itself)."""
    from credanno.eval.specs import SubsetSpec

    if subset_file is not None:
        ctx = click.get_current_context(silent=True)
        source = ctx.get_parameter_source("fracs") if ctx is not None else None
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            raise CredannoError("--subset-file names the labelled images itself; drop --frac")
    return SubsetSpec(fracs=fracs if n_labels is None else (),
                      n_labels=None if n_labels is None else (n_labels,),
                      mode=subset or "annotation",
                      stratify="malignancy" if stratify else None, seeds=seeds,
                      strategy=strategy, file=None if subset_file is None else str(subset_file))


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


def seed_options(*, default: str | None = None, default_n: int | None = None,
                 what: str = "Seeds") -> Callable[[Callable], Callable]:
    """``--seeds`` (a range ``0-4``, a list ``0,3,7`` or one seed ``7``) or ``--n-seeds N``
    (seeds 0..N-1), not both; the command receives ``seeds``, a list of ints.

    Without either the command's default applies: ``default`` in the ``--seeds`` form or
    the first ``default_n`` seeds.
    """
    if (default is None) == (default_n is None):
        raise ValueError("seed_options needs exactly one of default, default_n")
    shown = f"--seeds {default}" if default is not None else f"--n-seeds {default_n}"

    def collect(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        # click processes options in command-line order: the second of the two callbacks
        # to run sees both values and decides
        if ctx.resilient_parsing:
            return value
        got = ctx.meta.setdefault(("credanno.seeds", id(ctx)), {})
        got[param.name] = value
        if len(got) == 2:
            ctx.params["seeds"] = _chosen_seeds(got["seeds"], got["n_seeds"], default,
                                                default_n)
        return value

    return lambda f: _apply(f, [
        click.option("--seeds", "seeds", type=SEEDS, default=None, expose_value=False,
                     callback=collect,
                     help=f"{what}: a range 0-4, a list 0,3,7 or one seed 7 "
                          f"[default: {shown}]."),
        click.option("--n-seeds", "n_seeds", type=N_SEEDS, default=None, expose_value=False,
                     callback=collect, help="The first N seeds, 0..N-1 (instead of --seeds)."),
    ])


def _chosen_seeds(seeds: list[int] | None, n_seeds: int | None, default: str | None,
                  default_n: int | None) -> list[int]:
    from credanno.eval.options import first_seeds, parse_seeds

    if seeds is not None and n_seeds is not None:
        raise CredannoError("give --seeds or --n-seeds, not both")
    if seeds is not None:
        return seeds
    if n_seeds is not None:
        return first_seeds(n_seeds)
    return parse_seeds(default) if default is not None else first_seeds(default_n or 1)


def device_option(help_: str = "cpu, cuda or cuda:N (default: cuda when torch sees a GPU, "
                               "else cpu).") -> Callable[[Callable], Callable]:
    """``--device``: the same type and default (None = ``credanno.runtime.default_device()``,
    resolved by the library) in every command; only the help says what runs there."""
    return click.option("--device", type=DEVICE, default=None, help=help_)
