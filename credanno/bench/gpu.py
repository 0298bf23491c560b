"""``credanno bench gpu``: the paper's GPU path measured by one prepared command (issue 14).

On a CUDA machine (within about 8 minutes): paper-preset DINO pretraining images/s in bf16
(steady state after warm-up, eager and ``torch.compile``), peak GPU memory and the projected
300-epoch time on 1,904 patches; ViT-S/16 embedding images/s (``embed()``, bf16 autocast);
exact k-NN with faiss on the GPU (1M x 384 bank, 10k queries, k = 250) against the floor of
a torch matmul + topk on the same GPU; the joint linear probes on the GPU against the CPU;
DDP over every visible GPU when there is more than one (a ``torchrun`` subprocess).

``dry_run=True`` runs the same code at toy sizes on the CPU (CI runs it): the paper preset
with a one-block, 64-wide ViT at 64/32 px, ViT-S/16 on a few images, a small k-NN bank,
short probes, 2 Gloo ranks for DDP, and ``aot_eager`` instead of inductor for the compile
row (inductor's C++ build of a ViT takes minutes on 2 cores).

Rows are as in ``benchmarks/`` (``benchmark, metric, value, reference, ratio, target, ok``)
plus ``id`` (stable, for tests and JSON readers), ``seconds`` and ``note`` (why a row was
skipped or failed; its value is then None). Nothing is installed here: the faiss row says
``install faiss-gpu-cu12`` when the installed faiss has no GPU support.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from credanno import runtime
from credanno.errors import CredannoError

BENCHMARK = "gpu"
N_TRAIN = 1904              # the paper's training patches
PAPER_BATCH, PAPER_EPOCHS = 128, 300
TARGET_IMAGES_S = 1900      # 300 epochs on 1,904 patches in <= 5 minutes
AUTHORS_IMAGES_S = 100      # the authors' DINO pretraining, per GPU (reference, not measured)
ROW_IDS = ("pretrain_eager", "pretrain_compile", "peak_memory", "projected_run", "embed",
           "knn", "probes", "ddp")


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is: the paper's on a GPU, toy ones for ``--dry-run``."""

    overrides: dict[str, Any] = field(default_factory=dict)   # on top of the paper preset
    n_train: int = N_TRAIN
    warmup: int = 5
    steps: int = 20
    compile_backend: str | None = None   # None: torch.compile's default (inductor)
    embed_images: int = 8192
    embed_batch: int = 512
    knn: tuple[int, int, int, int] = (1_000_000, 10_000, 384, 250)   # bank, queries, dim, k
    probe: tuple[int, int, int] = (1904, 1536, 100)                  # rows, dim, epochs
    ddp_ranks: int | None = None         # None: every visible GPU


FULL = Sizes()
DRY = Sizes(overrides={"model_kwargs": {"depth": 1, "embed_dim": 64, "num_heads": 2},
                       "img_size": 64, "global_size": 64, "local_size": 32, "out_dim": 256,
                       "head_hidden_dim": 64, "head_bottleneck_dim": 32, "eval_resize": 64,
                       "eval_crop": 64, "batch_size": 8},
            n_train=64, warmup=1, steps=2, compile_backend="aot_eager", embed_images=4,
            embed_batch=4, knn=(4096, 256, 384, 250), probe=(256, 64, 5), ddp_ranks=2)


def _row(rid: str, metric: str, value: float | None, reference: float | None = None,
         target: str = "info", ok: bool | None = True, note: str = "") -> dict[str, Any]:
    ratio = value / reference if value is not None and reference else None
    return {"benchmark": BENCHMARK, "id": rid, "metric": metric,
            "value": None if value is None else float(value),
            "reference": None if reference is None else float(reference),
            "ratio": None if ratio is None else round(ratio, 3), "target": target,
            "ok": ok, "seconds": None, "note": note}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# -- pretraining ---------------------------------------------------------------------------
def _patch_file(folder: Path, n_train: int) -> Path:
    from credanno.data.patchfile import write_patch_file
    from credanno.synthetic import synthetic_images, synthetic_table

    table = synthetic_table(n_nodules=max(4, n_train // 2), per_nodule=3, test_frac=0.3, seed=0)
    keep = table.index[table["split"] == "train"][:n_train]
    table = table.loc[keep].reset_index(drop=True)
    return write_patch_file(folder / "bench.h5", synthetic_images(table), table,
                            {"source": "synthetic"})


def _config(data: Path, out: Path, device: str, sizes: Sizes, compile_: bool):
    from credanno.pretrain.config import load_config

    return load_config("paper", overrides={
        "data": str(data), "out": str(out), "device": device, "amp": "bf16",
        "compile": compile_ and sizes.compile_backend is None, **sizes.overrides})


def trainer_images_per_s(trainer, steps: int, warmup: int) -> float:
    """Training images/s of ``trainer`` (global batch over its ranks) after ``warmup`` steps."""
    import torch

    cfg, device = trainer.cfg, str(trainer.device)
    order = torch.randperm(trainer.n, generator=runtime.generator(0))
    start = 0.0
    for s in range(warmup + steps):
        if s == warmup:
            _sync(device)
            start = time.perf_counter()
        first = (s * cfg.batch_size) % (trainer.n - cfg.batch_size + 1)
        batch = order[first:first + cfg.batch_size]
        loss = trainer.train_step(1, s, runtime.shard(batch, trainer.env))
    _sync(device)
    seconds = time.perf_counter() - start
    if not math.isfinite(float(loss)):
        raise CredannoError(f"the benchmark's training loss became {float(loss)}")
    return steps * cfg.batch_size / seconds


def _peak_memory_gib(device: str) -> tuple[float, float | None, str]:
    """Peak memory of the process: GPU allocations on a GPU, the CPU's max RSS otherwise."""
    if device.startswith("cuda"):
        import torch

        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return torch.cuda.max_memory_allocated() / 2**30, total / 2**30, "GPU allocated"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib / 2**20, None, "CPU max RSS"


def pretrain_rows(device: str, sizes: Sizes, folder: Path) -> list[dict[str, Any]]:
    """Eager and compiled paper-preset training in bf16, peak memory, the projected run."""
    import torch

    from credanno.pretrain.train import Trainer

    data = _patch_file(folder, sizes.n_train)
    rates: dict[bool, float] = {}
    for compile_ in (False, True):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        cfg = _config(data, folder / f"run-{compile_}", device, sizes, compile_)
        trainer = Trainer(cfg, runtime.DistEnv(device=runtime.torch_device(device)))
        if compile_ and sizes.compile_backend is not None:   # the trainer's compile, cheaper
            for model in (trainer.student.backbone, trainer.teacher.backbone):
                model.compile(backend=sizes.compile_backend)
        warmup = sizes.warmup + (3 if compile_ else 0)   # both crop sizes, then recompiles
        rates[compile_] = trainer_images_per_s(trainer, sizes.steps, warmup)
        if not compile_:
            peak, total, what = _peak_memory_gib(device)
        del trainer
    label = f"paper preset, bf16, batch {cfg.batch_size}, {cfg.arch}"
    backend = sizes.compile_backend or "inductor"
    best = max(rates.values())
    minutes = PAPER_EPOCHS * (N_TRAIN // PAPER_BATCH) * PAPER_BATCH / best / 60
    target = f">= {TARGET_IMAGES_S} images/s"
    return [
        _row("pretrain_eager", f"pretrain images/s ({label}, eager; ref: authors' per GPU)",
             rates[False], AUTHORS_IMAGES_S, target, rates[False] >= TARGET_IMAGES_S),
        _row("pretrain_compile", f"pretrain images/s ({label}, torch.compile {backend}; "
                                 "ref: eager)", rates[True], rates[False], target,
             rates[True] >= TARGET_IMAGES_S),
        _row("peak_memory", f"peak memory during eager pretraining, GiB ({what}; ref: "
                            "device total)", peak, total, "info"),
        _row("projected_run", f"projected {PAPER_EPOCHS}-epoch run on {N_TRAIN} patches at "
                              "the faster rate, min (ref: the authors' rate)",
             minutes, PAPER_EPOCHS * (N_TRAIN // PAPER_BATCH) * PAPER_BATCH
             / AUTHORS_IMAGES_S / 60, "<= 5 min", minutes <= 5.0),
    ]


# -- embedding -----------------------------------------------------------------------------
def embed_rows(device: str, sizes: Sizes, folder: Path) -> list[dict[str, Any]]:
    """ViT-S/16 ``embed()`` images/s (patch file in, store out) against its bare forward."""
    import torch

    from credanno.data.patchfile import write_patch_file
    from credanno.embed import embed
    from credanno.encoders import build_encoder
    from credanno.synthetic import synthetic_images, synthetic_table

    n = sizes.embed_images
    table = synthetic_table(n_nodules=max(2, n // 4), per_nodule=4, seed=0)[:n]
    raw = synthetic_images(table)
    data = write_patch_file(folder / "embed.h5", raw, table, {"source": "synthetic"})
    spec, batch = "timm:vit_small_patch16_224", sizes.embed_batch
    dtype = runtime.autocast_dtype("auto", torch.device(device).type)
    enc = build_encoder(spec).to(device)
    images = torch.from_numpy(raw)
    with torch.no_grad(), runtime.autocast(torch.device(device).type, dtype):
        enc(images[:batch].to(device))   # warm-up: kernels, allocator
        _sync(device)
        t0 = time.perf_counter()
        for a in range(0, len(images), batch):
            enc(images[a:a + batch].to(device))
        _sync(device)
        forward = len(images) / (time.perf_counter() - t0)
    embed(data, encoder=spec, out=folder / "warm.h5", batch_size=batch, device=device)
    t0 = time.perf_counter()
    embed(data, encoder=spec, out=folder / "store.h5", batch_size=batch, device=device)
    rate = len(images) / (time.perf_counter() - t0)
    precision = runtime.precision_label(dtype)
    return [_row("embed", f"ViT-S/16 embed() images/s, 224 px, {precision}, {len(images)} "
                          "images (ref: bare forward)", rate, forward, ">= 0.8 of forward",
                 rate >= 0.8 * forward)]


# -- k-NN ----------------------------------------------------------------------------------
def faiss_gpu_problem() -> str | None:
    """Why the installed faiss cannot search on a GPU, or None when it can."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return "the installed faiss has no GPU support; install faiss-gpu-cu12"
    if faiss.get_num_gpus() < 1:
        return "faiss sees no GPU; install the faiss-gpu build matching the CUDA driver"
    return None


def _matmul_topk_seconds(bank: np.ndarray, queries: np.ndarray, k: int, device: str) -> float:
    """The floor: bank to the device, blocked ``queries @ bank.T`` and ``topk``, results back."""
    import torch

    _sync(device)
    t0 = time.perf_counter()
    b = torch.from_numpy(bank).to(device)
    block = max(1, min(len(queries), 2**29 // len(bank)))   # <= 2 GiB of similarities
    out = []
    for s in range(0, len(queries), block):
        q = torch.from_numpy(queries[s:s + block]).to(device)
        out.append(torch.topk(q @ b.T, k, dim=1).indices.cpu())
    _sync(device)
    return time.perf_counter() - t0


def knn_rows(device: str, sizes: Sizes) -> list[dict[str, Any]]:
    """Exact faiss k-NN (on the GPU when there is one) against the matmul + topk floor."""
    from credanno.eval.knn import knn_search
    from credanno.numerics import l2_normalise

    n_bank, n_q, dim, k = sizes.knn
    metric = (f"faiss k-NN search s, {n_bank:,} x {dim} bank, {n_q:,} queries, k={k} "
              f"({device}; ref: torch matmul + topk)")
    if device.startswith("cuda"):
        problem = faiss_gpu_problem()
        if problem is not None:
            return [_row("knn", metric, None, target="<= 1.5", ok=None,
                         note=f"skipped: {problem}")]
    rng = np.random.default_rng(0)
    bank = l2_normalise(rng.standard_normal((n_bank, dim), dtype=np.float32))
    queries = l2_normalise(rng.standard_normal((n_q, dim), dtype=np.float32))
    knn_search(bank[:4096], queries[:64], min(k, 64), normalize=False, device=device)  # warm
    _matmul_topk_seconds(bank[:4096], queries[:64], min(k, 64), device)
    floor = _matmul_topk_seconds(bank, queries, k, device)
    t0 = time.perf_counter()
    knn_search(bank, queries, k, normalize=False, device=device)
    seconds = time.perf_counter() - t0
    return [_row("knn", metric, seconds, floor, "<= 1.5", seconds <= 1.5 * floor)]


# -- probes --------------------------------------------------------------------------------
def probe_rows(device: str, sizes: Sizes) -> list[dict[str, Any]]:
    """The 9 joint heads, 15 configurations (3 fractions x 5 seeds) as one batched model."""
    from credanno.eval.probe import HeadLayout, ProbeRun, train_joint_heads
    from credanno.eval.specs import ProbeSpec
    from credanno.labels import LABEL_NAMES, label_spec

    n, dim, epochs = sizes.probe
    rng = np.random.default_rng(0)
    counts = [label_spec(x).n_classes for x in LABEL_NAMES]
    Y = np.stack([rng.integers(0, c, n) for c in counts], 1)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    layout = HeadLayout(list(LABEL_NAMES), counts, 0)
    runs = [ProbeRun(np.sort(np.random.default_rng(s).permutation(n)[:max(8, round(f * n))]),
                     5e-4, s) for f in (0.1, 0.5, 1.0) for s in range(5)]

    def seconds(dev: str) -> float:
        spec = ProbeSpec(epochs=epochs, device=dev)
        train_joint_heads(X, Y, layout, runs[:1], ProbeSpec(epochs=1, device=dev))  # warm
        _sync(dev)
        t0 = time.perf_counter()
        train_joint_heads(X, Y, layout, runs, spec)
        _sync(dev)
        return time.perf_counter() - t0

    value, reference = seconds(device), seconds("cpu")
    return [_row("probes", f"joint probes s, 15 configurations, {n} x {dim}, {epochs} epochs "
                           f"({device}; ref: cpu)", value, reference)]


# -- DDP -----------------------------------------------------------------------------------
def ddp_rows(device: str, sizes: Sizes, folder: Path) -> list[dict[str, Any]]:
    """Paper-preset training images/s over every visible GPU (torchrun subprocess)."""
    if sizes.ddp_ranks is not None:
        ranks = sizes.ddp_ranks
    elif device.startswith("cuda"):
        import torch

        ranks = torch.cuda.device_count()   # the device was resolved by runtime already
    else:
        ranks = 1
    metric = f"DDP pretrain images/s over {ranks} ranks ({device}; ref: one rank, eager)"
    if ranks < 2:
        return [_row("ddp", metric, None, ok=None,
                     note=f"skipped: {ranks} GPU visible; DDP needs more than one")]
    data = _patch_file(folder, sizes.n_train)
    out = folder / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", "-m", "credanno.bench.gpu", "--worker", str(out),
           "--data", str(data), "--device", "cuda" if device.startswith("cuda") else "cpu"]
    if sizes is DRY:
        cmd.append("--dry-run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 or not out.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"torchrun exited {done.returncode}: {tail[0]}")
    rate = json.loads(out.read_text())["images_per_s"]
    return [_row("ddp", metric, rate, None, "info")]


def _worker(argv: list[str]) -> None:
    """One ``torchrun`` rank of :func:`ddp_rows`: rank 0 writes the images/s as JSON."""
    from credanno.outputs import write_json
    from credanno.pretrain.train import Trainer

    out, data = Path(argv[argv.index("--worker") + 1]), Path(argv[argv.index("--data") + 1])
    device = argv[argv.index("--device") + 1]
    sizes = DRY if "--dry-run" in argv else FULL
    env = runtime.init_distributed(device)
    try:
        cfg = _config(data, out.parent / "ddp-run", device, sizes, compile_=False)
        rate = trainer_images_per_s(Trainer(cfg, env), sizes.steps, sizes.warmup)
        if env.is_main:
            write_json({"images_per_s": rate, "ranks": env.world_size}, out, option="--out")
    finally:
        runtime.cleanup(env)


# -- the command ---------------------------------------------------------------------------
def bench_device(dry_run: bool, device: str | None = None) -> str:
    """``cpu`` for a dry run; else the CUDA device (one line naming --dry-run without one)."""
    if dry_run:
        return "cpu"
    name = runtime.check_device(device) or runtime.default_device()
    if not name.startswith("cuda"):
        raise CredannoError("credanno bench gpu needs a CUDA GPU and torch sees none (or "
                            "--device cpu was given); pass --dry-run to run it at toy sizes "
                            "on the CPU")
    return runtime.resolve_device(name)


def run_gpu_bench(dry_run: bool = False, device: str | None = None,
                  on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every row of ``credanno bench gpu`` (see the module docstring), in :data:`ROW_IDS`
    order. A part that fails gives its rows ``ok=False`` with the error in ``note``; the
    other parts still run."""
    device = bench_device(dry_run, device)
    sizes = DRY if dry_run else FULL
    parts: list[tuple[tuple[str, ...], Callable[[Path], list[dict[str, Any]]]]] = [
        (ROW_IDS[:4], lambda f: pretrain_rows(device, sizes, f)),
        (("embed",), lambda f: embed_rows(device, sizes, f)),
        (("knn",), lambda f: knn_rows(device, sizes)),
        (("probes",), lambda f: probe_rows(device, sizes)),
        (("ddp",), lambda f: ddp_rows(device, sizes, f)),
    ]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="credanno-bench-gpu-") as tmp:
        for ids, part in parts:
            folder = Path(tempfile.mkdtemp(dir=tmp))
            t0 = time.perf_counter()
            try:
                got = part(folder)
            except Exception as exc:  # one failing part must not hide the others' figures
                last = traceback.extract_tb(exc.__traceback__)[-1]
                first = (str(exc).splitlines() or [""])[0]
                note = (f"failed: {type(exc).__name__}: {first} "
                        f"({Path(last.filename).name}:{last.lineno})")
                got = [_row(rid, rid, None, ok=False, note=note) for rid in ids]
            for row in got:
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def gpu_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as one Markdown table (skips and failures named in the ``ok`` column)."""
    from credanno.bench.perf import _cell

    lines = ["| metric | value | reference | ratio | target | ok | s |",
             "|---|---:|---:|---:|---|---|---:|"]
    for r in rows:
        ok = r["note"] if r["note"] else _cell(r["ok"])
        cells = [r["metric"], _cell(r["value"]), _cell(r["reference"]), _cell(r["ratio"]),
                 r["target"], ok, _cell(r["seconds"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[1:])
