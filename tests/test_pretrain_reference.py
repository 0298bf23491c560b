"""The DINO loss and schedules against naive references written from the papers' equations.

Each reference below is plain Python loops over float64 numbers, written from the equations
(Caron et al. 2021, "Emerging properties in self-supervised vision transformers", Eq. 1-2,
Algorithm 1 and section 3 / appendix "Implementation details"; cRedAnno section 3.1), not
from the implementation, and compared on random inputs. The trainer's wiring of both
(teacher on the global crops only, schedules applied per step) is checked on a real step.
"""

from __future__ import annotations

import math

import pytest
import torch

from credanno.data.patchfile import write_patch_file
from credanno.pretrain import load_config
from credanno.pretrain.loss import DINOLoss
from credanno.pretrain.schedules import cosine_schedule, teacher_temperature_schedule
from credanno.pretrain.train import Trainer
from credanno.runtime import DistEnv
from credanno.synthetic import synthetic_images, synthetic_table

# -- references ---------------------------------------------------------------------------


def ref_softmax(z: list[float], tau: float) -> list[float]:
    """softmax(z / tau)_k = exp(z_k / tau) / sum_j exp(z_j / tau) (max subtracted: exact)."""
    top = max(z)
    e = [math.exp((v - top) / tau) for v in z]
    total = sum(e)
    return [v / total for v in e]


def ref_dino_loss(student: list[list[float]], teacher: list[list[float]], centre: list[float],
                  tau_s: float, tau_t: float, n_views: int, momentum: float
                  ) -> tuple[float, list[float]]:
    """DINO's loss for one batch and the centre after it.

    ``student``: rows crop-major (view v of image b is row v * B + b) for all ``n_views``
    views; ``teacher``: the same for the 2 global views only. Eq. 1-2 of DINO:
    ``P_t = softmax((g_t - c) / tau_t)``, ``P_s = softmax(g_s / tau_s)``, and the loss is
    ``H(P_t, P_s) = -sum_k P_t[k] log P_s[k]`` averaged over images and over every pair of a
    global view seen by the teacher and a *different* view seen by the student. The centre
    is then ``c <- m c + (1 - m) (1/N) sum_i g_t(i)`` over the N teacher outputs of the batch
    (cRedAnno's mu, lambda = 0.9).
    """
    batch = len(teacher) // 2
    pair_losses = []
    for t in range(2):
        for s in range(n_views):
            if s == t:
                continue
            per_image = []
            for b in range(batch):
                g_t = [g - c for g, c in zip(teacher[t * batch + b], centre, strict=True)]
                p_t = ref_softmax(g_t, tau_t)
                p_s = ref_softmax(student[s * batch + b], tau_s)
                per_image.append(-sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s,
                                                                            strict=True)))
            pair_losses.append(sum(per_image) / batch)
    k = len(centre)
    mean = [sum(row[j] for row in teacher) / len(teacher) for j in range(k)]
    new_centre = [momentum * centre[j] + (1 - momentum) * mean[j] for j in range(k)]
    return sum(pair_losses) / len(pair_losses), new_centre


def ref_cosine(base: float, final: float, k: int, total: int) -> float:
    """Cosine decay from ``base`` (k = 0) towards ``final`` over ``total`` steps:
    ``final + (base - final) (1 + cos(pi k / total)) / 2``. DINO's teacher momentum is this
    with final = 1: ``m_k = 1 - (1 - m_0) (cos(pi k / K) + 1) / 2``."""
    return final + (base - final) * (1 + math.cos(math.pi * k / total)) / 2


def ref_lr(peak: float, final: float, epochs: int, steps: int, warmup_epochs: int) -> list[float]:
    """DINO's lr per step: linear warm-up from 0 reaching ``peak`` at the last warm-up step,
    then the cosine from ``peak`` towards ``final`` over the remaining steps. A warm-up
    longer than the run is cut at the run's end."""
    total = epochs * steps
    warm = min(warmup_epochs * steps, total)
    out = []
    for i in range(total):
        if i < warm:
            out.append(peak * i / (warm - 1) if warm > 1 else 0.0)
        else:
            out.append(ref_cosine(peak, final, i - warm, total - warm))
    return out


def ref_teacher_temp(start: float, end: float, warmup_epochs: int, epochs: int) -> list[float]:
    """Teacher temperature per epoch: linear from ``start`` (epoch 0) to ``end`` (last
    warm-up epoch), then ``end`` (DINO: 0.04 -> 0.07 over 30 epochs)."""
    warm = min(warmup_epochs, epochs)
    out = []
    for e in range(epochs):
        if e >= warm:
            out.append(end)
        else:  # a one-epoch warm-up is that one epoch at ``start``
            out.append(start + (end - start) * e / (warm - 1) if warm > 1 else start)
    return out


# -- the loss ------------------------------------------------------------------------------

@pytest.mark.parametrize("n_local", [0, 1, 4])
def test_dino_loss_and_centre_match_the_equations(n_local):
    """Three steps in a row (the centre feeds the next step), with a warming teacher."""
    gen = torch.Generator().manual_seed(n_local)
    batch, k, momentum = 3, 7, 0.9
    n_views = 2 + n_local
    loss_fn = DINOLoss(k, n_global=2, student_temp=0.1, center_momentum=momentum)
    centre = [0.0] * k
    for tau_t in (0.04, 0.055, 0.07):
        # head outputs are bounded by 1 (unit-norm input, weight-normalised prototypes)
        student = torch.rand(n_views * batch, k, generator=gen) * 2 - 1
        teacher = torch.rand(2 * batch, k, generator=gen) * 2 - 1
        loss = loss_fn(student, teacher, teacher_temp=tau_t)
        expected, centre = ref_dino_loss(student.double().tolist(), teacher.double().tolist(),
                                         centre, 0.1, tau_t, n_views, momentum)
        assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
        assert loss_fn.center.double().flatten().tolist() == pytest.approx(centre, abs=1e-7)


def test_dino_loss_pairs_only_different_views():
    """A student that copies the teacher on each global view is not rewarded for it: the
    loss is the cross term H(P_t1, P_s2) + H(P_t2, P_s1), not the matching one."""
    k = 5
    a, b = torch.tensor([[3.0, 0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 0, 3.0]])
    loss = DINOLoss(k, student_temp=1.0, center_momentum=1.0)(
        torch.cat([a, b]), torch.cat([a, b]), teacher_temp=1.0)
    ref, _ = ref_dino_loss([a[0].tolist(), b[0].tolist()], [a[0].tolist(), b[0].tolist()],
                           [0.0] * k, 1.0, 1.0, 2, 1.0)
    p_a = ref_softmax(a[0].tolist(), 1.0)
    p_b = ref_softmax(b[0].tolist(), 1.0)
    cross = -sum(pa * math.log(pb) for pa, pb in zip(p_a, p_b, strict=True))
    assert loss.item() == pytest.approx(ref, rel=1e-6) == pytest.approx(cross, rel=1e-6)


# -- the schedules ------------------------------------------------------------------------

@pytest.mark.parametrize("epochs, steps, warmup", [(10, 4, 2), (5, 3, 0), (3, 7, 3),
                                                   (2, 5, 4), (4, 1, 1)])
def test_lr_schedule_matches_warmup_then_cosine(epochs, steps, warmup):
    peak, final = 2.5e-4, 1e-6                  # cRedAnno: up to 0.00025, cosine to 1e-6
    got = cosine_schedule(peak, final, epochs, steps, warmup)
    assert got.tolist() == pytest.approx(ref_lr(peak, final, epochs, steps, warmup),
                                         rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("epochs, steps", [(300, 14), (5, 3), (1, 1)])
def test_momentum_and_weight_decay_follow_the_cosine(epochs, steps):
    total = epochs * steps
    momentum = cosine_schedule(0.996, 1.0, epochs, steps)
    assert momentum.tolist() == pytest.approx(
        [1 - (1 - 0.996) * (math.cos(math.pi * i / total) + 1) / 2 for i in range(total)],
        rel=1e-12)
    wd = cosine_schedule(0.04, 0.4, epochs, steps)
    assert wd.tolist() == pytest.approx([ref_cosine(0.04, 0.4, i, total) for i in range(total)],
                                        rel=1e-12)


@pytest.mark.parametrize("warmup, epochs", [(30, 300), (3, 5), (0, 4), (1, 3), (6, 4)])
def test_teacher_temperature_warmup(warmup, epochs):
    got = teacher_temperature_schedule(0.04, 0.07, warmup, epochs)
    assert got.tolist() == pytest.approx(ref_teacher_temp(0.04, 0.07, warmup, epochs),
                                         rel=1e-12)


# -- the trainer uses both as the equations say -------------------------------------------

TINY = {"model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}, "out_dim": 16,
        "head_hidden_dim": 32, "head_bottleneck_dim": 8, "local_crops": 3, "batch_size": 8,
        "epochs": 4, "warmup_epochs": 2, "device": "cpu", "warmup_teacher_temp": 0.02,
        "warmup_teacher_temp_epochs": 3}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    table = synthetic_table(n_nodules=12, per_nodule=3, seed=1)
    folder = tmp_path_factory.mktemp("ref")
    write_patch_file(folder / "p.h5", synthetic_images(table), table, {"source": "synthetic"})
    cfg = load_config("cpu-tiny", overrides={**TINY, "data": str(folder / "p.h5"),
                                             "out": str(folder / "run")})
    return Trainer(cfg, DistEnv())


def test_trainer_schedules_are_the_reference_ones(trainer):
    cfg, steps = trainer.cfg, trainer.steps_per_epoch
    assert trainer.lr_schedule.tolist() == pytest.approx(
        ref_lr(cfg.lr * cfg.batch_size / 256, cfg.min_lr, cfg.epochs, steps, cfg.warmup_epochs),
        rel=1e-12, abs=1e-15)
    total = cfg.epochs * steps
    assert trainer.momentum_schedule.tolist() == pytest.approx(
        [ref_cosine(cfg.momentum_teacher, 1.0, i, total) for i in range(total)], rel=1e-12)
    assert trainer.teacher_temp.tolist() == pytest.approx(
        ref_teacher_temp(0.02, cfg.teacher_temp, 3, cfg.epochs), rel=1e-12)


def test_a_step_feeds_the_loss_global_crops_to_the_teacher_and_sets_the_schedules(
        trainer, monkeypatch):
    seen = []
    original = trainer.loss_fn.forward

    def spy(student_out, teacher_out, teacher_temp):
        seen.append((student_out.shape[0], teacher_out.shape[0], teacher_temp))
        return original(student_out, teacher_out, teacher_temp)

    monkeypatch.setattr(trainer.loss_fn, "forward", spy)
    epoch, it = 1, trainer.steps_per_epoch + 2
    trainer.train_step(epoch, it, torch.arange(8))
    # the teacher saw the 2 global crops, the student all 2 + 3 crops, of the 8 images
    assert seen == [(5 * 8, 2 * 8, trainer.teacher_temp[epoch])]
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["lr"] == no_decay["lr"] == trainer.lr_schedule[it]
    assert decay["weight_decay"] == trainer.wd_schedule[it] and no_decay["weight_decay"] == 0
