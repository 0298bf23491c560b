"""``credanno active``: the cRedAnno+ loop (Lu et al., ISBI 2023) on a feature store, with
the store's labels as the oracle: a label-free seed set, pseudo-labels for the confident
unlabelled images, rounds of requested labels up to the budget, each retrained briefly
("training quenching")."""

from __future__ import annotations

from pathlib import Path

import click

from credanno.commands._eval_options import PATH, device_option
from credanno.commands._types import POSITIVE, SEED, RegistryChoice


@click.command("active")
@click.option("--store", type=PATH, default=None,
              help="Feature store (default: the newest under stores/).")
@click.option("--kind", default="cls", show_default=True, help="Feature set to train on.")
@click.option("--start", type=float, default=0.01, show_default=True,
              help="Label fraction of the seed set, in (0, 1].")
@click.option("--budget", type=float, default=0.02, show_default=True,
              help="Label fraction reached after the rounds, in [--start, 1].")
@click.option("--strategy", type=RegistryChoice("credanno.eval.strategies:strategy_names"),
              default="kmeans", show_default=True,
              help="Label-free rule picking the seed set (kmeans: cRedAnno+'s sparse seeding).")
@click.option("--query", default="least-confidence", show_default=True,
              help="How each round picks images to label: least-confidence, margin, or a "
                   "label-free strategy (kmeans, typiclust, probcover, coreset, random).")
@click.option("--rounds", type=click.IntRange(0, 1000), default=5, show_default=True)
@click.option("--threshold", type=float, default=0.9, show_default=True,
              help="Malignancy confidence an unlabelled image needs to be pseudo-labelled.")
@click.option("--pseudo", type=click.Choice(["hard", "soft"]), default="soft",
              show_default=True,
              help="Pseudo-labels as every head's predicted probabilities, trained as soft "
                   "targets (soft), or as the heads' predicted classes (hard).")
@click.option("--recipe", type=click.Choice(["tuned", "paper"]), default="tuned",
              show_default=True,
              help="How the heads train: tuned (to convergence, penalty cross-validated "
                   "inside the labelled images) or paper (SGD; --epochs, --quench-epochs).")
@click.option("--epochs", type=POSITIVE, default=None,
              help="Paper recipe: training epochs on the seed set [default: 100].")
@click.option("--quench-epochs", type=POSITIVE, default=None,
              help="Paper recipe: retraining epochs of each round, cRedAnno+'s training "
                   "quenching [default: 10].")
@click.option("--seed", type=SEED, default=0, show_default=True)
@device_option("Where the heads train: cpu, cuda or cuda:N (default: cuda when torch sees a "
               "GPU, else cpu).")
@click.option("--json", "json_path", type=PATH, default=None, help="Also write the rounds as JSON.")
@click.option("--csv", "csv_path", type=PATH, default=None,
              help="Also write one row per round as CSV.")
def active(store: Path | None, kind: str, start: float, budget: float, strategy: str,
           query: str, rounds: int, threshold: float, pseudo: str, recipe: str,
           epochs: int | None, quench_epochs: int | None, seed: int, device: str | None,
           json_path: Path | None, csv_path: Path | None) -> None:
    """Seed with a label-free pick, pseudo-label the confident rest, request labels over
    rounds up to --budget; prints every round (labels used, pseudo-labels kept and their
    accuracy against the hidden labels, test accuracy per label). Test labels only score."""
    from credanno.errors import CredannoError
    from credanno.eval.active import ActiveSpec, run_active, write_active

    if recipe == "tuned" and (epochs is not None or quench_epochs is not None):
        raise CredannoError("--epochs and --quench-epochs belong to --recipe paper; the tuned "
                            "recipe fits to convergence (add --recipe paper)")
    spec = ActiveSpec(start=start, budget=budget, strategy=strategy, query=query,
                      rounds=rounds, threshold=threshold, pseudo=pseudo, recipe=recipe,
                      epochs=epochs or 100, quench_epochs=quench_epochs or 10, kind=kind,
                      seed=seed, device=device)
    result = run_active(store, spec)
    p = result.params
    click.echo(f"cRedAnno+ loop on {p['store']} ({p['kind']}): seed {p['n_start']} images "
               f"by {strategy}, then {query} up to {p['n_budget']} of {p['n_train']}; "
               f"{pseudo} pseudo-labels at confidence > {threshold:g}; accuracy (%) on the "
               "test split\n")
    click.echo(result.markdown())
    for path in write_active(result, json_path=json_path, csv_path=csv_path):
        click.echo(f"wrote {path}")
