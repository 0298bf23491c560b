"""``credanno embed``: run a frozen encoder over a patch file into a feature store.

The paper evaluates frozen features (k-NN on the final CLS token, linear predictors on the
last four CLS tokens), so the encoder runs once per (encoder, patch file) and every later
evaluation reads the store. Rows are written in table order as batches finish; under
``torchrun`` the batches are dealt round-robin to the ranks, gathered on rank 0 and written
in the same order, so the store equals the single-process one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from credanno import runtime, stores
from credanno.augment.views import ViewAugmentation
from credanno.data.patchfile import PatchSet, file_sha256, read_patch_file
from credanno.encoders import Encoder, build_encoder
from credanno.errors import CredannoError
from credanno.paths import DEFAULT_PATCH_FILE, STORES_DIR

WHICH = ("teacher", "student", "random")


def _encoder_spec(checkpoint: str | os.PathLike | None, encoder: str | None) -> str:
    if checkpoint is not None and encoder is not None:
        raise CredannoError("pass either --checkpoint or --encoder, not both")
    if encoder is not None:
        return encoder
    return f"checkpoint:{checkpoint}" if checkpoint is not None else "checkpoint:"


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
                  n_views: int, augment: ViewAugmentation, device: torch.device,
                  amp: torch.dtype | None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    with torch.no_grad(), runtime.autocast(device.type, amp):
        feats = enc(images)
        views = None
        if n_views and train.any():
            train_images = images[torch.as_tensor(np.flatnonzero(train), device=device)]
            per_view = [enc(augment(train_images, rows[train], v)) for v in range(n_views)]
            views = {k: torch.stack([pv[k] for pv in per_view]) for k in feats}
    return feats, views


@dataclass(frozen=True)
class EmbedSpec:
    """How :func:`embed` runs, apart from which encoder and which files.

    ``dtype`` is the stored features' type (``float16`` halves the store); ``views``,
    ``view_seed`` and ``max_shift`` set the stored augmented views (:class:`ViewAugmentation`).
    """

    batch_size: int = 256
    device: str | None = None
    views: int = 0
    progress: bool = False
    dtype: str = "float32"
    view_seed: int = 0
    max_shift: int = 2

    def checked(self) -> EmbedSpec:
        """The spec with its counts checked and made ints (one-line errors)."""
        if int(self.batch_size) < 1:
            raise CredannoError(f"--batch-size must be >= 1, got {self.batch_size}")
        if int(self.views) < 0:
            raise CredannoError(f"--views must be >= 0, got {self.views}")
        runtime.check_device(self.device)
        return replace(self, batch_size=int(self.batch_size), views=int(self.views))

    def augmentation(self) -> ViewAugmentation:
        return ViewAugmentation(max_shift=self.max_shift, seed=self.view_seed)


def embed(data: str | os.PathLike = DEFAULT_PATCH_FILE,
          checkpoint: str | os.PathLike | None = None, encoder: str | None = None,
          weights: str | os.PathLike | None = None, which: str = "teacher",
          out: str | os.PathLike | None = None, spec: EmbedSpec | None = None, *,
          encoder_kwargs: dict[str, Any] | None = None, normalise: str = "auto",
          **options: Any) -> Path:
    """Embed every image of the patch file ``data`` into a feature store; returns its path.

    With no encoder named, the newest ``credanno pretrain`` run's teacher is used (as DINO
    and the paper evaluate). ``encoder`` is ``"timm:ARCH"`` (random init, or ``weights``
    from a local file; ``encoder_kwargs`` go to ``timm.create_model``) or ``"pixels"``.
    How it runs is an :class:`EmbedSpec`, given as ``spec`` or as its fields by keyword
    (``batch_size=64, device="cpu", views=2, progress=True``; they override ``spec``).
    ``normalise`` picks a timm model's input statistics (see
    :func:`credanno.encoders.build_encoder`). ``views=V`` also stores V augmented views of
    every training image (:class:`credanno.augment.views.ViewAugmentation`, drawn from
    ``(view_seed, view, row)``; the scheme is written to the store's provenance). The
    default output is ``stores/<run-or-encoder name>.h5`` (with the patch file's name
    appended when it is not the default one).
    """
    spec = replace(spec or EmbedSpec(), **options)  # an unknown keyword is a TypeError
    if which not in WHICH:
        raise CredannoError(f"unknown --which {which!r}; choose one of {', '.join(WHICH)}")
    spec = spec.checked()
    source = _encoder_spec(checkpoint, encoder)
    if not source.startswith("checkpoint:") and (
            which == "student" or (which == "random" and weights is not None)):
        raise CredannoError(f"--which {which} applies to --checkpoint encoders; timm:ARCH is "
                            "random without --weights and loaded with it")
    runtime.resolve_device(spec.device)  # before the patch file is read: a typo costs nothing
    data = Path(data)
    patches = read_patch_file(data)
    images, table = patches.images, patches.table
    if spec.batch_size > len(table) > 0:  # a batch beyond the data only allocates padding
        if spec.batch_size > 256:  # not the default on a small file
            import warnings

            from credanno.errors import CredannoWarning

            warnings.warn(f"--batch-size {spec.batch_size} is larger than the {len(table)} "
                          f"images; using {len(table)}", CredannoWarning, stacklevel=2)
        spec = replace(spec, batch_size=len(table))
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise CredannoError(f"{data} holds images of shape {images.shape[1:]}; embed needs "
                            "square patches")
    enc = build_encoder(source, weights=weights, which=which, image_size=int(images.shape[1]),
                        kwargs=encoder_kwargs, normalise=normalise)
    env = runtime.init_distributed(spec.device)
    try:
        return _embed(enc, data, patches, out, spec, env)
    finally:
        runtime.cleanup(env)


def _default_out(enc: Encoder, data: Path) -> Path:
    name = enc.name
    if data.resolve() != DEFAULT_PATCH_FILE.resolve():
        name += f"-{data.stem}"
    return STORES_DIR / f"{name}.h5"


def _embed(enc: Encoder, data: Path, patches: PatchSet, out: Any, spec: EmbedSpec,
           env: runtime.DistEnv) -> Path:
    dev, images, table = env.device, patches.images, patches.table
    batch_size, n_views, augment = spec.batch_size, spec.views, spec.augmentation()
    # bf16 where the GPU has it (fp32's range, so no loss scaling); features are cast to
    # fp32 when packed
    amp = runtime.autocast_dtype("auto", dev.type)
    out = Path(out) if out is not None else _default_out(enc, data)
    enc.to(dev)
    n = len(table)
    train = table["split"].astype(str).to_numpy() == "train"
    batches = _batches(n, batch_size)
    provenance = {
        "encoder": enc.provenance,
        # the source travels with the store, so outputs can say phantom vs real CT
        # even after the patch file has moved
        "patch_file": {"path": str(data), "sha256": file_sha256(data), "n_images": n,
                       "image_size": int(images.shape[1]), "source": patches.attrs.get("source")},
        "transform": enc.transform.to_dict() if enc.transform is not None else None,
        "feature_sets": enc.definitions,
        "views": ({"n": n_views, "augmentation": augment.to_dict(), "rows": "train"}
                  if n_views else None),
        "precision": runtime.precision_label(amp),
    }
    packer = _Packer(enc.feature_sets, n_views, batch_size)
    comm_dev = dev if dev.type == "cuda" else torch.device("cpu")
    writer = (stores.create(out, table, enc.feature_sets, provenance, dtype=spec.dtype,
                            views=n_views) if env.is_main else None)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, unit="img", desc=f"embed {enc.name}",
               disable=not spec.progress or not env.is_main)
    try:
        for first in range(0, len(batches), env.world_size):  # one batch per rank a round
            mine = first + env.rank
            packed = torch.zeros(batch_size, packer.width, device=comm_dev)
            if mine < len(batches):
                a, b = batches[mine]
                rows = np.arange(a, b)
                x = torch.from_numpy(images[a:b]).to(dev, non_blocking=True)
                feats, views = _encode_batch(enc, x, rows, train[a:b], n_views, augment, dev,
                                             amp)
                packed = packer.pack(feats, views, train[a:b], comm_dev)
            gathered = runtime.all_gather(packed, env)
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
    runtime.barrier(env)  # every rank returns only once the store exists
    return out
