"""feddf: FedDF, ensemble distillation for model fusion (Lin et al., NeurIPS 2020), in the FCCL trainer.

FedDF's round (paper Alg. 1): clients train locally on private data; then, for every architecture group,
the server initialises a student as the FedAvg of the group's models and distils into it the ensemble of
ALL received models on unlabeled public data,

    student ← argmin KL( σ( (1/|S|) Σ_{k∈S} f_k(x) ) ‖ σ( f_student(x) ) ),  x ~ public data  (eq. 2, T = 1).

Here every participant has its own architecture (FCCL's heterogeneous setting), so each group holds one
model and there is NO within-group averaging: the student of participant k starts from k's own locally
trained model. The distillation runs on the participants (only logits travel, as in the rest of the FCCL
trainer): per public batch every participant sends the logits of its post-local-training model (frozen,
eval mode) — the ensemble members — the server averages them and sends the mean back, and each participant
takes one KL step of its model towards it. Defaults: T = 1 and Adam(lr = 1e-3), the paper's; the number of
distillation steps is `fccl.public_epochs` passes over the public set in batches of `data.public_batch_size`
(the paper uses a fixed step budget with early stopping on a validation split, which this setting lacks).
Participants start from FCCL's pretrained models, as FCCL, FedMD and SOLO do.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from python_api.data.domains import augment_public
from python_api.messages import Message
from python_api.methods import MethodSpec, register_method
from python_api.methods.fccl import FCCLConfig, FCCLParticipant, FCCLServer

__all__ = ["FedDFSettings", "FedDFConfig", "FedDFParticipant", "FedDFServer", "ensemble_distillation_loss"]


@dataclass
class FedDFSettings:
    temperature: float = 1.0     # paper: T = 1
    lr: float = 1e-3             # paper: Adam, 1e-3


@dataclass
class FedDFConfig(FCCLConfig):
    METHOD = "feddf"
    method: str = "feddf"
    feddf: FedDFSettings = field(default_factory=FedDFSettings)


def ensemble_distillation_loss(student_logits: torch.Tensor, ensemble_logits: torch.Tensor,
                               temperature: float = 1.0) -> torch.Tensor:
    """KL(σ(z_ens/T) ‖ σ(z_student/T)), mean over the batch (summed over classes)."""
    target = F.softmax(ensemble_logits / temperature, dim=1)
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), target, reduction="batchmean")


class FedDFParticipant(FCCLParticipant):
    """`prev` (the model right after this round's local update) is the ensemble member; `net` the student."""

    @torch.no_grad()
    def _on_ensemble_logits(self, images: torch.Tensor) -> dict:
        return {"logits": self.prev(images.to(self.device))}

    def _on_distill(self, images: torch.Tensor, ensemble: torch.Tensor, temperature: float, lr: float) -> dict:
        if self._round_optimizer is None:
            self._round_optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.net.train()
        loss = ensemble_distillation_loss(self.net(images.to(self.device)), ensemble.to(self.device), temperature)
        self._round_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._round_optimizer.step()
        return {"loss": float(loss.detach())}

    def _on_local_update(self, round: int = 0, batch_size: int = 512, distill: bool = False) -> dict:
        out = super()._on_local_update(round=round, batch_size=batch_size, distill=False)
        self._round_optimizer = None          # one distillation Adam per round, made at the first step
        return out


class FedDFServer(FCCLServer):
    METHOD = "feddf"

    def make_client(self, cid) -> FedDFParticipant:
        p = self.cfg.participants[cid]
        return FedDFParticipant(cid, self.domains[cid], p.backbone, width=p.width, local_epochs=p.local_epochs,
                                method=self.cfg.fccl, test_sets=self.domains, pretrain=self.cfg.pretrain,
                                pretrain_data=self.pretrain_sets[cid], device=self.device, seed=self.cfg.run.seed)

    def run_round(self, round_idx: int, transport) -> dict:
        import time
        s = self.cfg.feddf
        start = time.perf_counter()
        if self.solo is None and self.cfg.fccl.evaluate_solo:
            self.solo = self._evaluate(transport, "frozen")
        replies = transport.send([Message("local_update", {"round": round_idx,
                                                           "batch_size": self.cfg.data.private_batch_size}, dst=i)
                                  for i in self.ids], desc="local update")
        local_time = time.perf_counter() - start
        losses = [[] for _ in self.ids]
        for _ in range(self.cfg.fccl.public_epochs):
            for rows in self._public_batches():
                images = augment_public(self.public, self.public_images[rows], self.public_generator).to(self.device)
                members = transport.send([Message("ensemble_logits", {"images": images}, dst=i) for i in self.ids],
                                         desc="ensemble logits")
                got = [r.payload["logits"] for r in members]
                ensemble = torch.stack(got).mean(0)
                steps = transport.send([Message("distill", {"images": images, "ensemble": ensemble,
                                                            "temperature": s.temperature, "lr": s.lr}, dst=i)
                                        for i in self.ids], desc="distill")
                for r in steps:
                    losses[r.src].append(r.payload["loss"])
        distill_time = time.perf_counter() - start - local_time
        evaluation = self._evaluate(transport)
        local_loss = {r.src: r.payload["loss"] for r in replies}
        record = self._record(round_idx, evaluation, [], [local_loss.get(i, float("nan")) for i in self.ids],
                              time.perf_counter() - start, distill_time, local_time)
        record["distill_loss"] = [sum(v) / len(v) if v else float("nan") for v in losses]
        return record


    def summary(self, records: list) -> dict:
        from python_api.methods.fml import _named_summary
        return _named_summary(super().summary(records), self.METHOD)


def build_feddf(cfg, run_dir=None, device=None) -> FedDFServer:
    return FedDFServer(cfg, device=device)


register_method(MethodSpec(name="feddf", config_cls=FedDFConfig, build=build_feddf,
                           description="FedDF: ensemble distillation of all participants' logits on public data "
                                       "(NeurIPS 2020); heterogeneous, no within-group averaging"))
