"""``credanno embed``: run a frozen encoder over a patch file into a feature store.

The paper evaluates frozen features (k-NN on the final CLS token, linear predictors on the
last four CLS tokens), so the encoder runs once per (encoder, patch file) and every later
evaluation reads the store. Rows are written in table order as batches finish; under
``torchrun`` the batches are dealt round-robin to the ranks, gathered on rank 0 and written
in the same order, so the store equals the single-process one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from credanno import stores
from credanno.augment.views import ViewAugmentation
from credanno.data.patchfile import file_sha256, read_patch_file
from credanno.encoders import Encoder, build_encoder
from credanno.errors import CredannoError
from credanno.paths import DEFAULT_PATCH_FILE, STORES_DIR

WHICH = ("teacher", "student", "random")


@dataclass
class _Ranks:
    rank: int = 0
    world: int = 1
    owns_group: bool = False
    device: torch.device = torch.device("cpu")


def _init_ranks(device: torch.device) -> _Ranks:
    """Join the ``torchrun`` process group if there is one (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Ranks(device=device)
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Ranks(dist.get_rank(), dist.get_world_size(), owns, device)


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CredannoError("--device cuda was asked for but no CUDA GPU is visible; "
                            "use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CredannoError(f"unknown device {device!r}; use cpu or cuda") from None


def _encoder_spec(checkpoint: str | os.PathLike | None, encoder: str | None) -> str:
    if checkpoint is not None and encoder is not None:
        raise CredannoError("pass either --checkpoint or --encoder, not both")
    if encoder is not None:
        return encoder
    return f"checkpoint:{checkpoint}" if checkpoint is not None else "checkpoint:"


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 keeps fp32's range, so no loss scaling; features are cast back to fp32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]


class _Packer:
    """Flattens one batch's features (and views of its training rows) into one tensor.

    One fixed-shape tensor per batch is what ``all_gather`` needs; rank 0 unpacks it.
    """

    def __init__(self, dims: dict[str, int], n_views: int, batch_size: int) -> None:
        self.dims = dims
        self.n_views = n_views
        self.batch_size = batch_size
        self.width = sum(dims.values()) * (1 + n_views)

    def pack(self, feats: dict[str, torch.Tensor], views: dict[str, torch.Tensor] | None,
             train: np.ndarray, device: torch.device) -> torch.Tensor:
        out = torch.zeros(self.batch_size, self.width, device=device)
        col = 0
        b = next(iter(feats.values())).shape[0]
        for kind, d in self.dims.items():
            out[:b, col:col + d] = feats[kind]
            col += d
        if self.n_views and views is not None:
            idx = torch.as_tensor(np.flatnonzero(train), device=device)
            for kind, d in self.dims.items():
                v = views[kind]  # (V, n_train_in_batch, D)
                block = v.permute(1, 0, 2).reshape(v.shape[1], -1)
                out[idx, col:col + d * self.n_views] = block
                col += d * self.n_views
        return out

    def unpack(self, packed: torch.Tensor, b: int, train: np.ndarray
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        arr = packed.cpu().numpy()
        feats, views = {}, {}
        col = 0
        for kind, d in self.dims.items():
            feats[kind] = arr[:b, col:col + d]
            col += d
        if self.n_views:
            rows = np.flatnonzero(train)
            for kind, d in self.dims.items():
                block = arr[rows, col:col + d * self.n_views]
                views[kind] = block.reshape(len(rows), self.n_views, d).transpose(1, 0, 2)
                col += d * self.n_views
        return feats, views


def _encode_batch(enc: Encoder, images: torch.Tensor, rows: np.ndarray, train: np.ndarray,
                  n_views: int, augment: ViewAugmentation, device: torch.device
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    with torch.no_grad(), _autocast(device):
        feats = enc(images)
        views = None
        if n_views and train.any():
            train_images = images[torch.as_tensor(np.flatnonzero(train), device=device)]
            per_view = [enc(augment(train_images, rows[train], v)) for v in range(n_views)]
            views = {k: torch.stack([pv[k] for pv in per_view]) for k in feats}
    return feats, views


def embed(data: str | os.PathLike = DEFAULT_PATCH_FILE,
          checkpoint: str | os.PathLike | None = None, encoder: str | None = None,
          weights: str | os.PathLike | None = None, which: str = "teacher",
          out: str | os.PathLike | None = None, batch_size: int = 256,
          device: str | None = None, views: int = 0, progress: bool = False, *,
          encoder_kwargs: dict[str, Any] | None = None, dtype: str = "float32",
          view_seed: int = 0, max_shift: int = 2, normalise: str = "auto") -> Path:
    """Embed every image of the patch file ``data`` into a feature store; returns its path.

    With no encoder named, the newest ``credanno pretrain`` run's teacher is used (as DINO
    and the paper evaluate). ``encoder`` is ``"timm:ARCH"`` (random init, or ``weights``
    from a local file; ``encoder_kwargs`` go to ``timm.create_model``; ``normalise`` picks its
    input statistics, see :func:`credanno.encoders.build_encoder`) or ``"pixels"``.
    ``views=V`` also stores V augmented views of every training image
    (:class:`credanno.augment.views.ViewAugmentation`, drawn from ``(view_seed, view, row)``;
    the scheme is written to the store's provenance). The default output is
    ``stores/<run-or-encoder name>.h5`` (with the patch file's name appended when it is not
    the default one).
    """
    if which not in WHICH:
        raise CredannoError(f"unknown --which {which!r}; choose one of {', '.join(WHICH)}")
    if int(batch_size) < 1:
        raise CredannoError(f"--batch-size must be >= 1, got {batch_size}")
    if int(views) < 0:
        raise CredannoError(f"--views must be >= 0, got {views}")
    spec = _encoder_spec(checkpoint, encoder)
    if not spec.startswith("checkpoint:") and (
            which == "student" or (which == "random" and weights is not None)):
        raise CredannoError(f"--which {which} applies to --checkpoint encoders; timm:ARCH is "
                            "random without --weights and loaded with it")
    dev = _resolve_device(device)
    data = Path(data)
    patches = read_patch_file(data)
    images, table = patches.images, patches.table
    if int(batch_size) > len(table) > 0:  # a batch beyond the data only allocates padding
        if int(batch_size) > 256:  # not the default on a small file
            import warnings

            from credanno.errors import CredannoWarning

            warnings.warn(f"--batch-size {batch_size} is larger than the {len(table)} images; "
                          f"using {len(table)}", CredannoWarning, stacklevel=2)
        batch_size = len(table)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise CredannoError(f"{data} holds images of shape {images.shape[1:]}; embed needs "
                            "square patches")
    enc = build_encoder(spec, weights=weights, which=which, image_size=int(images.shape[1]),
                        kwargs=encoder_kwargs, normalise=normalise)
    ranks = _init_ranks(dev)
    try:
        return _embed(enc, data, images, table, out, int(batch_size), ranks, int(views),
                      progress, dtype, ViewAugmentation(max_shift=max_shift, seed=view_seed),
                      source=patches.attrs.get("source"))
    finally:
        if ranks.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _default_out(enc: Encoder, data: Path) -> Path:
    name = enc.name
    if data.resolve() != DEFAULT_PATCH_FILE.resolve():
        name += f"-{data.stem}"
    return STORES_DIR / f"{name}.h5"


def _embed(enc: Encoder, data: Path, images: np.ndarray, table: Any, out: Any,
           batch_size: int, ranks: _Ranks, n_views: int, progress: bool, dtype: str,
           augment: ViewAugmentation, source: str | None = None) -> Path:
    dev = ranks.device
    out = Path(out) if out is not None else _default_out(enc, data)
    enc.to(dev)
    n = len(table)
    train = table["split"].astype(str).to_numpy() == "train"
    batches = _batches(n, batch_size)
    precision = "bf16-autocast" if dev.type == "cuda" else "fp32"
    provenance = {
        "encoder": enc.provenance,
        # the source travels with the store, so outputs can say phantom vs real CT
        # even after the patch file has moved
        "patch_file": {"path": str(data), "sha256": file_sha256(data), "n_images": n,
                       "image_size": int(images.shape[1]), "source": source},
        "transform": enc.transform.to_dict() if enc.transform is not None else None,
        "feature_sets": enc.definitions,
        "views": ({"n": n_views, "augmentation": augment.to_dict(), "rows": "train"}
                  if n_views else None),
        "precision": precision,
    }
    packer = _Packer(enc.feature_sets, n_views, batch_size)
    comm_dev = dev if dev.type == "cuda" else torch.device("cpu")
    writer = (stores.create(out, table, enc.feature_sets, provenance, dtype=dtype,
                            views=n_views) if ranks.rank == 0 else None)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, unit="img", desc=f"embed {enc.name}",
               disable=not progress or ranks.rank != 0)
    try:
        for first in range(0, len(batches), ranks.world):  # one batch per rank per round
            mine = first + ranks.rank
            packed = torch.zeros(batch_size, packer.width, device=comm_dev)
            if mine < len(batches):
                a, b = batches[mine]
                rows = np.arange(a, b)
                x = torch.from_numpy(images[a:b]).to(dev, non_blocking=True)
                feats, views = _encode_batch(enc, x, rows, train[a:b], n_views, augment, dev)
                packed = packer.pack(feats, views, train[a:b], comm_dev)
            if ranks.world > 1:
                import torch.distributed as dist

                gathered = [torch.empty_like(packed) for _ in range(ranks.world)]
                dist.all_gather(gathered, packed)
            else:
                gathered = [packed]
            if writer is None:
                continue
            for r, block in enumerate(gathered):
                if first + r >= len(batches):
                    break
                a, b = batches[first + r]
                feats_np, views_np = packer.unpack(block, b - a, train[a:b])
                writer.append(feats_np)
                if n_views and train[a:b].any():
                    writer.append_views(views_np)
                bar.update(b - a)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank returns only once the store exists
    return out
