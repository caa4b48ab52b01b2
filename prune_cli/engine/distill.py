"""Knowledge distillation in the training steps: a frozen teacher's softened outputs join the labels.

``kd_loss`` is the loss of Hinton et al. (2015), (1 - alpha) CE(student, y) + alpha T^2 KL(p_teacher || p_student)
with both distributions softened at temperature T (the T^2 keeps the soft term's gradients on the scale of the hard
one's as T changes). ``Distiller`` holds the teacher and runs it on each step's batch: in eval mode, under inference
mode (it is never updated: neither its weights nor its BN statistics), in the step's precision and memory format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student, teacher, y, alpha: float, temperature: float):
    """(1 - alpha) CE(student, y) + alpha T^2 KL(softmax(teacher / T) || softmax(student / T)), the KL averaged over
    the batch (``student``, ``teacher``: logits; the soft term in fp32 whatever precision made them)."""
    hard = F.cross_entropy(student, y)
    if alpha == 0:
        return hard
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student.float() / t, dim=1),
        F.log_softmax(teacher.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - alpha) * hard + alpha * t * t * soft


class Distiller:
    """The teacher of a training stage and its loss settings; ``loss`` replaces the steps' cross-entropy."""

    def __init__(self, teacher: torch.nn.Module, alpha: float, temperature: float):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.net = teacher

    def ready(self, memory_format: torch.memory_format, wrap) -> None:
        """Frozen, in eval mode and in the steps' memory format; ``wrap`` (torch.compile or nothing) gives the
        callable the steps run."""
        self.teacher.eval().requires_grad_(False)
        self.teacher.to(memory_format=memory_format)
        self.net = wrap(self.teacher)

    def loss(self, logits, x, y):
        """The step's loss of the student's ``logits`` on the batch ``x`` with labels ``y``."""
        with torch.inference_mode():
            taught = self.net(x)
        # a plain tensor (outside inference mode) so autograd may keep it for the KL's backward
        return kd_loss(logits, taught.clone(), y, self.alpha, self.temperature)
