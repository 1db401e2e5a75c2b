"""fml: Federated Mutual Learning (Shen et al., arXiv:2006.16765, 2020) in the FCCL trainer.

Each participant keeps its own private model (any architecture: FCCL's heterogeneous participants) and a
copy of a shared, homogeneous "meme" model. Locally both are trained on the private data by deep mutual
learning (paper eq. 1-2, after Zhang et al.'s DML):

    L_local = α · CE(f_local(x), y) + (1 − α) · KL( σ(f_meme(x)) ‖ σ(f_local(x)) )
    L_meme  = β · CE(f_meme(x), y)  + (1 − β) · KL( σ(f_local(x)) ‖ σ(f_meme(x)) )

(each KL's target detached), one optimiser step of each per mini-batch; then the server averages the memes
by FedAvg, weighted by the participants' sample counts (paper Alg. 1), and sends the average back. Only the
meme's parameters leave a participant; the private model never does. Accuracy (intra / inter) is the
private models', as the paper reports "local" models. Defaults: α = β = 0.5 (the paper's), Adam with
FCCL's `fccl.local_lr` for both models (the paper uses SGD; the other FCCL-trainer methods use Adam, so the
comparison changes only the method); the meme is `fml.meme_backbone` at `fml.meme_width`, initialised once
from `run.seed`. Participants start from FCCL's pretrained private models, as FCCL, FedMD and SOLO do.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from python_api.messages import Message
from python_api.methods import MethodSpec, register_method
from python_api.methods.fccl import FCCLConfig, FCCLParticipant, FCCLServer
from python_api.methods.fccl.participant import build_backbone
from python_api.methods.glfc.server import fedavg

__all__ = ["FMLSettings", "FMLConfig", "FMLParticipant", "FMLServer", "mutual_learning_losses"]


@dataclass
class FMLSettings:
    alpha: float = 0.5               # weight of CE in the private model's loss (paper: 0.5)
    beta: float = 0.5                # weight of CE in the meme model's loss (paper: 0.5)
    meme_backbone: str = "resnet10"  # the shared homogeneous model
    meme_width: float = 0.25


@dataclass
class FMLConfig(FCCLConfig):
    METHOD = "fml"
    method: str = "fml"
    fml: FMLSettings = field(default_factory=FMLSettings)


def _kl(student_logits, teacher_logits):
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits.detach(), dim=1),
                    reduction="batchmean")


def mutual_learning_losses(local_logits, meme_logits, labels, alpha: float, beta: float) -> tuple:
    """(L_local, L_meme) of eq. 1-2; each KL's target is the other model's detached distribution."""
    l_local = alpha * F.cross_entropy(local_logits, labels) + (1 - alpha) * _kl(local_logits, meme_logits)
    l_meme = beta * F.cross_entropy(meme_logits, labels) + (1 - beta) * _kl(meme_logits, local_logits)
    return l_local, l_meme


class FMLParticipant(FCCLParticipant):
    def _on_mutual_update(self, meme_state: dict, meme_backbone: str, meme_width: float, alpha: float, beta: float,
                          round: int = 0, batch_size: int = 512) -> dict:
        if getattr(self, "meme", None) is None:
            self.meme = build_backbone(meme_backbone, self.domain.num_classes, meme_width).to(self.device)
        self.meme.load_state_dict(meme_state)
        lr = self.method.local_lr
        opt_local = torch.optim.Adam(self.net.parameters(), lr=lr)
        opt_meme = torch.optim.Adam(self.meme.parameters(), lr=lr)
        self.net.train()
        self.meme.train()
        total, steps = 0.0, 0
        for _ in range(self.local_epochs):
            for rows in torch.randperm(len(self.train_y), generator=self.generator).split(batch_size):
                rows = rows.to(self.device)
                x, y = self.train_x[rows], self.train_y[rows]
                l_local, l_meme = mutual_learning_losses(self.net(x), self.meme(x), y, alpha, beta)
                opt_local.zero_grad(set_to_none=True)
                opt_meme.zero_grad(set_to_none=True)
                (l_local + l_meme).backward()     # disjoint parameters, detached targets: two separate steps
                opt_local.step()
                opt_meme.step()
                total, steps = total + float(l_local.detach()), steps + 1
        return {"loss": total / max(1, steps), "steps": steps, "num_samples": int(len(self.train_y)),
                "meme_state": {k: v.detach().clone() for k, v in self.meme.state_dict().items()}}


class FMLServer(FCCLServer):
    METHOD = "fml"

    def __init__(self, cfg, domains=None, public=None, device=None):
        super().__init__(cfg, domains, public, device)
        s = cfg.fml
        num_classes = self.domains[0].num_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed * 7919 + 5)
            meme = build_backbone(s.meme_backbone, num_classes, s.meme_width)
        self.meme_state = {k: v.to(self.device) for k, v in meme.state_dict().items()}

    def make_client(self, cid) -> FMLParticipant:
        p = self.cfg.participants[cid]
        return FMLParticipant(cid, self.domains[cid], p.backbone, width=p.width, local_epochs=p.local_epochs,
                              method=self.cfg.fccl, test_sets=self.domains, pretrain=self.cfg.pretrain,
                              pretrain_data=self.pretrain_sets[cid], device=self.device, seed=self.cfg.run.seed)

    def run_round(self, round_idx: int, transport) -> dict:
        import time
        s = self.cfg.fml
        start = time.perf_counter()
        if self.solo is None and self.cfg.fccl.evaluate_solo:
            self.solo = self._evaluate(transport, "frozen")
        payload = {"meme_state": self.meme_state, "meme_backbone": s.meme_backbone, "meme_width": s.meme_width,
                   "alpha": s.alpha, "beta": s.beta, "round": round_idx,
                   "batch_size": self.cfg.data.private_batch_size}
        replies = transport.send([Message("mutual_update", payload, dst=i) for i in self.ids], desc="mutual update")
        self.meme_state = fedavg([r.payload["meme_state"] for r in replies],
                                 [r.payload["num_samples"] for r in replies])
        local_time = time.perf_counter() - start
        evaluation = self._evaluate(transport)
        local_loss = {r.src: r.payload["loss"] for r in replies}
        return self._record(round_idx, evaluation, [], [local_loss.get(i, float("nan")) for i in self.ids],
                            time.perf_counter() - start, 0.0, local_time)

    def summary(self, records: list) -> dict:
        return _named_summary(super().summary(records), self.METHOD)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "meme_state": self.meme_state}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.meme_state = {k: v.to(self.device) for k, v in state["meme_state"].items()}


def _named_summary(out: dict, name: str) -> dict:
    from python_api.methods.fccl.plots import summary_table
    out["algorithm"] = name
    out["report"] = summary_table(out)
    return out


def build_fml(cfg, run_dir=None, device=None) -> FMLServer:
    return FMLServer(cfg, device=device)


register_method(MethodSpec(name="fml", config_cls=FMLConfig, build=build_fml,
                           description="Federated Mutual Learning: private model + FedAvg-shared meme model, "
                                       "deep mutual learning (2020)"))
