"""Shared machinery of the federated class-incremental (FCIL) baselines run in GLFC's stream.

Each baseline (finetune, lwf, ewc, icarl, bic, joint) is its own package under python_api/methods/ and
owns only its math; this package gives them GLFC's stream unchanged — task order, client groups
(S_o / S_b / S_n), client selection, FedAvg, evaluation on all seen classes, memory budget, run directory —
by subclassing `GLFCServer` / `GLFCClient` and replacing only the local objective:

    FCILConfig   GLFCConfig with the proxy off (the baselines send nothing but their model)
    FCILServer   the round: teacher snapshot at task change, train selected clients, FedAvg, evaluate
    FCILClient   class bookkeeping of GLFCClient (known task boundaries), exemplar memory, local SGD
"""
from python_api.methods.fcil.base import FCILClient, FCILConfig, FCILServer, class_balanced_memory

__all__ = ["FCILClient", "FCILConfig", "FCILServer", "class_balanced_memory"]
