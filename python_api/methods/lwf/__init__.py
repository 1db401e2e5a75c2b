"""lwf: FedAvg + Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017) in GLFC's stream.

Local objective (paper §3, eq. 1-2): the network keeps one output head per task (here: the old classes'
logits and the current task's logits of the one growing linear layer), and

    L = L_new + λ_o · L_old,
    L_new = CE over the logits of the sample's own head (the current task's classes for new data, the old
            classes for the old-class data GLFC's S_o clients keep),
    L_old = -Σ_{c ∈ old} y'_c log ŷ'_c,  y'_c = softmax(z_old / T)_c (the previous task's global model),
            ŷ'_c = softmax(z_{1..n_old} / T)_c (the current model's old-class logits only).

Cross-entropy over the sample's own head rather than over every class is the paper's multi-head form (and
PyCIL's class-incremental LwF): the new data's CE then does not push the old classes' logits down, which a
CE over all classes would (making LwF no better than finetune). Evaluation is single-head (argmax over all
seen classes), as for every method here. The teacher is the global model at the end of the previous task,
which every client received anyway. No memory. Defaults are the paper's: λ_o = 1 (`lwf.weight`) and T = 2
(`lwf.temperature`); the optimiser is GLFC's client's.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from python_api.methods import MethodSpec, register_method
from python_api.methods.fcil import FCILClient, FCILConfig, FCILServer

__all__ = ["LwFSettings", "LwFConfig", "LwFServer", "LwFClient", "lwf_distillation", "lwf_loss",
           "task_head_cross_entropy"]


@dataclass
class LwFSettings:
    weight: float = 1.0         # λ_o (paper: 1)
    temperature: float = 2.0    # T (paper: 2)


@dataclass
class LwFConfig(FCILConfig):
    METHOD = "lwf"
    method: str = "lwf"
    lwf: LwFSettings = field(default_factory=LwFSettings)


def lwf_distillation(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -Σ_c softmax(z_old/T)_c · log softmax(z_{old classes}/T)_c."""
    n_old = teacher_logits.shape[1]
    target = F.softmax(teacher_logits / temperature, dim=1)
    return -(target * F.log_softmax(logits[:, :n_old] / temperature, dim=1)).sum(1).mean()


def task_head_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, n_old: int) -> torch.Tensor:
    """Mean CE of each sample over its own head: classes [n_old, C) if y >= n_old, else [0, n_old)."""
    if n_old == 0:
        return F.cross_entropy(logits, labels)
    new = labels >= n_old
    masked = logits.masked_fill(new.unsqueeze(1) != (torch.arange(logits.shape[1], device=logits.device) >= n_old),
                                float("-inf"))
    return F.cross_entropy(masked, labels)


def lwf_loss(logits, labels, teacher_logits, weight: float, temperature: float) -> torch.Tensor:
    if teacher_logits is None:
        return F.cross_entropy(logits, labels)
    loss = task_head_cross_entropy(logits, labels, teacher_logits.shape[1])
    if weight:
        loss = loss + weight * lwf_distillation(logits, teacher_logits, temperature)
    return loss


class LwFClient(FCILClient):
    def objective(self, model, logits, labels, teacher_logits, p):
        s = self.ctx.cfg.lwf
        return lwf_loss(logits, labels, teacher_logits, s.weight, s.temperature)


class LwFServer(FCILServer):
    label = "LwF"
    client_cls = LwFClient


register_method(MethodSpec(name="lwf", config_cls=LwFConfig, build=LwFServer,
                           description="FedAvg + Learning without Forgetting distillation (ECCV 2016)"))
