"""joint: FedAvg over all data of every class each client has seen — the upper bound of FCIL tables.

Same stream as GLFC (python_api/methods/fcil) but a client never forgets its data: when it moves on to new
classes it keeps every sample of the classes it leaves (an unbounded memory, `client.memory_size`
ignored), and trains with plain cross-entropy on its current plus all its past data. No data moves
between clients, so "joint" is joint over time within each client, the federated analogue of the joint
(multi-task) upper bound of iCaRL (Rebuffi et al., CVPR 2017, §4) and TARGET (Zhang et al., ICCV 2023).
Hyperparameters: GLFC's client optimiser.
"""
from dataclasses import dataclass

from python_api.methods import MethodSpec, register_method
from python_api.methods.fcil import FCILClient, FCILConfig, FCILServer

__all__ = ["JointConfig", "JointServer", "JointClient"]


@dataclass
class JointConfig(FCILConfig):
    METHOD = "joint"
    method: str = "joint"


class JointClient(FCILClient):
    memory_kind = "all"


class JointServer(FCILServer):
    label = "Joint"
    client_cls = JointClient


register_method(MethodSpec(name="joint", config_cls=JointConfig, build=JointServer,
                           description="FedAvg over all past and current data of each client (FCIL upper bound)"))
