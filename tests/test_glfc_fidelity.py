"""GLFC against the official code, switch by switch (issue 16, items 1 and 3-9): herding in BN train
mode, L-BFGS tolerances, the NaN/Inf roll-back switch, one rule for defaults (config defaults and every
paper-named preset = the reference; `quirks: corrected` = the fixes), one protocol for the CIFAR presets,
the encoder's weights, glfc-demo at the reference switches, client-side feature passes."""
import math
import random
import re
from pathlib import Path

import pytest
import torch

from python_api import cli
from python_api.config import ConfigError, load_config
from python_api.methods.glfc import GLFCConfig, GLFCServer, privacy
from python_api.methods.glfc.client import GLFCClient, herding_selection
from python_api.methods.glfc.config import SWITCHES, VARIANTS
from python_api.methods.glfc.server import GLFCContext

from tests.glfc_tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
PAPER_PRESETS = ("glfc-cifar100-t5", "glfc-cifar100-t10", "glfc-cifar100-t20", "glfc-mini-imagenet",
                 "glfc-tiny-imagenet")


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ---- 1. herding in BN train mode --------------------------------------------------------------

def _herd(tmp_path, mode: bool):
    """One client that fires at task 1 and stores exemplars of its task-0 classes with a fresh
    (BN running stats = init) global model: the two modes see different features."""
    cfg = tiny_config(f"client.herding_train_mode={str(mode).lower()}", "client.memory_size=16",
                      "data.samples_per_class=40")
    torch.manual_seed(0)
    random.seed(0)
    server = GLFCServer(cfg, tmp_path / str(mode), torch.device("cpu"))
    state = {k: v.clone() for k, v in server.model.state_dict().items()}
    client = GLFCClient(0, server.ctx)
    client.before_train(0, 1)
    client.before_train(1, 1)                   # task change: the task-0 classes become last_class
    client.last_entropy = -math.inf             # fire
    model = server.ctx.load_working_model(state, 2)
    client.update_new_set(model)
    return server, client, state


def test_herding_train_mode_picks_different_exemplars(tmp_path):
    srv_train, train_client, state = _herd(tmp_path, True)
    _, eval_client, _ = _herd(tmp_path, False)
    assert train_client.learned_classes == eval_client.learned_classes
    assert sorted(train_client.learned_classes) == [0, 1]
    assert all(len(e) == 8 for e in train_client.exemplar_sets)
    assert any(not torch.equal(a, b) for a, b in zip(train_client.exemplar_sets, eval_client.exemplar_sets))
    # train mode = the reference: the whole class as ONE batch with BN batch statistics
    ctx = srv_train.ctx
    for c, chosen in zip(train_client.learned_classes, train_client.exemplar_sets):
        model = ctx.load_working_model(state, 2).train()
        idx = ctx.class_indices[c]
        with torch.no_grad():
            feats = model.features(ctx.aug.test(ctx.train.images[idx]))
        assert torch.equal(chosen, idx[herding_selection(feats, 8)])


def test_herding_train_mode_reference_value():
    assert GLFCConfig().client.herding_train_mode is True
    assert load_config(GLFCConfig, None, ["quirks=corrected"]).client.herding_train_mode is False


# ---- 3. L-BFGS tolerances -------------------------------------------------------------------

def _problem(k=2, seed=0):
    enc = privacy.build_encoder(3, 8, 4, seed, "cpu")
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(k, 3, 8, 8, generator=g)
    labels = torch.arange(k) % 4
    return enc, privacy.encode(enc, images, labels), labels


@pytest.mark.parametrize("fallback", [False, True])
def test_lbfgs_tolerances_reach_the_optimizer(monkeypatch, fallback):
    """The reference ran torch 1.2: tolerance_grad 1e-5, tolerance_change 1e-9. A tolerance_grad above
    every gradient stops L-BFGS before its first move, in the batched and in the fallback path."""
    cfg = GLFCConfig().proxy
    assert (cfg.tolerance_grad, cfg.tolerance_change) == (1e-5, 1e-9)
    if fallback:
        monkeypatch.setattr(privacy, "_fx_reconstruct", None)
        monkeypatch.setattr(privacy, "_warned", [True])
    enc, grads, labels = _problem()
    proxy = load_config(GLFCConfig, None, ["proxy.steps=3", "proxy.max_iter=4", "proxy.keep_last=3",
                                           "proxy.tolerance_grad=1.0e+6"]).proxy
    torch.manual_seed(1)
    frozen, _ = privacy.reconstruct(enc, grads, labels, proxy, (3, 8, 8))
    assert torch.equal(frozen[:, 0], frozen[:, -1])              # never moved
    proxy.tolerance_grad = 1e-5
    torch.manual_seed(1)
    moving, _ = privacy.reconstruct(enc, grads, labels, proxy, (3, 8, 8))
    assert not torch.equal(moving[:, 0], moving[:, -1])


# ---- 7. roll-back on NaN/Inf: a named switch, off in the reference -----------------------------

@pytest.mark.parametrize("fallback", [False, True])
def test_nonfinite_rollback_is_a_switch(monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(privacy, "_fx_reconstruct", None)
        monkeypatch.setattr(privacy, "_warned", [True])
    enc, grads, labels = _problem()
    grads = grads.clone()
    grads[1, 0] = float("nan")                  # problem 1's loss is NaN from the start
    assert GLFCConfig().proxy.nonfinite_rollback is False
    out = {}
    for rollback in (False, True):
        proxy = load_config(GLFCConfig, None, ["proxy.steps=3", "proxy.max_iter=3", "proxy.keep_last=1",
                                               f"proxy.nonfinite_rollback={str(rollback).lower()}"]).proxy
        torch.manual_seed(2)
        out[rollback], _ = privacy.reconstruct(enc, grads, labels, proxy, (3, 8, 8))
    assert torch.isnan(out[False][1]).all()              # reference: NaN in, NaN out
    assert torch.isfinite(out[True][1]).all()            # fix: back to the best (here: initial) iterate
    # the healthy problem is untouched (float32: the batch it shares differs by one row)
    torch.testing.assert_close(out[False][0], out[True][0], rtol=1e-4, atol=1e-4)


# ---- 4. one rule for defaults ---------------------------------------------------------------

def test_every_switch_defaults_to_the_reference():
    cfg = GLFCConfig()
    for sw in SWITCHES:
        assert _get(cfg, sw.key) == sw.reference, sw.key
    assert cfg.quirks == "reference"


@pytest.mark.parametrize("preset", PAPER_PRESETS + ("glfc-demo",))
def test_presets_reproduce_the_reference_switch_by_switch(preset):
    cfg = load_config(GLFCConfig, preset)
    assert cfg.quirks == "reference"
    for sw in SWITCHES:
        if sw.key == "proxy.encoder_num_classes" and preset == "glfc-tiny-imagenet":
            assert cfg.proxy.encoder_num_classes is None    # 200 classes cannot fit the hard-wired 100
            continue
        assert _get(cfg, sw.key) == sw.reference, (preset, sw.key)
    assert cfg.proxy.psnr is False


def test_corrected_group_sets_every_fix_but_explicit_settings_win():
    cfg = load_config(GLFCConfig, "glfc-cifar100-t10", ["quirks=corrected", "proxy.pixel_wrap=true"])
    for sw in SWITCHES:
        expected = True if sw.key == "proxy.pixel_wrap" else sw.corrected
        assert _get(cfg, sw.key) == expected, sw.key
    assert any(sw.reference != sw.corrected for sw in SWITCHES)
    with pytest.raises(ConfigError, match="quirks"):
        load_config(GLFCConfig, None, ["quirks=fixed"])


def test_encoder_smaller_than_the_dataset_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="proxy.encoder_num_classes"):
        GLFCServer(tiny_config("proxy.encoder_num_classes=3"), tmp_path, torch.device("cpu"))


def test_docs_table_lists_every_switch_with_reference_and_default():
    text = (REPO / "docs" / "glfc-trainer.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z_]+\.[a-z_]+)` \|.*$", text, re.M)}
    for sw in SWITCHES + VARIANTS:
        assert sw.key in rows, sw.key


def test_show_config_prints_the_reference_value_of_every_switch(capsys):
    assert cli.main(["show-config", "glfc", "--config", "glfc-cifar100-t10"]) == 0
    out = capsys.readouterr().out
    for sw in SWITCHES + VARIANTS:
        line = next((ln for ln in out.splitlines() if ln.startswith(f"# {sw.key} ")), None)
        assert line is not None, sw.key
        ref = "null" if sw.reference is None else str(sw.reference).lower() if isinstance(sw.reference, bool) \
            else str(sw.reference)
        assert ref in line.split()[2:4] or sw.key == "client.old_model_no_grad", line
    assert "differs from reference" not in out        # the paper preset is the reference
    out2 = capsys.readouterr().out if cli.main(["show-config", "glfc", "--config", "glfc-cifar100-t10",
                                                "quirks=corrected"]) == 0 else ""
    assert "differs from reference" in out2


# ---- 5. one protocol for the CIFAR presets --------------------------------------------------

@pytest.mark.parametrize("preset,tasks", [("glfc-cifar100-t5", 5), ("glfc-cifar100-t10", 10),
                                          ("glfc-cifar100-t20", 20)])
def test_cifar_presets_follow_the_glfc_code(preset, tasks):
    """GLFC code: 6 classes of the current task per client (capped at the task size where the code
    crashes, T=20) and task_size new clients per task; 30 initial clients, 10 per round, 10 rounds/task."""
    cfg = load_config(GLFCConfig, preset)
    task_size = 100 // tasks
    assert cfg.federated.num_tasks == tasks and cfg.federated.rounds_per_task == 10
    assert cfg.federated.new_clients_per_task is None          # = task_size
    assert cfg.client.client_class_fraction is None
    assert cfg.classes_per_client_for(task_size) == min(6, task_size)
    assert (cfg.federated.initial_clients, cfg.federated.clients_per_round) == (30, 10)


# ---- 6. the encoder's weights ---------------------------------------------------------------

def test_encoder_weights_do_not_depend_on_the_build_and_follow_run_seed(monkeypatch, tmp_path):
    built = privacy.build_encoder(3, 16, 10, 7, "cpu")
    monkeypatch.setattr(privacy, "_fx_reconstruct", None)
    fallback = privacy.build_encoder(3, 16, 10, 7, "cpu")
    assert type(built) is not type(fallback)
    a, b = list(built.parameters()), list(fallback.parameters())
    assert [p.shape for p in a] == [p.shape for p in b]
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    monkeypatch.undo()
    ctx = {s: GLFCServer(tiny_config(f"run.seed={s}"), tmp_path / str(s), torch.device("cpu")).ctx for s in (3, 4)}
    for s in (3, 4):
        ref = privacy.build_encoder(3, 16, 100, s, "cpu")
        for p, q in zip(ctx[s].encoder.parameters(), ref.parameters()):
            assert torch.equal(p, q)
    assert not torch.equal(next(ctx[3].encoder.parameters()), next(ctx[4].encoder.parameters()))


# ---- 9. client-side passes live with the client ---------------------------------------------

def test_feature_passes_live_with_the_client():
    assert not hasattr(GLFCContext, "features")
    assert callable(getattr(GLFCClient, "class_features", None))
