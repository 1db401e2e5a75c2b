"""End-to-end trainer rounds: one GLFC round at a task change and one FCCL round, with the fused
fcl_ext losses (impl `fcl_ext`) against the pure-PyTorch twins (impl `reference`).

    FCL_EXT_BENCH_THREADS=1 python -m pytest benchmarks/test_bench_trainers.py -q --benchmark-group-by=group
    python -m benchmarks.profile_round glfc|fccl [--backend ...]    # where a round's time goes

The state before the timed round is built once per method (benchmarks/profile_round.py: GLFC runs
task 0; FCCL pretrains, cached, and scores the frozen models); every timed call replays the same round
from a deep copy of it (copied in the untimed setup), so all calls do the same work. Under
--benchmark-disable (make test) the configs are tiny and each round runs once.
"""
import pytest
import torch

from benchmarks.profile_round import prepare_fccl, prepare_glfc

pytestmark = pytest.mark.filterwarnings("ignore:fcl_ext.ops has no FCCL losses")

ROUNDS = 3


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def glfc_state(smoke):
    threads = torch.get_num_threads()
    prepared = prepare_glfc(smoke)
    torch.set_num_threads(threads)
    return prepared


@pytest.fixture(scope="module")
def fccl_state(smoke, tmp_path_factory):
    threads = torch.get_num_threads()
    prepared = prepare_fccl(smoke, cache_dir=str(tmp_path_factory.mktemp("fccl_pretrained")))
    torch.set_num_threads(threads)
    return prepared


def _time_round(benchmark, smoke, prepared, op, impl):
    benchmark.group = f"{op} | round | cpu | float32 | {prepared.label}"
    benchmark.extra_info.update(op=op, mode="round", device="cpu", dtype="float32", shape=prepared.label,
                                impl=impl, bytes_moved=None, peak_mem_bytes=None)

    def setup():
        method, engine = prepared.fresh(impl)
        return (method, engine), {}

    def call(method, engine):
        return method.run_round(prepared.round_idx, engine)

    rounds = 1 if smoke else ROUNDS
    return benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=0 if smoke else 1, iterations=1)


@pytest.mark.parametrize("impl", ["fcl_ext", "reference"])
def test_glfc_round(benchmark, smoke, glfc_state, impl):
    record = _time_round(benchmark, smoke, glfc_state, "glfc_round", impl)
    benchmark.extra_info.update(signals=record["signals_total"], distilling=record["distilling_clients"],
                                gradients=record.get("num_gradients"), accuracy=record["accuracy"])
    assert record["task"] == 1 and record["signals_total"] >= 1
    assert record["distilling_clients"] >= 1 and record.get("num_gradients", 0) >= 1


@pytest.mark.parametrize("impl", ["fcl_ext", "reference"])
def test_fccl_round(benchmark, smoke, fccl_state, impl):
    record = _time_round(benchmark, smoke, fccl_state, "fccl_round", impl)
    benchmark.extra_info.update(mean_intra_top1=record["mean_intra_top1"], mean_inter_top1=record["mean_inter_top1"])
    assert record["round"] == 0 and record["mean_intra_top1"] == record["mean_intra_top1"]  # not NaN
