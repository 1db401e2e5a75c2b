"""One trainer round, prepared once and replayed: the shared setup of benchmarks/test_bench_trainers.py,
and a torch.profiler run of it ("where a round's time goes").

    python -m benchmarks.profile_round glfc|fccl [--backend fcl_ext|reference] [--out FILE] [--smoke]

Writes a markdown table of the top-10 ops by self CPU time to --out (default
docs/perf/profile_<method>_<backend>.md) and prints it.

Setup (untimed, once): build the method and the in-process engine on the bundled data with a small
config derived from the demo preset, then
  glfc: run task 0 (one round per task), so the next round is the first of task 1: clients detect the
        task change, train against the old model, encode prototype gradients and the proxy reconstructs;
  fccl: create (pretrain, cached) every participant and score the frozen models (the SOLO evaluation
        round 0 would otherwise do), so the next round is a plain collaborative + local round.
`Prepared.fresh(backend)` deep-copies that state (method, engine, RNG) and switches the loss backend,
so every replay does the same work from the same state.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from python_api.checkpoint import capture_rng_state, restore_rng_state, seed_everything
from python_api.config import load_config
from python_api.engine import InProcessEngine

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "python_api" / "configs"
BACKENDS = ("fcl_ext", "reference")

# glfc-demo (6 clients, 3 per round, width-16 ResNet-10) cut to seconds: task 0 = one round, 1 local
# epoch, short perturbation and reconstruction; after a single task-0 round the entropy rise at the
# task change is small, so the threshold drops to 0.1 (else no client fires and nothing is
# reconstructed). Smoke: 4 clients (2 per round), width 4, fewer steps.
GLFC_BENCH = ["run.progress=false", "run.threads=1", "run.device=cpu", "federated.rounds_per_task=1",
              "client.local_epochs=1", "client.entropy_threshold=0.1", "client.perturb_steps=5",
              "proxy.steps=10", "proxy.max_iter=5", "proxy.keep_last=5"]
GLFC_SMOKE = GLFC_BENCH + ["federated.initial_clients=4", "federated.new_clients_per_task=1",
                           "federated.clients_per_round=2", "model.width=4", "client.memory_size=40",
                           "client.perturb_steps=2", "proxy.steps=2", "proxy.max_iter=2", "proxy.keep_last=2"]


def glfc_label(smoke: bool) -> str:
    return "digits16 r10w4 2of5cl e1 rec2x2" if smoke else "digits16 r10w16 3of8cl e1 rec10x5"


# fccl-demo, cut to seconds: 4 participants at the demo's widths, 1 local epoch, 1 public epoch,
# short (cached) pretraining. Smoke: 2 participants, 8x8 images, fewer samples.
def _fccl_overrides(smoke: bool, cache_dir: str) -> list:
    if smoke:
        return ["run.progress=false", "run.threads=1", "run.device=cpu", "data.image_size=8",
                "data.bundled_train_per_domain=24", "data.bundled_public_size=64", "data.public_batch_size=32",
                "data.private_batch_size=16", "pretrain.epochs=1", "pretrain.batch_size=16",
                f"pretrain.cache_dir={cache_dir}", "fccl.public_epochs=1", "fccl.rounds=2"]
    return ["run.progress=false", "run.threads=1", "run.device=cpu", "data.bundled_train_per_domain=60",
            "data.bundled_public_size=200", "pretrain.epochs=3", f"pretrain.cache_dir={cache_dir}",
            "fccl.public_epochs=1", "fccl.rounds=2"]


def fccl_label(smoke: bool) -> str:
    return "digits8 2p w.06-.1 e1 pub2x32" if smoke else "digits16 4p w.125-.25 e1 pub2x100"


@dataclass
class Prepared:
    method_name: str
    method: object
    engine: InProcessEngine
    rng: dict
    round_idx: int
    label: str

    def fresh(self, backend: str):
        """(method, engine) deep copies of the prepared state, RNG restored, loss backend switched."""
        method, engine = copy.deepcopy((self.method, self.engine))
        set_backend(self.method_name, method, engine, backend)
        restore_rng_state(self.rng)
        return method, engine

    def run(self, backend: str) -> dict:
        method, engine = self.fresh(backend)
        return method.run_round(self.round_idx, engine)


def set_backend(method_name: str, method, engine, backend: str) -> None:
    if method_name == "glfc":
        from python_api.methods.glfc.server import resolve_loss
        method.cfg.client.loss_backend = backend
        method.ctx.loss_fn, method.ctx.loss_backend = resolve_loss(backend)
        assert method.ctx.loss_backend == backend
    else:
        from python_api.methods.fccl.participant import loss_functions
        method.cfg.fccl.loss_backend = backend
        for client in engine.clients.values():
            client.method = method.cfg.fccl
            client.cross_correlation_loss, client.dual_distillation_loss = loss_functions(backend)


def prepare_glfc(smoke: bool = False) -> Prepared:
    from python_api.methods.glfc import GLFCConfig
    from python_api.methods.glfc.server import GLFCServer
    cfg = load_config(GLFCConfig, CONFIGS / "glfc-demo.yaml", GLFC_SMOKE if smoke else GLFC_BENCH)
    cfg.client.loss_backend = "reference"      # task 0 never distils; the timed round switches backends
    torch.set_num_threads(1)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    run_dir = Path(tempfile.mkdtemp(prefix="fcl_ext_bench_glfc_"))
    method = GLFCServer(cfg, run_dir, torch.device("cpu"))
    engine = InProcessEngine(method, progress=False)
    first = cfg.federated.rounds_per_task      # first round of task 1
    for r in range(first):
        method.run_round(r, engine)
    return Prepared("glfc", method, engine, capture_rng_state(), first, glfc_label(smoke))


def prepare_fccl(smoke: bool = False, cache_dir=None) -> Prepared:
    from python_api.methods.fccl import FCCLConfig
    from python_api.methods.fccl.server import FCCLServer
    cache_dir = cache_dir or str(Path(tempfile.gettempdir()) / "fcl_ext_bench_fccl_pretrained")
    overrides = _fccl_overrides(smoke, cache_dir)
    if smoke:
        overrides += ["participants=[{domain: plain, backbone: resnet10, width: 0.0625, local_epochs: 1}, "
                      "{domain: inverted, backbone: mobilenetv2, width: 0.1, local_epochs: 1}]"]
    cfg = load_config(FCCLConfig, CONFIGS / "fccl-demo.yaml", overrides)
    if not smoke:
        for p in cfg.participants:
            p.local_epochs = 1
    cfg.validate()
    torch.set_num_threads(1)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    method = FCCLServer(cfg, device=torch.device("cpu"))
    engine = InProcessEngine(method, progress=False)
    for cid in method.ids:
        engine.client(cid)                      # pretrains (or loads the cache)
    if method.solo is None and cfg.fccl.evaluate_solo:
        method.solo = method._evaluate(engine, "frozen")
    return Prepared("fccl", method, engine, capture_rng_state(), 0, fccl_label(smoke))


def prepare(method_name: str, smoke: bool = False) -> Prepared:
    return {"glfc": prepare_glfc, "fccl": prepare_fccl}[method_name](smoke)


# ---- profiling -------------------------------------------------------------------------------

def profile_table(prepared: Prepared, backend: str, top: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile
    prepared.run(backend)                       # warm up (allocator, first-call costs)
    method, engine = prepared.fresh(backend)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        record = method.run_round(prepared.round_idx, engine)
    wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    lines = [f"# Where a {prepared.method_name.upper()} round's time goes ({backend})", "",
             f"One {prepared.method_name} round (`python -m benchmarks.profile_round {prepared.method_name} "
             f"--backend {backend}`), config `{prepared.label}`, CPU, {torch.get_num_threads()} thread(s), "
             f"torch {torch.__version__}. Round wall time under the profiler: {wall:.2f} s; "
             f"profiled self CPU total: {total / 1e6:.2f} s.", ""]
    if prepared.method_name == "glfc":
        lines += [f"Round {prepared.round_idx} (first of task 1): {record.get('signals_total')} client(s) fired, "
                  f"{record.get('distilling_clients')} distilled from an old model, "
                  f"{record.get('num_gradients')} prototype gradient(s) reconstructed.", ""]
    ours = [e for e in events if "fcl_ext" in e.key]
    ours_ms = sum(e.self_cpu_time_total for e in ours) / 1e3
    names = (": " + ", ".join(f"`{e.key}`" for e in ours[:6])) if ours else ""
    lines += [f"fcl_ext ops in this round: {len(ours)} kind(s), {ours_ms:.1f} ms self CPU "
              f"({100.0 * ours_ms * 1e3 / total:.1f}%){names}.", ""]
    lines += ["| rank | op | self CPU (ms) | share of self CPU | calls |", "|---:|---|---:|---:|---:|"]
    for i, e in enumerate(events[:top], 1):
        lines.append(f"| {i} | `{e.key}` | {e.self_cpu_time_total / 1e3:.1f} | "
                     f"{100.0 * e.self_cpu_time_total / total:.1f}% | {e.count} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["glfc", "fccl"])
    parser.add_argument("--backend", choices=BACKENDS, default="fcl_ext")
    parser.add_argument("--out", default=None, help="markdown file (default docs/perf/profile_<method>_<backend>.md)")
    parser.add_argument("--smoke", action="store_true", help="the tiny smoke-test config")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = profile_table(prepare(args.method, args.smoke), args.backend, args.top)
    out = Path(args.out) if args.out else ROOT / "docs" / "perf" / f"profile_{args.method}_{args.backend}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
