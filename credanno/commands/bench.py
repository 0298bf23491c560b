"""``credanno bench``: the paper's tables and figures, and the performance benchmarks."""

from __future__ import annotations

from pathlib import Path

import click

from credanno.bench.supervised import CNN_MAX_SIZE, CNN_MIN_SIZE
from credanno.commands._eval_options import device_option, seed_options
from credanno.commands._types import FRACS, POSITIVE, Count, RegistryChoice

_STORE = click.option("--store", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="Feature store (default: the newest under stores/).")
_SEEDS = seed_options(default_n=3)
_DEVICE = device_option("Device of the trained predictors and the CNN baseline: cpu, cuda or "
                        "cuda:N (default: cuda when torch sees a GPU, else cpu).")
_PRESET = click.option("--preset", type=RegistryChoice("credanno.pretrain.config:"
                                                       "available_presets"), default=None,
                       help="Pretraining preset (default: paper on a GPU, cpu-tiny otherwise).")


def _echo_figure(result, out: Path, csv_path: Path | None) -> None:
    """Print a figure's table, save the figure and, if asked, its CSV."""
    from credanno.viz import save_figure

    click.echo(result.markdown())
    click.echo(f"\nwrote {save_figure(result.figure(), out)}")
    if csv_path:
        click.echo(f"wrote {result.to_csv(csv_path)}")


@click.group("bench")
def bench() -> None:
    """Reproduce the paper's Table 1, Table 2, Fig. 2 and Fig. 4, and collect the
    performance benchmarks. Every output names the data it ran on."""


@bench.command("table1", short_help="Table 1: ours, the majority baseline and the paper's rows.")
@_STORE
@_SEEDS
@click.option("--probe-epochs", type=POSITIVE, default=100, show_default=True)
@_DEVICE
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table (long format, fractions) as CSV.")
def table1(store: Path | None, seeds: list[int], probe_epochs: int, device: str | None,
           csv_path: Path | None) -> None:
    """Table 1: our configurations (mean +/- sd), the majority baseline, the paper's rows."""
    from credanno.bench.table1 import run_table1

    t1 = run_table1(store, seeds=seeds, probe_epochs=probe_epochs, device=device,
                    progress=True)
    click.echo(t1.header())
    click.echo("\nTable 1: accuracy (%) - attributes within +/-1, malignancy exact. "
               "Paper rows: real LIDC-IDRI, as published.\n")
    click.echo(t1.markdown())
    click.echo("\n" + t1.exact_markdown())
    if csv_path:
        click.echo(f"\nwrote {t1.to_csv(csv_path)}")


@bench.command("fig2", short_help="Fig. 2: number of correctly predicted attributes.")
@_STORE
@_SEEDS
@click.option("--probe-epochs", type=POSITIVE, default=100, show_default=True)
@_DEVICE
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("results/fig2.png"), show_default=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def fig2(store: Path | None, seeds: list[int], probe_epochs: int, device: str | None, out: Path,
         csv_path: Path | None) -> None:
    """Fig. 2: distribution of the number of correctly predicted attributes."""
    from credanno.bench.fig2 import fig2_configs, fig2_from_table1
    from credanno.bench.table1 import run_table1

    t1 = run_table1(store, seeds=seeds, configs=fig2_configs(),
                    probe_epochs=probe_epochs, device=device, progress=True)
    f2 = fig2_from_table1(t1)
    click.echo(t1.header())
    click.echo("\nFig. 2: % of test images with n of 8 attributes correct\n")
    _echo_figure(f2, out, csv_path)


@bench.command("fig4", short_help="Fig. 4: malignancy accuracy vs annotation fraction.")
@_STORE
@_SEEDS
@click.option("--frac", "fracs", type=FRACS, default="0.01,0.02,0.05,0.1,0.2,0.5,1",
              show_default=True, help="Label fractions, comma-separated, in (0, 1].")
@click.option("--strategy", type=RegistryChoice("credanno.eval.strategies:strategy_names"),
              default="random", show_default=True,
              help="How the labelled images are chosen (the same rows for every method).")
@click.option("--subset-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Label exactly these images instead (annotation_id or nodule_id CSV, or "
                   "one id per line): one point per method.")
@click.option("--k", type=POSITIVE, default=50, show_default=True)
@click.option("--probe-epochs", type=POSITIVE, default=100, show_default=True)
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Patch file for the CNN baseline (default: the store's own).")
@click.option("--no-cnn", is_flag=True, help="Leave out the end-to-end CNN baseline.")
@click.option("--cnn-arch", default="resnet18", show_default=True,
              help="timm architecture of the end-to-end baseline (paper: resnet50).")
@click.option("--cnn-epochs", type=POSITIVE, default=30, show_default=True)
@click.option("--cnn-frac", "cnn_fracs", type=FRACS, default=None,
              help="Fractions the CNN trains on, comma-separated (default: all of --frac).")
@click.option("--cnn-size", type=Count(CNN_MIN_SIZE, CNN_MAX_SIZE), default=32, show_default=True,
              help="Input size of the CNN baseline (paper: 224).")
@_DEVICE
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("results/fig4.png"), show_default=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def fig4(store: Path | None, seeds: list[int], fracs: list[float], strategy: str,
         subset_file: Path | None, k: int, probe_epochs: int, data: Path | None, no_cnn: bool,
         cnn_arch: str, cnn_epochs: int, cnn_fracs: list[float] | None, cnn_size: int,
         device: str | None, out: Path, csv_path: Path | None) -> None:
    """Fig. 4: malignancy accuracy against annotation fraction (log scale)."""
    from credanno.bench.fig4 import CnnBaseline, run_fig4
    from credanno.commands._eval_options import subset_spec_of

    subsets = subset_spec_of(fracs, None, strategy, None, False, subset_file, seeds)
    cnn = None if no_cnn else CnnBaseline(
        {"arch": cnn_arch, "epochs": cnn_epochs, "image_size": cnn_size, "device": device},
        fracs=cnn_fracs, data=data)
    f4 = run_fig4(store, fracs=fracs, seeds=seeds, k=k,
                  probe_epochs=probe_epochs, cnn=cnn, device=device, progress=True,
                  on_config=lambda line: click.echo(line, err=True), subsets=subsets)
    click.echo(f"Data: {f4.data.text}. Store: {f4.store}.\n")
    click.echo("Fig. 4: malignancy accuracy (%), mean ± sd over seeds\n")
    _echo_figure(f4, out, csv_path)


@bench.command("table2", short_help="Table 2: ResNet vs ViT x end-to-end vs two-stage x init.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Patch file (default: data/phantom.h5).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results/table2"), show_default=True,
              help="Folder for the runs and stores the table needs.")
@seed_options(default_n=1)
@_PRESET
@click.option("--epochs", type=POSITIVE, default=None, help="Override the pretraining epochs.")
@click.option("--init-resnet", type=click.Path(dir_okay=False), default=None,
              help="Local ImageNet weights for the ResNet.")
@click.option("--init-vit", type=click.Path(dir_okay=False), default=None,
              help="Local ImageNet (DINO) weights for the ViT.")
@click.option("--vit-run", type=click.Path(path_type=Path), default=None,
              help="Reuse a finished pretraining run for the ViT two-stage row.")
@click.option("--cnn-epochs", type=POSITIVE, default=30, show_default=True)
@device_option()
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def table2(data: Path | None, out: Path, seeds: list[int], preset: str | None, epochs: int | None,
           init_resnet: str | None, init_vit: str | None, vit_run: Path | None,
           cnn_epochs: int, device: str | None, csv_path: Path | None) -> None:
    """Table 2: encoder (ResNet vs ViT) x strategy (end-to-end vs two-stage) x init."""
    from credanno.bench.table2 import Table2Pretraining, run_table2
    from credanno.paths import DEFAULT_PATCH_FILE

    setup = Table2Pretraining(preset=preset, init_resnet=init_resnet, init_vit=init_vit,
                              vit_run=vit_run, overrides={} if epochs is None else
                              {"epochs": epochs})
    t2 = run_table2(data or DEFAULT_PATCH_FILE, out, seeds=seeds, setup=setup,
                    cnn={"epochs": cnn_epochs, "device": device}, device=device,
                    progress=True, on_row=lambda line: click.echo(line, err=True))
    click.echo(f"Data: {t2.data.text}.\n")
    click.echo("Table 2: malignancy accuracy (%) with all annotations; paper column: real "
               "LIDC, ResNet-50 / ViT-S/16 at 224 px.\n")
    click.echo(t2.markdown())
    if csv_path:
        click.echo(f"\nwrote {t2.to_csv(csv_path)}")


@bench.command("perf")
@click.option("--quick", is_flag=True, help="Small sizes (seconds, for a smoke test).")
@click.option("--dir", "bench_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Benchmark folder (default: ./benchmarks).")
@click.option("--only", multiple=True, help="Run only these benchmarks (script names).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def perf(quick: bool, bench_dir: Path | None, only: tuple[str, ...],
         csv_path: Path | None) -> None:
    """Run every benchmarks/*.py that defines run(quick) and print one table of ratios."""
    from credanno.bench.perf import perf_markdown, run_perf
    from credanno.outputs import write_csv

    df = run_perf(bench_dir, quick=quick, only=only or None)
    click.echo(perf_markdown(df))
    click.echo("\nData: each benchmark builds its own synthetic arrays or stores (see its script).")
    if csv_path:
        click.echo(f"\nwrote {write_csv(df, csv_path, option='--csv', index=False)}")


@bench.command("gpu", short_help="The paper's GPU path: pretraining, embedding, k-NN, probes.")
@click.option("--dry-run", is_flag=True,
              help="The same code at toy sizes on the CPU (under 2 minutes; CI runs it).")
@device_option("GPU to measure: cuda or cuda:N (default: cuda when torch sees a GPU).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the rows (and the machine) as JSON.")
def gpu(dry_run: bool, device: str | None, out: Path | None) -> None:
    """Measure the paper-scale GPU path in one go (about 8 minutes on one GPU): paper-preset
    pretraining images/s (bf16, eager and torch.compile), peak memory, the projected
    300-epoch time; ViT-S/16 embedding images/s; faiss-gpu k-NN against the matmul floor;
    the probes on the GPU; DDP over every visible GPU when there is more than one.
    Installs nothing: without faiss GPU support the k-NN row is skipped with the reason."""
    from credanno.bench.gpu import bench_device, gpu_markdown, run_gpu_bench
    from credanno.bench.perf import machine_description
    from credanno.outputs import write_json

    where = bench_device(dry_run, device)   # no GPU and no --dry-run: one line, before work
    machine = machine_description()
    click.echo(f"Machine: {machine}", err=True)
    rows = run_gpu_bench(dry_run=dry_run, device=where,
                         on_row=lambda r: click.echo(f"  {r['metric']}: {r['value']}", err=True))
    click.echo(f"Machine: {machine}{' (dry run: toy sizes on the CPU)' if dry_run else ''}\n")
    click.echo(gpu_markdown(rows))
    if out:
        report = {"machine": machine, "dry_run": dry_run, "device": where, "rows": rows}
        click.echo(f"\nwrote {write_json(report, out, option='--out')}")


@bench.command("budget", short_help="Label efficiency: budgets x strategies x methods x seeds.")
@_STORE
@seed_options(default_n=3)
@click.option("--frac", "fracs", type=FRACS, default="0.005,0.01,0.02,0.05,0.1,1",
              show_default=True, help="Labelling budgets as label fractions, comma-separated.")
@click.option("--strategy", "strategies", multiple=True,
              help="Label-free strategies, repeatable or comma-separated (default: random, "
                   "kmeans, typiclust, probcover, coreset).")
@click.option("--method", "methods", default="knn,probe,semi", show_default=True,
              help="knn, probe and/or semi (probe + cRedAnno+ semi-supervised rounds).")
@click.option("--k", type=POSITIVE, default=10, show_default=True)
@click.option("--rounds", type=click.IntRange(0, 100), default=2, show_default=True,
              help="Semi-supervised rounds (half the budget seeded, half requested).")
@click.option("--kind", default="cls", show_default=True, help="Feature set.")
@_DEVICE
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("results/budget.png"), show_default=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def budget(store: Path | None, seeds: list[int], fracs: list[float],
           strategies: tuple[str, ...], methods: str, k: int, rounds: int,
           kind: str, device: str | None, out: Path, csv_path: Path | None) -> None:
    """Accuracy against the labelling budget per label-free strategy (a generalised
    Fig. 4, after cRedAnno+): k-NN, probe, probe + semi-supervised rounds."""
    from credanno.bench.budget import BUDGET_STRATEGIES, BudgetSpec, run_budget

    names = tuple(s.strip() for arg in strategies for s in arg.split(",") if s.strip())
    spec = BudgetSpec(fracs=tuple(fracs), strategies=names or BUDGET_STRATEGIES,
                      methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                      seeds=tuple(seeds), k=k, semi_rounds=rounds,
                      kind=kind, device=device)
    result = run_budget(store, spec)
    p = result.params
    click.echo(f"Store {p['store']} ({p['kind']}), {p['n_train']} training images; seeds "
               f"{list(seeds)}; {p['seconds']:.1f} s.\n")
    click.echo("Malignancy accuracy (%), mean ± sd over seeds\n")
    _echo_figure(result, out, csv_path)
