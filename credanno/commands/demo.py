"""``credanno demo``: the whole pipeline on the embedded phantom, into one folder."""

from __future__ import annotations

import time
from pathlib import Path

import click

from credanno.commands._eval_options import device_option, seed_options
from credanno.commands._types import POSITIVE, RegistryChoice


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              show_default=True, help="Folder for everything the demo writes.")
@seed_options(default_n=3, what="Seeds (label subsets) of every configuration")
@device_option()
@click.option("--preset", type=RegistryChoice("credanno.pretrain.config:available_presets"),
              default=None,
              help="Pretraining preset (default: paper on a GPU, cpu-tiny otherwise).")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Use this patch file instead of preparing the phantom.")
@click.option("--epochs", type=POSITIVE, default=None, help="Override the pretraining epochs.")
@click.option("--progress/--no-progress", default=False, show_default=True,
              help="Progress bars within the stages (stage lines are always shown).")
def demo(out: Path, seeds: list[int], device: str | None, preset: str | None, data: Path | None,
         epochs: int | None, progress: bool) -> None:
    """prepare -> pretrain -> embed -> k-NN/probes -> t-SNE -> Table 1, Fig. 2/4 -> report.md"""
    from credanno.demo import DemoSpec, run_demo

    t0 = time.perf_counter()
    spec = DemoSpec(seeds=seeds, device=device, preset=preset, data=data,
                    pretrain_overrides=None if epochs is None else {"epochs": epochs})
    res = run_demo(out, spec, progress=progress,
                   on_stage=lambda line: click.echo(line, err=True))
    click.echo(f"wrote {res.report} and {res.report_html.name} (figures in "
               f"{res.out / 'figures'}) in "
               f"{time.perf_counter() - t0:.0f} s")
