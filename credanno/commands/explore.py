"""``credanno explore``: one self-contained HTML page of a store's learned space."""

from __future__ import annotations

from pathlib import Path

import click

from credanno.commands._types import POSITIVE, SEED, FiniteFloat


@click.command("explore")
@click.option("--store", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Feature store (default: the newest under stores/).")
@click.option("--split", type=click.Choice(["test", "train", "all"]), default="test",
              show_default=True, help="Which images to map (the page filters by split too).")
@click.option("--color", "color", default="malignancy", show_default=True,
              help="Label the points are first coloured by (the page has a selector).")
@click.option("--k", "k", type=POSITIVE, default=8, show_default=True,
              help="Nearest training images listed for a clicked point.")
@click.option("--T", "T", type=FiniteFloat(0, example="0.1"), default=0.1, show_default=True,
              help="k-NN vote temperature: neighbours weigh exp(sim / T).")
@click.option("--kind", default="cls", show_default=True, help="Feature set of the store.")
@click.option("--perplexity", type=FiniteFloat(0, example="30"), default=30.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="t-SNE seed.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file (default: results/explorer_<store>_<split>.html).")
@click.option("--no-cache", is_flag=True, help="Recompute the t-SNE map even if it is cached.")
def explore(store: Path | None, split: str, color: str, k: int, T: float, kind: str,
            perplexity: float, seed: int, out: Path | None, no_cache: bool) -> None:
    """Write one HTML page (no server, no network) to explore a store's learned space:
    hover a point for its patch and ratings, click it for its nearest training images."""
    from credanno.paths import RESULTS_DIR
    from credanno.viz.explorer import check_color, write_explorer
    from credanno.viz.tsne import resolve_store

    check_color(color)  # an unknown label fails before any work
    path = resolve_store(store)
    out = out or RESULTS_DIR / f"explorer_{path.stem}_{split}.html"
    page = write_explorer(out, store=path, split=split, color=color, k=k, T=T, kind=kind,
                          perplexity=perplexity, seed=seed, cache=not no_cache)
    thumbs = "no thumbnails" if page.thumb_note else f"{page.n_images} thumbnails"
    click.echo(f"wrote {out} ({page.n_points} points, {thumbs}, {page.size / 1e6:.1f} MB; "
               f"map {'from cache' if page.cached_map else 'computed'})")
