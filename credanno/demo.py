"""The whole cRedAnno pipeline in one call, everything under one folder, with ``report.md``.

prepare (phantom) -> pretrain (DINO; ``cpu-tiny`` on a CPU, ``paper`` on a GPU) -> embed
(the teacher, plus two baselines: the same architecture with random weights, and raw
pixels) -> k-NN and trained predictors over the paper's label fractions and seeds ->
t-SNE (Fig. 3) -> Table 1, Fig. 2, Fig. 4 -> ``report.md`` that links the figures and
compares pretrained, random and pixel features on malignancy.

Every stage reuses what an earlier call left in the folder (the patch file, a finished
pretraining run, stores newer than their inputs), so a second call only redoes the
evaluation and pictures. Layout of ``out``::

    data/<source>.h5     runs/demo/       stores/{teacher,random,pixels}.h5
    figures/*.png        tables/*.csv     report.md
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from credanno._atomic import atomic_path, writable_folder
from credanno.errors import CredannoWarning
from credanno.numerics import mean_sd
from credanno.outputs import md_code, md_text

#: label fractions of the demo's Fig. 4 for k-NN and the trained predictors (seconds each)
DEMO_FRACS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
#: the fractions the end-to-end CNN trains on in the demo: the paper's 1%, 10% and 100%
DEMO_CNN_FRACS: tuple[float, ...] = (0.01, 0.1, 1.0)
#: a cheap end-to-end CNN for the demo's Fig. 4 (the bench default trains 30 epochs)
DEMO_CNN: dict[str, Any] = {"arch": "resnet18", "epochs": 4, "min_steps": 40}
#: the three encoders the report compares
ENCODERS: tuple[tuple[str, str], ...] = (
    ("teacher", "DINO-pretrained teacher"),
    ("random", "same architecture, random weights"),
    ("pixels", "raw pixels"),
)


@dataclass
class DemoResult:
    out: Path
    report: Path
    stores: dict[str, Path]
    figures: dict[str, Path]
    tables: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return float(sum(self.timings.values()))


class _Stages:
    """Times each stage and reports one progress line when it starts and ends."""

    def __init__(self, n: int, on_stage: Callable[[str], None] | None):
        self.n, self.i, self.on_stage = n, 0, on_stage
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.i += 1
        if self.on_stage:
            self.on_stage(f"[{self.i}/{self.n}] {name} ...")
        t0 = time.perf_counter()
        # tiny label fractions on purpose leave classes unlabelled and clamp k: collect
        # those warnings for the report instead of flooding the terminal
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CredannoWarning)
            value = fn()
        for w in caught:
            if issubclass(w.category, CredannoWarning):
                self.warnings.append(f"{name.split(' (')[0]}: {w.message}")
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        self.timings[name] = time.perf_counter() - t0
        if self.on_stage:
            self.on_stage(f"[{self.i}/{self.n}] {name}: done in {self.timings[name]:.1f} s")
        return value


def _fresh(path: Path, *inputs: Path) -> bool:
    """``path`` exists and is newer than every input (so it can be reused)."""
    if not path.exists():
        return False
    mtime = path.stat().st_mtime
    return all(mtime >= p.stat().st_mtime for p in inputs if p.exists())


def run_demo(out: str | os.PathLike = "demo", seeds: int | Sequence[int] = 3,
             device: str | None = None, source: str = "phantom",
             data: str | os.PathLike | None = None, preset: str | None = None,
             pretrain_overrides: dict[str, Any] | None = None,
             fracs: Sequence[float] = DEMO_FRACS, cnn_fracs: Sequence[float] | None = None,
             cnn: dict[str, Any] | None = None,
             probe_epochs: int = 100, perplexity: float = 30.0,
             progress: bool = False,
             on_stage: Callable[[str], None] | None = None) -> DemoResult:
    """Run the pipeline into ``out`` and write ``out/report.md``.

    ``data``: use this patch file instead of preparing ``source``; ``preset`` and
    ``pretrain_overrides``: the pretraining configuration (default: ``cpu-tiny`` on a CPU,
    ``paper`` on a GPU); ``cnn``: settings of the end-to-end baseline in Fig. 4.
    """
    from credanno.bench.fig2 import fig2_from_table1
    from credanno.bench.fig4 import CnnBaseline, run_fig4
    from credanno.bench.table1 import run_table1
    from credanno.embed import embed
    from credanno.errors import CredannoError
    from credanno.pretrain import load_config, pretrain
    from credanno.runtime import resolve_device
    from credanno.viz import save_figure, tsne_figure, tsne_map

    out = Path(out)
    if data is not None and not Path(data).exists():
        raise CredannoError(f"patch file {data} not found; pass an existing --data or leave it "
                            "out to prepare the phantom")
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise CredannoError("the demo needs at least one seed; pass --seeds 1 or more")
    writable_folder(out)  # fail now, not after minutes of pretraining
    figures_dir, tables_dir, stores_dir = out / "figures", out / "tables", out / "stores"
    dev = resolve_device(device)  # fails now, not after the patch file and pretraining
    st = _Stages(8, on_stage)
    cached: dict[str, bool] = {}

    # 1. the patch file
    def _prepare() -> Path:
        if data is not None:
            cached["prepare"] = True
            return Path(data)
        from credanno.data import prepare, read_patch_file

        path = out / "data" / f"{source}.h5"
        if path.exists():
            # prepare() always rebuilds; a readable file of the same source is reused, so
            # that the run and stores made from it stay valid
            try:
                if read_patch_file(path, images=False).attrs.get("source") == source:
                    cached["prepare"] = True
                    return path
            except CredannoError:
                pass
        res = prepare(source=source, out=path, progress=progress)
        cached["prepare"] = False
        return Path(res.path)

    patch = st.run(f"prepare ({'given patch file' if data is not None else source})", _prepare)

    # 2. DINO pretraining (resumes, or returns at once when the run is finished)
    cfg = load_config(preset=preset, overrides={"data": str(patch),
                                                "out": str(out / "runs" / "demo"),
                                                "device": device,
                                                **(pretrain_overrides or {})})

    def _pretrain():
        res = pretrain(cfg, progress=progress)
        cached["pretrain"] = res.resumed_from >= cfg.epochs
        return res

    run = st.run(f"pretrain ({cfg.preset}: {cfg.arch}, {cfg.epochs} epochs)", _pretrain)

    # 3. the three feature stores
    def _embed() -> dict[str, Path]:
        paths = {name: stores_dir / f"{name}.h5" for name, _ in ENCODERS}
        kwargs = {"teacher": {"checkpoint": run.checkpoint, "which": "teacher"},
                  "random": {"checkpoint": run.checkpoint, "which": "random"},
                  "pixels": {"encoder": "pixels"}}
        for name, path in paths.items():
            inputs = (patch, Path(run.checkpoint)) if name != "pixels" else (patch,)
            if _fresh(path, *inputs):
                cached[f"embed {name}"] = True
                continue
            embed(data=patch, out=path, device=dev, progress=progress, **kwargs[name])
            cached[f"embed {name}"] = False
        return paths

    store_paths = st.run("embed (teacher, random weights, raw pixels)", _embed)

    # 4. Table 1 on every store
    def _table1():
        return {name: run_table1(path, seeds=seeds, probe_epochs=probe_epochs, device=dev,
                                 method_name=f"credanno ({name})")
                for name, path in store_paths.items()}

    t1 = st.run(f"k-NN and trained predictors ({len(seeds)} seeds, 3 encoders)", _table1)

    # 5. t-SNE pictures
    def _tsne() -> dict[str, Path]:
        maps = {name: tsne_map(path, split="test", perplexity=perplexity,
                               cache_root=out / "cache")
                for name, path in store_paths.items()}
        src = t1["teacher"].data.text
        m = maps["teacher"]
        figs = {"tsne": save_figure(tsne_figure(
            m.coords, m.table, "all",
            caption=f"Data: {src}. Teacher features of the {len(m)} test images, openTSNE "
                    f"(perplexity {m.params['perplexity']:g}, seed 0)."),
            figures_dir / "tsne.png")}
        figs["tsne_compare"] = save_figure(_compare_figure(maps, src),
                                           figures_dir / "tsne_malignancy_compare.png")
        return figs

    figures = st.run("t-SNE (Fig. 3)", _tsne)

    # 6. Fig. 2 from the teacher's sweeps
    def _fig2():
        f2 = fig2_from_table1(t1["teacher"])
        figures["fig2"] = save_figure(f2.figure(), figures_dir / "fig2.png")
        f2.to_csv(tables_dir / "fig2.csv", option="--out")
        return f2

    f2 = st.run("Fig. 2", _fig2)

    # 7. Fig. 4 with the end-to-end CNN on the same subsets
    def _fig4():
        baseline = CnnBaseline({**DEMO_CNN, "device": dev, **(cnn or {})}, data=patch,
                               fracs=[f for f in (cnn_fracs or DEMO_CNN_FRACS) if f in fracs]
                               or fracs)
        f4 = run_fig4(store_paths["teacher"], fracs=fracs, seeds=seeds,
                      probe_epochs=probe_epochs, cnn=baseline, device=dev)
        figures["fig4"] = save_figure(f4.figure(), figures_dir / "fig4.png")
        f4.to_csv(tables_dir / "fig4.csv", option="--out")
        return f4

    f4 = st.run("Fig. 4 (with an end-to-end CNN baseline)", _fig4)

    # 8. tables and report
    def _report() -> Path:
        for name, res in t1.items():
            res.to_csv(tables_dir / f"table1_{name}.csv", option="--out")
        text = _report_text(out, t1, f2, f4, figures, cfg, run, patch, seeds, st.timings,
                            cached, st.warnings)
        path = out / "report.md"
        with atomic_path(path, option="--out") as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    report = st.run("report", _report)
    # the report's timing table cannot include the report stage itself; it takes < 1 s
    return DemoResult(out=out, report=report, stores=store_paths, figures=figures,
                      tables={"table1": t1, "fig2": f2, "fig4": f4}, timings=st.timings,
                      cached=cached, warnings=st.warnings)


def _compare_figure(maps: dict, caption_source: str):
    """Malignancy on the t-SNE maps of the three encoders, side by side."""
    from matplotlib.figure import Figure

    from credanno.labels import label_spec
    from credanno.viz.figures import plot_tsne_panel

    spec = label_spec("malignancy")
    fig = Figure(figsize=(3.8 * len(maps), 4.6), layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False).ravel()
    titles = dict(ENCODERS)
    for ax, (name, m) in zip(axes, maps.items(), strict=True):
        plot_tsne_panel(ax, m.coords, m.table["malignancy"].to_numpy(), spec,
                        title=titles.get(name, name))
    fig.suptitle("Malignancy of the test images on each encoder's t-SNE map", fontsize=12)
    fig.text(0.5, -0.01, f"Data: {caption_source}.", ha="center", va="top", fontsize=9,
             color="#444444")
    return fig


def malignancy_comparison(t1: dict) -> pd.DataFrame:
    """Malignancy accuracy (fraction) of each Table 1 configuration for each encoder.

    Rows are the settings in Table 1's order; columns ``<encoder>`` hold the mean over
    seeds and ``<encoder>_sd`` the sd (NaN with one seed)."""
    recs = []
    for name, res in t1.items():
        r = res.rows
        r = r[(r["source"] == "ours") & (r["label"] == "malignancy")]
        for _, row in r.iterrows():
            recs.append({"setting": row["setting"], "encoder": name, "acc": row["acc_mean"],
                         "sd": row["acc_sd"] if row["n_seeds"] > 1 else np.nan})
    df = pd.DataFrame(recs)
    order = list(dict.fromkeys(df["setting"]))
    names = [n for n, _ in ENCODERS if n in t1]
    acc = df.pivot(index="setting", columns="encoder", values="acc").reindex(order)[names]
    sd = df.pivot(index="setting", columns="encoder", values="sd").reindex(order)[names]
    return pd.concat([acc, sd.add_suffix("_sd")], axis=1)


def comparison_verdict(comp: pd.DataFrame) -> str:
    """One sentence: in how many settings the teacher beats each baseline (mean over seeds)."""
    if "teacher" not in comp:
        return ""
    parts = []
    for name, words in ENCODERS[1:]:
        if name in comp:
            wins = int((comp["teacher"] > comp[name]).sum())
            parts.append(f"{words} in {wins} of {len(comp)}")
    return "The pretrained teacher beats " + " and ".join(parts) + " settings."


def _notes_md(notes: list[str]) -> str:
    if not notes:
        return ""
    unique = list(dict.fromkeys(notes))
    return ("Warnings raised on the way (expected with 1% of the labels: some classes get no "
            "labelled example, and k is clamped to the labelled images):\n\n"
            + "\n".join(f"- {md_text(n)}" for n in unique) + "\n\n")


def _report_text(out: Path, t1: dict, f2, f4, figures: dict[str, Path], cfg, run, patch: Path,
                 seeds: list[int], timings: dict[str, float], cached: dict[str, bool],
                 notes: list[str]) -> str:
    teacher = t1["teacher"]
    data = teacher.data
    rel = {k: os.path.relpath(v, out) for k, v in figures.items()}
    warn = ("" if data.is_real else
            f"> **{data.text}.** Nothing in this report is a result on real CT; see the "
            "paper's rows for those, and run on LIDC-IDRI (`credanno prepare --source lidc`) "
            "for your own.\n\n")
    comp = malignancy_comparison(t1)
    names = [c for c in comp.columns if not c.endswith("_sd")]
    comp_md = ["| setting | " + " | ".join(dict(ENCODERS)[c] for c in names) + " |",
               "|---|" + "---:|" * len(names)]
    for setting, row in comp.iterrows():
        cells = [mean_sd(row[c], row[f"{c}_sd"]) for c in names]
        comp_md.append(f"| {setting} | " + " | ".join(cells) + " |")
    base = teacher.rows[(teacher.rows["source"] == "baseline")
                        & (teacher.rows["label"] == "malignancy")]["acc_mean"]
    total = sum(timings.values())
    time_md = ["| stage | seconds | reused |", "|---|---:|---|"]
    for name, secs in timings.items():
        key = name.split(" (")[0]
        reused = [v for k, v in cached.items() if k.startswith(key)]
        time_md.append(f"| {md_text(name)} | {secs:.1f} | "
                       f"{'yes' if reused and all(reused) else ''} |")
    time_md.append(f"| **total (before writing this report)** | **{total:.1f}** | |")
    loss = ""
    if getattr(run, "metrics", None):
        first, last = run.metrics[0], run.metrics[-1]
        if "loss" in first and "loss" in last:
            loss = f" DINO loss {first['loss']:.3f} (epoch 1) -> {last['loss']:.3f} (epoch " \
                   f"{last.get('epoch', len(run.metrics))})."
    return f"""# credanno demo report

{warn}Patch file: {md_code(patch)} ({data.text}); {teacher.n_nodules} nodules, \
{teacher.n_test_images} test images. Pretraining: preset {md_code(cfg.preset)}, \
{md_code(cfg.arch)} {md_text(cfg.model_kwargs or '')}, {cfg.epochs} epochs, \
run {md_code(run.run_dir)}.{loss} \
Seeds: {seeds}. Accuracies in %, mean ± sd over seeds (no ± where the seeds agree exactly, \
as k-NN with all labels always does); attributes count as correct within \
±1 of the median rating, malignancy exactly (the paper's metric).

## Does pretraining help? Malignancy accuracy by encoder

The same k-NN and trained predictors on three feature stores: the DINO-pretrained teacher,
the same architecture with random weights, and the raw pixels. The best constant
prediction scores {mean_sd(float(base.iloc[0])) if len(base) else '?'}.

{chr(10).join(comp_md)}

{comparison_verdict(comp)}

![t-SNE of the three encoders, coloured by malignancy]({rel['tsne_compare']})

## Table 1 (pretrained teacher) beside the paper's rows

Our rows are on {data.text}; the paper's rows are on real LIDC-IDRI as published.

{teacher.markdown()}

{teacher.exact_markdown()}

## Fig. 3: t-SNE of the teacher's test features

![t-SNE coloured by malignancy and the seven attributes]({rel['tsne']})

## Fig. 2: number of correctly predicted attributes

{f2.markdown()}

![Fig. 2]({rel['fig2']})

## Fig. 4: annotation reduction

{f4.markdown()}

![Fig. 4]({rel['fig4']})

{f4.caption(markdown=True)}

## Stages

{chr(10).join(time_md)}

{_notes_md(notes)}Tables as CSV are in `tables/`; the stores in `stores/` can be read with
`credanno.stores.open(...)` for your own analyses. Re-running `credanno demo` reuses the
patch file, the finished pretraining run and the stores.
"""
