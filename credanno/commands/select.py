"""``credanno select``: which training images to annotate next, chosen label-free from a
feature store (cRedAnno+'s k-means seeding, TypiClust, ProbCover, coreset or random)."""

from __future__ import annotations

from pathlib import Path

import click

from credanno.commands._eval_options import PATH, device_option
from credanno.commands._types import FRACS, SEED, RegistryChoice


@click.command("select")
@click.option("--strategy", type=RegistryChoice("credanno.eval.strategies:strategy_names"),
              default="kmeans", show_default=True,
              help="Label-free rule: kmeans (cRedAnno+), typiclust, probcover, coreset, "
                   "random (the paper's), ...")
@click.option("--budget", type=int, default=None, help="Number of images to label.")
@click.option("--frac", "fracs", type=FRACS, default=None,
              help="Label this fraction of the training images instead (one value).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--store", type=PATH, default=None,
              help="Feature store (default: the newest under stores/).")
@click.option("--kind", default="cls", show_default=True, help="Feature set to select on.")
@click.option("--labelled", type=PATH, default=None,
              help="Images already labelled (a CSV with annotation_id or nodule_id, or one "
                   "id per line): never picked again; the budget counts new picks.")
@click.option("--per", type=click.Choice(["image", "nodule", "whole-nodule"]),
              default="image", show_default=True,
              help="image: any images; nodule: at most one image per nodule; whole-nodule: "
                   "whole nodules counted against the budget.")
@device_option("Where FAISS runs: cpu, cuda or cuda:N (default: a GPU when faiss has one).")
@click.option("--out", type=PATH, default=Path("picks.csv"), show_default=True,
              help="Ranked picks as CSV; the run's parameters go beside it as .json.")
def select(strategy, budget, fracs, seed, store, kind, labelled, per, device, out) -> None:
    """Rank the training images to label next (annotation_id, nodule_id, patient_id,
    rank, score); labels are never read. Feed the CSV to --subset-file of knn/probe."""
    from credanno.errors import CredannoError
    from credanno.eval.selection import select as run_select
    from credanno.eval.selection import write_picks

    if fracs is not None and len(fracs) != 1:
        raise CredannoError(f"credanno select takes one --frac, got {len(fracs)}; "
                            "pass e.g. --frac 0.01")
    picks = run_select(store, strategy, budget, frac=fracs[0] if fracs else None, seed=seed,
                       kind=kind, labelled=labelled, per=per, device=device)
    csv, sidecar = write_picks(picks, out)
    p = picks.params
    click.echo(f"wrote {csv} ({p['n_picked']} images to label of {p['n_train']}, "
               f"{p['strategy']}, seed {seed}) and {sidecar}")
