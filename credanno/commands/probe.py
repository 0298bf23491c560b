"""``credanno probe``: the paper's trained linear predictors G_exp and G_cls (Eq. 3)."""

from __future__ import annotations

from pathlib import Path

import click

_PATH = click.Path(dir_okay=False, path_type=Path)


@click.command("probe")
@click.option("--store", type=_PATH, default=None,
              help="Feature store (default: the newest under stores/).")
@click.option("--train-store", type=_PATH, default=None,
              help="Take the training rows from this store (same provenance as --test-store).")
@click.option("--test-store", type=_PATH, default=None,
              help="Take the test rows from this store.")
@click.option("--frac", "fracs", default="1", show_default=True,
              help="Label fractions of the training images, comma-separated, in (0, 1].")
@click.option("--n-labels", type=int, default=None,
              help="Label this many training images instead of a fraction.")
@click.option("--subset", type=click.Choice(["annotation", "nodule"]), default="annotation",
              show_default=True, help="Draw labelled images one by one or as whole nodules.")
@click.option("--stratify", is_flag=True, help="Stratify the labelled subset by malignancy.")
@click.option("--seeds", default="0-4", show_default=True,
              help="Seeds (subset, initialisation, batches): a range 0-4, a list or a count.")
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=None,
              help="Initial learning rate (default: the paper's 5e-4 with all labels, "
                   "2.5e-4 with partial labels).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--kind", default=None,
              help="Feature set (default: last4, the CLS tokens of the last 4 blocks, "
                   "when the store has it).")
@click.option("--labels", default=None,
              help="Labels to evaluate, comma-separated (default: all the store has).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--select", type=click.Choice(["last", "val"]), default="last",
              show_default=True,
              help="Model selection: last epoch, or each head's best epoch on a validation "
                   "part of the labelled subset (never the test split).")
@click.option("--val-frac", type=float, default=0.2, show_default=True,
              help="Share of the labelled subset held out with --select val.")
@click.option("--standardize/--no-standardize", default=True, show_default=True,
              help="Standardise features with training-split statistics (off = the paper's "
                   "raw features).")
@click.option("--views/--no-views", default=True, show_default=True,
              help="Train on the store's augmented views when it has them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--csv", type=_PATH, default=None, help="Also write the per-seed records as CSV.")
@click.option("--predictions", type=_PATH, default=None,
              help="Also write per-test-image predictions and probabilities as CSV.")
@click.option("--progress/--no-progress", default=False, help="Progress bar on stderr.")
def probe(store, train_store, test_store, fracs, n_labels, subset, stratify, seeds, epochs,
          lr, batch_size, kind, labels, device, select, val_frac, standardize, views,
          as_json, csv, predictions, progress) -> None:
    """Train the joint linear heads (one per attribute, malignancy on features + attribute
    logits) on a labelled subset and evaluate them on the test split."""
    from credanno.errors import CredannoError
    from credanno.eval.options import emit, parse_fracs, parse_labels, parse_seeds
    from credanno.eval.probe import probe_sweep

    if store is not None and train_store is not None:
        raise CredannoError("give --store or --train-store, not both")
    result = probe_sweep(
        train_store or store, fracs=parse_fracs(fracs) if n_labels is None else (),
        seeds=parse_seeds(seeds), labels=parse_labels(labels), kind=kind, epochs=epochs,
        lr=lr, device=device, progress=progress, n_labels=n_labels, mode=subset,
        stratify="malignancy" if stratify else None, select=select, val_frac=val_frac,
        batch_size=batch_size, standardize=standardize, use_views=views,
        test_store=test_store)
    click.echo(emit(result, as_json, csv, predictions))
