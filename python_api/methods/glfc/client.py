"""GLFC client: the algorithm of one local participant (spec §1.2-1.6), engine-agnostic.

Messages it handles (payload keys):
  "train"   {round, task, group, num_classes, global_state, old_models: [snap1|None, snap2|None]}
            -> "update" {state, num_samples, signal, loss, proto_grads [K,P] | None, old_model_id}
               (+ audit_prototypes / audit_originals / audit_labels only with proxy.psnr=true: raw images)
  "refresh" {round, task, group, num_classes, global_state}
            -> "refreshed" {signal}           (entropy pass + maybe exemplar update; no training)
A snapshot is {"id": int, "num_classes": int, "state": state_dict}. `group` is 0 for S_o clients
(keep their classes) and 1 otherwise.

State kept between rounds (and checkpointed): class sets, exemplar indices (herding order), the
previous mean entropy, the last signal, the old model it distils from. Every pass over the client's
own images (entropy, herding, prototype features, perturbation, encoding) runs here, on the client.
"""
from __future__ import annotations

import math
import random
from typing import Optional

import torch
import torch.nn.functional as F

import fcl_ext
from python_api.data import iterate_batches
from python_api import profiling
from python_api.messages import Message
from python_api.methods.glfc import privacy

__all__ = ["GLFCClient", "lr_for_epoch", "herding_selection", "choose_old_model", "refresh_together", "UPDATE_KEYS",
           "REFRESHED_KEYS", "AUDIT_KEYS"]

# What a client may send (the privacy audit test checks every reply against these lists).
UPDATE_KEYS = frozenset({"state", "num_samples", "signal", "loss", "proto_grads", "old_model_id"})
REFRESHED_KEYS = frozenset({"signal"})
AUDIT_KEYS = frozenset({"audit_prototypes", "audit_originals", "audit_labels"})   # only with proxy.psnr=true


def lr_for_epoch(cfg_client, round_idx: int, rounds_per_task: int, epoch: int) -> list:
    """Learning rates of the local epochs of one round (spec §2, quirk §4.2-1).

    legacy_per_round: the optimizer restarts at lr each round; when (epoch + stride·round) mod 200 hits a
    milestone the lr drops to lr/divisor for the rest of this round.
    per_task_step: milestones on the cumulative epoch within the task (scaled so that 200 = a task).
    Returns the lr of every epoch 0..epoch-1 given `epoch` = the number of local epochs.
    """
    base = cfg_client.lr
    lrs, lr = [], base
    total = rounds_per_task * cfg_client.local_epochs
    for e in range(epoch):
        if cfg_client.lr_schedule == "legacy_per_round":
            k = (e + cfg_client.legacy_epoch_stride * round_idx) % 200
            for milestone, div in zip(cfg_client.lr_milestones, cfg_client.lr_divisors):
                if k == milestone:
                    lr = base / div
        else:
            k = (round_idx % rounds_per_task) * cfg_client.local_epochs + e
            lr = base
            for milestone, div in zip(cfg_client.lr_milestones, cfg_client.lr_divisors):
                if k >= milestone * total / 200:
                    lr = base / div
        lrs.append(lr)
    return lrs


def herding_selection(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL herding as the reference does it (spec §1.5): f L2-normalised, μ = mean(f) (not
    re-normalised); step k picks argmin_i ‖μ − (S + f_i)/k‖, S += f_i; no exclusion of picked indices."""
    f = F.normalize(features.double(), dim=1)
    mu = f.mean(0)
    acc = torch.zeros_like(mu)
    picked = []
    for k in range(1, m + 1):
        idx = int(torch.linalg.vector_norm(mu - (acc + f) / k, dim=1).argmin())
        picked.append(idx)
        acc = acc + f[idx]
    return torch.tensor(picked, dtype=torch.long)


def choose_old_model(best_1, best_2, signal: bool, current):
    """The selection table of spec §1.7 (client side, GLFC.py:117-124)."""
    if best_2 is not None:
        return best_2 if signal else best_1
    if signal:
        return best_1
    return current


class GLFCClient:
    def __init__(self, cid, ctx):
        self.cid = cid
        self.ctx = ctx                      # shared read-only context (data, config, models factory)
        self.task_id_old = -1
        self.num_classes = 0
        self.current_class: Optional[list] = None
        self.last_class: Optional[list] = None
        self.learned_classes: list = []
        self.learned_numclass = 0
        self.exemplar_sets: list = []       # index tensors into the training set, herding order
        self.last_entropy = 0.0
        self.signal = False
        self.old_model: Optional[dict] = None   # snapshot {"id", "num_classes", "state"}
        self.nonfinite: Optional[dict] = None   # {"term", "where"} when this round's loss was not finite

    # ---- checkpoint ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("task_id_old", "num_classes", "current_class", "last_class",
                                              "learned_classes", "learned_numclass", "exemplar_sets",
                                              "last_entropy", "signal", "old_model")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.exemplar_sets = [e.to(self.ctx.device) for e in self.exemplar_sets]
        if self.old_model is not None:
            self.old_model = self.ctx.snapshot_to_device(self.old_model)

    # ---- protocol --------------------------------------------------------------------
    def handle(self, message: Message) -> Message:
        kind = "refresh" if message.kind == "refresh" else "local_training"
        with profiling.phase(kind, f"client {self.cid} round {message.payload.get('round')}"):
            return self._handle(message)

    def _handle(self, message: Message) -> Message:
        p = message.payload
        model = self.ctx.load_working_model(p["global_state"], p["num_classes"])
        self.before_train(p["task"], p["group"])
        self.update_new_set(model)
        if message.kind == "refresh":
            return Message("refreshed", {"signal": self.signal})
        if message.kind != "train":
            raise ValueError(f"GLFCClient: unknown message kind {message.kind!r}")
        best_1, best_2 = p["old_models"]
        self.old_model = choose_old_model(best_1, best_2, self.signal, self.old_model)
        self.nonfinite = None
        loss, num_samples = self.train(model, p["round"])
        cfg = self.ctx.cfg.client
        state = None if cfg.bn_stats_after_upload else self.ctx.clone_state(model)
        reply = {"signal": self.signal, "loss": loss, "num_samples": num_samples, "proto_grads": None,
                 "old_model_id": None if self.old_model is None else self.old_model["id"]}
        if self.nonfinite is not None:   # issue 17: the server stops the run or leaves this update out
            reply["nonfinite"] = self.nonfinite
        elif self.signal and self.ctx.cfg.proxy.enabled:
            with profiling.phase("prototype_encoding"):
                reply.update(self.prototype_gradients(model, p["num_classes"]))
        reply["state"] = self.ctx.clone_state(model) if state is None else state
        return Message("update", reply)

    # ---- bookkeeping (GLFC.py beforeTrain) --------------------------------------------
    def before_train(self, task: int, group: int) -> None:
        if task != self.task_id_old:
            self.task_id_old = task
            ts = self.ctx.stream.task_size
            self.num_classes = ts * (task + 1)
            if group != 0:
                if self.current_class is not None:
                    self.last_class = self.current_class
                k = self.ctx.classes_per_client
                self.current_class = random.sample(range(self.num_classes - ts, self.num_classes), k)
            else:
                self.last_class = None

    # ---- entropy signal + exemplar memory (GLFC.py update_new_set) ----------------------
    def current_indices(self) -> torch.Tensor:
        return torch.cat([self.ctx.class_indices[c] for c in self.current_class])

    def entropy_batches(self) -> list:
        """The entropy pass's batches: (image indices, their augmentation's random numbers), drawn from the
        global RNG as the pass uses them (the reference applies train_transform here; the forward in eval
        mode draws nothing, so drawing first changes no number)."""
        ctx = self.ctx
        idx = self.current_indices()
        return [(idx[b], ctx.aug.draw(len(b), ctx.device))
                for b in iterate_batches(len(idx), ctx.cfg.client.eval_batch_size, shuffle=False, device=ctx.device)]

    def batch_entropy(self, logits) -> float:
        return float(fcl_ext.ops.softmax_entropy(logits.float(), reduction="sum", eps=self.ctx.cfg.client.entropy_eps))

    @torch.no_grad()
    def mean_entropy(self, model) -> float:
        ctx = self.ctx
        model.eval()
        total, count = 0.0, 0
        batches = self.entropy_batches()
        for ids, drawn in profiling.batches("batches", batches, len(batches)):
            total += self.batch_entropy(model(ctx.aug.train(ctx.train.images[ids], drawn)))
            count += len(ids)
        return total / max(count, 1)

    def update_new_set(self, model, mean_entropy: Optional[float] = None) -> None:
        """Entropy signal and exemplar update; `mean_entropy` when the pass already ran (refresh_together)."""
        with profiling.phase("entropy"):
            h = self.mean_entropy(model) if mean_entropy is None else mean_entropy
        self.signal = (h - self.last_entropy) > self.ctx.cfg.client.entropy_threshold
        self.last_entropy = h
        new_classes = self.last_class
        if new_classes is not None and self.ctx.cfg.client.skip_relearned_classes:
            new_classes = [c for c in new_classes if c not in self.learned_classes] or None
        if self.signal and new_classes is not None:
            self.learned_numclass += len(new_classes)
            self.learned_classes = self.learned_classes + list(new_classes)
            m = int(self.ctx.cfg.client.memory_size / self.learned_numclass)
            self.exemplar_sets = [e[:m] for e in self.exemplar_sets]
            # The reference's entropy pass ends with model.train() (GLFC.py:185), so its herding
            # features use BN batch statistics; herding_train_mode=false is the eval-mode fix.
            with profiling.phase("herding"):
                for c in new_classes:
                    idx = self.ctx.class_indices[c]
                    feats = self.class_features(model, idx, train_mode=self.ctx.cfg.client.herding_train_mode)
                    self.exemplar_sets.append(idx[herding_selection(feats, m).to(idx.device)])
        model.train()

    @torch.no_grad()
    def class_features(self, model, idx: torch.Tensor, train_mode: bool) -> torch.Tensor:
        """Backbone features of this client's training images `idx` with the test transform (herding and
        prototypes, GLFC.py:265-275). train_mode=True runs the whole set as ONE batch in train mode, as
        the reference does (BN batch statistics; the running statistics move too)."""
        ctx = self.ctx
        was_training = model.training
        if train_mode:
            model.train()
            out = model.features(ctx.aug.test(ctx.train.images[idx]))
        else:
            model.eval()
            bs = ctx.cfg.client.eval_batch_size
            out = torch.cat([model.features(ctx.aug.test(ctx.train.images[idx[b]])) for b in profiling.batches(
                "batches", iterate_batches(len(idx), bs, False, ctx.device), math.ceil(len(idx) / bs))])
        model.train(was_training)
        return out

    # ---- local training ---------------------------------------------------------------
    def train_indices(self):
        ctx = self.ctx
        idx = [self.current_indices()]
        labels = [ctx.train.labels[idx[0]]]
        for c, ex in zip(self.learned_classes, self.exemplar_sets):
            idx.append(ex)
            labels.append(torch.full((len(ex),), c, dtype=torch.long, device=ctx.device))
        return torch.cat(idx), torch.cat(labels)

    def train(self, model, round_idx: int):
        ctx, cfg = self.ctx, self.ctx.cfg.client
        idx, labels = self.train_indices()
        old_model = ctx.snapshot_model(self.old_model) if self.old_model is not None else None
        old_mask = torch.zeros(self.num_classes, dtype=torch.bool, device=ctx.device)
        if self.learned_classes:
            old_mask[torch.tensor(self.learned_classes, device=ctx.device)] = True
        loss_fn = ctx.loss_fn
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        model.train()
        lrs = lr_for_epoch(cfg, round_idx, ctx.cfg.federated.rounds_per_task, cfg.local_epochs)
        loss_sum, steps = 0.0, 0

        def epoch_batches():
            for epoch in range(cfg.local_epochs):
                for group in optimizer.param_groups:
                    group["lr"] = lrs[epoch]
                for b in iterate_batches(len(idx), cfg.batch_size, shuffle=True, device=ctx.device):
                    yield epoch, b
        total_steps = cfg.local_epochs * math.ceil(len(idx) / cfg.batch_size)
        for epoch, b in profiling.batches("training_steps", epoch_batches(), total_steps):
            x = ctx.aug.train(ctx.train.images[idx[b]])
            y = labels[b]
            logits = model(x)
            old_logits = None
            if old_model is not None:
                if cfg.old_model_no_grad:
                    with torch.no_grad():
                        old_logits = old_model(x)
                else:
                    old_logits = old_model(x)
            loss = loss_fn(logits, y, old_mask, old_logits, gc_weight=cfg.gc_weight, rd_weight=cfg.rd_weight)
            if not torch.isfinite(loss.detach()):   # no step on it: the weights keep their last finite values
                self.nonfinite = {"term": self.nonfinite_term(logits, y, old_mask, old_logits),
                                  "where": f"local epoch {epoch}, step {steps}"}
                return float("nan"), int(len(idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach())
            steps += 1
        return loss_sum / max(steps, 1), int(len(idx))

    def nonfinite_term(self, logits, labels, old_mask, old_logits) -> str:
        """Which part of the GLFC loss is not finite: the inputs, L_GC or L_RD (by the reference twins), or
        else the loss backend itself."""
        from fcl_ext import reference
        with torch.no_grad():
            if not torch.isfinite(logits).all():
                return "logits (model output)"
            if old_logits is not None and not torch.isfinite(old_logits).all():
                return "old-model logits (L_RD teacher)"
            if not torch.isfinite(reference.gradient_compensated_bce(logits, labels, old_mask)):
                return "L_GC"
            if old_logits is not None and not torch.isfinite(
                    reference.relation_distillation_bce(logits, labels, old_logits)):
                return "L_RD"
        return f"glfc_loss of the {self.ctx.loss_backend} backend (L_GC and L_RD are finite in fcl_ext.reference)"

    # ---- prototype -> perturbation -> gradient (GLFC.py prototype_mask) ------------------
    def prototype_gradients(self, model, num_classes: int) -> dict:
        ctx, cfg = self.ctx, self.ctx.cfg.client
        protos, feat_var = [], []
        with profiling.loop("classes", len(self.current_class)) as measured:
            for c in self.current_class[:measured]:
                idx = ctx.class_indices[c]
                feats = F.normalize(self.class_features(model, idx, train_mode=cfg.prototype_train_mode).double(),
                                    dim=1)
                mu = feats.mean(0)
                protos.append(idx[int(torch.linalg.vector_norm(mu - feats, dim=1).argmin())])
                feat_var.append(feats.var(0, unbiased=True) if len(idx) > 1 else torch.zeros_like(mu))
        for c in self.current_class[measured:]:   # only while an estimate samples: stand-ins, so K stays as in full
            protos.append(ctx.class_indices[c][0])
            feat_var.append(torch.zeros_like(feat_var[0]))
        model.eval()
        labels = torch.tensor(self.current_class, dtype=torch.long, device=ctx.device)
        x0 = ctx.train.images[torch.stack(protos)].float() / 255.0          # [K, C, H, W] in [0, 1]
        x = self.perturb(model, x0, labels, num_classes, torch.stack(feat_var).float())
        grads = privacy.encode(ctx.encoder, x.detach(), labels)
        out = {"proto_grads": grads.detach()}
        if ctx.cfg.proxy.psnr:   # opt-in audit, NOT the method: raw prototypes leave the client (the run says so)
            out["audit_prototypes"] = x.detach().clamp(0, 1)
            out["audit_originals"] = x0
            out["audit_labels"] = labels
        return out

    def perturb(self, model, x0, labels, num_classes, feat_var):
        """Reference: `perturb_steps` SGD steps on the images (lr/10, weight decay on the pixels)
        minimising BCE(model(x), onehot(y)); per-image losses are independent in eval mode, so one
        batched step with the summed per-image loss equals the reference's one-image-at-a-time loop.
        gaussian (paper): pull the image's feature to f + n, n ~ N(0, γ·σ²_class)."""
        ctx, cfg = self.ctx, self.ctx.cfg.client
        if cfg.perturbation == "none" or cfg.perturb_steps == 0:
            return x0
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            x = x0.clone().requires_grad_(True)
            opt = torch.optim.SGD([x], lr=cfg.lr / cfg.perturb_lr_divisor, weight_decay=cfg.perturb_weight_decay)
            net_input = (lambda z: ctx.aug.normalize(z)) if cfg.prototype_input_normalised else (lambda z: z)
            if cfg.perturbation == "gaussian":
                with torch.no_grad():
                    f0 = F.normalize(model.features(net_input(x0)), dim=1)
                    target_f = f0 + torch.randn_like(f0) * (cfg.gaussian_gamma * feat_var.to(f0)).sqrt()
            onehot = F.one_hot(labels, num_classes).float()
            with torch.enable_grad(), profiling.loop("perturb_steps", cfg.perturb_steps) as steps:
                for _ in range(steps):
                    if cfg.perturbation == "descent":
                        per_image = F.binary_cross_entropy_with_logits(model(net_input(x)), onehot,
                                                                       reduction="none").mean(1)
                    else:
                        f = F.normalize(model.features(net_input(x)), dim=1)
                        per_image = (f - target_f).pow(2).sum(1)
                    opt.zero_grad()
                    per_image.sum().backward()
                    opt.step()
            return x.detach()
        finally:
            for p in model.parameters():
                p.requires_grad_(True)


@torch.no_grad()
def refresh_together(clients: list, messages: list, rng_context) -> list:
    """The refresh of several unselected clients with their entropy passes packed into shared batches.

    Every refreshed client gets the same global model in eval mode, where an image's logits do not depend
    on the other images of its batch: the clients' batches (each at most eval_batch_size images) are packed
    into forwards of up to eval_batch_size images, and each client's entropy is summed over its own batches
    in its own order, so the values equal one client after another. Each client draws its augmentation in
    its own RNG context (`rng_context(message)`: its stream, or the running global RNG in request order),
    in the order the clients would have drawn it; the signal and herding follow per client."""
    ctx = clients[0].ctx
    first = messages[0].payload
    with profiling.phase("refresh", f"{len(clients)} clients together, round {first.get('round')}"):
        model = ctx.load_working_model(first["global_state"], first["num_classes"])
        plans = []
        for client, message in zip(clients, messages):
            with rng_context(message):
                client.before_train(message.payload["task"], message.payload["group"])
                plans.append(client.entropy_batches())
        chunks = [(i, ids, drawn) for i, plan in enumerate(plans) for ids, drawn in plan]
        packs, size = [], ctx.cfg.client.refresh_pack_images or ctx.cfg.client.eval_batch_size
        for chunk in chunks:   # consecutive chunks, up to eval_batch_size images per forward
            if packs and sum(len(c[1]) for c in packs[-1]) + len(chunk[1]) <= size:
                packs[-1].append(chunk)
            else:
                packs.append([chunk])
        totals, counts = [0.0] * len(clients), [0] * len(clients)
        with profiling.phase("entropy"):
            model.eval()
            for pack in profiling.batches("batches", packs, len(packs)):
                ids = torch.cat([c[1] for c in pack])
                drawn = {k: torch.cat([c[2][k] for c in pack]) for k in pack[0][2]}
                logits = model(ctx.aug.train(ctx.train.images[ids], drawn))
                for (i, chunk_ids, _), part in zip(pack, logits.split([len(c[1]) for c in pack])):
                    totals[i] += clients[i].batch_entropy(part)
                    counts[i] += len(chunk_ids)
        replies = []
        for i, client in enumerate(clients):
            client.update_new_set(model, totals[i] / max(counts[i], 1))
            replies.append(Message("refreshed", {"signal": client.signal}))
        return replies
