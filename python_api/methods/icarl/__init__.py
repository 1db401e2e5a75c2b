"""icarl: FedAvg + iCaRL (Rebuffi et al., CVPR 2017) in GLFC's stream — the "iCaRL+FL" row of GLFC's tables.

Local objective (paper Alg. 3, "UpdateRepresentation"): on the client's current data plus its exemplars,
with q = σ(z_old) the previous task's global model's sigmoid outputs on the old classes,

    L = Σ_{y ∈ new} BCE(σ(z_y), δ_{y=y_i}) + Σ_{y ∈ old} BCE(σ(z_y), q_y)

averaged over samples and output units (the reference implementations' mean; GLFC's L_GC reduces the
same way). Exemplars (Alg. 4-5): when a client leaves classes it herds m = K / (#classes it has learned)
of each under the previous task's global model (`herding_selection`: GLFC's reference herding, which does
not exclude already-picked samples — the same memory GLFC builds), K = `client.memory_size`
(paper: 2000, GLFC's preset value, per client as in GLFC).

Evaluation reports both classifiers: `accuracy` = the FC head (argmax of the logits, as every method here),
`nme_accuracy` = iCaRL's nearest-mean-of-exemplars (Alg. 1): μ_y = mean of L2-normalised features of the
class's exemplars, y* = argmin_y ‖φ(x) − μ_y‖ with φ(x) normalised. In federated form the means need the
clients' data: after the last round of each task every client sends, for each class it holds, the SUM of
normalised features under the new global model and the count (exemplars for past classes, all its data for
current ones, whose exemplars are not herded yet). This is iCaRL's own protocol; `icarl.nme_eval: false`
keeps everything on the clients and reports FC only. Defaults: the paper's optimiser (lr 2.0, weight decay
1e-5, batch 128) = GLFC's client defaults; epochs as in GLFC's presets.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from python_api.messages import Message
from python_api.metrics import average_incremental_accuracy, forgetting
from python_api.methods import MethodSpec, register_method
from python_api.methods.fcil import FCILClient, FCILConfig, FCILServer

__all__ = ["ICaRLSettings", "ICaRLConfig", "ICaRLServer", "ICaRLClient", "icarl_loss", "nme_predict"]


@dataclass
class ICaRLSettings:
    nme_eval: bool = True       # clients send per-class feature sums so the server can report NME accuracy


@dataclass
class ICaRLConfig(FCILConfig):
    METHOD = "icarl"
    method: str = "icarl"
    icarl: ICaRLSettings = field(default_factory=ICaRLSettings)


def icarl_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits) -> torch.Tensor:
    """BCE on one-hot targets, old classes' targets replaced by the teacher's sigmoid outputs."""
    target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    if teacher_logits is not None:
        n_old = teacher_logits.shape[1]
        target = torch.cat([torch.sigmoid(teacher_logits).to(logits.dtype), target[:, n_old:]], dim=1)
    return F.binary_cross_entropy_with_logits(logits, target)


def nme_predict(features: torch.Tensor, class_means: torch.Tensor) -> torch.Tensor:
    """argmin_y ‖normalise(φ(x)) − μ_y‖ ; rows of class_means that are NaN (no data anywhere) never win."""
    f = F.normalize(features, dim=1)
    dist = torch.cdist(f, class_means.to(f.dtype))
    return torch.nan_to_num(dist, nan=float("inf")).argmin(1)


class ICaRLClient(FCILClient):
    memory_kind = "herding"

    def objective(self, model, logits, labels, teacher_logits, p):
        return icarl_loss(logits, labels, teacher_logits)

    @torch.no_grad()
    def on_class_means(self, p) -> Message:
        """Per-class sums of L2-normalised features (eval mode, test transform) and counts."""
        ctx = self.ctx
        num_classes = p["num_classes"]
        model = ctx.load_working_model(p["global_state"], num_classes)
        sums = torch.zeros(num_classes, model.feature_dim, device=ctx.device, dtype=torch.float64)
        counts = torch.zeros(num_classes, dtype=torch.long, device=ctx.device)
        held = [(c, ex) for c, ex in zip(self.learned_classes, self.exemplar_sets)]
        if self.current_class is not None:
            held += [(c, self.class_data(c)) for c in self.current_class if c not in self.learned_classes]
        for c, idx in held:
            if len(idx) == 0 or c >= num_classes:
                continue
            feats = F.normalize(self.class_features(model, idx, train_mode=False).double(), dim=1)
            sums[c] += feats.sum(0)
            counts[c] += len(idx)
        return Message("class_sums", {"sums": sums, "counts": counts})


class ICaRLServer(FCILServer):
    label = "iCaRL"
    client_cls = ICaRLClient

    def end_of_task(self, task: int, transport) -> dict:
        if not self.cfg.icarl.nme_eval:
            return {}
        num_classes = self.model.num_classes
        state = {k: v.detach() for k, v in self.model.state_dict().items()}
        replies = transport.send([Message("class_means", {"num_classes": num_classes, "global_state": state}, dst=c)
                                  for c in range(self.num_clients)], desc=f"task {task} class means")
        sums = sum(rep.payload["sums"] for rep in replies)
        counts = sum(rep.payload["counts"] for rep in replies)
        means = F.normalize(sums / counts.unsqueeze(1), dim=1)       # NaN rows where no client holds the class
        means[counts == 0] = float("nan")
        self.model.eval()
        acc = self.evaluate_predictor(task, lambda x: nme_predict(self.model.features(x).double(), means))
        self.model.train()
        return {f"nme_{k}": v for k, v in acc.items()}

    def summary(self, records: list) -> dict:
        s = super().summary(records)
        ends = [e for e in self.task_end_records(records) if e.get("nme_accuracy") is not None]
        if s and ends:
            T = self.cfg.federated.num_tasks
            matrix = [[(e["nme_per_task_accuracy"][j] if j < len(e["nme_per_task_accuracy"]) else None)
                       for j in range(T)] for e in ends]
            curve = [e["nme_accuracy"] for e in ends]
            s.update({"nme_accuracy_matrix": matrix, "nme_task_end_accuracy": curve,
                      "nme_final_accuracy": curve[-1], "nme_average_incremental_accuracy":
                          average_incremental_accuracy(curve),
                      "nme_forgetting": forgetting([row[:len(ends)] for row in matrix])})
            s["report"] += (f"\nNME: final accuracy {s['nme_final_accuracy']:.2f}  average incremental accuracy "
                            f"{s['nme_average_incremental_accuracy']:.2f}  forgetting {s['nme_forgetting']:.2f}")
        return s


register_method(MethodSpec(name="icarl", config_cls=ICaRLConfig, build=ICaRLServer,
                           description="FedAvg + iCaRL: herding memory, BCE distillation, NME and FC (CVPR 2017)"))
