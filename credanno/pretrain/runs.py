"""The run folder: its name, whether it is resumed, and what a resume must keep the same.

``--out`` names the folder; without it the newest unfinished ``runs/<preset>-*`` run of the
same settings on the same patch file is resumed, else a new ``runs/<preset>-<time>`` is
made. A folder holding a checkpoint is resumed; a resume is refused where a setting that
changes the result differs (the list of those that may change is
:data:`credanno.pretrain.config.RESUMABLE_CHANGES`) or where the patch file has other
contents (by sha256).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from credanno.errors import CredannoError
from credanno.paths import RUNS_DIR
from credanno.pretrain.checkpoint import CHECKPOINT_NAME, bad_field
from credanno.pretrain.config import PretrainConfig, result_settings

#: how many of the newest same-preset runs are looked at for an unfinished one
_CANDIDATES = 5


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def find_unfinished(cfg: PretrainConfig, data_sha256: str | None = None) -> Path | None:
    """The newest ``runs/<preset>-*`` run that was stopped early with these same settings
    on the same patch file (by content, not by path)."""
    runs = sorted(RUNS_DIR.glob(f"{cfg.preset}-*/{CHECKPOINT_NAME}"),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for ckpt in runs[:_CANDIDATES]:
        cfg_file = ckpt.parent / "config.json"
        metrics = ckpt.parent / "metrics.jsonl"
        try:
            saved = json.loads(cfg_file.read_text())
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        except (OSError, json.JSONDecodeError):
            continue
        same_data = saved.get("data_sha256") in (None, data_sha256)
        same = result_settings(saved) == result_settings(cfg.to_dict())
        if done < cfg.epochs and same_data and same:
            return ckpt.parent
    return None


def resolve_run_dir(cfg: PretrainConfig, data_sha256: str | None = None) -> Path:
    """``--out`` if given; else an unfinished run of the same settings; else a new name."""
    if cfg.out:
        return Path(cfg.out)
    return find_unfinished(cfg, data_sha256) or RUNS_DIR / f"{cfg.preset}-{_timestamp()}"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint; an impossible path is a one-line error."""
    try:
        return (run_dir / CHECKPOINT_NAME).exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise CredannoError(f"cannot use run folder {run_dir} ({exc.strerror}); "
                            "choose another --out") from None


def make_run_dir(run_dir: Path) -> None:
    """Create the run folder; an unusable path is a one-line error naming ``--out``."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only, no permission, a file in the way, name too long
        raise CredannoError(f"cannot create run folder {run_dir} ({exc.strerror}); "
                            "choose a writable --out") from None


def check_resumable(cfg: PretrainConfig, state: dict[str, Any], ckpt: Path,
                    data_sha256: str) -> None:
    """Same settings and the same patch file (by sha256) as the run being resumed."""
    run_dir = ckpt.parent
    saved, now = result_settings(state["config"]), result_settings(cfg.to_dict())
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        shown = ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in diff[:4])
        raise CredannoError(f"{run_dir} was started with other settings ({shown}); "
                            "pass the same settings to resume or a new --out")
    if state["epoch"] > cfg.epochs:
        raise bad_field(ckpt, "epoch", f"is {state['epoch']}, beyond the run's "
                                       f"{cfg.epochs} epochs")
    old = state.get("data_sha256")
    if old is not None and old != data_sha256:
        raise CredannoError(
            f"{cfg.data} is not the patch file {run_dir} was trained on (its "
            f"sha256 was {str(old)[:12]}..., now {data_sha256[:12]}...); pass a new "
            "--out to train on these images, or restore the original file to resume")
