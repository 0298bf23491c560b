"""Per-iteration schedules of DINO (Caron et al. 2021, section 3 and appendix).

The learning rate rises linearly for the warm-up epochs, then follows a cosine to its final
value; the weight decay (0.04 -> 0.4) and the teacher's EMA momentum (0.996 -> 1) follow a
cosine over the whole run. The teacher temperature rises linearly over its warm-up epochs.
Schedules are plain float64 arrays indexed by the global iteration (or epoch), so that
resuming at iteration ``i`` reads exactly the value an uninterrupted run would.
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, start_warmup: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``start_warmup`` to ``base``, then a cosine from ``base`` to ``final``.

    Returns ``epochs * steps_per_epoch`` values, one per optimisation step.
    """
    total = epochs * steps_per_epoch
    warmup_steps = min(warmup_epochs * steps_per_epoch, total)
    warmup = np.linspace(start_warmup, base, warmup_steps) if warmup_steps else np.zeros(0)
    steps = np.arange(total - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_epochs: int,
                                 epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear ``warmup_temp -> temp``, then constant."""
    warmup_epochs = min(warmup_epochs, epochs)
    return np.concatenate([np.linspace(warmup_temp, temp, warmup_epochs),
                           np.full(epochs - warmup_epochs, temp)]).astype(np.float64)
