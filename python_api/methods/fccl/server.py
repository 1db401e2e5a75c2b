"""FCCLServer: the round loop of FCCL and its baselines over engine messages (specs/fccl.md 1.2-1.6).

The server side owns the public data and the schedule; it sees only what participants send: logits on
public batches and scalar metrics. Per round:
  1. collaborative update (fccl, fedmd): for every public mini-batch, one augmented batch goes to every
     participant, each replies its logits Z_k; participant i gets back the sum of the others' logits and
     N and forms its own target (its own slot = previous-round model, or current logits), then steps;
  2. local update on private data (fccl: CE + dual KD; fedmd and solo: CE), then prev <- net;
  3. evaluation of every participant on its own test set (intra) and the other domains' (inter).
An initial evaluation before round 0 scores the pretrained models, i.e. the SOLO baseline of the
reference (evaluation_generalization.py "Evaluate Original"), reported in the summary as `solo`.
"""
from __future__ import annotations

import math
import time
from typing import Hashable, Optional

import torch

from python_api import profiling
from python_api.data.domains import augment_public
from python_api.messages import Message
from python_api.methods.fccl.data import build_domains, check_splits, pretrain_domains
from python_api.methods.fccl.participant import FCCLParticipant
from python_api.nonfinite import NonFiniteGuard

__all__ = ["FCCLServer", "intra_inter"]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _mean_finite(values: list) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def intra_inter(accuracies: list, key: str, own_domains: Optional[list] = None) -> dict:
    """accuracies[i][key][domain] -> per-participant intra (own domain) and inter (mean over the others).

    `own_domains[i]` is participant i's domain (default: the i-th test domain). Results are keyed by
    participant: two participants on one domain share its test set, and neither's inter accuracy counts
    that domain. A participant whose evaluation reply is missing (None: it failed or timed out) counts as
    NaN and is left out of the means.
    """
    present = [a for a in accuracies if a is not None]
    names = list(present[0][key].keys()) if present else []
    own_domains = list(own_domains) if own_domains is not None else names[:len(accuracies)]
    intra, inter, per_domain = [], [], []
    for i, acc in enumerate(accuracies):
        values = [acc[key][n] for n in names] if acc is not None else [float("nan")] * len(names)
        per_domain.append(values)
        own = own_domains[i] if i < len(own_domains) else None
        intra.append(values[names.index(own)] if own in names else float("nan"))
        others = [v for n, v in zip(names, values) if n != own]
        inter.append(sum(others) / len(others) if others else float("nan"))
    return {"intra": intra, "inter": inter, "mean_intra": _mean_finite(intra),
            "mean_inter": _mean_finite(inter), "per_domain": per_domain}


def evenly_spaced_tests(domain, count: Optional[int]):
    """`domain` with at most `count` of its test images, evenly spaced over the test set (class-ordered test
    sets keep every class); the domain itself when count is None or covers the whole set."""
    import dataclasses
    n = len(domain.test_labels)
    if count is None or count >= n:
        return domain
    keep = torch.linspace(0, n - 1, count).long()
    return dataclasses.replace(domain, test_images=domain.test_images[keep], test_labels=domain.test_labels[keep],
                               test_index=None if domain.test_index is None else domain.test_index[keep])


def cross_correlation_matrix(a: torch.Tensor, b: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """The K x K matrix the collaborative loss drives (batch-standardised columns, / B), for plots."""
    def standardise(z):
        return (z - z.mean(0)) / z.std(0, unbiased=unbiased).clamp_min(1e-12)
    return standardise(a).T @ standardise(b) / a.shape[0]


class FCCLServer:
    METHOD = "fccl"

    def __init__(self, cfg, domains: Optional[list] = None, public=None, device=None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else _resolve_device(cfg.run.device)
        if domains is None:
            domains, public = build_domains(cfg)
        self.domains, self.public = domains, public
        self.pretrain_sets = pretrain_domains(cfg, domains) if cfg.pretrain.subset_seed is not None else domains
        check_splits(self.domains, self.pretrain_sets, public)   # no test image in any training data, ever
        # One test set per distinct domain (participants on one domain share it), in order of appearance.
        self.own_domains = [domain.name for domain in self.domains]
        first = {}
        for domain in self.domains:
            first.setdefault(domain.name, domain)
        self.test_sets = [evenly_spaced_tests(t, cfg.data.test_per_domain) for t in first.values()]
        self.num_rounds = cfg.fccl.rounds
        self.ids = list(range(len(cfg.participants)))
        self.names = [f"{p.domain}/{p.backbone}" for p in cfg.participants]
        self.public_generator = torch.Generator().manual_seed(cfg.run.seed * 7 + 3)
        # Kept on the device: each public batch is augmented and normalised there (augment_public).
        self.public_images = public.images.to(self.device) if public is not None else None
        self.solo: Optional[dict] = None            # evaluation of the pretrained models (before round 0)
        self.correlations: list = []                # per round: N x K x K tensor (last public batch)
        self._guard = NonFiniteGuard(cfg.run.on_nonfinite, -1)   # the current round's (run_round sets it)

    # ------------------------------------------------------------------ engine protocol
    def make_client(self, cid: Hashable) -> FCCLParticipant:
        p = self.cfg.participants[cid]
        return FCCLParticipant(cid, self.domains[cid], p.backbone, width=p.width, local_epochs=p.local_epochs,
                               method=self.cfg.fccl, test_sets=self.test_sets, pretrain=self.cfg.pretrain,
                               pretrain_data=self.pretrain_sets[cid], device=self.device, seed=self.cfg.run.seed,
                               model=self.cfg.model)

    def _evaluate(self, transport, model: str = "net") -> dict:
        with profiling.phase("evaluation", f"({model})"):
            return self._evaluate_all(transport, model)

    def _evaluate_all(self, transport, model: str) -> dict:
        replies = transport.send([Message("evaluate", {"model": model, "top_k": self.cfg.fccl.top_k,
                                                         "batch_size": self.cfg.data.eval_batch_size}, dst=i)
                                  for i in self.ids], desc=f"evaluate {model}")
        got = {r.src: r.payload for r in replies}  # a failed participant simply has no reply
        accuracies = [got.get(i) for i in self.ids]
        return {"top1": intra_inter(accuracies, "top1", self.own_domains),
                "topk": intra_inter(accuracies, "topk", self.own_domains)}

    def _public_batches(self) -> list:
        d = self.cfg.data
        count = len(self.public_images)
        order = torch.randperm(count, generator=self.public_generator)
        size = min(d.public_batch_size, count)
        batches = list(order.split(size))
        if d.public_drop_last and len(batches[-1]) < size:
            batches = batches[:-1]
        return batches

    def _collaborate(self, transport) -> dict:
        m = self.cfg.fccl
        mode = "reference" if (m.algorithm == "fccl" and m.target == "reference") else "all_current"
        loss = "l1" if m.algorithm == "fedmd" else "cross_correlation"
        losses = [[] for _ in self.ids]
        last_logits = None
        d = self.cfg.data
        per_epoch = len(self.public_images) // min(d.public_batch_size, len(self.public_images)) if d.public_drop_last \
            else math.ceil(len(self.public_images) / min(d.public_batch_size, len(self.public_images)))

        def public_steps():
            for _ in range(m.public_epochs):
                yield from self._public_batches()
        for rows in profiling.batches("public_batches", public_steps(), m.public_epochs * per_epoch):
            images = augment_public(self.public, self.public_images[rows.to(self.device)],
                                    self.public_generator)
            replies = transport.send([Message("public_logits", {"images": images}, dst=i) for i in self.ids],
                                     desc="public logits")
            # Replies are matched by sender: a participant that failed or timed out sits this
            # step out, and the others align with whoever answered.
            got = {r.src: r.payload["logits"] for r in replies
                   if self._guard.ok(r.src, r.payload, {"public logits": r.payload["logits"]})}
            live = [i for i in self.ids if i in got]
            if len(live) < 2:
                continue
            logits = [got[i] for i in live]
            if len(logits) > 8:
                total = torch.stack(logits).sum(0)
                others = {i: total - got[i] for i in live}
            else:
                others = {i: sum(got[k] for k in live if k != i) for i in live}
            replies = transport.send([Message("collaborate", {"others_sum": others[i], "count": len(live),
                                                              "mode": mode, "loss": loss}, dst=i)
                                      for i in live], desc="collaborate")
            for r in replies:
                if self._guard.ok(r.src, r.payload, {}):   # a skipped step leaves no loss value
                    losses[r.src].append(r.payload["loss"])
            if len(live) == len(self.ids):
                last_logits = logits
        if last_logits is not None:
            n = len(self.ids)
            self.correlations.append(torch.stack([
                cross_correlation_matrix(last_logits[i], sum(z for k, z in enumerate(last_logits) if k != i) / (n - 1))
                for i in self.ids]).cpu())
        return {"collab_loss": [sum(v) / len(v) if v else float("nan") for v in losses]}

    def run_round(self, round_idx: int, transport) -> dict:
        m = self.cfg.fccl
        start = time.perf_counter()
        self._guard = NonFiniteGuard(self.cfg.run.on_nonfinite, round_idx)   # issue 17: stop or skip
        if self.solo is None and m.evaluate_solo:
            self.solo = self._evaluate(transport, "frozen")
        if m.algorithm in ("fccl", "fedmd"):
            with profiling.phase("public_alignment", f"round {round_idx}"):
                collab = self._collaborate(transport)
        else:
            collab = {"collab_loss": []}
        collab_time = time.perf_counter() - start
        with profiling.phase("local_training", f"round {round_idx}"):
            replies = transport.send([Message("local_update", {"round": round_idx,
                                                               "batch_size": self.cfg.data.private_batch_size,
                                                               "distill": m.algorithm == "fccl"}, dst=i)
                                      for i in self.ids], desc="local update")
        local_time = time.perf_counter() - start - collab_time
        evaluation = self._evaluate(transport)
        local_loss = {r.src: r.payload["loss"] for r in replies if self._guard.ok(r.src, r.payload, {})}
        record = self._record(round_idx, evaluation, collab["collab_loss"],
                              [local_loss.get(i, float("nan")) for i in self.ids],
                              time.perf_counter() - start, collab_time, local_time)
        if self._guard.skipped:
            record["nonfinite_skipped"] = self._guard.skipped
        return record

    def _record(self, round_idx, evaluation, collab_loss, local_loss, seconds, collab_time, local_time) -> dict:
        top1, topk, k = evaluation["top1"], evaluation["topk"], self.cfg.fccl.top_k
        record = {"round": round_idx, "mean_intra_top1": top1["mean_intra"], "mean_inter_top1": top1["mean_inter"],
                  f"mean_intra_top{k}": topk["mean_intra"], f"mean_inter_top{k}": topk["mean_inter"],
                  "round_time_s": seconds, "collab_time_s": collab_time, "local_time_s": local_time}
        for i, name in enumerate(self.names):
            tag = f"p{i}_{self.cfg.participants[i].domain}".replace(" ", "_")
            record[f"{tag}_intra_top1"], record[f"{tag}_inter_top1"] = top1["intra"][i], top1["inter"][i]
            record[f"{tag}_intra_top{k}"], record[f"{tag}_inter_top{k}"] = topk["intra"][i], topk["inter"][i]
            if collab_loss:
                record[f"{tag}_collab_loss"] = collab_loss[i]
            record[f"{tag}_local_loss"] = local_loss[i]
        record["accuracy_top1"] = top1["per_domain"]      # participant x domain
        record[f"accuracy_top{k}"] = topk["per_domain"]
        return record

    def round_plan(self, r: int) -> dict:
        """What round r asks of each phase (`fcl-ext estimate`): the same every round, except that round 0
        also evaluates the pretrained models (the SOLO baseline)."""
        solo = r == 0 and self.cfg.fccl.evaluate_solo
        return {"task_start": r == 0, "units": {"evaluation": 2 if solo else 1}}

    # ------------------------------------------------------------------ results
    def summary(self, records: list) -> dict:
        k, m = self.cfg.fccl.top_k, self.cfg.fccl
        domains = [p.domain for p in self.cfg.participants]
        headline = self.cfg.headline_metric()
        out = {"algorithm": m.algorithm, "participants": self.names, "domains": domains,
               "test_domains": [t.name for t in self.test_sets],
               "rounds_completed": len(records), "headline": headline}
        if records:
            last = records[-1]
            n = len(self.names)
            tags = [f"p{i}_{domains[i]}".replace(" ", "_") for i in range(n)]
            for key in ("top1", f"top{k}"):
                out[f"intra_{key}"] = [last[f"{t}_intra_{key}"] for t in tags]
                out[f"inter_{key}"] = [last[f"{t}_inter_{key}"] for t in tags]
                out[f"mean_intra_{key}"] = last[f"mean_intra_{key}"]
                out[f"mean_inter_{key}"] = last[f"mean_inter_{key}"]
                # FCCL+'s table value: mean of the last 3 rounds of the across-participant mean.
                tail = records[-3:]
                out[f"last3_mean_intra_{key}"] = sum(r[f"mean_intra_{key}"] for r in tail) / len(tail)
                out[f"last3_mean_inter_{key}"] = sum(r[f"mean_inter_{key}"] for r in tail) / len(tail)
            out["intra"] = {"per_participant": out[f"intra_{headline}"], "mean": out[f"mean_intra_{headline}"]}
            out["inter"] = {"per_participant": out[f"inter_{headline}"], "mean": out[f"mean_inter_{headline}"]}
            out["accuracy_matrix"] = last["accuracy_top1" if headline == "top1" else f"accuracy_top{k}"]
            out["final_accuracy"] = out["intra"]["mean"]
            out["total_time_s"] = sum(r["round_time_s"] for r in records)
        if self.solo is not None:
            key = "top1" if headline == "top1" else "topk"
            s = self.solo[key]
            out["solo"] = {"intra": {"per_participant": s["intra"], "mean": s["mean_intra"]},
                           "inter": {"per_participant": s["inter"], "mean": s["mean_inter"]},
                           "accuracy_matrix": s["per_domain"], "metric": headline,
                           "definition": "pretrained-only models (private data only, no federation)"}
        from python_api.methods.fccl.plots import summary_table
        out["report"] = summary_table(out)
        return out

    def round_postfix(self, record: dict) -> dict:
        metric = self.cfg.headline_metric()
        return {"intra": f"{record[f'mean_intra_{metric}']:.1f}", "inter": f"{record[f'mean_inter_{metric}']:.1f}"}

    def write_plots(self, plot_dir, records: list, summary: dict) -> list:
        from python_api.methods.fccl.plots import write_fccl_plots
        return write_fccl_plots(plot_dir, records, summary, self.correlations, self.names, self.cfg)

    def table(self, summary: dict) -> str:
        from python_api.methods.fccl.plots import summary_table
        return summary_table(summary)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"public_generator": self.public_generator.get_state(), "solo": self.solo,
                "correlations": self.correlations}

    def load_state_dict(self, state: dict) -> None:
        self.public_generator.set_state(state["public_generator"])
        self.solo = state["solo"]
        self.correlations = list(state["correlations"])
