"""FedDF and FML in the FCCL trainer: their losses against the papers' equations, what crosses the engine,
FedAvg of the meme, and tiny end-to-end runs."""
import math

import pytest
import torch

from python_api.config import from_dict
from python_api.engine import InProcessEngine
from python_api.engine.runner import run_training
from python_api.methods.feddf import FedDFConfig, FedDFServer, ensemble_distillation_loss
from python_api.methods.fml import FMLConfig, FMLServer, mutual_learning_losses

pytestmark = pytest.mark.filterwarnings("ignore:fcl_ext.ops has no FCCL losses")


def tiny(cls, tmp_path, **method):
    data = {
        "run": {"device": "cpu", "seed": 0, "progress": False, "threads": 1},
        "data": {"scenario": "bundled", "public": "bundled", "image_size": 8, "bundled_train_per_domain": 24,
                 "bundled_public_size": 64, "public_batch_size": 32, "private_batch_size": 16},
        "participants": [{"domain": "plain", "backbone": "resnet10", "width": 0.0625, "local_epochs": 1},
                         {"domain": "inverted", "backbone": "mobilenetv2", "width": 0.1, "local_epochs": 1}],
        "pretrain": {"epochs": 1, "batch_size": 16, "cache_dir": str(tmp_path / "pretrained")},
        "fccl": {"rounds": 2, "loss_backend": "reference"},
        **method,
    }
    cfg = from_dict(cls, data)
    cfg.validate()
    return cfg


def _softmax(row, T=1.0):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def test_ensemble_distillation_is_kl_of_the_mean_logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 5, generator=g, dtype=torch.float64)
    members = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    ensemble = members.mean(0)
    got = ensemble_distillation_loss(student, ensemble, temperature=2.0)
    total = 0.0
    for i in range(4):
        p, q = _softmax(ensemble[i].tolist(), 2.0), _softmax(student[i].tolist(), 2.0)
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))
    assert got.item() == pytest.approx(total / 4, rel=1e-12)


def test_mutual_learning_losses_match_eq_1_2():
    g = torch.Generator().manual_seed(1)
    local = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    meme = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2])
    l_local, l_meme = mutual_learning_losses(local, meme, y, alpha=0.3, beta=0.6)
    ref_local = ref_meme = 0.0
    for i in range(4):
        p, q = _softmax(local[i].tolist()), _softmax(meme[i].tolist())
        kl_meme_local = sum(b * (math.log(b) - math.log(a)) for a, b in zip(p, q))   # KL(p_meme ‖ p_local)
        kl_local_meme = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))   # KL(p_local ‖ p_meme)
        ref_local += 0.3 * -math.log(p[y[i]]) + 0.7 * kl_meme_local
        ref_meme += 0.6 * -math.log(q[y[i]]) + 0.4 * kl_local_meme
    assert l_local.item() == pytest.approx(ref_local / 4, rel=1e-12)
    assert l_meme.item() == pytest.approx(ref_meme / 4, rel=1e-12)
    (g_meme,) = torch.autograd.grad(l_local, meme, allow_unused=True, retain_graph=True)
    assert g_meme is None or torch.all(g_meme == 0)              # the other model is a fixed target


def test_feddf_sends_only_logits_and_distils(tmp_path):
    server = FedDFServer(tiny(FedDFConfig, tmp_path))
    engine = InProcessEngine(server, progress=False)
    engine.audit = True
    before = {k: v.clone() for k, v in engine.client(0).net.state_dict().items()}
    record = server.run_round(0, engine)
    for direction, kind, _, payload in engine.messages_carried:
        if direction == "reply":
            assert set(payload) <= {"logits", "loss", "steps", "top1", "topk"}, (kind, set(payload))
    kinds = {kind for _, kind, _, _ in engine.messages_carried}
    assert {"local_update", "ensemble_logits", "distill", "evaluate"} <= kinds
    assert all(v == v for v in record["distill_loss"]) and len(record["distill_loss"]) == 2
    after = engine.client(0).net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fml_meme_is_the_weighted_fedavg(tmp_path):
    server = FMLServer(tiny(FMLConfig, tmp_path, fml={"meme_width": 0.0625}))
    engine = InProcessEngine(server, progress=False)
    engine.audit = True
    server.run_round(0, engine)
    memes = [engine.client(i).meme.state_dict() for i in (0, 1)]
    n = [len(engine.client(i).train_y) for i in (0, 1)]
    for key, value in server.meme_state.items():
        if value.is_floating_point():
            expected = (memes[0][key] * n[0] + memes[1][key] * n[1]) / sum(n)
            torch.testing.assert_close(value, expected)
    for direction, kind, _, payload in engine.messages_carried:
        if direction == "reply" and kind == "mutual_update":
            assert set(payload) == {"loss", "steps", "num_samples", "meme_state"}   # never the private model


@pytest.mark.parametrize("method,cls", [("feddf", FedDFConfig), ("fml", FMLConfig)])
def test_tiny_run_end_to_end(method, cls, tmp_path):
    result = run_training(method, tiny(cls, tmp_path), out_dir=tmp_path / method, verbose=False)
    s = result.summary
    assert result.completed and s["algorithm"] == method and method.upper() in s["report"]
    assert 0 <= s["intra"]["mean"] <= 100 and 0 <= s["inter"]["mean"] <= 100 and s["solo"] is not None
    assert (tmp_path / method / "metrics.json").is_file()
