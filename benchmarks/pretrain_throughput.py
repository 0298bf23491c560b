"""DINO pretraining throughput and the projected time of a preset's full schedule.

Measures training images/s (one image = its 2 global + n local crops through student and
teacher, backward, AdamW, EMA) on a few steps after warm-up, for the ``paper`` preset on
CUDA or ``cpu-tiny`` on CPU, on 1,904 synthetic 32 x 32 training patches (the paper's count).

Reference (same process, same model and device): the augmentation applied image by image,
as a per-image data-loader pipeline does, in full precision; the ratio is the speed-up of
the batched on-device path (bf16 autocast, fused AdamW, optional torch.compile on CUDA).
Targets: paper preset on one H100 >= 1,900 images/s (300 epochs in <= 5 min);
cpu-tiny full run <= 5 min on 2 CPU cores.

Run: ``python benchmarks/pretrain_throughput.py [--quick] [--preset NAME] [--compile]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from credanno import runtime
from credanno.data.patchfile import write_patch_file
from credanno.pretrain.config import load_config
from credanno.pretrain.train import Trainer
from credanno.synthetic import synthetic_images, synthetic_table

N_TRAIN = 1904  # the paper's training images


class _PerImage:
    """The reference: the same crops, computed one image at a time."""

    def __init__(self, multicrop):
        self.multicrop = multicrop

    def __call__(self, images, keys, second=None):
        second = images if second is None else second
        per = [self.multicrop(images[i:i + 1], keys[i:i + 1], second[i:i + 1])
               for i in range(len(images))]
        return [torch.cat([p[c] for p in per]) for c in range(len(per[0]))]


def _patch_file(folder: Path) -> Path:
    table = synthetic_table(n_nodules=N_TRAIN // 2, per_nodule=3, test_frac=0.3, seed=0)
    keep = table.index[table["split"] == "train"][:N_TRAIN]
    table = table.loc[keep].reset_index(drop=True)
    path = folder / "bench.h5"
    write_patch_file(path, synthetic_images(table), table, {"source": "synthetic"})
    return path


def _images_per_s(trainer: Trainer, steps: int, warmup: int) -> float:
    cfg = trainer.cfg
    order = torch.randperm(trainer.n, generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for s in range(warmup + steps):
        if s == warmup:
            sync()
            start = time.perf_counter()
        batch = order[(s * cfg.batch_size) % (trainer.n - cfg.batch_size):][:cfg.batch_size]
        trainer.train_step(1, s, batch)
    sync()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def run(quick: bool = False, preset: str | None = None, compile: bool = False) -> list[dict]:
    cuda = runtime.default_device() == "cuda"
    preset = preset or ("paper" if cuda else "cpu-tiny")
    steps, warmup = (3, 1) if quick else ((20, 5) if cuda else (8, 2))
    rows = []
    with tempfile.TemporaryDirectory(prefix="credanno-bench-") as tmp:
        data = _patch_file(Path(tmp))
        base = {"data": str(data), "out": str(Path(tmp) / "run"), "device": None}
        fast_cfg = load_config(preset, overrides={**base, "compile": compile and cuda})
        fast = Trainer(fast_cfg, runtime.DistEnv(device=runtime.torch_device(None)))
        value = _images_per_s(fast, steps, warmup)
        ref_cfg = load_config(preset, overrides={**base, "amp": "none"})
        ref = Trainer(ref_cfg, runtime.DistEnv(device=runtime.torch_device(None)))
        ref.multicrop = _PerImage(ref.multicrop)
        if cuda:
            ref.optimizer = torch.optim.AdamW(ref.optimizer.param_groups, fused=False)
        reference = _images_per_s(ref, max(2, steps // 4), 1)
    device = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}"
    images = fast.steps_per_epoch * fast_cfg.batch_size * fast_cfg.epochs
    minutes = images / value / 60
    gpu_target = preset == "paper" and cuda
    target_ips = 1900 if gpu_target else None
    rows.append({"benchmark": "pretrain_throughput",
                 "metric": f"{preset} train images/s ({device}, amp {fast.amp_dtype})",
                 "value": round(value, 1), "reference": round(reference, 1),
                 "ratio": round(value / reference, 2),
                 "target": ">= 1900 images/s" if target_ips else "info",
                 "ok": bool(value >= target_ips) if target_ips else True})
    limit = 5.0 if gpu_target or preset == "cpu-tiny" else None
    rows.append({"benchmark": "pretrain_throughput",
                 "metric": f"{preset} projected {fast_cfg.epochs}-epoch run on {N_TRAIN} "
                           f"patches, min",
                 "value": round(minutes, 2), "reference": round(images / reference / 60, 2),
                 "ratio": round(value / reference, 2),
                 "target": f"<= {limit} min" if limit else "info",
                 "ok": bool(minutes <= limit) if limit else True})
    return rows


if __name__ == "__main__":
    args = sys.argv[1:]
    preset = args[args.index("--preset") + 1] if "--preset" in args else None
    results = run(quick="--quick" in args, preset=preset, compile="--compile" in args)
    from credanno.bench.perf import print_rows

    print_rows(results)
