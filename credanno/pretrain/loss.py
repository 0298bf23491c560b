"""The DINO loss with a centred, sharpened teacher (Caron et al. 2021, Eq. 1-2, Algorithm 1).

For every pair of a teacher global view ``t`` and a *different* student view ``s``:
``H(P_t, P_s) = -sum_k P_t[k] log P_s[k]`` with ``P_t = softmax((g_t - c) / tau_t)`` and
``P_s = softmax(g_s / tau_s)``. The centre ``c`` is an EMA (momentum 0.9) of the teacher's
batch means, averaged over all ranks, which with sharpening (``tau_t`` < ``tau_s``) keeps the
teacher from collapsing (the paper's section 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from credanno import runtime


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's global views and the student's other views."""

    def __init__(self, out_dim: int, n_global: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9, env: runtime.DistEnv | None = None):
        super().__init__()
        # the ranks the centre is averaged over (default: this process alone)
        self.env = env if env is not None else runtime.DistEnv()
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                teacher_temp: float) -> torch.Tensor:
        """``student_out``: (n_crops * B, K); ``teacher_out``: (n_global * B, K), crop-major.

        Returns the mean loss over pairs and images, and updates the centre.
        """
        n_crops = student_out.shape[0] // (teacher_out.shape[0] // self.n_global)
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        student_logp = student_logp.chunk(n_crops)
        teacher_p = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)
        teacher_p = teacher_p.detach().chunk(self.n_global)
        total = student_out.new_zeros((), dtype=torch.float32)
        n_pairs = 0
        for t, p_t in enumerate(teacher_p):
            for s, logp_s in enumerate(student_logp):
                if s == t:  # the same view seen by both networks carries no signal
                    continue
                total = total + torch.sum(-p_t * logp_s, dim=-1).mean()
                n_pairs += 1
        self.update_center(teacher_out)
        return total / n_pairs

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the teacher's batch mean, the mean taken over every rank's images."""
        batch_sum = runtime.all_reduce_sum(teacher_out.float().sum(dim=0, keepdim=True),
                                           self.env)
        batch_mean = batch_sum / (teacher_out.shape[0] * self.env.world_size)
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)
