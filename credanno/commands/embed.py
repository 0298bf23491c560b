"""``credanno embed``: a frozen encoder over a patch file, into a feature store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from credanno.commands._eval_options import device_option
from credanno.commands._types import POSITIVE, Count, RegistryChoice, RegistryHelpOption
from credanno.errors import CredannoError


def _parse_options(pairs: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` strings -> dict; values parsed as JSON where they can be (8, 0.1, true)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CredannoError(f"--encoder-option {pair!r} is not KEY=VALUE; e.g. "
                                "--encoder-option img_size=32")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@click.command("embed")
@click.option("--checkpoint", default=None,
              help="Pretraining run folder (runs/NAME) or checkpoint file; default: the newest "
                   "run under runs/.")
@click.option("--encoder", default=None, cls=RegistryHelpOption,
              registry_help="credanno.encoders:encoder_forms",
              help="Instead of --checkpoint, one of: {names} (timm:ARCH is random, or loads "
                   "--weights FILE).")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local state-dict / safetensors file for --encoder timm:ARCH.")
@click.option("--normalise", type=RegistryChoice("credanno.encoders:NORMALISE"), default="auto",
              show_default=True,
              help="Input statistics for --encoder timm:ARCH: model (its timm pretrained_cfg "
                   "mean/std; ARCH.TAG picks a tag's, e.g. vit_small_patch16_224.dino) or lidc "
                   "(the paper's); auto = model with --weights, lidc for random weights.")
@click.option("--encoder-option", "encoder_options", multiple=True, metavar="KEY=VALUE",
              help="timm.create_model option for --encoder timm:ARCH (repeatable), e.g. "
                   "img_size=32.")
@click.option("--which", type=RegistryChoice("credanno.embed:WHICH"),
              default="teacher", show_default=True,
              help="Checkpoint weights: the teacher (the paper's), the student, or random "
                   "(untrained baseline).")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Patch file (default: data/phantom.h5).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Store file (default: stores/<run or encoder>.h5).")
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True)
@device_option()
@click.option("--views", type=Count(0), default=0, show_default=True,
              help="Also store V augmented views of every training image (probe training).")
@click.option("--float16", "half", is_flag=True, help="Store features as float16 (half size).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def embed(checkpoint: str | None, encoder: str | None, weights: Path | None, normalise: str,
          encoder_options: tuple[str, ...], which: str, data: Path | None, out: Path | None,
          batch_size: int, device: str | None, views: int, half: bool, quiet: bool) -> None:
    """Embed every patch with a frozen encoder into an HDF5 feature store.

    Works under torchrun (one store, identical to a single-process run).
    """
    from credanno import stores
    from credanno.embed import embed as run_embed
    from credanno.paths import DEFAULT_PATCH_FILE

    path = run_embed(data=data or DEFAULT_PATCH_FILE, checkpoint=checkpoint, encoder=encoder,
                     weights=weights, which=which, out=out, batch_size=batch_size,
                     device=device, views=views, progress=not quiet,
                     encoder_kwargs=_parse_options(encoder_options),
                     dtype="float16" if half else "float32", normalise=normalise)
    if int(os.environ.get("RANK", "0")) == 0:
        with stores.open(path) as s:
            sets = ", ".join(f"{k} {s.dims[k]}-d" for k in s.feature_sets)
            extra = f", {s.n_views} views of each training image" if s.n_views else ""
            click.echo(f"wrote {path} ({s.n} images; {sets}{extra})")
