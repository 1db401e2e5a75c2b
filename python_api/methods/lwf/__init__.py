"""lwf: FedAvg + Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017) in GLFC's stream.

Local objective (paper eq. 1-2, the single-head class-incremental form TARGET and LANDER report):

    L = CE(f(x), y) + λ_o · L_old,    L_old = -Σ_{c ∈ old} y'_c log ŷ'_c,
    y'_c = softmax(z_old / T)_c  (the previous task's global model),  ŷ'_c = softmax(z_{1..n_old} / T)_c

with z_{1..n_old} the current model's logits of the old classes only. The teacher is the global model at
the end of the previous task, which every client received anyway. No memory. Defaults are the paper's:
λ_o = 1 (`lwf.weight`) and T = 2 (`lwf.temperature`); the optimiser is GLFC's client's.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from python_api.methods import MethodSpec, register_method
from python_api.methods.fcil import FCILClient, FCILConfig, FCILServer

__all__ = ["LwFSettings", "LwFConfig", "LwFServer", "LwFClient", "lwf_distillation", "lwf_loss"]


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


def lwf_loss(logits, labels, teacher_logits, weight: float, temperature: float) -> torch.Tensor:
    loss = F.cross_entropy(logits, labels)
    if teacher_logits is not None and weight:
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
