"""``credanno tsne``: a t-SNE picture of a store's features (the paper's Fig. 3)."""

from __future__ import annotations

from pathlib import Path

import click

from credanno.commands._types import SEED, FiniteFloat


@click.command("tsne")
@click.option("--color", "color", default="malignancy", show_default=True,
              help="Label to colour by, or 'all' for the 8 panels of the paper's Fig. 3.")
@click.option("--store", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Feature store (default: the newest under stores/).")
@click.option("--split", type=click.Choice(["test", "train", "all"]), default="test",
              show_default=True, help="Which images to show.")
@click.option("--fit-on-train", is_flag=True,
              help="Fit the map on the training split and place the shown split into it "
                   "(openTSNE transform).")
@click.option("--perplexity", type=FiniteFloat(0, example="30"), default=30.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--kind", default="cls", show_default=True, help="Feature set of the store.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Figure file; .png, .svg or .pdf (default: results/tsne_<store>_<color>.png).")
@click.option("--no-cache", is_flag=True, help="Recompute the map even if it is cached.")
def tsne(color: str, store: Path | None, split: str, fit_on_train: bool, perplexity: float,
         seed: int, kind: str, out: Path | None, no_cache: bool) -> None:
    """t-SNE of a store's features coloured by radiologists' ratings, in their words."""
    from credanno.paths import RESULTS_DIR
    from credanno.viz import color_names, describe_source, save_figure, tsne_figure, tsne_map

    color_names(color)  # an unknown label fails before any work
    m = tsne_map(store, split=split, kind=kind, perplexity=perplexity, seed=seed,
                 fit_split="train" if fit_on_train else None, cache=not no_cache)
    out = out or RESULTS_DIR / f"tsne_{m.store.stem}_{split}_{color}.png"
    placed = " placed into a map of the train split" if fit_on_train and split != "train" else ""
    caption = (f"Data: {describe_source(m.provenance, m.store).text}. Store {m.store.name}, {kind} "
               f"features, {split} split ({len(m)} images){placed}; openTSNE, perplexity "
               f"{m.params['perplexity']:g}, seed {seed}.")
    save_figure(tsne_figure(m.coords, m.table, color, caption=caption), out)
    click.echo(f"wrote {out} ({len(m)} points, map {'from cache' if m.cached else 'computed'})")
