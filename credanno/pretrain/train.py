"""The DINO training loop (Caron et al. 2021, Algorithm 1; cRedAnno section 2 and 3.1).

Per step: multi-crop the batch on the device, teacher on the 2 global crops, student on all
crops, DINO loss, AdamW step (lr / weight decay from their schedules, per-parameter gradient
clipping, the prototype layer frozen during the first epoch), then the teacher follows the
student by EMA. Every epoch the checkpoint is rewritten atomically, so a killed run resumes
from its last finished epoch with the same result as an uninterrupted one: all randomness is
a function of (seed, epoch, image index, rank), never of hidden generator state.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from credanno._atomic import atomic_path
from credanno.errors import CredannoError
from credanno.paths import RUNS_DIR
from credanno.pretrain import distributed as D
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
from credanno.pretrain.multicrop import MultiCrop, mix64, sample_keys
from credanno.pretrain.nodule_views import SameNoduleViews
from credanno.pretrain.schedules import cosine_schedule, teacher_temperature_schedule
from credanno.transforms import EvalTransform

#: Settings that may change when a run is resumed (they do not change its result).
RESUMABLE_CHANGES = frozenset({"out", "device", "monitor_every", "monitor_val_frac",
                               "monitor_k", "compile", "amp", "init"})
#: Run facts saved in config.json beside the config fields (not settings).
RUN_FACTS = ("data_sha256",)


@dataclass
class RunResult:
    """What a pretraining run left behind."""

    run_dir: Path
    checkpoint: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0          # epochs already done when this call started
    loss_curve: Path | None = None

    @property
    def epochs_done(self) -> int:
        return self.metrics[-1]["epoch"] if self.metrics else self.resumed_from


def select_amp_dtype(amp: str, device_type: str,
                     bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 on GPUs that support it, full precision elsewhere.

    fp16 needs a GradScaler and a GPU; bf16 needs neither (same exponent range as fp32).
    """
    if device_type == "cuda" and bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if device_type == "cuda" and bf16_supported else None
    if amp == "bf16":
        if device_type == "cuda" and not bf16_supported:
            raise CredannoError("this GPU has no bf16 support; pass amp = \"fp16\" or \"none\"")
        return torch.bfloat16
    if amp == "fp16":
        if device_type != "cuda":
            raise CredannoError("fp16 autocast needs a GPU; use amp = \"bf16\" or \"none\" on CPU")
        return torch.float16
    raise CredannoError(f"unknown amp mode {amp!r}; choose auto, bf16, fp16 or none")


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


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The same image order on every rank, a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(_derive_seed(seed, epoch, 0x5EED))
    return torch.randperm(n, generator=g)


def _derive_seed(*parts: int) -> int:
    x = torch.tensor([0], dtype=torch.int64)
    for part in parts:
        x = mix64(x + int(part))
    return int(x.item()) & ((1 << 63) - 1)


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in RESUMABLE_CHANGES and k not in RUN_FACTS}


def _find_unfinished(cfg: PretrainConfig, data_sha256: str | None = None) -> Path | None:
    """The newest ``runs/<preset>-*`` run that was stopped early with these same settings
    on the same patch file (by content, not by path)."""
    runs = sorted(RUNS_DIR.glob(f"{cfg.preset}-*/{CHECKPOINT_NAME}"),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for ckpt in runs[:5]:
        cfg_file = ckpt.parent / "config.json"
        metrics = ckpt.parent / "metrics.jsonl"
        try:
            saved = json.loads(cfg_file.read_text())
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        except (OSError, json.JSONDecodeError):
            continue
        same_data = saved.get("data_sha256") in (None, data_sha256)
        if done < cfg.epochs and same_data and _comparable(saved) == _comparable(cfg.to_dict()):
            return ckpt.parent
    return None


def resolve_run_dir(cfg: PretrainConfig, data_sha256: str | None = None) -> Path:
    """``--out`` if given; else an unfinished run of the same settings; else a new name."""
    if cfg.out:
        return Path(cfg.out)
    return _find_unfinished(cfg, data_sha256) or RUNS_DIR / f"{cfg.preset}-{_timestamp()}"


def _has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint; an impossible path is a one-line error."""
    try:
        return (run_dir / CHECKPOINT_NAME).exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise CredannoError(f"cannot use run folder {run_dir} ({exc.strerror}); "
                            "choose another --out") from None


def _make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only, no permission, a file in the way, name too long
        raise CredannoError(f"cannot create run folder {run_dir} ({exc.strerror}); "
                            "choose a writable --out") from None


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


class Trainer:
    """One pretraining run on this rank. Build with a config, call :meth:`run`."""

    def __init__(self, cfg: PretrainConfig, env: D.DistEnv, progress: bool = False):
        self.cfg, self.env, self.progress = cfg, env, progress
        self.device = env.device
        from credanno.data.patchfile import file_sha256

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
        self.amp_dtype = select_amp_dtype(cfg.amp, self.device.type)
        self.multicrop = MultiCrop(cfg.global_size, cfg.local_size, cfg.local_crops,
                                   cfg.global_scale, cfg.local_scale, cfg.blur_sigma,
                                   local_shift=cfg.local_shift, rotation=cfg.rotation)
        self.nodule_views = None
        if cfg.nodule_views > 0:
            if "nodule_id" not in self.table:
                raise CredannoError(f"{cfg.data} has no nodule_id column for nodule_views; "
                                    "set nodule_views = 0 or re-create it with `credanno prepare`")
            self.nodule_views = SameNoduleViews(self.table["nodule_id"].to_numpy(),
                                                cfg.nodule_views, self.device)
        self.eval_transform = EvalTransform(resize=cfg.eval_resize, crop=cfg.eval_crop)
        self.run_dir = Path(D.broadcast_object(str(resolve_run_dir(cfg, self.data_sha256)),
                                               env))
        self.resuming = _has_checkpoint(self.run_dir)
        self._build_models()
        self._build_schedules()

    # -- construction -------------------------------------------------------------------
    def _build_models(self) -> None:
        cfg = self.cfg
        kwargs = cfg.backbone_kwargs()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            student_bb = create_backbone(cfg.arch, kwargs, drop_path_rate=cfg.drop_path)
            teacher_bb = create_backbone(cfg.arch, kwargs)
            dim = student_bb.num_features
            head_kw = dict(out_dim=cfg.out_dim, hidden_dim=cfg.head_hidden_dim,
                           bottleneck_dim=cfg.head_bottleneck_dim, nlayers=cfg.head_layers)
            student_head = DINOHead(dim, norm_last_layer=cfg.norm_last_layer, **head_kw)
            teacher_head = DINOHead(dim, **head_kw)
        self.init_report = None
        if cfg.init and not self.resuming:  # a resumed run has its weights already
            from credanno.pretrain.init_weights import load_init_weights

            self.init_report = load_init_weights(student_bb, cfg.init)
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
                                center_momentum=cfg.center_momentum).to(self.device)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=cfg.peak_lr,
                                           fused=fused or None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ddp_student: nn.Module = self.student
        if self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_student = DistributedDataParallel(self.student, device_ids=ids)
        if cfg.compile:
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
    def state_dict(self, epoch: int, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "epoch": epoch,
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
            # Randomness is derived from (seed, epoch, index, rank); these are the seeds.
            "rng": {"scheme": "splitmix64(seed, epoch, index)", "seed": self.cfg.seed,
                    "torch_cpu": torch.get_rng_state()},
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

    def _check_resumable(self, state: dict[str, Any], ckpt: Path) -> None:
        """Same settings and the same patch file (by sha256) as the run being resumed."""
        saved, now = _comparable(state["config"]), _comparable(self.cfg.to_dict())
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            shown = ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in diff[:4])
            raise CredannoError(f"{self.run_dir} was started with other settings ({shown}); "
                                "pass the same settings to resume or a new --out")
        if state["epoch"] > self.cfg.epochs:
            raise bad_field(ckpt, "epoch", f"is {state['epoch']}, beyond the run's "
                                           f"{self.cfg.epochs} epochs")
        old = state.get("data_sha256")
        if old is not None and old != self.data_sha256:
            raise CredannoError(
                f"{self.cfg.data} is not the patch file {self.run_dir} was trained on (its "
                f"sha256 was {str(old)[:12]}..., now {self.data_sha256[:12]}...); pass a new "
                "--out to train on these images, or restore the original file to resume")

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
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype)
                    if self.amp_dtype is not None else contextlib.nullcontext())
        with autocast:
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

    def run_epoch(self, epoch: int, bar=None) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        # Drop path draws from the device's default generator: seed it per (epoch, rank).
        torch.manual_seed(_derive_seed(cfg.seed, epoch, env.rank, 0xD409))
        order = epoch_permutation(cfg.seed, epoch, self.n)
        loss_sum = torch.zeros((), device=self.device)
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            it = epoch * self.steps_per_epoch + step
            loss_sum += self.train_step(epoch, it, D.shard(batch, env))
            if bar is not None and (step % 5 == 4 or step == self.steps_per_epoch - 1):
                elapsed = time.perf_counter() - start
                bar.update(step + 1 - bar.n + epoch * self.steps_per_epoch)
                bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.3f}",
                                lr=f"{self.lr_schedule[it]:.2e}",
                                img_s=f"{(step + 1) * cfg.batch_size / elapsed:.0f}")
        loss = D.all_reduce_mean(loss_sum / self.steps_per_epoch, env).item()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        last = (epoch + 1) * self.steps_per_epoch - 1
        return {"epoch": epoch + 1, "loss": loss, "lr": float(self.lr_schedule[last]),
                "wd": float(self.wd_schedule[last]),
                "momentum": float(self.momentum_schedule[last]),
                "teacher_temp": float(self.teacher_temp[epoch]),
                "images_per_s": self.steps_per_epoch * cfg.batch_size / seconds,
                "epoch_time_s": seconds}

    def run(self) -> RunResult:
        cfg, env = self.cfg, self.env
        run_dir = self.run_dir
        ckpt = run_dir / CHECKPOINT_NAME
        metrics: list[dict[str, Any]] = []
        start_epoch = 0
        if self.resuming:
            state = read_checkpoint(ckpt, map_location=self.device)
            self._check_resumable(state, ckpt)
            start_epoch = self.load_state(state, ckpt)
            metrics = _checkpoint_metrics(state, ckpt, run_dir / "metrics.jsonl")
            if env.is_main:
                _reconcile_outputs(run_dir, metrics, plot=start_epoch >= cfg.epochs)
        elif env.is_main:
            _make_run_dir(run_dir)
            save_config(cfg, run_dir / "config.json", {"data_sha256": self.data_sha256})
        result = RunResult(run_dir=run_dir, checkpoint=ckpt, metrics=metrics,
                           resumed_from=start_epoch)
        if start_epoch >= cfg.epochs:
            result.loss_curve = _existing(run_dir / "loss.png")
            return result
        monitor = _Monitor(self) if cfg.monitor_every > 0 else None
        bar = None
        if self.progress and env.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.epochs * self.steps_per_epoch,
                       initial=start_epoch * self.steps_per_epoch, unit="step",
                       desc=f"pretrain {run_dir.name}", leave=False)
        last_good = start_epoch
        try:
            with torch.random.fork_rng(devices=_cuda_devices(self.device)):
                for epoch in range(start_epoch, cfg.epochs):
                    row = self.run_epoch(epoch, bar)
                    if not math.isfinite(row["loss"]):
                        kept = f"epoch {last_good} checkpoint kept at {ckpt}" if last_good else \
                            "no checkpoint was written"
                        raise CredannoError(
                            f"loss became {row['loss']} in epoch {epoch + 1}; training stopped "
                            f"({kept}); lower --lr or raise the teacher temperature warm-up")
                    if monitor is not None and ((epoch + 1) % cfg.monitor_every == 0
                                                or epoch + 1 == cfg.epochs):
                        row.update(monitor())
                    metrics.append(row)
                    if env.is_main:
                        save_checkpoint(ckpt, self.state_dict(epoch + 1, metrics))
                        _write_metrics(run_dir / "metrics.jsonl", metrics)
                    last_good = epoch + 1
                    D.barrier(env)
        except torch.OutOfMemoryError:
            raise CredannoError(
                f"GPU out of memory at batch size {cfg.batch_size}; pass --batch-size "
                f"{max(2, cfg.batch_size // 2)} (the lr scales with it)") from None
        finally:
            if bar is not None:
                bar.close()
        if env.is_main:
            result.loss_curve = plot_loss_curve(metrics, run_dir / "loss.png")
        D.barrier(env)
        result.metrics = metrics
        return result


class _Monitor:
    """k-NN malignancy accuracy of the teacher's CLS features (DINO's k-NN monitor).

    The queries are a nodule-level hold-out of the *training* split (never the test split);
    the bank is the remaining training images.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        cfg = trainer.cfg
        table = trainer.table
        labels = table["malignancy"].to_numpy()
        nodules = np.unique(table["nodule_id"].to_numpy())
        rng = np.random.default_rng(cfg.seed)
        held = rng.permutation(nodules)[:max(1, int(round(cfg.monitor_val_frac * len(nodules))))]
        is_val = np.isin(table["nodule_id"].to_numpy(), held)
        valid = labels >= 0
        self.bank = np.flatnonzero(~is_val & valid)
        self.queries = np.flatnonzero(is_val & valid)
        self.labels = labels
        if len(self.bank) == 0 or len(self.queries) == 0:
            raise CredannoError("too few labelled training images for the k-NN monitor; "
                                "drop --monitor-every")

    @torch.no_grad()
    def features(self) -> np.ndarray:
        t = self.trainer
        out = []
        for start in range(0, t.n, 256):
            x = t.eval_transform(t.images[start:start + 256])
            f = t.teacher.backbone(x).float()
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        return torch.cat(out).numpy()

    def __call__(self) -> dict[str, float]:
        try:
            from credanno.eval.knn import knn_classify
        except ImportError:
            raise CredannoError("the k-NN monitor needs credanno.eval.knn, which is not "
                                "installed in this version; drop --monitor-every") from None
        feats = self.features()
        k = int(min(self.trainer.cfg.monitor_k, len(self.bank)))
        preds = knn_classify(feats[self.bank], self.labels[self.bank], feats[self.queries],
                             ks=[k], n_classes=2)
        acc = float(np.mean(np.asarray(preds[k]) == self.labels[self.queries]))
        return {"knn_k": k, "knn_malignancy_acc": acc}


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


def _read_metrics(path: Path) -> list[dict[str, Any]] | None:
    """metrics.jsonl's rows; None when it is missing or unreadable (it is then rewritten)."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return rows if all(isinstance(r, dict) for r in rows) else None


def _checkpoint_metrics(state: dict[str, Any], ckpt: Path,
                        fallback: Path) -> list[dict[str, Any]]:
    """The per-epoch rows of a checkpoint (older checkpoints: metrics.jsonl's first rows)."""
    epoch = state["epoch"]
    if "metrics" not in state:
        return (_read_metrics(fallback) or [])[:epoch]
    rows = state["metrics"]
    if not isinstance(rows, list) or len(rows) != epoch or not all(
            isinstance(r, dict) and r.get("epoch") == i + 1 and isinstance(r.get("loss"), float)
            for i, r in enumerate(rows)):
        raise bad_field(ckpt, "metrics", f"is not one row per epoch for its {epoch} epochs")
    return [dict(r) for r in rows]


def _reconcile_outputs(run_dir: Path, metrics: list[dict[str, Any]], plot: bool) -> None:
    """Rewrite metrics.jsonl (and loss.png when ``plot``) where a kill left them behind the
    checkpoint: both are written after it."""
    if _read_metrics(run_dir / "metrics.jsonl") != metrics:
        _write_metrics(run_dir / "metrics.jsonl", metrics)
    if plot and metrics and not (run_dir / "loss.png").exists():
        plot_loss_curve(metrics, run_dir / "loss.png")


def _write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(json.dumps(m) + "\n" for m in metrics))


def plot_loss_curve(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    """DINO loss per epoch (matplotlib Agg), written atomically."""
    if not metrics:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    ax.plot([m["epoch"] for m in metrics], [m["loss"] for m in metrics], marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel("DINO loss")
    ax.set_title(path.parent.name, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def pretrain(config: PretrainConfig, progress: bool = False) -> RunResult:
    """Run (or resume) DINO pretraining; see :mod:`credanno.pretrain`."""
    config.validate()
    env = D.init_distributed(config.device)
    try:
        return Trainer(config, env, progress=progress).run()
    finally:
        D.cleanup(env)
