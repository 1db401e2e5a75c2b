"""FCCLParticipant: one party's private domain, its models and its two local phases (specs/fccl.md 1.1-1.4).

State: `net` (trained), `frozen` (intra-domain teacher = the pretrained model, never updated) and `prev`
(inter-domain teacher = `net` at the end of the previous round). Only logits leave the participant:
its replies hold public-batch logits and scalar metrics, never parameters, gradients or private images.

Messages it handles (engine-agnostic, see python_api/messages.py):
    evaluate        {"model": "net"|"frozen"}          -> {"top1": {domain: %}, "topk": {domain: %}}
    public_logits   {"images": B x C x H x W}          -> {"logits": B x K}   (train mode; graph kept)
    collaborate     {"others_sum": B x K, "count": N}  -> {"loss": float}     (one optimiser step)
    local_update    {"round": r}                       -> {"loss": float, "steps": int}; then prev <- net

`collaborate` steps on the graph its `public_logits` call kept (one forward per batch, as the reference:
BN running statistics and dropout are drawn once), so an engine must deliver both to the same object.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from python_api import profiling
from python_api.data.domains import DomainData, normalise
from python_api.messages import Message

__all__ = ["FCCLParticipant", "loss_functions", "collaborative_target", "build_backbone"]


_WARNED_FALLBACK = False


def loss_functions(backend: str):
    """(cross_correlation_loss, dual_distillation_loss) from fcl_ext.ops, or the pure-PyTorch twins."""
    import fcl_ext
    if backend == "reference":
        source = fcl_ext.reference
    else:
        source = fcl_ext.ops
        if not all(hasattr(source, name) for name in ("cross_correlation_loss", "dual_distillation_loss")):
            import warnings
            global _WARNED_FALLBACK
            if not _WARNED_FALLBACK:
                _WARNED_FALLBACK = True
                warnings.warn("fcl_ext.ops has no FCCL losses in this build; using fcl_ext.reference", stacklevel=2)
            source = fcl_ext.reference
    return source.cross_correlation_loss, source.dual_distillation_loss


def collaborative_target(others_sum: torch.Tensor, count: int, own_slot: torch.Tensor) -> torch.Tensor:
    """FCCL's target for participant i: the mean of N logit tensors, the others' current ones (summed by the
    server) plus i's own slot, which is its previous-round model's logits in the CVPR code (FCCL.py:200-207)
    or its own current logits in FCCL+ (and FedMD's consensus)."""
    return (others_sum + own_slot) / count


def build_backbone(name: str, num_classes: int, width: float = 1.0, init: str = "pytorch",
                   efficientnet_drop_connect: float = 0.0) -> torch.nn.Module:
    """A registered backbone; `width` multiplies the channel counts (ResNets: base width 64 * width);
    `init` is model.init (python_api/models/init.py), PyTorch's defaults as the FCCL code."""
    from python_api.models import build_model
    if name.startswith("resnet"):
        return build_model(name, num_classes=num_classes, width=max(1, int(round(64 * width))), init=init)
    if name == "efficientnet_b0":
        return build_model(name, num_classes=num_classes, width=width, init=init,
                           drop_connect_rate=efficientnet_drop_connect)
    return build_model(name, num_classes=num_classes, width=width, init=init)


def code_digest(backbone: str) -> str:
    """A digest of the source of the code a pretrained checkpoint depends on: the backbone's module, the
    init schemes, the participant (pretraining loop) and the data readers. Part of the pretraining cache
    key, so a change to any of them (an init or drop-connect fix) never reuses a stale checkpoint."""
    import importlib
    from python_api.models import _MODELS
    modules = {_MODELS[backbone].__module__ if backbone in _MODELS else "python_api.models",
               "python_api.models.init", "python_api.data.domains", "python_api.data.common", __name__}
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode())
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()[:16]


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    teacher = copy.deepcopy(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def _data_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(images.contiguous().cpu().numpy().tobytes())
    digest.update(labels.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class FCCLParticipant:
    def __init__(self, index: int, domain: DomainData, backbone: str, *, width: float = 1.0,
                 local_epochs: int = 1, method=None, test_sets: Sequence[DomainData] = (),
                 pretrain=None, pretrain_data: Optional[DomainData] = None, device="cpu", seed: int = 0,
                 model=None):
        self.index = index
        self.domain = domain
        self.backbone = backbone
        self.width = width
        self.local_epochs = local_epochs
        self.method = method                   # FCCLMethodConfig
        self.model_cfg = model                 # FCCLModelConfig (None: its defaults, the reference)
        init = "pytorch" if model is None else model.init
        drop_connect = 0.0 if model is None else model.efficientnet_drop_connect
        self.build_options = {"init": init, "efficientnet_drop_connect": drop_connect}
        self.test_sets = list(test_sets) or [domain]
        self.device = torch.device(device)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed * 1009 + 17 * index + 1)
        self.cross_correlation_loss, self.dual_distillation_loss = loss_functions(method.loss_backend)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1009 + index)
            self.net = build_backbone(backbone, domain.num_classes, width, **self.build_options).to(self.device)
        self.train_x = normalise(domain.train_images, domain.mean, domain.std).to(self.device)
        self.train_y = domain.train_labels.to(self.device)
        self.pretrain_info: dict = {}
        if pretrain is not None:
            self.pretrain(pretrain, pretrain_data or domain)
        self.frozen = _frozen_copy(self.net)   # intra-domain teacher
        self.prev = _frozen_copy(self.net)     # inter-domain teacher; == net in round 0 (spec 1.1)
        self._live_logits: Optional[torch.Tensor] = None
        self._public_images: Optional[torch.Tensor] = None
        self._round_optimizer = None

    # ------------------------------------------------------------------ pretraining (spec 1.5)
    def pretrain_key(self, cfg, data: DomainData) -> str:
        fields = {"backbone": self.backbone, "width": self.width, "classes": data.num_classes,
                  "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": self.seed,
                  "index": self.index, "data": _data_digest(data.train_images, data.train_labels),
                  "torch": torch.__version__.split("+")[0], "version": 2, "code": code_digest(self.backbone),
                  **self.build_options}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]

    def pretrain(self, cfg, data: DomainData) -> None:
        """CE, Adam(lr), `epochs` over the private data; cached under cfg.cache_dir by a hash of all inputs."""
        key = self.pretrain_key(cfg, data)
        cache = Path(os.path.expanduser(cfg.cache_dir)) / f"{self.backbone}-{data.name}-{key}.pt".replace(" ", "_")
        if cache.exists():
            self.net.load_state_dict(torch.load(cache, map_location=self.device, weights_only=True))
            self.pretrain_info = {"cached": True, "path": str(cache)}
            return
        x = normalise(data.train_images, data.mean, data.std).to(self.device)
        y = data.train_labels.to(self.device)
        generator = torch.Generator().manual_seed(self.seed * 1009 + 31 * self.index + 7)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.net.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1009 + 53 * self.index)  # dropout / drop-connect draws
            for _ in range(cfg.epochs):
                for rows in torch.randperm(len(y), generator=generator).split(cfg.batch_size):
                    rows = rows.to(self.device)
                    loss = F.cross_entropy(self.net(x[rows]), y[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        torch.save(self.net.state_dict(), tmp)
        os.replace(tmp, cache)
        self.pretrain_info = {"cached": False, "path": str(cache)}

    # ------------------------------------------------------------------ messages
    def handle(self, message: Message) -> Message:
        handler = getattr(self, f"_on_{message.kind}", None)
        if handler is None:
            raise ValueError(f"FCCLParticipant: unknown message kind {message.kind!r}")
        return Message(message.kind, handler(**message.payload))

    @torch.no_grad()
    def _on_evaluate(self, model: str = "net", top_k: int = 5, batch_size: int = 512) -> dict:
        network = self.frozen if model == "frozen" else self.net
        was_training = network.training
        network.eval()
        top1, topk = {}, {}
        for test in self.test_sets:
            correct1 = correctk = 0
            starts = range(0, len(test.test_labels), batch_size)
            for start in profiling.batches("batches", starts, len(starts)):   # per batch: SVHN's test set is 26k
                x = normalise(test.test_images[start:start + batch_size].to(self.device), test.mean, test.std)
                y = test.test_labels[start:start + batch_size].to(self.device)
                logits = network(x)
                k = min(top_k, logits.shape[1])
                hits = logits.topk(k, dim=1).indices.eq(y[:, None])
                correct1 += hits[:, 0].sum().item()
                correctk += hits.any(1).sum().item()
            n = max(1, len(test.test_labels))
            top1[test.name], topk[test.name] = 100.0 * correct1 / n, 100.0 * correctk / n
        network.train(was_training)
        return {"top1": top1, "topk": topk}

    def _on_public_logits(self, images: torch.Tensor) -> dict:
        """Z_i = net_i(x) in train mode (BN batch stats and running-stat updates, dropout on: FCCL.py:169-176)."""
        self.net.train()
        self._public_images = images.to(self.device)
        self._live_logits = self.net(self._public_images)
        return {"logits": self._live_logits.detach().clone()}

    def _on_collaborate(self, others_sum: torch.Tensor, count: int, mode: str = "reference",
                        loss: str = "cross_correlation") -> dict:
        if self._live_logits is None:
            raise RuntimeError("collaborate before public_logits")
        m = self.method
        logits, self._live_logits = self._live_logits, None
        if mode == "reference":
            with torch.no_grad():
                own_slot = self.prev(self._public_images)   # prev in eval mode (FCCL.py:180-187)
        else:
            own_slot = logits.detach()
        target = collaborative_target(others_sum.to(self.device), count, own_slot)
        if loss == "l1":   # FedMD's consensus digest
            value = F.l1_loss(logits, target)
        else:
            value = self.cross_correlation_loss(logits, target, off_diag_weight=m.off_diag_weight,
                                                off_diag_target=m.off_diag_target, unbiased=m.unbiased_std,
                                                eps=m.std_eps)
        if m.fresh_public_optimizer or self._round_optimizer is None:
            # Reference: a new Adam for every batch (FCCL.py:198): its first step is sign-SGD with step lr.
            optimizer = torch.optim.Adam(self.net.parameters(), lr=m.public_lr)
            if not m.fresh_public_optimizer:
                self._round_optimizer = optimizer
        else:
            optimizer = self._round_optimizer
        self._public_images = None
        if not torch.isfinite(value.detach()):   # issue 17: no step on it; the server stops or skips
            term = "collaborative target" if not torch.isfinite(target).all() else \
                ("L1 consensus loss" if loss == "l1" else "cross-correlation loss")
            return {"loss": float("nan"), "nonfinite": {"term": term, "where": "collaborative update"}}
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        return {"loss": float(value.detach())}

    @torch.no_grad()
    def _teacher_logits(self, teacher: torch.nn.Module) -> torch.Tensor:
        """A teacher's logits on the whole (un-augmented) private set, once per round (not per step)."""
        return torch.cat([teacher(self.train_x[s:s + 512]) for s in range(0, len(self.train_y), 512)]) \
            if len(self.train_y) else torch.zeros(0, self.domain.num_classes, device=self.device)

    def _on_local_update(self, round: int = 0, batch_size: int = 512, distill: bool = True) -> dict:
        """CE + KL(frozen) + KL(prev), Adam created once per round (utils_idea.py:218-252); then prev <- net."""
        m = self.method
        with profiling.phase("distillation"):   # the teachers' logits; the KD terms are part of every step
            intra = self._teacher_logits(self.frozen) if distill and m.intra_weight else None
            inter = self._teacher_logits(self.prev) if distill and m.inter_weight else None
        optimizer = torch.optim.Adam(self.net.parameters(), lr=m.local_lr)
        self.net.train()
        total, steps = 0.0, 0
        start = {k: v.detach().clone() for k, v in self.net.state_dict().items()}   # put back on a non-finite loss
        def epoch_batches():
            for epoch in range(self.local_epochs):
                for rows in torch.randperm(len(self.train_y), generator=self.generator).split(batch_size):
                    yield epoch, rows
        total_steps = self.local_epochs * math.ceil(len(self.train_y) / batch_size)
        for epoch, rows in profiling.batches("training_steps", epoch_batches(), total_steps):
            rows = rows.to(self.device)
            logits = self.net(self.train_x[rows])
            if distill:
                loss = self.dual_distillation_loss(
                    logits, self.train_y[rows], None if intra is None else intra[rows],
                    None if inter is None else inter[rows], temperature=m.temperature,
                    intra_weight=m.intra_weight, inter_weight=m.inter_weight,
                    temperature_squared=m.temperature_squared)
            else:
                loss = F.cross_entropy(logits, self.train_y[rows])
            if not torch.isfinite(loss.detach()):   # issue 17: this round's local update is undone
                self.net.load_state_dict(start)
                self.prev = _frozen_copy(self.net)
                self._round_optimizer = None
                term = self._nonfinite_term(logits, self.train_y[rows], intra, inter, rows)
                return {"loss": float("nan"), "steps": steps,
                        "nonfinite": {"term": term, "where": f"local update, epoch {epoch}, step {steps}"}}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        self.prev = _frozen_copy(self.net)   # FCCL.py:267-268, after the local update
        self._round_optimizer = None
        return {"loss": total / max(1, steps), "steps": steps}

    @torch.no_grad()
    def _nonfinite_term(self, logits, labels, intra, inter, rows) -> str:
        """Which part of the local loss is not finite: the inputs, CE, or the distillation (KL) terms."""
        if not torch.isfinite(logits).all():
            return "logits (model output)"
        if intra is not None and not torch.isfinite(intra[rows]).all():
            return "intra-domain teacher logits (frozen model)"
        if inter is not None and not torch.isfinite(inter[rows]).all():
            return "inter-domain teacher logits (previous-round model)"
        if not torch.isfinite(F.cross_entropy(logits, labels)):
            return "cross-entropy"
        return "dual distillation (KL terms)"

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "frozen": self.frozen.state_dict(), "prev": self.prev.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.frozen.load_state_dict(state["frozen"])
        self.prev.load_state_dict(state["prev"])
        self.generator.set_state(state["generator"])
