"""Embedding throughput (images/s) of ``credanno embed``.

- the CPU default encoder (the ``cpu-tiny`` pretraining preset: ViT-Tiny width, 6 blocks,
  patch 8 at the patches' native 32 px): the whole ``embed()`` (patch file in, store out),
  less the one-off encoder construction, against the bare encoder forward pass on the same
  images in the same process (ratio = pipeline / forward; target >= 0.8, i.e. reading,
  transforming, hashing and writing cost < 20%); the end-to-end rate is reported too;
- the paper's ViT-S/16 at 224 px (256 -> 224 eval transform): forward images/s, bf16 autocast
  on CUDA when a GPU is present, fp32 on CPU (reported, no target).

Run: ``python benchmarks/embed_throughput.py [--quick]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from credanno import runtime
from credanno.data.patchfile import write_patch_file
from credanno.embed import embed
from credanno.encoders import build_encoder
from credanno.synthetic import synthetic_images, synthetic_table


def _preset_encoder() -> tuple[str, dict]:
    from credanno.pretrain import load_config

    cfg = load_config("cpu-tiny")
    return f"timm:{cfg.arch}", cfg.backbone_kwargs()


def _forward_rate(spec: str, kwargs: dict, images: torch.Tensor, batch_size: int,
                  device: torch.device, repeat: int) -> float:
    enc = build_encoder(spec, kwargs=kwargs).to(device)
    amp = runtime.autocast(device.type, runtime.autocast_dtype("auto", device.type))
    best = float("inf")
    with torch.no_grad(), amp:
        enc(images[:batch_size].to(device))  # warm-up (kernels, allocator)
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for a in range(0, len(images), batch_size):
                enc(images[a:a + batch_size].to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return len(images) / best


def _row(metric: str, value: float, reference: float | None, target: str) -> dict:
    ratio = value / reference if reference else None
    ok = True if target == "info" else (ratio is not None and ratio >= 0.8)
    return {"benchmark": "embed_throughput", "metric": metric, "value": round(value, 1),
            "reference": None if reference is None else round(reference, 1),
            "ratio": None if ratio is None else round(ratio, 3), "target": target, "ok": ok}


def run(quick: bool = False) -> list[dict]:
    n = 512 if quick else 2048
    table = synthetic_table(n_nodules=n // 4, per_nodule=4, seed=0)
    raw = synthetic_images(table)
    device = torch.device(runtime.default_device())
    spec, kwargs = _preset_encoder()
    rows = []
    with tempfile.TemporaryDirectory(prefix="credanno-bench-") as tmp:
        data = write_patch_file(Path(tmp) / "p.h5", raw, table, {"source": "synthetic"})
        forward = _forward_rate(spec, kwargs, torch.from_numpy(raw), 256, device,
                                1 if quick else 2)
        t0 = time.perf_counter()
        build_encoder(spec, kwargs=kwargs)
        t_build = time.perf_counter() - t0  # one-off: timm's weight initialisation
        best = float("inf")
        for i in range(1 if quick else 2):
            t0 = time.perf_counter()
            embed(data, encoder=spec, encoder_kwargs=kwargs, out=Path(tmp) / f"s{i}.h5",
                  batch_size=256, device=device.type)
            best = min(best, time.perf_counter() - t0)
        rows.append(_row(f"cpu-tiny encoder, embed() images/s without the {t_build:.1f} s "
                         f"encoder construction ({device.type}, {n} images)",
                         n / max(best - t_build, 1e-9), forward, ">= 0.8"))
        rows.append(_row(f"cpu-tiny encoder, embed() images/s end to end ({device.type})",
                         n / best, None, "info"))
    n_big = 1024 if device.type == "cuda" else (16 if quick else 64)
    big = torch.rand(n_big, 32, 32)
    rate = _forward_rate("timm:vit_small_patch16_224", {}, big, 256 if device.type == "cuda"
                         else 32, device, 2 if device.type == "cuda" else 1)
    precision = "bf16" if device.type == "cuda" else "fp32"
    rows.append(_row(f"ViT-S/16 at 224 px, forward images/s ({device.type}, {precision})", rate,
                     None, "info"))
    return rows


if __name__ == "__main__":
    results = run(quick="--quick" in sys.argv)
    from credanno.bench.perf import print_rows

    print_rows(results)
