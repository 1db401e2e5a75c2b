"""GLFC (Dong et al., CVPR 2022) as its reference code computes it; see specs/glfc.md.

    GLFCServer   orchestration, FedAvg, head growth, evaluation (python_api.messages.FederatedMethod)
    GLFCClient   entropy signal, herding memory, GLFC loss, prototype gradients
    ProxyServer  label recovery, reconstruction, monitor set, best-old-model selection
    GLFCConfig   every setting, with the reference quirks as named switches
"""
from python_api.methods import MethodSpec, register_method
from python_api.methods.glfc.client import GLFCClient
from python_api.methods.glfc.config import GLFCConfig
from python_api.methods.glfc.proxy import ProxyServer
from python_api.methods.glfc.server import GLFCContext, GLFCServer, fedavg

__all__ = ["GLFCClient", "GLFCConfig", "GLFCServer", "GLFCContext", "ProxyServer", "fedavg"]

register_method(MethodSpec(name="glfc", config_cls=GLFCConfig, build=GLFCServer,
                           description="GLFC: federated class-incremental learning (CVPR 2022)"))
