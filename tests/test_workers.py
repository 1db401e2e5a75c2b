"""run.workers=N (python_api/engine/inprocess.py): clients in worker processes, randomness from per-client
streams, final metrics identical to run.workers=1."""
import pytest

from python_api.config import ConfigError
from python_api.engine.inprocess import stream_seed
from python_api.engine.runner import run_training

from tests.glfc_tiny import tiny_config
from tests.test_glfc_run import COMPARED


def _metrics(result):
    return [{k: r.get(k) for k in COMPARED} for r in result.records], result.summary["final_accuracy"]


def test_stream_seed_depends_on_seed_round_client_and_kind_only():
    base = stream_seed(0, 3, 7, "train")
    assert base == stream_seed(0, 3, 7, "train")
    assert len({base, stream_seed(1, 3, 7, "train"), stream_seed(0, 4, 7, "train"), stream_seed(0, 3, 8, "train"),
                stream_seed(0, 3, 7, "refresh")}) == 5


def test_workers_need_streams_and_are_positive():
    with pytest.raises(ConfigError, match="run.workers > 1 needs run.client_rng=streams"):
        tiny_config("run.workers=2")
    with pytest.raises(ConfigError, match="run.workers"):
        tiny_config("run.workers=0", "run.client_rng=streams")
    with pytest.raises(ConfigError, match="run.client_rng"):
        tiny_config("run.client_rng=parallel")


def test_two_workers_give_the_metrics_of_one(tmp_path):
    """The whole tiny run (2 tasks, proxy, old models, a client joining) and a resume in between."""
    one = run_training("glfc", tiny_config("run.client_rng=streams"), out_dir=tmp_path / "w1")
    two = run_training("glfc", tiny_config("run.client_rng=streams", "run.workers=2", "run.max_rounds=3"),
                       out_dir=tmp_path / "w2")
    two = run_training("glfc", tiny_config("run.client_rng=streams", "run.workers=2"), out_dir=tmp_path / "w2",
                       resume=True)
    assert _metrics(two) == _metrics(one)
    assert len(one.records) == 4 and one.records[-1]["distilling_clients"] >= 0


def test_clients_live_in_the_workers_and_close_stops_them(tmp_path):
    import os
    from python_api.checkpoint import seed_everything
    from python_api.engine.inprocess import InProcessEngine
    from python_api.methods import get_method
    import torch
    cfg = tiny_config("run.client_rng=streams", "run.workers=2")
    seed_everything(cfg.run.seed)
    method = get_method("glfc").build(cfg, tmp_path, torch.device("cpu"))
    engine = InProcessEngine(method, progress=False)
    record = method.run_round(0, engine)
    procs = [p for p, _ in engine._pool]
    assert len(procs) == 2 and all(p.is_alive() and p.pid != os.getpid() for p in procs)
    assert engine.clients == {} and sorted(engine._owner) == [0, 1, 2, 3]   # 2 trained + 2 refreshed, remote
    state = engine.state_dict()["clients"]
    assert sorted(state) == [0, 1, 2, 3]
    engine.close()
    assert engine._pool is None and not any(p.is_alive() for p in procs)


@pytest.mark.slow   # ~4 min here (Ray start-up)
def test_flower_simulation_uses_the_same_streams(tmp_path):
    """run.client_rng=streams on 2 simulated Flower nodes: the records of the in-process run with 2 workers."""
    pytest.importorskip("flwr", reason="Flower is not installed")
    from tests.test_flower_engine import _close
    cfg = ("run.client_rng=streams", "run.max_rounds=3")
    a = run_training("glfc", tiny_config(*cfg, "run.workers=2"), out_dir=tmp_path / "inprocess", verbose=False)
    from python_api.engine.flower import run_with_flower
    b = run_with_flower("glfc", tiny_config(*cfg), out_dir=tmp_path / "sim", engine="flower-sim", verbose=False,
                        num_supernodes=2)
    assert len(b.records) == len(a.records) == 3
    _close(a.records, b.records)


@pytest.mark.parametrize("rng", ["sequential", "streams"])
def test_refresh_together_gives_the_metrics_of_one_client_at_a_time(tmp_path, rng):
    """Issue 14 item 5: the unselected clients' entropy passes packed into shared batches (client.refresh_together)
    leave every metric, signal and exemplar choice as it was, in both RNG modes (the tiny run: 2 tasks, a client
    joining, herding at the task change)."""
    one = run_training("glfc", tiny_config(f"run.client_rng={rng}", "client.refresh_together=false"),
                       out_dir=tmp_path / "one")
    together = run_training("glfc", tiny_config(f"run.client_rng={rng}"), out_dir=tmp_path / "together")
    assert _metrics(together) == _metrics(one)
    assert [r["signals_total"] for r in together.records] == [r["signals_total"] for r in one.records]
    assert sum(r["signals_total"] - r["signals_selected"] for r in one.records) > 0   # refreshed clients fired
    # batches of 16 (3 per 48-image pass) in packs of 40: packs cross from one client's pass into the next's
    small = [f"run.client_rng={rng}", "client.eval_batch_size=16"]
    one_small = run_training("glfc", tiny_config(*small, "client.refresh_together=false"), out_dir=tmp_path / "os")
    packed = run_training("glfc", tiny_config(*small, "client.refresh_pack_images=40"), out_dir=tmp_path / "packed")
    assert _metrics(packed) == _metrics(one_small)
    # every client's stored mean entropy (the signal's input) is the same float
    import torch
    states = [torch.load(r.run_dir / "checkpoints" / "last.pt", weights_only=False)["engine_state"]["clients"]
              for r in (one, together, one_small, packed)]
    entropies = [{cid: s["last_entropy"] for cid, s in clients.items()} for clients in states]
    assert entropies[0] == entropies[1] and entropies[2] == entropies[3] and len(entropies[0]) == 5


class _EchoClient:
    def handle(self, message):
        from python_api.messages import Message
        return Message("echo", {"data": message.payload["data"] + 1})

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class _EchoMethod:
    """Clients that send back a payload as large as the request's (a model state in a real method)."""
    def __init__(self):
        from types import SimpleNamespace
        self.cfg = SimpleNamespace(run=SimpleNamespace(seed=0, client_rng="streams", workers=2))

    def make_client(self, cid):
        return _EchoClient()


def test_workers_exchange_payloads_larger_than_a_pipe_buffer():
    """Several requests per worker, each far over the pipe's buffer both ways: no deadlock, replies in order."""
    import threading
    import torch
    from python_api.engine.inprocess import InProcessEngine
    from python_api.messages import Message
    engine = InProcessEngine(_EchoMethod(), progress=False)
    messages = [Message("echo", {"data": torch.full((1 << 21,), float(i))}, dst=i) for i in range(6)]   # 8 MiB each
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("replies", engine.send(messages)), daemon=True)
    thread.start()
    thread.join(timeout=300)
    try:
        assert not thread.is_alive(), "send did not return: the parent and a worker block each other"
        assert [float(r.payload["data"][0]) for r in out["replies"]] == [float(i + 1) for i in range(6)]
        assert [r.src for r in out["replies"]] == list(range(6))
    finally:
        if not thread.is_alive():
            engine.close()
