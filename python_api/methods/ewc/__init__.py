"""ewc: FedAvg + Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) in GLFC's stream.

Local objective (paper eq. 3, one quadratic penalty per finished task t, as the paper's §2.1 prescribes for
more than two tasks):

    L = CE(f(x), y) + Σ_t (λ/2) Σ_i F_{t,i} (θ_i − θ*_{t,i})²

θ*_t is the global model at the end of task t and F_t the diagonal of its Fisher information on task t's
data. Federated form ("Fisher estimated locally and averaged"): after the last round of task t the server
sends θ*_t to every client that holds task-t data; each returns its local diagonal Fisher estimate
F_k = E_x E_{y~p_θ(y|x)}[(∂ log p_θ(y|x)/∂θ)²] — the true Fisher the paper uses, computed exactly by summing
over the model's predicted class distribution — and its sample count; the server averages them weighted
by the counts and sends the list of (F_t, θ*_t) with every train message. Parameters that grew after task t
(new head rows) are penalised only on their first rows. The estimate is per mini-batch of
`ewc.fisher_batch_size` samples (1 = the paper's per-sample estimate; larger is the common faster
approximation used by PyCIL and Avalanche).

Defaults: λ = `ewc.weight` = 1000 — the paper tunes λ per benchmark and gives no class-incremental value;
1000 is PyCIL's class-incremental EWC (lamda) — and the GLFC client optimiser. `ewc.fisher_max` (default
null = the paper's unclamped Fisher) caps each F_i; PyCIL caps at 1e-4, and the presets do too: with GLFC's
large SGD learning rates an unclamped penalty has curvature lr·λ·F_i far above 2 for the largest F_i (about 1
on the bundled digits), so plain SGD on it diverges to NaN.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from python_api.data import iterate_batches
from python_api.messages import Message
from python_api.methods import MethodSpec, register_method
from python_api.methods.fcil import FCILClient, FCILConfig, FCILServer

__all__ = ["EWCSettings", "EWCConfig", "EWCServer", "EWCClient", "ewc_penalty", "diagonal_fisher"]


@dataclass
class EWCSettings:
    weight: float = 1000.0         # λ (PyCIL's class-incremental value; the paper has none)
    fisher_max: Optional[float] = None   # cap on each F_i (null = the paper; PyCIL and the presets: 1e-4)
    fisher_batch_size: int = 32    # samples per gradient in the Fisher estimate (1 = per-sample, the paper)


@dataclass
class EWCConfig(FCILConfig):
    METHOD = "ewc"
    method: str = "ewc"
    ewc: EWCSettings = field(default_factory=EWCSettings)


def ewc_penalty(named_params, penalties: list, weight: float) -> torch.Tensor:
    """Σ_t (λ/2) Σ_i F_{t,i} (θ_i − θ*_{t,i})² over the parameters named in each F_t (leading rows)."""
    params = dict(named_params)
    total = None
    for pen in penalties:
        for name, fisher in pen["fisher"].items():
            p = params[name]
            rows = fisher.shape[0]
            term = (fisher * (p[:rows] - pen["anchor"][name]).pow(2)).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=next(iter(params.values())).device)
    return 0.5 * weight * total


def diagonal_fisher(model, inputs_batches) -> tuple:
    """Σ over batches of Σ_y p(y|x) (∂ log p(y|x) / ∂θ)² with the batch-mean log-likelihood, / #batches.

    `inputs_batches` yields normalised input batches. Returns ({name: F}, number of samples)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = samples = 0
    for x in inputs_batches:
        log_p = F.log_softmax(model(x), dim=1)
        probs = log_p.detach().exp()
        for y in range(log_p.shape[1]):
            grads = torch.autograd.grad(log_p[:, y].mean(), list(params.values()), retain_graph=True)
            for (n, _), g in zip(params.items(), grads):
                fisher[n] += probs[:, y].mean() * g.pow(2)
        batches += 1
        samples += len(x)
    return {n: f / max(batches, 1) for n, f in fisher.items()}, samples


class EWCClient(FCILClient):
    def objective(self, model, logits, labels, teacher_logits, p):
        loss = F.cross_entropy(logits, labels)
        if p.get("ewc_penalties"):
            loss = loss + ewc_penalty(model.named_parameters(), p["ewc_penalties"], self.ctx.cfg.ewc.weight)
        return loss

    def on_fisher(self, p) -> Message:
        """Local Fisher of the end-of-task global model on the data of the task just finished."""
        ctx = self.ctx
        if self.task_id_old != p["task"] or self.current_class is None:
            return Message("fisher", {"fisher": None, "num_samples": 0})
        model = ctx.load_working_model(p["global_state"], p["num_classes"])
        model.eval()        # BN running statistics are part of θ*; the estimate must not move them
        idx = self.current_indices()
        bs = ctx.cfg.ewc.fisher_batch_size
        batches = (ctx.aug.test(ctx.train.images[idx[b]]) for b in iterate_batches(len(idx), bs, False, ctx.device))
        fisher, n = diagonal_fisher(model, batches)
        model.train()
        return Message("fisher", {"fisher": {k: v.detach() for k, v in fisher.items()}, "num_samples": n})


class EWCServer(FCILServer):
    label = "EWC"
    client_cls = EWCClient

    def __init__(self, cfg, run_dir, device):
        super().__init__(cfg, run_dir, device)
        self.penalties: list = []          # [{"fisher": {name: F_t}, "anchor": {name: θ*_t}}]

    def round_payload(self) -> dict:
        return {"ewc_penalties": self.penalties}

    def end_of_task(self, task: int, transport) -> dict:
        if task == self.cfg.federated.num_tasks - 1:
            return {}
        state = {k: v.detach() for k, v in self.model.state_dict().items()}
        replies = transport.send([Message("fisher", {"task": task, "num_classes": self.model.num_classes,
                                                     "global_state": state}, dst=c)
                                  for c in range(self.num_clients)], desc=f"task {task} Fisher")
        parts = [(rep.payload["fisher"], rep.payload["num_samples"]) for rep in replies if rep.payload["num_samples"]]
        total = sum(n for _, n in parts)
        fisher = {name: sum(f[name] * (n / total) for f, n in parts) for name in parts[0][0]}
        if self.cfg.ewc.fisher_max is not None:
            fisher = {name: f.clamp(max=self.cfg.ewc.fisher_max) for name, f in fisher.items()}
        anchor = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.penalties.append({"fisher": fisher, "anchor": anchor})
        return {"fisher_clients": len(parts),
                "fisher_mean": float(sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values()))}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "penalties": self.penalties}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.penalties = [{k: {n: t.to(self.device) for n, t in pen[k].items()} for k in pen}
                          for pen in state["penalties"]]


register_method(MethodSpec(name="ewc", config_cls=EWCConfig, build=EWCServer,
                           description="FedAvg + elastic weight consolidation, Fisher averaged over clients (PNAS 2017)"))
