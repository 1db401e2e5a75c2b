"""Every method switch shows its effect (or its documented no-effect), on the tiny fixtures (issue 17).

Switches covered elsewhere (see the index at the end of this file) are not repeated here. Each test
here changes ONE switch from its default and checks what it is documented to change."""
import json
import shutil

import pytest
import torch

from python_api.checkpoint import keep_round_checkpoints, load_checkpoint, save_checkpoint, seed_everything
from python_api.engine import InProcessEngine
from python_api.engine.runner import run_training
from python_api.methods.glfc import GLFCServer
from python_api.methods.glfc.client import lr_for_epoch

from tests.glfc_tiny import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:fcl_ext.ops has no FCCL losses")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Tiny models: one intra-op thread (conftest restores the count)."""


def _round0(tmp_path, *overrides):
    """GLFC round 0 on the tiny setting (every client's signal fires: prototypes are made), seeded."""
    seed_everything(0)
    server = GLFCServer(tiny_config(*overrides), tmp_path, CPU)
    engine = InProcessEngine(server, progress=False)
    engine.audit = True
    record = server.run_round(0, engine)
    updates = {cid: p for side, kind, cid, p in engine.messages_carried if side == "reply" and kind == "update"}
    return server, engine, record, updates


def _differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ GLFC client: prototypes
@pytest.mark.parametrize("override", [
    "client.prototype_train_mode=false",       # prototype features in eval mode (BN running stats)
    "client.prototype_input_normalised=true",  # the network sees normalised pixels in the perturbation
    "client.perturb_lr_divisor=2",             # image SGD lr = lr / 2 instead of lr / 10
    "client.perturb_weight_decay=0.5",         # weight decay on the pixels
])
def test_prototype_switches_change_the_uploaded_gradients(tmp_path, override):
    # bn_stats_after_upload=false (the corrected value) keeps the prototype pass out of the uploaded state
    _, _, _, base = _round0(tmp_path / "a", "client.bn_stats_after_upload=false")
    _, _, _, changed = _round0(tmp_path / "b", "client.bn_stats_after_upload=false", override)
    assert set(base) == set(changed) and base
    for cid in base:
        a, b = base[cid]["proto_grads"], changed[cid]["proto_grads"]
        assert a is not None and b is not None and _differ(a, b), (override, cid)
        # the model update itself does not depend on how prototypes are made (bn_stats_after_upload=false)
        for k, v in base[cid]["state"].items():
            assert torch.equal(v, changed[cid]["state"][k]), (override, k)


def test_gaussian_gamma_scales_the_latent_noise(tmp_path):
    _, _, _, base = _round0(tmp_path / "a", "client.perturbation=gaussian")
    _, _, _, changed = _round0(tmp_path / "b", "client.perturbation=gaussian", "client.gaussian_gamma=5.0")
    for cid in base:
        assert _differ(base[cid]["proto_grads"], changed[cid]["proto_grads"]), cid


def test_prototype_train_mode_moves_the_bn_running_statistics_only_in_train_mode(tmp_path):
    for mode, moves in (("true", True), ("false", False)):
        seed_everything(0)
        server = GLFCServer(tiny_config(f"client.prototype_train_mode={mode}"), tmp_path / mode, CPU)
        client = server.make_client(0)
        client.before_train(0, 1)
        model = server.ctx.load_working_model({k: v.detach() for k, v in server.model.state_dict().items()}, 2)
        before = server.ctx.clone_state(model)
        client.prototype_gradients(model, 2)
        after = server.ctx.clone_state(model)
        moved = [k for k in before if "running_mean" in k and not torch.equal(before[k], after[k])]
        assert bool(moved) == moves, (mode, moved)


def test_bn_stats_after_upload_uploads_the_statistics_the_prototype_pass_left(tmp_path):
    """§4.2-8: with the switch on, the uploaded BN running statistics are those after the prototype pass
    (train mode); the parameters are the same either way."""
    _, _, _, base = _round0(tmp_path / "a", "client.bn_stats_after_upload=false")
    _, _, _, quirk = _round0(tmp_path / "b", "client.bn_stats_after_upload=true")   # the reference value
    for cid in base:
        a, b = base[cid]["state"], quirk[cid]["state"]
        params = [k for k in a if "running" not in k and "num_batches" not in k]
        stats = [k for k in a if "running_mean" in k]
        assert params and stats
        assert all(torch.equal(a[k], b[k]) for k in params)
        assert any(not torch.equal(a[k], b[k]) for k in stats)
        counter = next(k for k in a if "num_batches" in k)     # one train-mode batch per prototype class
        assert int(b[counter]) - int(a[counter]) == 2            # (classes_per_client=2)


def test_old_model_no_grad_is_numerically_identical(tmp_path):
    """§4.2-9: documented as only faster. Train the same client from the same state with an old model,
    once with each setting: identical weights and loss."""
    server, engine, record, _ = _round0(tmp_path)
    cid = record["selected"][0]
    client = engine.client(cid)
    snapshot = {"id": 99, "num_classes": 2, "state": server.ctx.clone_state(server.model)}
    client.old_model = snapshot
    client.learned_classes = client.learned_classes or [0]
    global_state = {k: v.detach() for k, v in server.model.state_dict().items()}
    results = {}
    for flag in (True, False):
        server.cfg.client.old_model_no_grad = flag
        model = server.ctx.load_working_model(global_state, 2)
        seed_everything(1)
        loss, _ = client.train(model, 1)
        results[flag] = (loss, server.ctx.clone_state(model))
    assert results[True][0] == results[False][0] and results[True][0] == results[True][0]
    for k, v in results[True][1].items():
        assert torch.equal(v, results[False][1][k]), k
    # and the old model's logits really entered the loss (L_RD is on): a different old model changes it
    client.old_model = {"id": 100, "num_classes": 2,
                        "state": {k: (v + 0.5 if v.is_floating_point() and "running_var" not in k else v)
                                  for k, v in snapshot["state"].items()}}
    model = server.ctx.load_working_model(global_state, 2)
    seed_everything(1)
    assert client.train(model, 1)[0] != results[True][0]


# ------------------------------------------------------------------------------ GLFC server and proxy
def test_shuffle_pool_reorders_the_gradient_pool(tmp_path):
    """§4.2-14: the proxy takes the pool in arrival order (reference) or shuffled (paper)."""
    from python_api.methods.glfc.proxy import ProxyServer
    server, _, _, updates = _round0(tmp_path)
    pool = torch.cat([u["proto_grads"] for u in updates.values()])
    state = {k: v.detach() for k, v in server.model.state_dict().items()}
    galleries = {}
    for flag in (False, True):
        server.cfg.proxy.shuffle_pool = flag
        proxy = ProxyServer(server.ctx)
        torch.manual_seed(3)
        proxy.process(state, 2, pool)
        galleries[flag] = proxy.gallery
    torch.manual_seed(3)
    order = torch.randperm(pool.shape[0])
    assert not torch.equal(order, torch.arange(pool.shape[0]))
    from python_api.methods.glfc import privacy
    labels = privacy.recover(server.ctx.encoder, pool)
    assert torch.equal(galleries[False]["labels"], labels)
    assert torch.equal(galleries[True]["labels"], labels[order])


@pytest.mark.parametrize("fraction, kept", [(0.0, 0), (0.5, 2), (1.0, 4)])
def test_old_keep_fraction_sets_how_many_clients_keep_their_classes(tmp_path, fraction, kept):
    server = GLFCServer(tiny_config(f"federated.old_keep_fraction={fraction}"), tmp_path, CPU)
    server.start_task(1)
    assert len(server.old_client_0) == kept and len(server.old_client_1) == 4 - kept
    assert server.new_client == [4]


def test_accuracy_integer_truncation_truncates_every_accuracy(tmp_path, monkeypatch):
    from python_api.methods.glfc import server as glfc_server
    from python_api.metrics import top1_accuracy
    assert top1_accuracy(2, 3) == pytest.approx(66.6667, abs=1e-3) and top1_accuracy(2, 3, True) == 66.0
    server = GLFCServer(tiny_config("proxy.accuracy_integer_truncation=true"), tmp_path, CPU)
    server.task = 0
    calls = []
    real = glfc_server.top1_accuracy
    monkeypatch.setattr(glfc_server, "top1_accuracy", lambda c, n, t=False: calls.append(t) or real(c, n, t))
    acc = server.evaluate(0)
    assert calls and all(calls)                       # the switch reaches every accuracy of the evaluation
    assert all(float(a).is_integer() for a in [acc["accuracy"], *acc["per_task_accuracy"]])
    server.cfg.proxy.accuracy_integer_truncation = False
    calls.clear()
    exact = server.evaluate(0)
    assert calls and not any(calls) and exact["accuracy"] >= acc["accuracy"] > exact["accuracy"] - 1


def test_encoder_switches_change_the_gradient_encoder(tmp_path):
    def encoder(*overrides):
        return GLFCServer(tiny_config(*overrides), tmp_path, CPU).ctx.encoder
    base = encoder()                                    # the reference: 100 outputs whatever the dataset
    narrow = encoder("proxy.encoder_num_classes=10")
    other = encoder("proxy.encoder_seed=1")
    size = lambda m: sum(p.numel() for p in m.parameters())
    assert base.fc.out_features == 100 and narrow.fc.out_features == 10
    assert size(narrow) < size(base) == size(other)
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), other.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), encoder().parameters()))   # rebuilt alike


def test_legacy_epoch_stride_moves_the_lr_drop():
    from types import SimpleNamespace
    cfg = SimpleNamespace(lr=2.0, lr_schedule="legacy_per_round", legacy_epoch_stride=20, local_epochs=20,
                          lr_milestones=(100,), lr_divisors=(5,))
    # (epoch + 20·5) mod 200 == 100 at epoch 0 of round 5; with stride 10 at epoch 50 (beyond 20 epochs)
    assert lr_for_epoch(cfg, 5, 10, 20)[0] == pytest.approx(0.4)
    cfg.legacy_epoch_stride = 10
    assert lr_for_epoch(cfg, 5, 10, 20) == [2.0] * 20
    assert lr_for_epoch(cfg, 9, 10, 20)[10:] == [pytest.approx(0.4)] * 10    # (10 + 90) mod 200 == 100


# ------------------------------------------------------------------------------ run: checkpoints, seeding
def test_checkpoint_every_saves_every_k_rounds_and_resumes_from_a_mid_checkpoint(tmp_path, monkeypatch):
    """run.checkpoint_every=3 over 4 rounds: checkpoints after rounds 2 and 3 (the last); resuming from
    the round-2 checkpoint reaches the uninterrupted run's records."""
    from python_api.engine import runner
    saved = []
    save = runner.save_checkpoint

    def spy(path, state):
        save(path, state)
        saved.append(state["round"])
        if state["round"] == 2:               # what a run killed during round 3 would have left
            shutil.copytree(path.parent.parent, tmp_path / "killed", ignore=shutil.ignore_patterns("plots"))
    monkeypatch.setattr(runner, "save_checkpoint", spy)
    full = run_training("glfc", tiny_config("run.checkpoint_every=3", "run.keep_checkpoints=0"),
                        out_dir=tmp_path / "full", verbose=False)
    assert saved == [2, 3]
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["round"] == 2
    resumed = run_training("glfc", tiny_config("run.checkpoint_every=3"), out_dir=tmp_path / "killed",
                           resume=True, verbose=False)
    assert saved == [2, 3, 3] and len(resumed.records) == 4
    for a, b in zip(full.records, resumed.records):
        for key in ("accuracy", "per_task_accuracy", "loss", "selected", "num_gradients", "old_model_ids"):
            assert a[key] == b[key], (a["round"], key)


def test_keep_checkpoints_keeps_the_newest_round_files(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    last = folder / "last.pt"
    for r in range(4):
        save_checkpoint(last, {"round": r})           # replaces last.pt (a new file) each time
        kept = keep_round_checkpoints(last, r, 2)
    assert [p.name for p in kept] == ["round-0002.pt", "round-0003.pt"]
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "round-0002.pt", "round-0003.pt"]
    assert load_checkpoint(folder / "round-0002.pt")["round"] == 2 and load_checkpoint(last)["round"] == 3
    assert keep_round_checkpoints(last, 4, 0) == [] and sorted(p.name for p in folder.iterdir()) == ["last.pt"]


def test_keep_checkpoints_in_a_run(tmp_path):
    run_training("glfc", tiny_config("run.keep_checkpoints=2", "run.max_rounds=3"), out_dir=tmp_path / "run",
                 verbose=False)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.glob("round-*.pt")) == ["round-0001.pt", "round-0002.pt"]
    assert load_checkpoint(folder / "round-0001.pt")["round"] == 1


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_sets_the_cudnn_flags(deterministic, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seed_everything(0, deterministic)
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    assert flags == ((True, False) if deterministic else (False, True))   # false: left as they were


# ------------------------------------------------------------------------------ FCCL
def _fccl(tmp_path, **sections):
    from python_api.methods.fccl import FCCLServer
    from tests.test_fccl_trainer import tiny_config as fccl_config
    server = FCCLServer(fccl_config(tmp_path, **sections))
    return server, InProcessEngine(server, progress=False)


def test_fccl_evaluate_solo_off_skips_the_pretrained_evaluation(tmp_path):
    for solo in (True, False):
        server, engine = _fccl(tmp_path, fccl={"rounds": 1, "evaluate_solo": solo})
        engine.audit = True
        record = server.run_round(0, engine)
        frozen = [p for side, kind, _, p in engine.messages_carried if side == "request" and kind == "evaluate"
                  and p["model"] == "frozen"]
        assert len(frozen) == (2 if solo else 0)
        assert ("solo" in server.summary([record])) == solo


def test_fccl_top_k_and_headline(tmp_path):
    server, engine = _fccl(tmp_path, fccl={"rounds": 1, "top_k": 3, "headline": "topk"})
    record = server.run_round(0, engine)
    assert "mean_intra_top3" in record and "mean_intra_top5" not in record
    server.cfg.fccl.top_k = 5
    record = server.run_round(1, engine)
    summary = server.summary([record])
    assert summary["headline"] == "top5" and summary["intra"]["mean"] == record["mean_intra_top5"]
    assert record["mean_intra_top5"] >= record["mean_intra_top1"]


@pytest.mark.parametrize("drop_last, sizes", [(False, [48, 16]), (True, [48])])
def test_fccl_public_drop_last(tmp_path, drop_last, sizes):
    server, _ = _fccl(tmp_path, data={"scenario": "bundled", "public": "bundled", "image_size": 8,
                                      "bundled_train_per_domain": 24, "bundled_public_size": 64,
                                      "public_batch_size": 48, "private_batch_size": 16,
                                      "public_drop_last": drop_last})
    assert [len(b) for b in server._public_batches()] == sizes


def test_fccl_pretrain_subset_seed_draws_a_different_pretraining_subset(tmp_path):
    from python_api.config import load_config
    from python_api.methods.fccl import FCCLConfig
    from python_api.methods.fccl.data import build_domains, pretrain_domains
    from tests.test_fccl_data import write_tiny_digits_root
    write_tiny_digits_root(tmp_path / "data")
    overrides = [f"data.root={tmp_path / 'data'}", "data.image_size=8", "data.public_size=16",
                 "participants=[{domain: mnist, backbone: resnet10, private_samples: 8},"
                 "{domain: svhn, backbone: resnet10, private_samples: 8}]"]
    cfg = load_config(FCCLConfig, "fccl-digits", overrides)
    built, _ = build_domains(cfg)
    assert pretrain_domains(cfg, built) == list(built)              # default: the FL private subset
    cfg = load_config(FCCLConfig, "fccl-digits", overrides + ["pretrain.subset_seed=0"])
    built, _ = build_domains(cfg)
    other = pretrain_domains(cfg, built)
    for a, b in zip(built, other):
        assert a.train_images.shape == b.train_images.shape                      # same size
        assert not torch.equal(a.train_images, b.train_images)                  # another draw
        assert torch.equal(a.test_images, b.test_images)                        # same test set


# Switches tested in other files (kept here so a reader sees the whole list):
COVERED_ELSEWHERE = {
    "federated.new_clients_per_task": "test_glfc_units.py", "federated.aggregation": "test_glfc_units.py",
    "client.lr_schedule": "test_glfc_units.py", "client.skip_relearned_classes": "test_glfc_units.py",
    "client.classes_per_client / client_class_fraction": "test_glfc_units.py, test_trainer_config.py",
    "client.loss_backend": "test_glfc_run.py::test_loss_backends_agree",
    "client.gc_weight / rd_weight": "test_glfc_loss.py", "client.perturbation": "test_glfc_units.py",
    "proxy.enabled": "test_glfc_run.py", "proxy.pixel_wrap": "test_glfc_units.py",
    "proxy.best_perf_reset_per_task": "test_glfc_units.py", "proxy.psnr": "test_glfc_run.py",
    "proxy.monitor_transform": "test_trainer_config.py (validation only)",
    "run.on_nonfinite": "test_nonfinite.py",
    "fccl.algorithm": "test_fccl_trainer.py::test_baselines_run",
    "fccl.target / fresh_public_optimizer": "test_fccl_trainer.py::test_variants_all_current_target_and_persistent_adam",
    "fccl.off_diag_* / unbiased_std / std_eps": "test_fccl_trainer.py, test_cross_correlation.py",
    "fccl.temperature / intra_weight / inter_weight / temperature_squared": "test_dual_distillation.py",
    "fccl.loss_backend": "test_fccl_trainer.py::test_backends_agree",
    "data.officehome_reference_split": "test_fccl_data.py::test_syn_and_office_home_folders",
}
