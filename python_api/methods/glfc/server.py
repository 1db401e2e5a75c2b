"""GLFC server side: orchestration of one global round (spec §1.8), FedAvg, head expansion, client
sampling, evaluation on all seen classes, the proxy server, metrics, plots.

`GLFCServer(cfg, run_dir, device)` implements python_api.messages.FederatedMethod; the engine gives
it a transport and owns the `GLFCClient`s that `make_client` creates.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from python_api.config import ConfigError
from python_api.data import ClassIncrementalStream, DeviceAugment, iterate_batches, load_dataset
from python_api import profiling
from python_api.messages import Message
from python_api.metrics import (average_incremental_accuracy, backward_transfer, forgetting, pycil_line,
                                top1_accuracy)
from python_api.models import IncrementalNet, build_model
from python_api.nonfinite import NonFiniteGuard
from python_api.methods.glfc import privacy
from python_api.methods.glfc.client import GLFCClient, refresh_together
from python_api.methods.glfc.proxy import ProxyServer

__all__ = ["GLFCServer", "GLFCContext", "fedavg", "resolve_loss", "PSNR_PRIVACY_NOTICE", "TRAIN_KEYS", "REFRESH_KEYS"]

# What the server sends a client (the privacy audit test checks every request against these lists).
REFRESH_KEYS = frozenset({"round", "task", "group", "num_classes", "global_state"})
TRAIN_KEYS = REFRESH_KEYS | {"old_models"}

PSNR_PRIVACY_NOTICE = ("proxy.psnr=true: firing clients sent their raw perturbed prototype images (and the "
                       "unperturbed ones and their labels) to the server to measure reconstruction PSNR; GLFC "
                       "itself sends only LeNet gradients. Do not use this setting with private data.")


def resolve_loss(backend: str):
    """glfc_loss from fcl_ext.ops (fused) or fcl_ext.reference (pure PyTorch); auto = ops if built."""
    import fcl_ext
    if backend == "auto":
        backend = "fcl_ext" if hasattr(fcl_ext.ops, "glfc_loss") else "reference"
    module = fcl_ext.ops if backend == "fcl_ext" else fcl_ext.reference
    if not hasattr(module, "glfc_loss"):
        raise RuntimeError("client.loss_backend=fcl_ext: this fcl_ext build has no ops.glfc_loss; "
                           "rebuild fcl_ext or use client.loss_backend=reference")
    return module.glfc_loss, backend


@contextlib.contextmanager
def rng_untouched(device):
    """Model surgery (head expansion of scratch copies) must not consume the run's RNG streams."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def fedavg(states: list, weights=None) -> dict:
    """Average state_dicts (BN buffers included). Integer buffers (num_batches_tracked) use integer
    division as the reference's torch-1.2 `torch.div` on long tensors did."""
    n = len(states)
    if weights is None:
        weights = [1.0 / n] * n
    else:
        total = float(sum(weights))
        weights = [w / total for w in weights]
    out = {}
    for key in states[0]:
        if states[0][key].is_floating_point():
            acc = states[0][key].detach().clone().mul_(weights[0])
            for s, w in zip(states[1:], weights[1:]):
                acc.add_(s[key], alpha=w)
            out[key] = acc
        else:
            out[key] = torch.stack([s[key] for s in states]).sum(0) // n
    return out


class GLFCContext:
    """What every GLFC party needs and shares read-only in one process: config, device, the decoded
    training set (labels remapped to the class order), augmentation, the task stream, the fixed LeNet
    encoder, the loss, and scratch models (so clients do not build a ResNet per message). Passes over
    client images (herding, prototypes) live in GLFCClient, not here."""

    def __init__(self, cfg, device, train, stream):
        self.cfg, self.device, self.train, self.stream = cfg, device, train, stream
        self.aug = DeviceAugment.from_config(cfg.data, device)
        # client.max_images_per_class (a cost cut for smoke tests, null = every image): the clients see only
        # the first N training images of each class; the data set itself stays whole
        cap = cfg.client.max_images_per_class
        self.class_indices = [torch.nonzero(train.labels == c).flatten()[:cap] for c in range(stream.num_classes)]
        self.classes_per_client = cfg.classes_per_client_for(stream.task_size)
        self.image_shape = tuple(train.images.shape[1:])
        self.loss_fn, self.loss_backend = resolve_loss(cfg.client.loss_backend)
        enc_classes = cfg.proxy.encoder_num_classes or stream.num_classes
        if enc_classes < stream.num_classes:
            raise ConfigError(f"proxy.encoder_num_classes={enc_classes} is smaller than the dataset's "
                              f"{stream.num_classes} classes (labels >= {enc_classes} cannot be encoded); "
                              f"set proxy.encoder_num_classes=null (= the dataset's class count)")
        self.encoder_seed = cfg.run.seed if cfg.proxy.encoder_seed is None else cfg.proxy.encoder_seed
        self.encoder = privacy.build_encoder(self.image_shape[0], self.image_shape[1], enc_classes,
                                             self.encoder_seed, device)
        self.template = None
        self._working: dict = {}
        self._snapshots: dict = {}
        self._snapshot_models: dict = {}

    def set_template(self, model: IncrementalNet) -> None:
        self.template = copy.deepcopy(model)

    def _fresh(self, num_classes: int) -> IncrementalNet:
        with rng_untouched(self.device):
            m = copy.deepcopy(self.template)
            m.expand(num_classes)
        return m

    def load_working_model(self, state: dict, num_classes: int) -> IncrementalNet:
        """A scratch model holding `state` (the reference's deepcopy(model_g))."""
        if num_classes not in self._working:
            self._working[num_classes] = self._fresh(num_classes)
        m = self._working[num_classes]
        m.load_state_dict(state)
        for p in m.parameters():
            p.requires_grad_(True)
        m.train()
        return m

    @staticmethod
    def clone_state(model) -> dict:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def snapshot_to_device(self, snap: dict) -> dict:
        if snap["id"] not in self._snapshots:
            self._snapshots[snap["id"]] = {**snap, "state": {k: v.to(self.device) for k, v in snap["state"].items()}}
        return self._snapshots[snap["id"]]

    def snapshot_model(self, snap: dict) -> IncrementalNet:
        """An eval-mode, frozen module for an old-model snapshot (cached by id)."""
        key = snap["id"]
        if key not in self._snapshot_models:
            if len(self._snapshot_models) >= 4:
                self._snapshot_models.pop(next(iter(self._snapshot_models)))
            m = self._fresh(snap["num_classes"])
            m.load_state_dict(snap["state"])
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
            self._snapshot_models[key] = m
        return self._snapshot_models[key]


class GLFCServer:
    label = "GLFC"   # names the method in plots and reports (the FCIL baselines override it)

    def __init__(self, cfg, run_dir, device):
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        train, test = load_dataset(cfg.data)
        self.stream = ClassIncrementalStream(train.num_classes, cfg.federated.num_tasks, cfg.data.class_order,
                                             cfg.run.seed)
        train.labels, test.labels = self.stream.remap(train.labels), self.stream.remap(test.labels)
        self.train, self.test = train.to(device), test.to(device)
        self.ctx = GLFCContext(cfg, device, self.train, self.stream)
        ts = self.stream.task_size
        backbone = build_model(cfg.model.arch, None, width=cfg.model.width, in_channels=self.ctx.image_shape[0])
        self.model = IncrementalNet(backbone, ts).to(device)
        self.ctx.set_template(self.model)
        self.proxy = ProxyServer(self.ctx)
        self.num_rounds = cfg.federated.num_tasks * cfg.federated.rounds_per_task
        self.task = -1
        self.old_client_0: list = []                      # S_o: keep previous classes
        self.old_client_1: list = list(range(cfg.federated.initial_clients))   # S_b (task 0: everyone)
        self.new_client: list = []                        # S_n: joined at this task
        self.new_clients_per_task = cfg.federated.new_clients_per_task or ts
        if cfg.proxy.psnr:
            print(f"[privacy] {PSNR_PRIVACY_NOTICE}", file=sys.stderr)

    # ---- FederatedMethod ---------------------------------------------------------------
    def make_client(self, cid) -> GLFCClient:
        return GLFCClient(cid, self.ctx)

    @property
    def num_clients(self) -> int:
        return len(self.old_client_0) + len(self.old_client_1) + len(self.new_client)

    def group_of(self, cid) -> int:
        return 0 if cid in self.old_client_0 else 1

    def start_task(self, task: int) -> None:
        """Regroup clients and grow the head (fl_main.py:85-96)."""
        f = self.cfg.federated
        overall = self.num_clients
        self.new_client = list(range(overall, overall + self.new_clients_per_task))
        self.old_client_1 = random.sample(range(overall), int(overall * (1 - f.old_keep_fraction)))
        self.old_client_0 = [i for i in range(overall) if i not in self.old_client_1]
        self.model.expand(self.stream.task_size * (task + 1))

    def run_round(self, r: int, transport) -> dict:
        f = self.cfg.federated
        old_models = self.proxy.model_back()
        task = r // f.rounds_per_task
        if task != self.task:
            if self.task >= 0:
                self.start_task(task)
            self.task = task
        num_classes = self.model.num_classes
        global_state = {k: v.detach() for k, v in self.model.state_dict().items()}
        selected = random.sample(range(self.num_clients), f.clients_per_round)

        def payload(cid, with_old):
            p = {"round": r, "task": task, "group": self.group_of(cid), "num_classes": num_classes,
                 "global_state": global_state}
            if with_old:
                p["old_models"] = old_models
            return p
        t0 = time.perf_counter()
        replies = transport.send([Message("train", payload(c, True), dst=c) for c in selected],
                                 desc=f"round {r} train")
        t_train = time.perf_counter() - t0
        others = [c for c in range(self.num_clients) if c not in selected]
        refreshed = transport.send([Message("refresh", payload(c, False), dst=c) for c in others],
                                   desc=f"round {r} refresh")
        t_refresh = time.perf_counter() - t0 - t_train

        guard = NonFiniteGuard(self.cfg.run.on_nonfinite, r)   # issue 17: stop, or leave the update out
        answered, replies = replies, [rep for rep in replies if guard.ok(rep.src, rep.payload, {
            "loss": rep.payload["loss"], "update (model state)": rep.payload["state"],
            "prototype gradients": rep.payload.get("proto_grads")})]
        weights = [rep.payload["num_samples"] for rep in replies] if f.aggregation == "weighted" else None
        if replies:   # every update left out: the global model stays as it was
            with profiling.phase("aggregation"):
                self.model.load_state_dict(fedavg([rep.payload["state"] for rep in replies], weights))
        grads = [rep.payload["proto_grads"] for rep in replies if rep.payload.get("proto_grads") is not None]
        pool = torch.cat(grads) if grads else None
        audit = None
        if grads and self.cfg.proxy.psnr and all("audit_prototypes" in rep.payload for rep in replies
                                                 if rep.payload.get("proto_grads") is not None):
            parts = [rep.payload for rep in replies if rep.payload.get("proto_grads") is not None]
            audit = {"prototypes": torch.cat([p["audit_prototypes"] for p in parts]),
                     "originals": torch.cat([p["audit_originals"] for p in parts]),
                     "labels": torch.cat([p["audit_labels"] for p in parts])}
        new_state = {k: v.detach() for k, v in self.model.state_dict().items()}
        with profiling.phase("proxy_reconstruction"):
            proxy_info = self.proxy.process(new_state, num_classes, pool, audit) if self.cfg.proxy.enabled else {}
        with profiling.phase("evaluation"):
            acc = self.evaluate(task)
        fired_selected = sum(bool(rep.payload["signal"]) for rep in answered)
        fired_other = sum(bool(rep.payload["signal"]) for rep in refreshed)
        old_ids = [rep.payload.get("old_model_id") for rep in answered]
        record = {"round": r, "task": task, "classes_seen": num_classes, **acc,
                  "loss": sum(rep.payload["loss"] for rep in replies) / len(replies) if replies else float("nan"),
                  "num_clients": self.num_clients, "selected": selected,
                  "groups": {"old": len(self.old_client_0), "between": len(self.old_client_1),
                             "new": len(self.new_client)},
                  "signals_selected": fired_selected, "signals_total": fired_selected + fired_other,
                  "distilling_clients": sum(i is not None for i in old_ids), "old_model_ids": old_ids,
                  "train_time_s": t_train, "refresh_time_s": t_refresh, **proxy_info}
        if guard.skipped:
            record["nonfinite_skipped"] = guard.skipped
        return record

    @torch.no_grad()
    def evaluate(self, task: int) -> dict:
        """Global model, eval mode, test images of all seen classes, argmax over all current logits."""
        self.model.eval()
        try:
            return self.evaluate_predictor(task, lambda x: self.model(x).argmax(1))
        finally:
            self.model.train()

    @torch.no_grad()
    def evaluate_predictor(self, task: int, predict) -> dict:
        """Accuracy on the test images of all seen classes (all, old, new, per task) of any
        `predict(x_normalised) -> labels`: the global model's argmax, iCaRL's NME, BiC's corrected head."""
        ts = self.stream.task_size
        seen = (task + 1) * ts
        idx = torch.nonzero(self.test.labels < seen).flatten()
        correct_per_class = torch.zeros(seen, dtype=torch.long, device=self.device)
        count_per_class = torch.zeros(seen, dtype=torch.long, device=self.device)
        bs = self.cfg.client.eval_batch_size
        for b in profiling.batches("batches", iterate_batches(len(idx), bs, False, self.device),
                                   math.ceil(len(idx) / bs)):
            y = self.test.labels[idx[b]]
            pred = predict(self.ctx.aug.test(self.test.images[idx[b]]))
            correct_per_class += torch.bincount(y[pred == y], minlength=seen)
            count_per_class += torch.bincount(y, minlength=seen)
        trunc = self.cfg.proxy.accuracy_integer_truncation
        c, n = correct_per_class.cpu(), count_per_class.cpu()

        def acc(lo, hi):
            return top1_accuracy(int(c[lo:hi].sum()), int(n[lo:hi].sum()), trunc)
        return {"accuracy": acc(0, seen), "old_accuracy": acc(0, task * ts) if task > 0 else None,
                "new_accuracy": acc(task * ts, seen),
                "per_task_accuracy": [acc(j * ts, (j + 1) * ts) for j in range(task + 1)]}

    def handle_together(self, clients: list, messages: list, rng_context):
        """The engine's hook for a send handled in one go: the refresh of unselected clients with their
        entropy passes packed into shared batches (same values; client.refresh_together). None: one by one."""
        if not self.cfg.client.refresh_together or len(messages) < 2:
            return None
        if any(type(c) is not GLFCClient for c in clients) or any(   # the FCIL baselines' clients refresh their own way
                m.kind != "refresh" or m.payload.get("global_state") is not messages[0].payload.get("global_state")
                for m in messages):
            return None
        return refresh_together(clients, messages, rng_context)

    # ---- cost model (`fcl-ext estimate`) -------------------------------------------------
    # Run only when the entropy signal fires, i.e. in a task's first round (new classes raise the entropy).
    TASK_START_PHASES = ("prototype_encoding", "herding", "reconstruction")

    def round_plan(self, r: int) -> dict:
        """What round r asks of each phase (python_api/estimate.py scales the measured seconds per unit):
        clients trained and refreshed, test classes evaluated, and the images of the selected clients'
        training sets (their current classes, plus the exemplar memory from task 1 on for the clients that
        were not new at that task)."""
        f, c = self.cfg.federated, self.cfg.client
        task = min(r // f.rounds_per_task, f.num_tasks - 1)
        clients = f.initial_clients + task * self.new_clients_per_task
        per_class = sum(len(i) for i in self.ctx.class_indices) / max(len(self.ctx.class_indices), 1)
        images = self.ctx.classes_per_client * per_class
        if task > 0:
            images += c.memory_size * (1 - self.new_clients_per_task / clients)
        return {"task_start": r % f.rounds_per_task == 0,
                "units": {"local_training": f.clients_per_round, "refresh": max(clients - f.clients_per_round, 0),
                          "local_training/training_steps": f.clients_per_round * images,
                          "evaluation": (task + 1) * self.stream.task_size,
                          # the problems: the prototypes of the selected clients whose signal fired
                          "proxy_reconstruction/reconstruction": f.clients_per_round},
                "per_client": {"proxy_reconstruction/reconstruction": "train"}}

    # ---- checkpoint -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_classes": self.model.num_classes, "task": self.task,
                "groups": (self.old_client_0, self.old_client_1, self.new_client),
                "proxy": self.proxy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with rng_untouched(self.device):
            self.model.expand(state["num_classes"])
        self.model.load_state_dict(state["model"])
        self.task = state["task"]
        self.old_client_0, self.old_client_1, self.new_client = (list(g) for g in state["groups"])
        self.proxy.load_state_dict(state["proxy"])

    # ---- results ------------------------------------------------------------------------
    def task_end_records(self, records: list) -> list:
        ends = {}
        for rec in records:
            ends[rec["task"]] = rec
        return [ends[t] for t in sorted(ends)]

    def summary(self, records: list) -> dict:
        if not records:
            return {}
        ends = self.task_end_records(records)
        T = self.cfg.federated.num_tasks
        matrix = [[(e["per_task_accuracy"][j] if j < len(e["per_task_accuracy"]) else None) for j in range(T)]
                  for e in ends]
        curve = [e["accuracy"] for e in ends]
        square = [row[:len(ends)] for row in matrix]
        psnrs = [r["psnr_mean"] for r in records if r.get("psnr_mean") is not None]
        times = [r["round_time_s"] for r in records if "round_time_s" in r]
        s = {"accuracy_matrix": matrix, "task_end_accuracy": curve,
             "classes_seen": [e["classes_seen"] for e in ends],
             "final_accuracy": records[-1]["accuracy"],
             "average_incremental_accuracy": average_incremental_accuracy(curve),
             "forgetting": forgetting(square), "backward_transfer": backward_transfer(square),
             "pycil": pycil_line(curve),
             "reconstruction_psnr_mean": sum(psnrs) / len(psnrs) if psnrs else None,
             "mean_round_time_s": sum(times) / len(times) if times else None,
             "loss_backend": self.ctx.loss_backend, "quirks": self.cfg.quirks,
             "raw_prototypes_left_clients": bool(self.cfg.proxy.psnr),
             "fcl_ext_reconstruct": privacy.HAVE_FCL_EXT_RECONSTRUCT}
        if self.cfg.proxy.psnr:
            s["privacy_notice"] = PSNR_PRIVACY_NOTICE
        s["report"] = self.report_text(s)
        return s

    def report_text(self, s: dict) -> str:
        lines = ["GLFC per-task accuracy (%) — row t: after task t; columns: accuracy on task j's classes"]
        header = "task | " + " ".join(f"  T{j:<3d}" for j in range(len(s["accuracy_matrix"][0]))) + " |  all seen"
        lines.append(header)
        for t, row in enumerate(s["accuracy_matrix"]):
            cells = " ".join(f"{v:6.1f}" if v is not None else "     -" for v in row)
            lines.append(f"{t:4d} | {cells} | {s['task_end_accuracy'][t]:8.1f}")
        lines.append(s["pycil"])
        lines.append(f"final accuracy {s['final_accuracy']:.2f}  average incremental accuracy "
                     f"{s['average_incremental_accuracy']:.2f}  forgetting {s['forgetting']:.2f}")
        if s.get("privacy_notice"):
            lines.append(f"PRIVACY: {s['privacy_notice']}")
        if s.get("reconstruction_psnr_mean") is not None:
            lines.append(f"proxy reconstruction PSNR (mean) {s['reconstruction_psnr_mean']:.2f} dB")
        return "\n".join(lines)

    def round_postfix(self, record: dict) -> dict:
        return {"task": record["task"], "acc": f"{record['accuracy']:.1f}", "sig": record["signals_total"]}

    def accuracy_plots(self, plot_dir, records: list, summary: dict) -> list:
        """Accuracy vs classes, per round (all / old / new classes) and the task matrix, named by self.label."""
        from python_api import report
        plot_dir = Path(plot_dir)
        out = [report.plot_accuracy_curve(plot_dir / "accuracy_vs_classes.png", summary["classes_seen"],
                                          summary["task_end_accuracy"], label=self.label)]
        rounds = [r["round"] for r in records]
        curves = {"all seen": (rounds, [r["accuracy"] for r in records])}
        old = [(r["round"], r["old_accuracy"]) for r in records if r.get("old_accuracy") is not None]
        if old:
            curves["old classes"] = ([a for a, _ in old], [b for _, b in old])
        curves["new classes"] = (rounds, [r["new_accuracy"] for r in records])
        out.append(report.plot_curves(plot_dir / "accuracy_per_round.png", curves, "global round",
                                      "top-1 accuracy (%)", f"{self.label} accuracy per round"))
        out.append(report.plot_matrix(plot_dir / "accuracy_matrix.png", summary["accuracy_matrix"],
                                      "accuracy after task t on task j (%)", "task j", "after task t", 0, 100))
        return out

    def write_plots(self, plot_dir, records: list, summary: dict) -> list:
        from python_api import report
        plot_dir = Path(plot_dir)
        out = self.accuracy_plots(plot_dir, records, summary)
        g = self.proxy.gallery
        if g is not None:
            k = min(len(g["images"]), self.cfg.metrics.prototype_grid_max)
            if "truth" in g:
                k = min(k, self.cfg.metrics.prototype_grid_max // 2)
                images = torch.cat([g["truth"][:k], g["images"][:k]])
                titles = [f"sent y={int(y)}" for y in g["true_labels"][:k]] + \
                         [f"recon y={int(y)}" for y in g["labels"][:k]]
            else:
                images, titles = g["images"][:k], [f"y={int(y)}" for y in g["labels"][:k]]
            out.append(report.plot_image_grid(plot_dir / "reconstructions.png", images, titles, ncols=max(1, k),
                                              title="proxy: perturbed prototypes (top) and reconstructions"))
        return out
