"""finetune: FedAvg of plain cross-entropy on the current data only — the lower bound of FCIL tables.

Each selected client trains the global model on the classes it holds now (no memory, no distillation,
no regulariser): L = CE(f(x), y) over all classes seen so far, then FedAvg. Reported as "Finetune" by
TARGET (Zhang et al., ICCV 2023, Table 1) and LANDER (Tran et al., CVPR 2024); everything else is GLFC's
stream (python_api/methods/fcil). Hyperparameters: GLFC's client optimiser (lr 2.0, 20 local epochs,
weight decay 1e-5, batch 128), so the comparison changes only the objective.
"""
from dataclasses import dataclass

from python_api.methods import MethodSpec, register_method
from python_api.methods.fcil import FCILClient, FCILConfig, FCILServer

__all__ = ["FinetuneConfig", "FinetuneServer", "FinetuneClient"]


@dataclass
class FinetuneConfig(FCILConfig):
    METHOD = "finetune"
    method: str = "finetune"


class FinetuneClient(FCILClient):
    """FCILClient's default objective is the finetune loss: CE over all current logits."""


class FinetuneServer(FCILServer):
    label = "Finetune"
    client_cls = FinetuneClient


register_method(MethodSpec(name="finetune", config_cls=FinetuneConfig, build=FinetuneServer,
                           description="FedAvg + cross-entropy on current data only (FCIL lower bound)"))
