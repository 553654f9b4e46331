"""The pieces of the distillation loss (``compactnlu.distill`` puts them together): attention
fusion of two teachers, adaptive temperature, and the KD, MSE and contrastive terms.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


# ---------------------------------------------------------------- fusion and temperature

class TeacherFusion(nn.Module):
    """Per-example (or per-word) attention over two teachers' outputs, conditioned on the student."""

    def __init__(self, student_dim: int, output_dim: int, hidden: int = 64, mode: str = "attention"):
        super().__init__()
        self.mode = mode
        self.student = nn.Linear(student_dim, hidden)
        self.teacher = nn.Linear(output_dim, hidden, bias=False)
        self.score = nn.Linear(hidden, 1, bias=False)

    def weights(self, student: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """student ``[N, S]``, outputs ``[N, K, D]`` -> weights ``[N, K]`` summing to 1."""
        if self.mode == "mean":
            return torch.full(outputs.shape[:2], 1.0 / outputs.shape[1], device=outputs.device)
        scores = self.score(torch.tanh(self.student(student).unsqueeze(1) + self.teacher(outputs))).squeeze(-1)
        return scores.softmax(-1)


def fuse(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (weights.unsqueeze(-1) * values).sum(1)


def multilabel_confidence(logits: torch.Tensor) -> torch.Tensor:
    return (2 * torch.sigmoid(logits) - 1).abs().mean(-1)


def adaptive_temperature(base: float, confidence: torch.Tensor, adaptive: bool = True) -> torch.Tensor:
    """``T · (0.5 + c)``: between T/2 (unsure teacher) and 3T/2 (certain teacher)."""
    if not adaptive:
        return torch.full_like(confidence, base)
    return base * (0.5 + confidence.clamp(0, 1))


# ---------------------------------------------------------------- losses

def multilabel_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: torch.Tensor):
    """BCE of softened student sigmoids against softened teacher sigmoids, × T² (per example T)."""
    t = temperature.unsqueeze(-1)
    target = torch.sigmoid(teacher_logits / t)
    per_label = F.binary_cross_entropy_with_logits(student_logits / t, target, reduction="none")
    # subtract the target's own entropy so the loss is 0 when student equals teacher
    entropy = F.binary_cross_entropy(target, target, reduction="none")
    return ((per_label - entropy).mean(-1) * temperature ** 2).mean()


def token_kd(student_emissions: torch.Tensor, teacher_emissions: torch.Tensor, temperature: torch.Tensor):
    """KL(teacher ‖ student) of softened tag distributions per word, × T²."""
    t = temperature.unsqueeze(-1)
    kl = F.kl_div(F.log_softmax(student_emissions / t, -1), F.log_softmax(teacher_emissions / t, -1),
                  log_target=True, reduction="none").sum(-1)
    return (kl * temperature ** 2).mean()


def representation_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student, teacher)


def contrastive_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """InfoNCE: row i of ``student`` should match row i of ``teacher`` among all rows."""
    logits = F.normalize(student, dim=-1) @ F.normalize(teacher, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(len(student), device=student.device))
