"""``credanno knn``: k-NN classification of a feature store's test split (paper, section 3.1)."""

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
from credanno.commands._types import FiniteFloat


@click.command("knn")
@store_options
@click.option("--k", "ks", default="50,150,250", show_default=True,
              help="Numbers of neighbours, comma-separated; all from one search.")
@subset_options
@seed_options(default="0-4", what="Subset seeds")
@click.option("--T", "T", type=FiniteFloat(0, example="0.1"), default=0.1, show_default=True,
              help="Temperature of the exp(sim / T) vote weights (DINO uses 0.07).")
@click.option("--weighting", type=click.Choice(["exp", "majority"]), default="exp",
              show_default=True, help="Weighted (exp) or plain majority voting.")
@click.option("--kind", default="cls", show_default=True, help="Feature set of the store.")
@click.option("--labels", default=None,
              help="Labels to evaluate, comma-separated (default: all the store has).")
@click.option("--block-rows", type=int, default=None,
              help="Stream the training features from the store in blocks of this many rows.")
@device_option("cpu, or cuda / cuda:N for a faiss GPU index (default: a GPU when faiss "
               "sees one).")
@output_options
def knn(store, train_store, test_store, ks, fracs, n_labels, strategy, subset, stratify,
        subset_file, where, seeds, T, weighting, kind, labels, block_rows, device, as_json,
        csv, predictions, progress) -> None:
    """k-NN classification (cosine similarity, exp(sim/T) votes) of malignancy and the
    nodule attributes, over label fractions and seeds, from a feature store."""
    from credanno.errors import CredannoError
    from credanno.eval.knn import knn_sweep
    from credanno.eval.options import emit, parse_ks, parse_labels
    from credanno.eval.specs import KnnSpec

    if store is not None and train_store is not None:
        raise CredannoError("give --store or --train-store, not both")
    subsets = subset_spec_of(fracs, n_labels, strategy, subset, stratify, subset_file, seeds)
    spec = KnnSpec(ks=parse_ks(ks), T=T, weighting=weighting, kind=kind, block_rows=block_rows,
                   device=device)
    result = knn_sweep(train_store or store, subsets, spec, labels=parse_labels(labels),
                       test_store=test_store, where=where, progress=progress)
    click.echo(emit(result, as_json, csv, predictions))
