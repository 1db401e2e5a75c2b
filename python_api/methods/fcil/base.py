"""FCIL baselines inside GLFC's stream: the shared server and client (see the package docstring).

What is GLFC's, reused as is: data loading and class order (GLFCServer.__init__), client groups and head
growth (`start_task`), uniform client selection, `fedavg`, FC evaluation on all seen classes (`evaluate`),
the summary metrics (accuracy matrix, average incremental accuracy, forgetting), the client's class draw
(`GLFCClient.before_train`), herding (`herding_selection`) and its learning-rate schedule (`lr_for_epoch`).

What differs, and why: a baseline knows task boundaries (as in the FCIL papers that run them: iCaRL+FL,
BiC+FL in GLFC's tables, LwF/EWC in TARGET's) instead of detecting them by GLFC's entropy signal, so
  - at a task change the server keeps the previous task's final global model as the `teacher` snapshot
    (LwF, iCaRL and BiC distil from it) and sends it with each train message;
  - a client that moves on to new classes stores exemplars of the classes it leaves (methods with a memory:
    herding under the teacher, `client.memory_size` per client as in GLFC; joint keeps everything).
Every round the unselected clients get a "refresh" (no training) so that, as in GLFC, every client draws
its classes and updates its memory at each task change. Nothing else leaves a client than its model state, its sample count and its loss, plus what a method's
own protocol sends (EWC: its Fisher diagonal; iCaRL's NME evaluation: per-class feature sums; BiC: its
two bias-correction scalars) — each documented in that method's module.

With `data.partition: dirichlet` (python_api/data/dirichlet.py) the clients are fixed
(`federated.initial_clients`, no newcomers, no S_o group) and client k's data of task t is its Dirichlet
shard.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from python_api.config import ConfigError
from python_api.data import iterate_batches
from python_api.data.dirichlet import dirichlet_task_partition
from python_api.messages import Message
from python_api.methods.glfc.client import GLFCClient, herding_selection, lr_for_epoch
from python_api.methods.glfc.config import GLFCConfig, ProxyConfig
from python_api.methods.glfc.server import GLFCServer, fedavg

__all__ = ["FCILConfig", "FCILServer", "FCILClient", "class_balanced_memory"]


@dataclass
class FCILConfig(GLFCConfig):
    """GLFC's config tree (same stream, model, client optimiser, memory budget) with the proxy off.
    The GLFC-only client keys (entropy, gc/rd weights, perturbation) are unused by the baselines."""
    METHOD = None
    method: str = "fcil"
    proxy: ProxyConfig = field(default_factory=lambda: ProxyConfig(enabled=False, psnr=False))

    def validate(self) -> None:
        super().validate()
        if self.data.partition not in ("classes", "dirichlet"):
            raise ConfigError(f"data.partition: expected one of classes, dirichlet, got {self.data.partition!r}")
        if self.data.partition == "dirichlet":
            if not self.data.beta > 0:
                raise ConfigError(f"data.beta: must be > 0, got {self.data.beta}")
            if self.data.dirichlet_min_samples < 0:
                raise ConfigError("data.dirichlet_min_samples: must be >= 0")


def class_balanced_memory(memory_size: int, num_classes: int) -> int:
    """Exemplars per class of a fixed budget (iCaRL's m = K / t, as GLFC's client)."""
    return int(memory_size / num_classes) if num_classes else 0


class FCILClient(GLFCClient):
    """One client. Subclasses override `objective` (the local loss) and, where the method needs it,
    `memory_kind`, `after_local_training` and the `on_<kind>` handlers of extra messages."""
    memory_kind = "none"        # none | herding (fixed budget, iCaRL) | all (joint: every past sample)

    # ---- which data the client holds -------------------------------------------------
    def before_train(self, task: int, group: int) -> None:
        partition = self.ctx.partition
        if partition is None:
            return super().before_train(task, group)
        if task != self.task_id_old:
            self.task_id_old = task
            self.num_classes = self.ctx.stream.task_size * (task + 1)
            if self.current_class is not None:
                self.last_class = self.current_class
            shard = partition[task][self.cid]
            self.current_class = sorted(set(self.ctx.train.labels[shard].tolist()))

    def class_data(self, c: int) -> torch.Tensor:
        """This client's training indices of class c."""
        partition = self.ctx.partition
        if partition is None:
            return self.ctx.class_indices[c]
        shard = partition[self.ctx.stream.task_of(c)][self.cid]
        return shard[self.ctx.train.labels[shard] == c]

    def current_indices(self) -> torch.Tensor:
        if self.ctx.partition is None:
            return super().current_indices()
        return self.ctx.partition[self.task_id_old][self.cid]

    # ---- memory ------------------------------------------------------------------------
    def update_memory(self, teacher_model) -> None:
        """Store the classes the client just left (last_class): herding under the previous task's
        global model within `client.memory_size` (GLFC's budget), or every sample (joint)."""
        if self.memory_kind == "none" or not self.last_class:
            return
        new_classes = [c for c in self.last_class if c not in self.learned_classes]
        if not new_classes:
            return
        self.learned_classes = self.learned_classes + new_classes
        if self.memory_kind == "all":
            self.exemplar_sets = self.exemplar_sets + [self.class_data(c) for c in new_classes]
            return
        m = class_balanced_memory(self.ctx.cfg.client.memory_size, len(self.learned_classes))
        self.exemplar_sets = [e[:m] for e in self.exemplar_sets]
        for c in new_classes:
            idx = self.class_data(c)
            if len(idx) == 0 or m == 0:
                self.exemplar_sets.append(idx[:0])
                continue
            feats = self.class_features(teacher_model, idx, train_mode=False)
            self.exemplar_sets.append(idx[herding_selection(feats, min(m, len(idx))).to(idx.device)])

    # ---- protocol ------------------------------------------------------------------------
    def handle(self, message: Message) -> Message:
        p = message.payload
        handler = getattr(self, f"on_{message.kind}", None)
        if handler is None:
            raise ValueError(f"{type(self).__name__}: unknown message kind {message.kind!r}")
        return handler(p)

    def teacher_model(self, p):
        snap = p.get("teacher")
        return None if snap is None else self.ctx.snapshot_model(self.ctx.snapshot_to_device(snap))

    def follow_stream(self, p):
        """GLFC's per-round bookkeeping (every client, selected or not): new classes at a task change,
        and the memory of the classes left behind. Returns the teacher model (or None)."""
        changed = p["task"] != self.task_id_old
        self.before_train(p["task"], p["group"])
        teacher = self.teacher_model(p)
        if changed and teacher is not None:
            self.update_memory(teacher)
        return teacher

    def on_refresh(self, p) -> Message:
        self.follow_stream(p)
        return Message("refreshed", {})

    def on_train(self, p) -> Message:
        model = self.ctx.load_working_model(p["global_state"], p["num_classes"])
        teacher = self.follow_stream(p)
        loss, num_samples = self.local_train(model, p, teacher)
        reply = {"loss": loss, "num_samples": num_samples, **self.after_local_training(model, p, teacher)}
        reply["state"] = self.ctx.clone_state(model)
        return Message("update", reply)

    def local_train(self, model, p, teacher):
        """GLFC's local loop (SGD, lr_for_epoch schedule, train augmentation) with `objective` as loss."""
        ctx, cfg = self.ctx, self.ctx.cfg.client
        idx, labels = self.train_indices()
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        model.train()
        lrs = lr_for_epoch(cfg, p["round"], ctx.cfg.federated.rounds_per_task, cfg.local_epochs)
        loss_sum, steps = 0.0, 0
        for epoch in range(cfg.local_epochs):
            for group in optimizer.param_groups:
                group["lr"] = lrs[epoch]
            for b in iterate_batches(len(idx), cfg.batch_size, shuffle=True, device=ctx.device):
                x = ctx.aug.train(ctx.train.images[idx[b]])
                y = labels[b]
                logits = model(x)
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = self.teacher_logits(teacher, x, p)
                loss = self.objective(model, logits, y, teacher_logits, p)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach())
                steps += 1
        return loss_sum / max(steps, 1), int(len(idx))

    # ---- method hooks --------------------------------------------------------------------
    def teacher_logits(self, teacher, x, p) -> torch.Tensor:
        return teacher(x)

    def objective(self, model, logits, labels, teacher_logits, p) -> torch.Tensor:
        """Cross-entropy over all current classes (finetune)."""
        return F.cross_entropy(logits, labels)

    def after_local_training(self, model, p, teacher) -> dict:
        return {}


class FCILServer(GLFCServer):
    """GLFC's server without the proxy: the round of FedAvg + a local class-incremental method."""
    label = "FCIL"
    client_cls = FCILClient

    def __init__(self, cfg, run_dir, device):
        super().__init__(cfg, run_dir, device)
        self.teacher: Optional[dict] = None
        self.ctx.partition = None
        if cfg.data.partition == "dirichlet":
            d = cfg.data
            self.ctx.partition = dirichlet_task_partition(self.train.labels, self.stream, cfg.federated.initial_clients,
                                                          d.beta, cfg.run.seed, d.dirichlet_min_samples)
            self.old_client_0, self.old_client_1, self.new_client = [], list(range(cfg.federated.initial_clients)), []

    def make_client(self, cid) -> FCILClient:
        return self.client_cls(cid, self.ctx)

    def start_task(self, task: int) -> None:
        if self.ctx.partition is not None:   # fixed clients; each moves to its shard of the new task
            self.model.expand(self.stream.task_size * (task + 1))
            return
        super().start_task(task)

    def snapshot(self, task: int) -> dict:
        return {"id": f"{self.label}-teacher-{task}", "num_classes": self.model.num_classes,
                "state": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

    # ---- method hooks ----------------------------------------------------------------------
    def round_payload(self) -> dict:
        """Extra keys of every train message (EWC: penalties, BiC: bias)."""
        return {}

    def aggregate_extras(self, replies: list) -> dict:
        return {}

    def end_of_task(self, task: int, transport) -> dict:
        """After the last round of a task (EWC: Fisher, iCaRL: NME evaluation); returns record keys."""
        return {}

    def on_task_change(self, task: int) -> None:
        """Called after the teacher snapshot and the head growth."""

    # ---- the round ----------------------------------------------------------------------------
    def run_round(self, r: int, transport) -> dict:
        f = self.cfg.federated
        task = r // f.rounds_per_task
        if task != self.task:
            previous, self.task = self.task, task
            if previous >= 0:
                self.teacher = self.snapshot(previous)
                self.start_task(task)
                self.on_task_change(task)
        num_classes = self.model.num_classes
        global_state = {k: v.detach() for k, v in self.model.state_dict().items()}
        selected = random.sample(range(self.num_clients), f.clients_per_round)
        extras = self.round_payload()
        messages = [Message("train", {"round": r, "task": task, "group": self.group_of(c), "num_classes": num_classes,
                                      "global_state": global_state, "teacher": self.teacher, **extras}, dst=c)
                    for c in selected]
        t0 = time.perf_counter()
        replies = transport.send(messages, desc=f"round {r} train")
        t_train = time.perf_counter() - t0
        # as GLFC's refresh: the other clients follow the stream too (class draw, memory), without training
        others = [c for c in range(self.num_clients) if c not in selected]
        transport.send([Message("refresh", {"round": r, "task": task, "group": self.group_of(c), "teacher": self.teacher},
                                dst=c) for c in others], desc=f"round {r} refresh")
        weights = [rep.payload["num_samples"] for rep in replies] if f.aggregation == "weighted" else None
        self.model.load_state_dict(fedavg([rep.payload["state"] for rep in replies], weights))
        record = {"round": r, "task": task, "classes_seen": num_classes, **self.aggregate_extras(replies)}
        record.update(self.evaluate(task))
        record.update({"loss": sum(rep.payload["loss"] for rep in replies) / len(replies),
                       "num_clients": self.num_clients, "selected": selected,
                       "groups": {"old": len(self.old_client_0), "between": len(self.old_client_1),
                                  "new": len(self.new_client)},
                       "train_time_s": t_train})
        if (r + 1) % f.rounds_per_task == 0:
            record.update(self.end_of_task(task, transport))
        return record

    # ---- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher": self.teacher}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.teacher = state["teacher"]
        if self.teacher is not None:
            self.teacher = self.ctx.snapshot_to_device(self.teacher)

    # ---- results -----------------------------------------------------------------------------
    def summary(self, records: list) -> dict:
        s = super().summary(records)
        if s:
            s["method"] = self.cfg.method
            s["report"] = s["report"].replace("GLFC", self.label, 1)
        return s

    def round_postfix(self, record: dict) -> dict:
        return {"task": record["task"], "acc": f"{record['accuracy']:.1f}"}

    def write_plots(self, plot_dir, records: list, summary: dict) -> list:
        return self.accuracy_plots(plot_dir, records, summary)   # no proxy, so no reconstruction grid

    # evaluation with another predictor (NME, bias-corrected): GLFCServer.evaluate_predictor
