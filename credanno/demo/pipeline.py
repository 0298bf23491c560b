"""The demo's stages, declared in one list, and :func:`run_demo` that runs them.

Each stage function takes the :class:`_Demo` state, reads the results of earlier stages
from it and stores its own there; the paths every stage writes are fixed up front by
:func:`_paths`, so the stage list can name each stage's inputs and outputs before anything
runs (see :mod:`credanno.demo.stages` for the freshness rule).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from credanno._atomic import atomic_path, writable_folder
from credanno.bench.compare import ENCODERS, encoder_tsne_figure
from credanno.demo.report import ReportInputs, report_text
from credanno.demo.stages import Freshness, Stage, StageRunner
from credanno.errors import CredannoError

#: label fractions of the demo's Fig. 4 for k-NN and the trained predictors (seconds each)
DEMO_FRACS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
#: the fractions the end-to-end CNN trains on in the demo: the paper's 1%, 10% and 100%
DEMO_CNN_FRACS: tuple[float, ...] = (0.01, 0.1, 1.0)
#: a cheap end-to-end CNN for the demo's Fig. 4 (the bench default trains 30 epochs)
DEMO_CNN: dict[str, Any] = {"arch": "resnet18", "epochs": 4, "min_steps": 40}
#: the demo's reduced budget grid (``credanno bench budget`` runs 0.5%..100%): the two
#: budgets the report compares strategies at, k-NN and the probe only (seconds, not minutes)
DEMO_BUDGET_FRACS: tuple[float, ...] = (0.01, 0.1)
DEMO_BUDGET_METHODS: tuple[str, ...] = ("knn", "probe")
#: how each store is embedded (the checkpoint is added for the first two)
_EMBED: dict[str, dict[str, Any]] = {"teacher": {"which": "teacher"},
                                     "random": {"which": "random"},
                                     "pixels": {"encoder": "pixels"}}


@dataclass(frozen=True)
class DemoSpec:
    """What the demo runs; :func:`run_demo` takes it, ``credanno demo`` builds it.

    ``seeds``: a number of seeds (``3`` = seeds 0, 1, 2) or the seeds themselves;
    ``data``: use this patch file instead of preparing ``source``; ``preset`` and
    ``pretrain_overrides``: the pretraining configuration (default: ``cpu-tiny`` on a CPU,
    ``paper`` on a GPU); ``fracs``: label fractions of Fig. 4; ``cnn`` and ``cnn_fracs``:
    settings and fractions of its end-to-end baseline; ``probe_epochs``: of the trained
    predictors; ``perplexity``: of the t-SNE maps.
    """

    seeds: int | Sequence[int] = 3
    device: str | None = None
    source: str = "phantom"
    data: str | os.PathLike | None = None
    preset: str | None = None
    pretrain_overrides: Mapping[str, Any] | None = None
    fracs: Sequence[float] = DEMO_FRACS
    cnn_fracs: Sequence[float] | None = None
    cnn: Mapping[str, Any] | None = None
    probe_epochs: int = 100
    perplexity: float = 30.0

    def __post_init__(self) -> None:
        if self.data is not None and not Path(self.data).exists():
            raise CredannoError(f"patch file {self.data} not found; pass an existing --data or "
                                "leave it out to prepare the phantom")
        if not self.seed_list:
            raise CredannoError("the demo needs at least one seed; pass --n-seeds 1 or more")

    @property
    def seed_list(self) -> list[int]:
        if isinstance(self.seeds, int):
            return list(range(self.seeds))
        return [int(s) for s in self.seeds]


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
    def report_html(self) -> Path:
        """The same report as one offline HTML file, with the teacher's explorer."""
        return self.report.with_suffix(".html")

    @property
    def wall_s(self) -> float:
        return float(sum(self.timings.values()))


@dataclass
class _Demo:
    """The state the stages share: the spec, fixed paths, and each stage's results."""

    spec: DemoSpec
    out: Path
    device: str
    cfg: Any  # credanno.pretrain.PretrainConfig
    progress: bool
    patch: Path
    checkpoint: Path
    stores: dict[str, Path]
    run: Any = None  # credanno.pretrain.RunResult
    t1: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    f2: Any = None
    f4: Any = None
    budget: Any = None  # credanno.bench.budget.BudgetResult
    recipes: Any = None  # credanno.bench.recipes.RecipeComparison

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)


def run_demo(out: str | os.PathLike = "demo", spec: DemoSpec | None = None, *,
             progress: bool = False,
             on_stage: Callable[[str], None] | None = None) -> DemoResult:
    """Run the pipeline described by ``spec`` (default: :class:`DemoSpec`'s defaults) into
    ``out`` and write ``out/report.md``; ``on_stage`` gets one line as each stage starts and
    one as it ends, ``progress`` shows progress bars within stages."""
    d = _setup(Path(out), spec or DemoSpec(), progress)
    runner = StageRunner(Freshness(d.path("cache", "stages")), on_stage)
    runner.run_all(declare_stages(d, runner))
    # the report's timing table cannot include the report stage itself; it takes < 1 s
    return DemoResult(out=d.out, report=d.path("report.md"), stores=d.stores,
                      figures=d.figures, tables={"table1": d.t1, "fig2": d.f2, "fig4": d.f4,
                              "budget": d.budget, "recipes": d.recipes},
                      timings=runner.timings, cached=runner.reused, warnings=runner.warnings)


def _setup(out: Path, spec: DemoSpec, progress: bool) -> _Demo:
    """Check what can fail early (before minutes of pretraining) and fix every path."""
    from credanno.pretrain import load_config
    from credanno.pretrain.checkpoint import CHECKPOINT_NAME
    from credanno.runtime import resolve_device

    writable_folder(out)
    device = resolve_device(spec.device)
    patch = Path(spec.data) if spec.data is not None else out / "data" / f"{spec.source}.h5"
    cfg = load_config(preset=spec.preset, overrides={"data": str(patch),
                                                     "out": str(out / "runs" / "demo"),
                                                     "device": spec.device,
                                                     **(spec.pretrain_overrides or {})})
    return _Demo(spec=spec, out=out, device=device, cfg=cfg, progress=progress, patch=patch,
                 checkpoint=Path(cfg.out) / CHECKPOINT_NAME,
                 stores={name: out / "stores" / f"{name}.h5" for name, _ in ENCODERS})


def declare_stages(d: _Demo, runner: StageRunner) -> list[Stage]:
    """The demo's stages in order, with what each reads and writes.

    Only ``prepare`` and the three ``embed`` parts declare outputs, so only they can be
    reused; the other stages' results are needed in memory by the report, and their
    ``inputs`` say what they read. The report stage reads the ``runner``'s timings."""
    spec, cfg = d.spec, d.cfg
    if spec.data is not None:
        prepare = Stage("prepare", run=lambda: True, title="prepare (given patch file)")
    else:
        prepare = Stage("prepare", run=partial(_prepare, d), outputs=(d.patch,),
                        params={"source": spec.source}, title=f"prepare ({spec.source})",
                        adopt=partial(_is_patch_file_of, d.patch, spec.source))
    embeds = tuple(
        Stage(f"embed {name}", run=partial(_embed, d, name), outputs=(d.stores[name],),
              inputs=(d.patch,) if name == "pixels" else (d.patch, d.checkpoint),
              params=_EMBED[name])
        for name in d.stores)
    return [
        prepare,
        Stage("pretrain", run=partial(_pretrain, d), inputs=(d.patch,),
              title=f"pretrain ({cfg.preset}: {cfg.arch}, {cfg.epochs} epochs)"),
        Stage("embed", parts=embeds, title="embed (teacher, random weights, raw pixels)"),
        Stage("table1", run=partial(_table1, d), inputs=tuple(d.stores.values()),
              title=f"k-NN and trained predictors ({len(spec.seed_list)} seeds, 3 encoders)"),
        Stage("tsne", run=partial(_tsne, d), inputs=tuple(d.stores.values()),
              title="t-SNE (Fig. 3)"),
        Stage("fig2", run=partial(_fig2, d), title="Fig. 2"),
        Stage("fig4", run=partial(_fig4, d), inputs=(d.patch, d.stores["teacher"]),
              title="Fig. 4 (with an end-to-end CNN baseline)"),
        Stage("recipes", run=partial(_recipes, d), inputs=(d.stores["teacher"],),
              title="probe recipes (tuned vs the paper's, 1%, 10%, 100%)"),
        Stage("budget", run=partial(_budget, d), inputs=(d.stores["teacher"],),
              title="labelling budget (label-free strategies vs random, 1% and 10%)"),
        Stage("report", run=partial(_report, d, runner), inputs=tuple(d.stores.values())),
    ]


def _prepare(d: _Demo) -> None:
    from credanno.data import prepare

    prepare(source=d.spec.source, out=d.patch, progress=d.progress)


def _is_patch_file_of(path: Path, source: str) -> bool:
    """``path`` is a readable patch file of ``source`` (prepare() always rebuilds; keeping
    it keeps the pretraining run and stores made from it valid)."""
    from credanno.data import read_patch_file

    try:
        return read_patch_file(path, images=False).attrs.get("source") == source
    except CredannoError:
        return False


def _pretrain(d: _Demo) -> bool:
    """DINO pretraining; it resumes, or returns at once when the run is finished."""
    from credanno.pretrain import pretrain

    d.run = pretrain(d.cfg, progress=d.progress)
    return d.run.resumed_from >= d.cfg.epochs


def _embed(d: _Demo, name: str) -> None:
    from credanno.embed import embed

    kwargs = dict(_EMBED[name])
    if name != "pixels":
        kwargs["checkpoint"] = d.checkpoint
    embed(data=d.patch, out=d.stores[name], device=d.device, progress=d.progress, **kwargs)


def _table1(d: _Demo) -> None:
    """Table 1 on every store."""
    from credanno.bench.table1 import run_table1

    d.t1 = {name: run_table1(path, seeds=d.spec.seed_list, probe_epochs=d.spec.probe_epochs,
                             device=d.device, method_name=f"credanno ({name})")
            for name, path in d.stores.items()}


def _tsne(d: _Demo) -> None:
    """Fig. 3 on the teacher, and malignancy on every encoder's map side by side."""
    from credanno.viz import save_figure, tsne_figure, tsne_map

    maps = {name: tsne_map(path, split="test", perplexity=d.spec.perplexity,
                           cache_root=d.path("cache"))
            for name, path in d.stores.items()}
    src = d.t1["teacher"].data.text
    m = maps["teacher"]
    d.figures["tsne"] = save_figure(tsne_figure(
        m.coords, m.table, "all",
        caption=f"Data: {src}. Teacher features of the {len(m)} test images, openTSNE "
                f"(perplexity {m.params['perplexity']:g}, seed 0)."),
        d.path("figures", "tsne.png"))
    d.figures["tsne_compare"] = save_figure(encoder_tsne_figure(maps, src),
                                            d.path("figures", "tsne_malignancy_compare.png"))


def _fig2(d: _Demo) -> None:
    """Fig. 2 from the teacher's sweeps."""
    from credanno.bench.fig2 import fig2_from_table1
    from credanno.viz import save_figure

    d.f2 = fig2_from_table1(d.t1["teacher"])
    d.figures["fig2"] = save_figure(d.f2.figure(), d.path("figures", "fig2.png"))
    d.f2.to_csv(d.path("tables", "fig2.csv"), option="--out")


def _fig4(d: _Demo) -> None:
    """Fig. 4, with the end-to-end CNN trained on the same label subsets."""
    from credanno.bench.fig4 import CnnBaseline, run_fig4
    from credanno.viz import save_figure

    spec = d.spec
    cnn_fracs = ([f for f in (spec.cnn_fracs or DEMO_CNN_FRACS) if f in spec.fracs]
                 or spec.fracs)
    baseline = CnnBaseline({**DEMO_CNN, "device": d.device, **(spec.cnn or {})},
                           data=d.patch, fracs=cnn_fracs)
    d.f4 = run_fig4(d.stores["teacher"], fracs=spec.fracs, seeds=spec.seed_list,
                    probe_epochs=spec.probe_epochs, cnn=baseline, device=d.device)
    d.figures["fig4"] = save_figure(d.f4.figure(), d.path("figures", "fig4.png"))
    d.f4.to_csv(d.path("tables", "fig4.csv"), option="--out")


def _recipes(d: _Demo) -> None:
    """Both probe recipes on the teacher at 1%, 10% and 100% labels."""
    from credanno.bench.recipes import run_recipes

    d.recipes = run_recipes(d.stores["teacher"], seeds=d.spec.seed_list, device=d.device)
    d.recipes.to_csv(d.path("tables", "probe_recipes.csv"), option="--out")


def _budget(d: _Demo) -> None:
    """``bench budget`` on the teacher, on the demo's reduced grid."""
    from credanno.bench.budget import BudgetSpec, run_budget
    from credanno.viz import save_figure

    spec = BudgetSpec(fracs=DEMO_BUDGET_FRACS, methods=DEMO_BUDGET_METHODS,
                      seeds=tuple(d.spec.seed_list), device=d.device)
    d.budget = run_budget(d.stores["teacher"], spec)
    d.figures["budget"] = save_figure(d.budget.figure("knn"), d.path("figures", "budget.png"))
    d.budget.to_csv(d.path("tables", "budget.csv"), option="--out")


def _report(d: _Demo, runner: StageRunner) -> None:
    """The Table 1 CSVs, ``report.md`` and ``report.html``."""
    for name, res in d.t1.items():
        res.to_csv(d.path("tables", f"table1_{name}.csv"), option="--out")
    text = report_text(ReportInputs(
        out=d.out, t1=d.t1, f2=d.f2, f4=d.f4, budget=d.budget, recipes=d.recipes,
        figures=d.figures, cfg=d.cfg,
        run=d.run, patch=d.patch, seeds=d.spec.seed_list, timings=runner.timings,
        reused=runner.reused, notes=runner.warnings))
    with atomic_path(d.path("report.md"), option="--out") as tmp:
        tmp.write_text(text, encoding="utf-8")
    _report_html(d, text)


def _report_html(d: _Demo, text: str) -> None:
    """``report.html``: the same report, figures inlined, with the teacher's explorer (its
    t-SNE map is the one the tsne stage cached, so this takes seconds)."""
    from credanno.demo.report_html import report_html
    from credanno.viz.explorer import explorer_page

    page = explorer_page(d.stores["teacher"], split="test", perplexity=d.spec.perplexity,
                         cache_root=d.path("cache"))
    with atomic_path(d.path("report.html"), option="--out") as tmp:
        tmp.write_text(report_html(text, d.out, page.html), encoding="utf-8")
