"""bic: FedAvg + BiC, Large Scale Incremental Learning (Wu et al., CVPR 2019) — GLFC's "BiC+FL" row.

Stage 1 (paper eq. 1-3) on the client's training split of current data + exemplars, with n old and m new
classes, λ = n / (n + m) and the previous task's (bias-corrected) global model as teacher:

    L = λ · L_d + (1 − λ) · L_c,   L_d = Σ_{k ≤ n} −π̂_k(x) log π_k(x),  π = softmax(z/T) on the old logits,
    L_c = CE(z, y) over all n + m classes.

Stage 2 (paper eq. 4-5): the bias-correction layer q_k = α·o_k + β on the NEW classes' logits (old ones
pass through), trained with CE of the corrected logits on a held-out validation split while the model is
frozen. The split follows the paper's rule — held-out exemplars of every old class and the SAME number of
samples of every new class (`bic.val_fraction` of the per-class exemplar count; paper 0.1, i.e. 9:1) — taken
per client from the tail of each exemplar list / class list, so it is deterministic. Federated form: each
client fits (α, β) from (1, 0) on its own split after its local epochs and sends the two scalars with its
model; the server averages them weighted by the split sizes, applies them to the global model's newest
classes at evaluation, and freezes them into the next task's teacher. In task 0 there are no old classes:
no split, no bias layer, as in the paper. Defaults: T = 2 (paper), val_fraction = 0.1 (paper); the stage-2
optimiser (`bic.epochs`, `bic.lr`, full batch) is ours — the paper does not state it for this setting.
Exemplars: herding within `client.memory_size`, as iCaRL.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from python_api.methods import MethodSpec, register_method
from python_api.methods.fcil import FCILClient, FCILConfig, FCILServer

__all__ = ["BiCSettings", "BiCConfig", "BiCServer", "BiCClient", "bic_stage1_loss", "apply_bias", "fit_bias"]


@dataclass
class BiCSettings:
    temperature: float = 2.0    # T of L_d (paper: 2)
    val_fraction: float = 0.1   # held-out share of each old class's exemplars (paper: 9:1 train:val)
    epochs: int = 100           # stage-2 full-batch steps on the validation split (ours)
    lr: float = 0.1             # stage-2 SGD learning rate (ours)


@dataclass
class BiCConfig(FCILConfig):
    METHOD = "bic"
    method: str = "bic"
    bic: BiCSettings = field(default_factory=BiCSettings)


def apply_bias(logits: torch.Tensor, alpha, beta, lo: int, hi: int) -> torch.Tensor:
    """q_k = α·o_k + β for the new classes k ∈ [lo, hi); other logits unchanged."""
    return torch.cat([logits[:, :lo], alpha * logits[:, lo:hi] + beta, logits[:, hi:]], dim=1)


def bic_stage1_loss(logits, labels, teacher_logits, temperature: float) -> torch.Tensor:
    ce = F.cross_entropy(logits, labels)
    if teacher_logits is None:
        return ce
    n_old, total = teacher_logits.shape[1], logits.shape[1]
    lam = n_old / total
    soft = F.softmax(teacher_logits / temperature, dim=1)
    distill = -(soft * F.log_softmax(logits[:, :n_old] / temperature, dim=1)).sum(1).mean()
    return lam * distill + (1 - lam) * ce


def fit_bias(logits: torch.Tensor, labels: torch.Tensor, lo: int, hi: int, epochs: int, lr: float) -> tuple:
    """Stage 2: (α, β) from (1, 0) minimising CE(apply_bias(logits), labels), full-batch SGD."""
    alpha = torch.ones((), dtype=logits.dtype, device=logits.device, requires_grad=True)
    beta = torch.zeros((), dtype=logits.dtype, device=logits.device, requires_grad=True)
    opt = torch.optim.SGD([alpha, beta], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            loss = F.cross_entropy(apply_bias(logits, alpha, beta, lo, hi), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float(alpha.detach()), float(beta.detach())


class BiCClient(FCILClient):
    memory_kind = "herding"

    def validation_split(self) -> tuple:
        """(train indices, train labels, val indices, val labels): `val_fraction` of each old class's
        exemplars and the same count of every current class, from the tails; no split without old classes."""
        ctx = self.ctx
        old = [(c, ex) for c, ex in zip(self.learned_classes, self.exemplar_sets) if len(ex)]
        current = [(c, self.class_data(c)) for c in self.current_class]
        per_class = max(1, int(round(ctx.cfg.bic.val_fraction * min(len(ex) for _, ex in old)))) if old else 0
        tr_i, tr_y, va_i, va_y = [], [], [], []
        for c, idx in old + current:
            k = min(per_class, max(len(idx) - 1, 0))
            cut = len(idx) - k
            tr_i.append(idx[:cut])
            va_i.append(idx[cut:])
            tr_y.append(torch.full((cut,), c, dtype=torch.long, device=ctx.device))
            va_y.append(torch.full((k,), c, dtype=torch.long, device=ctx.device))
        return torch.cat(tr_i), torch.cat(tr_y), torch.cat(va_i), torch.cat(va_y)

    def train_indices(self):
        tr_i, tr_y, _, _ = self.validation_split()
        return tr_i, tr_y

    def teacher_logits(self, teacher, x, p):
        z = teacher(x)
        bias = p.get("teacher_bias")
        if bias is not None:
            z = apply_bias(z, bias["alpha"], bias["beta"], bias["lo"], bias["hi"])
        return z

    def objective(self, model, logits, labels, teacher_logits, p):
        return bic_stage1_loss(logits, labels, teacher_logits, self.ctx.cfg.bic.temperature)

    @torch.no_grad()
    def after_local_training(self, model, p, teacher) -> dict:
        ctx = self.ctx
        _, _, va_i, va_y = self.validation_split()
        if p["task"] == 0 or len(va_i) == 0:
            return {"bic_alpha": None, "bic_beta": None, "bic_val_samples": 0}
        model.eval()
        logits = model(ctx.aug.test(ctx.train.images[va_i])).double()
        model.train()
        ts = ctx.stream.task_size
        alpha, beta = fit_bias(logits, va_y, p["task"] * ts, (p["task"] + 1) * ts, ctx.cfg.bic.epochs, ctx.cfg.bic.lr)
        return {"bic_alpha": alpha, "bic_beta": beta, "bic_val_samples": int(len(va_i))}


class BiCServer(FCILServer):
    label = "BiC"
    client_cls = BiCClient

    def __init__(self, cfg, run_dir, device):
        super().__init__(cfg, run_dir, device)
        self.bias = None              # {"alpha", "beta", "lo", "hi"} of the current task
        self.teacher_bias = None      # the bias frozen into the teacher

    def snapshot(self, task: int) -> dict:
        self.teacher_bias = self.bias
        return super().snapshot(task)

    def on_task_change(self, task: int) -> None:
        self.bias = None

    def round_payload(self) -> dict:
        return {"teacher_bias": self.teacher_bias}

    def aggregate_extras(self, replies: list) -> dict:
        parts = [rep.payload for rep in replies if rep.payload["bic_val_samples"]]
        if not parts:   # no selected client holds old classes this round: the last fitted layer stays
            return {"bic_alpha": None if self.bias is None else self.bias["alpha"],
                    "bic_beta": None if self.bias is None else self.bias["beta"]}
        n = sum(q["bic_val_samples"] for q in parts)
        ts, task = self.stream.task_size, self.task
        self.bias = {"alpha": sum(q["bic_alpha"] * q["bic_val_samples"] for q in parts) / n,
                     "beta": sum(q["bic_beta"] * q["bic_val_samples"] for q in parts) / n,
                     "lo": task * ts, "hi": (task + 1) * ts}
        return {"bic_alpha": self.bias["alpha"], "bic_beta": self.bias["beta"]}

    @torch.no_grad()
    def evaluate(self, task: int) -> dict:
        if self.bias is None:
            return super().evaluate(task)
        b = self.bias
        self.model.eval()
        out = self.evaluate_predictor(task, lambda x: apply_bias(self.model(x), b["alpha"], b["beta"],
                                                                 b["lo"], b["hi"]).argmax(1))
        self.model.train()
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bias": self.bias, "teacher_bias": self.teacher_bias}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bias, self.teacher_bias = state["bias"], state["teacher_bias"]


register_method(MethodSpec(name="bic", config_cls=BiCConfig, build=BiCServer,
                           description="FedAvg + BiC: distillation and a bias-correction layer on a held-out "
                                       "exemplar split (CVPR 2019)"))
