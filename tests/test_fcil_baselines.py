"""FCIL baselines (finetune, lwf, ewc, icarl, bic, joint): each loss/update against a plain transcription of its
paper's equation, and a tiny end-to-end run of each in GLFC's stream."""
import json
import math

import pytest
import torch
import torch.nn as nn

from python_api.checkpoint import load_checkpoint
from python_api.config import ConfigError
from python_api.engine.runner import run_training
from python_api.methods.bic import apply_bias, bic_stage1_loss, fit_bias
from python_api.methods.ewc import diagonal_fisher, ewc_penalty
from python_api.methods.fcil import class_balanced_memory
from python_api.methods.icarl import icarl_loss, nme_predict
from python_api.methods.lwf import lwf_loss

from tests.fcil_tiny import BASELINES, tiny_baseline_config


def _data(n=5, c=6, n_old=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(n, n_old, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, c, (n,), generator=g)
    return logits, labels, teacher


def _softmax(row, T=1.0):
    e = [math.exp(v / T) for v in row]
    s = sum(e)
    return [v / s for v in e]


# ---- losses vs the papers' equations, written element by element ------------------------------------

def test_lwf_loss_is_own_head_ce_plus_weighted_softened_cross_entropy_on_old_classes():
    logits, labels, teacher = _data(n=8)
    assert (labels < 4).any() and (labels >= 4).any()
    got = lwf_loss(logits, labels, teacher, weight=0.7, temperature=2.0)
    total = 0.0
    for i in range(len(labels)):
        y = int(labels[i])
        head = range(4, 6) if y >= 4 else range(0, 4)                  # the sample's own task head
        p = _softmax([float(logits[i, c]) for c in head])
        ce = -math.log(p[list(head).index(y)])
        y_old = _softmax(teacher[i].tolist(), 2.0)                     # y'_o = softmax(z_old / T)
        y_hat = _softmax(logits[i, :teacher.shape[1]].tolist(), 2.0)  # ŷ'_o over the old classes only
        l_old = -sum(a * math.log(b) for a, b in zip(y_old, y_hat))
        total += ce + 0.7 * l_old
    assert got.item() == pytest.approx(total / len(labels), rel=1e-12)
    assert lwf_loss(logits, labels, None, 0.7, 2.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item())


def test_icarl_loss_matches_algorithm_3():
    logits, labels, teacher = _data()
    got = icarl_loss(logits, labels, teacher)
    sig = lambda v: 1 / (1 + math.exp(-v))                              # noqa: E731
    total = 0.0
    for i in range(len(labels)):
        for y in range(logits.shape[1]):
            g = sig(float(logits[i, y]))
            q = sig(float(teacher[i, y])) if y < teacher.shape[1] else float(y == labels[i])
            total += -(q * math.log(g) + (1 - q) * math.log(1 - g))
    assert got.item() == pytest.approx(total / logits.numel(), rel=1e-12)


def test_bic_stage1_loss_and_bias_layer_match_eq_1_to_5():
    logits, labels, teacher = _data(c=6, n_old=4)
    got = bic_stage1_loss(logits, labels, teacher, temperature=2.0)
    lam = 4 / 6
    total = 0.0
    for i in range(len(labels)):
        pi_hat = _softmax(teacher[i].tolist(), 2.0)
        pi = _softmax(logits[i, :4].tolist(), 2.0)
        l_d = -sum(a * math.log(b) for a, b in zip(pi_hat, pi))
        l_c = -math.log(_softmax(logits[i].tolist())[labels[i]])
        total += lam * l_d + (1 - lam) * l_c
    assert got.item() == pytest.approx(total / len(labels), rel=1e-12)
    q = apply_bias(logits, 0.5, -1.0, 4, 6)
    assert torch.equal(q[:, :4], logits[:, :4])
    torch.testing.assert_close(q[:, 4:], 0.5 * logits[:, 4:] - 1.0)


def test_fit_bias_removes_a_bias_towards_the_new_classes():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(6).repeat(20)
    logits = torch.nn.functional.one_hot(labels, 6).double() * 3 + torch.randn(120, 6, generator=g, dtype=torch.float64)
    biased = logits.clone()
    biased[:, 4:] += 4.0                                              # the new classes' logits inflated
    ce = lambda z: torch.nn.functional.cross_entropy(z, labels).item()   # noqa: E731
    alpha, beta = fit_bias(biased, labels, 4, 6, epochs=300, lr=0.1)
    assert beta < -1.0
    assert ce(apply_bias(biased, alpha, beta, 4, 6)) < 0.5 * ce(biased)


def test_ewc_penalty_matches_eq_3_with_one_term_per_task():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    pens = []
    for rows in (2, 4):         # the head had 2 rows after task 0 and 4 after task 1
        pens.append({"fisher": {"weight": torch.rand(rows, 3, dtype=torch.float64), "bias": torch.rand(rows, dtype=torch.float64)},
                     "anchor": {"weight": torch.randn(rows, 3, dtype=torch.float64), "bias": torch.randn(rows, dtype=torch.float64)}})
    got = ewc_penalty(model.named_parameters(), pens, weight=10.0)
    total = 0.0
    for pen in pens:
        for name, param in (("weight", model.weight), ("bias", model.bias)):
            f, a = pen["fisher"][name].flatten().tolist(), pen["anchor"][name].flatten().tolist()
            theta = param[:pen["fisher"][name].shape[0]].flatten().tolist()
            total += sum(fi * (t - ai) ** 2 for fi, t, ai in zip(f, theta, a)) * 10.0 / 2
    assert got.item() == pytest.approx(total, rel=1e-12)
    got.backward()
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


def test_diagonal_fisher_per_sample_is_the_true_fisher():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    fisher, n = diagonal_fisher(model, (x[i:i + 1] for i in range(5)))
    assert n == 5
    expected = torch.zeros_like(model.weight)
    for i in range(5):                       # F = E_x Σ_y p(y|x) (∂ log p(y|x) / ∂W)²
        p = torch.softmax(model(x[i]), 0).detach()
        for y in range(4):
            grad_w = torch.outer(torch.nn.functional.one_hot(torch.tensor(y), 4).double() - p, x[i])
            expected += p[y] * grad_w ** 2
    torch.testing.assert_close(fisher["weight"], expected / 5)


def test_nme_picks_the_nearest_normalised_class_mean():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(7, 5, generator=g, dtype=torch.float64)
    means = torch.nn.functional.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=1)
    means_nan = torch.cat([means, torch.full((1, 5), float("nan"), dtype=torch.float64)])
    got = nme_predict(feats, means_nan)
    for i in range(7):
        f = feats[i] / feats[i].norm()
        dists = [float((f - means[y]).norm()) for y in range(3)]
        assert int(got[i]) == dists.index(min(dists))


def test_memory_budget_is_split_evenly():
    assert class_balanced_memory(2000, 30) == 66 and class_balanced_memory(10, 0) == 0


# ---- end to end in GLFC's stream -----------------------------------------------------------------------

@pytest.mark.parametrize("method", BASELINES)
def test_tiny_run_end_to_end(method, tmp_path):
    result = run_training(method, tiny_baseline_config(method), out_dir=tmp_path / method, verbose=False)
    run = result.run_dir
    for name in ("config.yaml", "metrics.json", "metrics.csv", "checkpoints/last.pt",
                 "plots/accuracy_vs_classes.png", "plots/accuracy_matrix.png"):
        assert (run / name).is_file(), name
    data = json.loads((run / "metrics.json").read_text())
    s = data["summary"]
    assert len(data["rounds"]) == 4 and s["completed"] and s["method"] == method
    assert len(s["accuracy_matrix"]) == 2 and s["accuracy_matrix"][0][1] is None
    assert 0 <= s["final_accuracy"] <= 100 and s["final_accuracy"] == data["rounds"][-1]["accuracy"]
    r0, r2 = data["rounds"][0], data["rounds"][2]
    assert r0["classes_seen"] == 2 and r2["classes_seen"] == 4 and r2["num_clients"] == 5   # GLFC's stream
    state = load_checkpoint(run / "checkpoints/last.pt")
    assert state["method_state"]["teacher"]["num_classes"] == 2                              # task-0 global model
    clients = state["engine_state"]["clients"]
    memories = {cid: c["exemplar_sets"] for cid, c in clients.items() if c["exemplar_sets"]}
    if method in ("icarl", "bic"):
        assert memories and all(len(e) <= 10 // len(m) for m in memories.values() for e in m)   # memory_size=10
    elif method == "joint":
        assert memories and all(len(e) == 24 * 3 // 4 for m in memories.values() for e in m)   # every train sample
    else:
        assert not memories
    if method == "icarl":
        assert s["nme_final_accuracy"] is not None and len(s["nme_accuracy_matrix"]) == 2
        assert "nme_accuracy" in data["rounds"][1] and "nme_accuracy" not in data["rounds"][0]
    if method == "ewc":
        assert data["rounds"][1]["fisher_clients"] >= 1
        pen = state["method_state"]["penalties"]
        assert len(pen) == 1 and pen[0]["fisher"]["fc.weight"].shape[0] == 2
    if method == "bic":
        assert any(r["bic_alpha"] is not None for r in data["rounds"][2:])


def test_bic_resume_reaches_the_same_metrics(tmp_path):
    full = run_training("bic", tiny_baseline_config("bic"), out_dir=tmp_path / "full", verbose=False)
    run_training("bic", tiny_baseline_config("bic", "run.max_rounds=3"), out_dir=tmp_path / "part", verbose=False)
    resumed = run_training("bic", tiny_baseline_config("bic"), out_dir=tmp_path / "part", resume=True, verbose=False)
    for a, b in zip(full.records, resumed.records):
        for key in ("accuracy", "per_task_accuracy", "loss", "selected", "bic_alpha"):
            assert a[key] == b[key], (a["round"], key)


def test_unknown_partition_is_rejected():
    with pytest.raises(ConfigError, match="data.partition"):
        tiny_baseline_config("lwf", "data.partition=iid")


def test_presets_share_glfcs_stream_switch_for_switch():
    from python_api.config import list_presets, load_config, to_dict
    from python_api.methods import get_method
    from python_api.methods.glfc import GLFCConfig
    pairs = [("demo", "glfc-demo")] + [(f"cifar100-t{T}", f"glfc-cifar100-t{T}") for T in (5, 10, 20)]
    shared_client = ("local_epochs", "batch_size", "lr", "weight_decay", "lr_schedule", "memory_size",
                     "classes_per_client", "client_class_fraction", "momentum", "lr_milestones", "lr_divisors")
    for method in BASELINES:
        for suffix, glfc in pairs:
            cfg = load_config(get_method(method).config_cls, f"{method}-{suffix}")
            ref = to_dict(load_config(GLFCConfig, glfc))
            got = to_dict(cfg)
            for section in ("data", "model", "federated"):
                assert got[section] == ref[section], (method, suffix, section)
            assert {k: got["client"][k] for k in shared_client} == {k: ref["client"][k] for k in shared_client}
            assert got["run"]["seed"] == ref["run"]["seed"] and not cfg.proxy.enabled
        for suffix in ("demo-dirichlet", "cifar100-dirichlet-t5", "cifar100-dirichlet-t10"):
            cfg = load_config(get_method(method).config_cls, f"{method}-{suffix}")
            assert cfg.data.partition == "dirichlet" and cfg.data.beta == 0.5
            assert cfg.federated.initial_clients == cfg.federated.clients_per_round == 5
    assert {f"{m}-demo" for m in BASELINES} <= set(list_presets())


def test_ewc_fisher_cap(tmp_path):
    run_training("ewc", tiny_baseline_config("ewc", "ewc.fisher_max=0.000001"), out_dir=tmp_path / "run", verbose=False)
    pen = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["method_state"]["penalties"][0]["fisher"]
    assert max(float(f.max()) for f in pen.values()) == pytest.approx(1e-6)
