"""GLFC proxy server (spec §1.7): gradient pool -> label recovery -> batched reconstruction -> monitor
set -> best-old-model selection. Engine-agnostic: the GLFC server calls `model_back()` at the start of a
round and `process(global_state, num_classes, pool)` after aggregation.

Selection, as the reference code does it (ProxyServer.py:35-48):
    if the round brought gradients: monitor set := their reconstructions; best_model_1 := best_model_2;
                                    (best_perf := 0 only with best_perf_reset_per_task, quirk §4.2-5)
    acc := top-1 of the aggregated model on the monitor set
    if acc >= best_perf: best_perf := acc; best_model_2 := the aggregated model
Snapshots are immutable dicts {"id", "num_classes", "state"}; clients hold them by reference.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import torch

from python_api import profiling
from python_api.data import iterate_batches
from python_api.methods.glfc import privacy
from python_api.metrics import psnr, top1_accuracy

__all__ = ["ProxyServer", "pixels_to_uint8"]


def pixels_to_uint8(x: torch.Tensor, wrap: bool) -> torch.Tensor:
    """Float images -> uint8. wrap=True mimics ToPILImage on unclipped floats: mul(255), truncate,
    keep the low byte (values outside [0,1] wrap around, quirk §4.2-13); False clips to [0,1]."""
    if wrap:
        return (x * 255).trunc().long().remainder(256).to(torch.uint8)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class ProxyServer:
    def __init__(self, ctx):
        self.ctx = ctx
        self.best_model_1: Optional[dict] = None
        self.best_model_2: Optional[dict] = None
        self.best_perf = 0.0
        self.monitor_images: Optional[torch.Tensor] = None    # uint8 [M, C, H, W]
        self.monitor_labels: Optional[torch.Tensor] = None
        self.next_id = 0
        self.gallery: Optional[dict] = None                   # last reconstructions, for the plot

    def model_back(self) -> list:
        """[best_model_1, best_model_2] (either may be None), sent to clients at the start of a round."""
        return [self.best_model_1, self.best_model_2]

    def _snapshot(self, state: dict, num_classes: int) -> dict:
        snap = {"id": self.next_id, "num_classes": num_classes,
                "state": {k: v.detach().clone() for k, v in state.items()}}
        self.next_id += 1
        return snap

    def process(self, global_state: dict, num_classes: int, pool: Optional[torch.Tensor],
                audit: Optional[dict] = None) -> dict:
        """One round's proxy work; returns metrics for the round record."""
        cfg, ctx = self.ctx.cfg.proxy, self.ctx
        info = {"num_gradients": 0, "monitor_accuracy": None, "proxy_time_s": 0.0,
                "psnr_mean": None, "psnr_vs_original_mean": None, "label_recovery_accuracy": None}
        t0 = time.perf_counter()
        if pool is not None and pool.shape[0] > 0:
            order = torch.randperm(pool.shape[0], device=pool.device) if cfg.shuffle_pool else \
                torch.arange(pool.shape[0], device=pool.device)
            pool = pool[order]
            labels = privacy.recover(ctx.encoder, pool)
            with profiling.phase("reconstruction"), profiling.loop("steps", cfg.steps) as steps:
                run_cfg = cfg if steps == cfg.steps else dataclasses.replace(cfg, steps=steps)
                iterates, _losses = privacy.reconstruct(ctx.encoder, pool, labels, run_cfg, ctx.image_shape)
            keep_full = max(1, min(cfg.keep_last, cfg.steps))
            if iterates.shape[1] < keep_full:   # only while an estimate samples: the monitor set keeps its full size
                iterates = torch.cat([iterates, iterates[:, -1:].expand(-1, keep_full - iterates.shape[1],
                                                                         *iterates.shape[2:])], 1)
            k, keep = iterates.shape[:2]
            self.monitor_images = pixels_to_uint8(iterates.reshape(k * keep, *iterates.shape[2:]), cfg.pixel_wrap)
            self.monitor_labels = labels.repeat_interleave(keep)
            self.best_model_1 = self.best_model_2
            if cfg.best_perf_reset_per_task:
                self.best_perf = 0.0
            info["num_gradients"] = int(k)
            last = iterates[:, -1].clamp(0, 1)
            gallery = {"images": last, "labels": labels}
            if audit is not None:
                truth = audit["prototypes"][order]
                info["psnr_mean"] = float(psnr(last, truth).mean())
                info["psnr_vs_original_mean"] = float(psnr(last, audit["originals"][order]).mean())
                info["label_recovery_accuracy"] = 100.0 * float((labels == audit["labels"][order]).float().mean())
                gallery.update(truth=truth, true_labels=audit["labels"][order])
            self.gallery = {key: v.detach().cpu() for key, v in gallery.items()}
        if self.monitor_images is not None:
            with profiling.phase("monitor_evaluation"):
                acc = self.monitor_accuracy(global_state, num_classes)
            info["monitor_accuracy"] = acc
            if acc >= self.best_perf:
                self.best_perf = acc
                self.best_model_2 = self._snapshot(global_state, num_classes)
        info["best_perf"] = self.best_perf
        info["best_model_1_id"] = None if self.best_model_1 is None else self.best_model_1["id"]
        info["best_model_2_id"] = None if self.best_model_2 is None else self.best_model_2["id"]
        info["proxy_time_s"] = time.perf_counter() - t0
        return info

    @torch.no_grad()
    def monitor_accuracy(self, global_state: dict, num_classes: int) -> float:
        """Top-1 (argmax over all outputs) on the monitor set; batches of monitor_batch_size, shuffled,
        drop_last as the reference's DataLoader (all images when fewer than one batch)."""
        cfg, ctx = self.ctx.cfg.proxy, self.ctx
        model = ctx.load_working_model(global_state, num_classes)
        model.eval()
        n = self.monitor_images.shape[0]
        drop_last = n >= cfg.monitor_batch_size
        correct = total = 0
        batches = (n // cfg.monitor_batch_size) if drop_last else math.ceil(n / cfg.monitor_batch_size)
        for b in profiling.batches("batches", iterate_batches(n, cfg.monitor_batch_size, shuffle=True,
                                                              device=ctx.device, drop_last=drop_last), batches):
            imgs = self.monitor_images[b]
            x = ctx.aug.train(imgs) if cfg.monitor_transform == "train_aug" else ctx.aug.test(imgs)
            pred = model(x).argmax(1)
            correct += int((pred == self.monitor_labels[b]).sum())
            total += len(b)
        return top1_accuracy(correct, total, cfg.accuracy_integer_truncation)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("best_model_1", "best_model_2", "best_perf", "monitor_images",
                                              "monitor_labels", "next_id", "gallery")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        dev = self.ctx.device
        for key in ("best_model_1", "best_model_2"):
            if getattr(self, key) is not None:
                setattr(self, key, self.ctx.snapshot_to_device(getattr(self, key)))
        if self.monitor_images is not None:
            self.monitor_images, self.monitor_labels = self.monitor_images.to(dev), self.monitor_labels.to(dev)
