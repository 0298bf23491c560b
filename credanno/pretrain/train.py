"""The DINO training loop (Caron et al. 2021, Algorithm 1; cRedAnno section 2 and 3.1).

Per step: multi-crop the batch on the device, teacher on the 2 global crops, student on all
crops, DINO loss, AdamW step (lr / weight decay from their schedules, per-parameter gradient
clipping, the prototype layer frozen during the first epoch), then the teacher follows the
student by EMA. Every epoch the checkpoint is rewritten atomically, so a killed run resumes
from its last finished epoch with the same result as an uninterrupted one: all randomness is
a function of (seed, epoch, image index, rank), never of hidden generator state.

``max_steps`` (``--max-steps N``) stops a call after N optimiser steps, for smoke tests and
throughput probes. A stop on an epoch boundary is an ordinary checkpoint (resumable); a stop
mid-epoch writes a *probe* checkpoint: ``epoch`` counts the finished epochs, ``steps`` the
optimiser steps in its weights and ``partial_epoch`` holds the unfinished epoch's row. Its
weights embed like any checkpoint's, but they cannot be continued bit-exactly (drop path
draws once per epoch), so a later run on that folder starts over from epoch 0 (a warning).

What else a run does each epoch (k-NN monitor, progress bar, metrics.jsonl and loss.png) are
callbacks (:mod:`.callbacks`); the run folder's name and resume policy live in :mod:`.runs`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from credanno import runtime
from credanno.augment.rng import derive_seed, epoch_permutation, forked_seed, sample_keys
from credanno.errors import CredannoError, CredannoWarning
from credanno.pretrain.callbacks import Callback, ProgressBar
from credanno.pretrain.checkpoint import (
    CHECKPOINT_NAME,
    bad_field,
    check_state_dict,
    create_backbone,
    read_checkpoint,
    save_checkpoint,
)
from credanno.pretrain.config import PretrainConfig, save_config
from credanno.pretrain.heads import LAST_LAYER, DINOHead, MultiCropWrapper
from credanno.pretrain.loss import DINOLoss
from credanno.pretrain.monitor import KnnMonitor
from credanno.pretrain.multicrop import CropSpec, MultiCrop
from credanno.pretrain.nodule_views import SameNoduleViews
from credanno.pretrain.outputs import (
    LOSS_PLOT_NAME,
    METRICS_NAME,
    MetricsWriter,
    checkpoint_metrics,
    existing,
    reconcile_outputs,
)
from credanno.pretrain.runs import check_resumable, has_checkpoint, make_run_dir, resolve_run_dir
from credanno.pretrain.schedules import cosine_schedule, teacher_temperature_schedule
from credanno.transforms import EvalTransform

#: salt of the per-(epoch, rank) seed of the default generator, which drop path draws from
_DROP_PATH_SALT = 0xD409


@dataclass
class RunResult:
    """What a pretraining run left behind."""

    run_dir: Path
    checkpoint: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0          # epochs already done when this call started
    loss_curve: Path | None = None
    partial: dict[str, Any] | None = None   # the unfinished epoch's row after a --max-steps stop

    @property
    def epochs_done(self) -> int:
        return self.metrics[-1]["epoch"] if self.metrics else self.resumed_from


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """DINO's two groups: weight decay on weights, none on biases and norm parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clip_per_parameter(params: list[torch.Tensor], clip: float) -> None:
    """DINO's clipping: each parameter's gradient norm is capped at ``clip`` on its own."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or clip <= 0:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coef.unbind()))


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """``teacher <- m * teacher + (1 - m) * student`` (the paper's Eq. for theta_t)."""
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


def load_train_images(path: str) -> tuple[np.ndarray, Any]:
    """The training split's images and table (the test split is never seen in pretraining)."""
    from credanno.data.patchfile import read_patch_file

    patches = read_patch_file(path)
    shape = tuple(patches.images.shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        size = " x ".join(map(str, shape[1:]))
        raise CredannoError(f"{path} holds {size} images; pretraining (like `credanno embed`) "
                            "needs square patches; re-create it with `credanno prepare`")
    train = (patches.table["split"] == "train").to_numpy()
    if not train.any():
        raise CredannoError(f"{path} has no training images; re-create it with "
                            "`credanno prepare`")
    return patches.images[train], patches.table[train].reset_index(drop=True)


def default_callbacks(cfg: PretrainConfig, progress: bool = False) -> list[Callback]:
    """The k-NN monitor (when ``monitor_every`` > 0), a progress bar (when ``progress``) and
    the metrics writer, in the order they run."""
    callbacks: list[Callback] = [KnnMonitor()] if cfg.monitor_every > 0 else []
    if progress:
        callbacks.append(ProgressBar())
    return [*callbacks, MetricsWriter()]


class Trainer:
    """One pretraining run on this rank. Build with a config, call :meth:`run`.

    ``callbacks`` replace :func:`default_callbacks` (pass them plus your own to extend).
    """

    def __init__(self, cfg: PretrainConfig, env: runtime.DistEnv, progress: bool = False,
                 callbacks: Sequence[Callback] | None = None):
        self.cfg, self.env, self.progress = cfg, env, progress
        self.device = env.device
        self.callbacks = list(default_callbacks(cfg, progress) if callbacks is None
                              else callbacks)
        self._load_data()
        self.amp_dtype = runtime.autocast_dtype(cfg.amp, self.device.type)
        self.multicrop = MultiCrop(CropSpec.from_config(cfg))
        self.nodule_views = self._nodule_views()
        self.eval_transform = EvalTransform(resize=cfg.eval_resize, crop=cfg.eval_crop)
        self.run_dir = Path(runtime.broadcast_object(
            str(resolve_run_dir(cfg, self.data_sha256)), env))
        self.checkpoint = self.run_dir / CHECKPOINT_NAME
        self.steps_left: int | None = cfg.max_steps or None   # optimiser steps this call may take
        self._state: dict[str, Any] | None = None
        self.resuming = has_checkpoint(self.run_dir) and self._continuable()
        self._build_models()
        self._build_optimizer()
        self._wrap_models()
        self._build_schedules()

    # -- construction -------------------------------------------------------------------
    def _continuable(self) -> bool:
        """Read the folder's checkpoint (same settings and data, or one line); False for a
        --max-steps probe stopped mid-epoch, which cannot be continued bit-exactly."""
        state = read_checkpoint(self.checkpoint, map_location=self.device)
        check_resumable(self.cfg, state, self.checkpoint, self.data_sha256)
        partial = state.get("partial_epoch")
        if partial is None:
            self._state = state
            return True
        steps = partial.get("steps") if isinstance(partial, dict) else None
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise bad_field(self.checkpoint, "partial_epoch", "is not a row with its steps")
        warnings.warn(CredannoWarning(
            f"{self.run_dir} holds a --max-steps probe stopped {steps} steps into epoch "
            f"{partial.get('epoch')}; it cannot be continued bit-exactly, so training starts "
            "over from epoch 0 (pass another --out to keep it)"), stacklevel=2)
        return False

    def _load_data(self) -> None:
        from credanno.data.patchfile import file_sha256

        cfg, env = self.cfg, self.env
        images, self.table = load_train_images(cfg.data)
        # The data's identity is its content: a resume on other images at the same path
        # would silently mix two datasets.
        self.data_sha256 = file_sha256(cfg.data)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        self.n = len(self.images)
        if cfg.batch_size > self.n:
            raise CredannoError(f"batch size {cfg.batch_size} exceeds the {self.n} training "
                                f"images; pass --batch-size {max(2, self.n // 2)}")
        self.steps_per_epoch = self.n // cfg.batch_size  # drop_last, as DINO
        self.local_batch = cfg.batch_size // env.world_size
        if cfg.batch_size % env.world_size:
            raise CredannoError(f"batch size {cfg.batch_size} is not divisible by "
                                f"{env.world_size} processes; pass a multiple of the rank count")

    def _nodule_views(self) -> SameNoduleViews | None:
        cfg = self.cfg
        if cfg.nodule_views <= 0:
            return None
        if "nodule_id" not in self.table:
            raise CredannoError(f"{cfg.data} has no nodule_id column for nodule_views; "
                                "set nodule_views = 0 or re-create it with `credanno prepare`")
        return SameNoduleViews(self.table["nodule_id"].to_numpy(), cfg.nodule_views,
                               self.device)

    def _build_models(self) -> None:
        cfg = self.cfg
        kwargs = cfg.backbone_kwargs()
        with forked_seed(cfg.seed):  # timm's and the heads' initialisation
            student_bb = create_backbone(cfg.arch, kwargs, drop_path_rate=cfg.drop_path)
            teacher_bb = create_backbone(cfg.arch, kwargs)
            dim = student_bb.num_features
            head_kw = dict(out_dim=cfg.out_dim, hidden_dim=cfg.head_hidden_dim,
                           bottleneck_dim=cfg.head_bottleneck_dim, nlayers=cfg.head_layers)
            student_head = DINOHead(dim, norm_last_layer=cfg.norm_last_layer, **head_kw)
            teacher_head = DINOHead(dim, **head_kw)
        self.init_report = None
        if cfg.init and not self.resuming:  # a resumed run has its weights already
            from credanno.weights import load_weights

            self.init_report = load_weights(student_bb, cfg.init, option="--init").to_dict()
        self.student = MultiCropWrapper(student_bb, student_head).to(self.device)
        self.teacher = MultiCropWrapper(teacher_bb, teacher_head).to(self.device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.student.train()
        self.student_params = list(self.student.parameters())
        self.teacher_params = list(self.teacher.parameters())
        self.last_layer_params = [p for n, p in self.student.head.named_parameters()
                                  if n.startswith(LAST_LAYER)]
        self.loss_fn = DINOLoss(cfg.out_dim, n_global=2, student_temp=cfg.student_temp,
                                center_momentum=cfg.center_momentum,
                                env=self.env).to(self.device)

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=cfg.peak_lr,
                                           fused=fused or None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _wrap_models(self) -> None:
        """DDP around the student on several ranks; ``torch.compile`` when asked."""
        self.ddp_student: nn.Module = self.student
        if self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_student = DistributedDataParallel(self.student, device_ids=ids)
        if self.cfg.compile:
            # Module.compile keeps state-dict keys free of an ``_orig_mod.`` prefix.
            self.student.backbone.compile()
            self.teacher.backbone.compile()

    def _build_schedules(self) -> None:
        cfg, steps = self.cfg, self.steps_per_epoch
        self.lr_schedule = cosine_schedule(cfg.peak_lr, cfg.min_lr, cfg.epochs, steps,
                                           cfg.warmup_epochs)
        self.wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end,
                                           cfg.epochs, steps)
        self.momentum_schedule = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps)
        self.teacher_temp = teacher_temperature_schedule(
            cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs,
            cfg.epochs)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self, epoch: int, metrics: list[dict[str, Any]],
                   partial: dict[str, Any] | None = None) -> dict[str, Any]:
        # No generator state is saved: every draw (image order, crops, partner views, drop
        # path masks) is a function of (seed, epoch, image index, rank), so a resume from
        # epoch e draws what an uninterrupted run draws from e on (test: resume = full run).
        # ``partial``: the row of an epoch a --max-steps stop left unfinished (a probe).
        return {
            "epoch": epoch,
            "steps": epoch * self.steps_per_epoch + (partial["steps"] if partial else 0),
            "partial_epoch": None if partial is None else dict(partial),
            # the rows travel with the weights, so a kill before metrics.jsonl loses none
            "metrics": [dict(m) for m in metrics],
            "data_sha256": self.data_sha256,
            "config": self.cfg.to_dict(),
            "backbone": {"arch": self.cfg.arch, "kwargs": self.cfg.backbone_kwargs()},
            "teacher_backbone": self.teacher.backbone.state_dict(),
            "student_backbone": self.student.backbone.state_dict(),
            "teacher_head": self.teacher.head.state_dict(),
            "student_head": self.student.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "centre": self.loss_fn.center.detach().clone(),
            "scaler": self.scaler.state_dict(),
            "eval_transform": self.eval_transform.to_dict(),
            "init": self.init_report,
            "train_images": self.n,
        }

    def load_state(self, state: dict[str, Any], path: Path) -> int:
        """Restore the training state, each field checked first (one line naming it)."""
        for name, module in (("teacher_backbone", self.teacher.backbone),
                             ("student_backbone", self.student.backbone),
                             ("teacher_head", self.teacher.head),
                             ("student_head", self.student.head)):
            check_state_dict(path, name, module, state.get(name))
            module.load_state_dict(state[name])
        self._load_optimizer(state.get("optimizer"), path)
        centre = state.get("centre")
        if not isinstance(centre, torch.Tensor) or centre.shape != self.loss_fn.center.shape:
            raise bad_field(path, "centre", f"is not a tensor of shape "
                                            f"{tuple(self.loss_fn.center.shape)}")
        self.loss_fn.center.copy_(centre.to(self.device))
        self.init_report = state.get("init")
        if state.get("scaler") and self.scaler.is_enabled():
            try:
                self.scaler.load_state_dict(state["scaler"])
            except (KeyError, TypeError, ValueError, RuntimeError):
                raise bad_field(path, "scaler", "is not a GradScaler state") from None
        return state["epoch"]

    def _load_optimizer(self, sd: Any, path: Path) -> None:
        try:
            self.optimizer.load_state_dict(sd)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError):
            raise bad_field(path, "optimizer", "does not fit the model's parameters") from None
        # torch checks group sizes, not the moment tensors' shapes (those fail mid-step)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.ndim and value.shape != p.shape:
                        raise bad_field(path, f"optimizer state {key}",
                                        f"has shape {tuple(value.shape)} for a parameter of "
                                        f"shape {tuple(p.shape)}")

    # -- loop -----------------------------------------------------------------------------
    def train_step(self, epoch: int, it: int, indices: torch.Tensor) -> torch.Tensor:
        """One optimisation step on this rank's images ``indices``; returns the loss."""
        cfg = self.cfg
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[it])
            if i == 0:
                group["weight_decay"] = float(self.wd_schedule[it])
        indices = indices.to(self.device)
        keys = sample_keys(cfg.seed, epoch, indices)
        second = None
        if self.nodule_views is not None:
            second = self.images[self.nodule_views(indices, keys)]
        crops = self.multicrop(self.images[indices], keys, second)
        with runtime.autocast(self.device.type, self.amp_dtype):
            with torch.no_grad():
                teacher_out = self.teacher(crops[:2])
            student_out = self.ddp_student(crops)
        loss = self.loss_fn(student_out, teacher_out, float(self.teacher_temp[epoch]))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip_per_parameter(self.student_params, cfg.clip_grad)
        if epoch < cfg.freeze_last_layer:
            for p in self.last_layer_params:
                p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update(self.teacher_params, self.student_params, float(self.momentum_schedule[it]))
        return loss.detach()

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over this epoch's image order; returns its metrics row."""
        cfg, env = self.cfg, self.env
        # Drop path draws from the device's default generator: seeded per (epoch, rank)
        # for the epoch, the caller's random state restored afterwards.
        with forked_seed(derive_seed(cfg.seed, epoch, env.rank, _DROP_PATH_SALT), self.device):
            return self._epoch(epoch)

    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        order = epoch_permutation(cfg.seed, epoch, self.n)
        loss_sum = torch.zeros((), device=self.device)
        n_steps = self.steps_per_epoch if self.steps_left is None else \
            min(self.steps_per_epoch, self.steps_left)
        self._emit("on_epoch_start", epoch)
        start = time.perf_counter()
        for step in range(n_steps):
            batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            it = epoch * self.steps_per_epoch + step
            loss_sum += self.train_step(epoch, it, runtime.shard(batch, env))
            self._emit("on_step_end", epoch, step, loss_sum)
        loss = runtime.all_reduce_mean(loss_sum / n_steps, env).item()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        last = epoch * self.steps_per_epoch + n_steps - 1
        row = {"epoch": epoch + 1, "loss": loss, "lr": float(self.lr_schedule[last]),
               "wd": float(self.wd_schedule[last]),
               "momentum": float(self.momentum_schedule[last]),
               "teacher_temp": float(self.teacher_temp[epoch]),
               "images_per_s": n_steps * cfg.batch_size / seconds,
               "epoch_time_s": seconds}
        if n_steps < self.steps_per_epoch:  # a --max-steps stop inside the epoch
            row.update(steps=n_steps, partial=True)
        return row

    def run(self) -> RunResult:
        """Train the epochs not yet in the checkpoint (none if the run is finished)."""
        start_epoch, metrics = self._open_run()
        result = RunResult(run_dir=self.run_dir, checkpoint=self.checkpoint, metrics=metrics,
                           resumed_from=start_epoch)
        if start_epoch >= self.cfg.epochs:
            result.loss_curve = existing(self.run_dir / LOSS_PLOT_NAME)
            return result
        result.metrics, result.partial = self._train(start_epoch, metrics)
        if self.env.is_main:
            result.loss_curve = existing(self.run_dir / LOSS_PLOT_NAME)
        runtime.barrier(self.env)
        return result

    def _open_run(self) -> tuple[int, list[dict[str, Any]]]:
        """Resume the run folder's checkpoint (checked against this config) or start it."""
        if not self.resuming:
            if self.env.is_main:
                make_run_dir(self.run_dir)
                save_config(self.cfg, self.run_dir / "config.json",
                            {"data_sha256": self.data_sha256})
            return 0, []
        ckpt = self.checkpoint
        state, self._state = self._state, None   # read and checked by _continuable
        start_epoch = self.load_state(state, ckpt)
        metrics = checkpoint_metrics(state, ckpt, self.run_dir / METRICS_NAME)
        if self.env.is_main:
            reconcile_outputs(self.run_dir, metrics, plot=start_epoch >= self.cfg.epochs)
        return start_epoch, metrics

    def _train(self, start_epoch: int, metrics: list[dict[str, Any]]
               ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Epochs ``start_epoch`` .. end (or until ``max_steps``), a checkpoint after each;
        callbacks around them. Returns the finished epochs' rows and a partial epoch's row."""
        cfg = self.cfg
        partial = None
        try:
            self._emit("on_train_start", start_epoch)
            for epoch in range(start_epoch, cfg.epochs):
                if self.steps_left == 0:
                    break
                row = self.run_epoch(epoch)
                self._check_finite(row, epoch)
                if self.steps_left is not None:
                    self.steps_left -= row.get("steps", self.steps_per_epoch)
                if row.get("partial"):   # the monitor and the epoch's row wait for its end
                    partial = row
                    self._save(epoch, metrics, partial)
                    break
                for callback in self.callbacks:
                    row.update(callback.on_epoch_end(self, epoch, row))
                metrics.append(row)
                self._save(epoch + 1, metrics)
            self._emit("on_train_end", metrics)
        except torch.OutOfMemoryError:
            raise CredannoError(
                f"GPU out of memory at batch size {cfg.batch_size}; pass --batch-size "
                f"{max(2, cfg.batch_size // 2)} (the lr scales with it)") from None
        finally:
            for callback in self.callbacks:
                callback.close()
        return metrics, partial

    def _save(self, epochs_done: int, metrics: list[dict[str, Any]],
              partial: dict[str, Any] | None = None) -> None:
        """Rank 0 writes the checkpoint; then the callbacks see its rows (metrics.jsonl holds
        a partial epoch's row last, marked ``"partial": true``)."""
        if self.env.is_main:
            save_checkpoint(self.checkpoint, self.state_dict(epochs_done, metrics, partial))
        self._emit("on_checkpoint", metrics if partial is None else [*metrics, partial])
        runtime.barrier(self.env)

    def _check_finite(self, row: dict[str, Any], epoch: int) -> None:
        """A NaN/Inf loss stops the run before its checkpoint replaces the last good one."""
        if math.isfinite(row["loss"]):
            return
        kept = (f"epoch {epoch} checkpoint kept at {self.checkpoint}" if epoch else
                "no checkpoint was written")
        raise CredannoError(
            f"loss became {row['loss']} in epoch {epoch + 1}; training stopped "
            f"({kept}); lower --lr or raise the teacher temperature warm-up")

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def pretrain(config: PretrainConfig, progress: bool = False) -> RunResult:
    """Run (or resume) DINO pretraining; see :mod:`credanno.pretrain`."""
    config.validate()
    env = runtime.init_distributed(config.device)
    try:
        return Trainer(config, env, progress=progress).run()
    finally:
        runtime.cleanup(env)
