"""What a run leaves beside its checkpoint: ``metrics.jsonl`` (one JSON row per epoch) and
``loss.png``, both rewritten from the checkpoint's ``metrics`` where a kill left them behind.

The checkpoint is the source of truth (docs/architecture.md): it is written first each
epoch, then these files, so a kill in between loses nothing that the next run on the folder
(a resume, or "already trained") cannot restore.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from credanno._atomic import atomic_path
from credanno.pretrain.callbacks import Callback
from credanno.pretrain.checkpoint import bad_field

if TYPE_CHECKING:
    from credanno.pretrain.train import Trainer

METRICS_NAME = "metrics.jsonl"
LOSS_PLOT_NAME = "loss.png"


def existing(path: Path) -> Path | None:
    return path if path.exists() else None


def read_metrics(path: Path) -> list[dict[str, Any]] | None:
    """metrics.jsonl's rows; None when it is missing or unreadable (it is then rewritten)."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return rows if all(isinstance(r, dict) for r in rows) else None


def write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(json.dumps(m) + "\n" for m in metrics))


def checkpoint_metrics(state: dict[str, Any], ckpt: Path,
                       fallback: Path) -> list[dict[str, Any]]:
    """The per-epoch rows of a checkpoint (older checkpoints: metrics.jsonl's first rows)."""
    epoch = state["epoch"]
    if "metrics" not in state:
        return (read_metrics(fallback) or [])[:epoch]
    rows = state["metrics"]
    if not isinstance(rows, list) or len(rows) != epoch or not all(
            isinstance(r, dict) and r.get("epoch") == i + 1 and isinstance(r.get("loss"), float)
            for i, r in enumerate(rows)):
        raise bad_field(ckpt, "metrics", f"is not one row per epoch for its {epoch} epochs")
    return [dict(r) for r in rows]


def reconcile_outputs(run_dir: Path, metrics: list[dict[str, Any]], plot: bool) -> None:
    """Rewrite metrics.jsonl (and loss.png when ``plot``) where a kill left them behind the
    checkpoint: both are written after it."""
    if read_metrics(run_dir / METRICS_NAME) != metrics:
        write_metrics(run_dir / METRICS_NAME, metrics)
    if plot and metrics and not (run_dir / LOSS_PLOT_NAME).exists():
        plot_loss_curve(metrics, run_dir / LOSS_PLOT_NAME)


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


class MetricsWriter(Callback):
    """Rank 0 rewrites metrics.jsonl after each checkpoint and draws loss.png at the end."""

    def on_checkpoint(self, trainer: Trainer, metrics: list[dict[str, Any]]) -> None:
        if trainer.env.is_main:
            write_metrics(trainer.run_dir / METRICS_NAME, metrics)

    def on_train_end(self, trainer: Trainer, metrics: list[dict[str, Any]]) -> None:
        if trainer.env.is_main:
            plot_loss_curve(metrics, trainer.run_dir / LOSS_PLOT_NAME)
