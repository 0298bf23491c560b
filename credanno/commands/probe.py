"""``credanno probe``: the paper's trained linear predictors G_exp and G_cls (Eq. 3)."""

from __future__ import annotations

import click

from credanno.commands._eval_options import (
    device_option,
    output_options,
    seed_options,
    store_options,
    subset_options,
    subset_spec_of,
)
from credanno.commands._types import POSITIVE, FiniteFloat
from credanno.eval.probe import MAX_LR, PROBE_RECIPES


@click.command("probe")
@store_options
@subset_options
@seed_options(default="0-4", what="Seeds (subset, initialisation, batches)")
@click.option("--recipe", type=click.Choice(list(PROBE_RECIPES)), default="tuned",
              show_default=True,
              help="tuned: fitted to convergence, penalty cross-validated inside the labelled "
                   "subset, never worse than a constant; paper: the paper's SGD recipe "
                   "(--epochs, --lr, --batch-size, --select apply to it).")
@click.option("--epochs", type=POSITIVE, default=100, show_default=True)
@click.option("--lr", type=FiniteFloat(0, MAX_LR, example="5e-4"), default=None,
              help="Initial learning rate (default: the paper's 5e-4 with all labels, "
                   "2.5e-4 with partial labels).")
@click.option("--batch-size", type=POSITIVE, default=128, show_default=True)
@click.option("--kind", default=None,
              help="Feature set (default: last4, the CLS tokens of the last 4 blocks, "
                   "when the store has it).")
@click.option("--labels", default=None,
              help="Labels to evaluate, comma-separated (default: all the store has).")
@device_option()
@click.option("--select", type=click.Choice(["last", "val"]), default="last",
              show_default=True,
              help="Model selection: last epoch, or each head's best epoch on a validation "
                   "part of the labelled subset (never the test split).")
@click.option("--val-frac", type=FiniteFloat(0, 1, high_open=True, example="0.2"),
              default=0.2, show_default=True,
              help="Share of the labelled subset held out with --select val.")
@click.option("--standardize/--no-standardize", default=True, show_default=True,
              help="Standardise features with training-split statistics (off = the paper's "
                   "raw features).")
@click.option("--views/--no-views", default=True, show_default=True,
              help="Train on the store's augmented views when it has them.")
@output_options
def probe(store, train_store, test_store, fracs, n_labels, strategy, subset, stratify,
          subset_file, where, seeds, recipe, epochs, lr, batch_size, kind, labels, device,
          select, val_frac, standardize, views, as_json, csv, predictions, progress) -> None:
    """Train the joint linear heads (one per attribute, malignancy on features + attribute
    logits) on a labelled subset and evaluate them on the test split."""
    from credanno.errors import CredannoError
    from credanno.eval.options import emit, parse_labels
    from credanno.eval.probe import probe_sweep
    from credanno.eval.specs import ProbeSpec

    if store is not None and train_store is not None:
        raise CredannoError("give --store or --train-store, not both")
    subsets = subset_spec_of(fracs, n_labels, strategy, subset, stratify, subset_file, seeds)
    spec = ProbeSpec(kind=kind, recipe=recipe, epochs=epochs, lr=lr, batch_size=batch_size,
                     select=select, val_frac=val_frac, standardize=standardize, views=views,
                     device=device)
    result = probe_sweep(train_store or store, subsets, spec, labels=parse_labels(labels),
                         test_store=test_store, where=where, progress=progress)
    click.echo(emit(result, as_json, csv, predictions))
