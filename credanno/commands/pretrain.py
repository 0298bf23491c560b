"""``credanno pretrain``: self-supervised DINO pretraining (stage 1 of the paper)."""

from __future__ import annotations

from pathlib import Path

import click

from credanno.commands._eval_options import device_option
from credanno.commands._types import RegistryChoice


@click.command("pretrain")
@click.option("--preset", type=RegistryChoice("credanno.pretrain.config:available_presets"),
              default=None, help="Preset (default: paper with a GPU, else cpu-tiny).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="TOML file overriding preset fields.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Patch file (default: data/phantom.h5). Only its training split is used.")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Global batch over all processes.")
@click.option("--arch", default=None, help="Any timm architecture name.")
@click.option("--lr", type=float, default=None,
              help="Base lr per 256 images (peak = lr * batch / 256).")
@click.option("--local-crops", type=int, default=None)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder (default runs/<preset>-<time>); resumes if it has a checkpoint.")
@click.option("--seed", type=int, default=None)
@device_option()
@click.option("--init", "init", default=None,
              help="Start from ImageNet weights: a DINO/timm file, or timm:NAME (online).")
@click.option("--monitor-every", type=int, default=None,
              help="k-NN malignancy accuracy on a training hold-out every N epochs.")
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "none"]), default=None)
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the ViTs.")
@click.option("--max-steps", type=int, default=None,
              help="Stop after N optimiser steps (a smoke test or throughput probe; a stop "
                   "mid-epoch is not resumable). 0: no limit.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def pretrain(preset, config_file, data, epochs, batch_size, arch, lr, local_crops, out, seed,
             device, init, monitor_every, amp, compile_, max_steps, progress) -> None:
    """Self-supervised DINO pretraining of a ViT encoder on the nodule patches.

    Writes runs/NAME/checkpoint.pt (every epoch), metrics.jsonl, config.json and loss.png.
    Multi-GPU: torchrun --nproc_per_node N -m credanno pretrain ...
    """
    from credanno.pretrain import load_config
    from credanno.pretrain import pretrain as run_pretrain

    overrides = {"data": data, "epochs": epochs, "batch_size": batch_size, "arch": arch,
                 "lr": lr, "local_crops": local_crops, "out": out, "seed": seed,
                 "device": device, "init": init, "monitor_every": monitor_every, "amp": amp,
                 "compile": compile_, "max_steps": max_steps}
    cfg = load_config(preset=preset, file=config_file,
                      overrides={k: v for k, v in overrides.items() if v is not None})
    result = run_pretrain(cfg, progress=progress)
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    if result.resumed_from >= cfg.epochs:
        click.echo(f"{result.run_dir}: already trained for {cfg.epochs} epochs; nothing to do")
    elif result.resumed_from:
        click.echo(f"resumed {result.run_dir} from epoch {result.resumed_from}")
    _report(cfg, result)


def _report(cfg, result) -> None:
    """The run's summary: losses and speed of its epochs (or of a --max-steps probe)."""
    m = result.metrics
    if result.partial is not None:
        p = result.partial
        click.echo(f"preset {cfg.preset}: {cfg.arch} {cfg.global_size}/{cfg.local_size} px, "
                   f"stopped by --max-steps {p['steps']} steps into epoch {p['epoch']}, "
                   f"loss {p['loss']:.3f}, {p['images_per_s']:.1f} images/s (a probe: a "
                   "later run on this folder starts over)")
    elif m:
        first, last = m[0], m[-1]
        click.echo(f"preset {cfg.preset}: {cfg.arch} {cfg.global_size}/{cfg.local_size} px, "
                   f"{last['epoch']} epochs, loss {first['loss']:.3f} -> {last['loss']:.3f}, "
                   f"{last['images_per_s']:.0f} images/s")
        if "knn_malignancy_acc" in last:
            click.echo(f"k-NN malignancy (training hold-out): {last['knn_malignancy_acc']:.3f}")
    click.echo(f"checkpoint: {result.checkpoint}")
