"""GLFC pieces against the spec: client groups and class assignment (§1.8, §2), exemplar budget and
herding (§1.5), entropy signal (§1.4), old-model table and proxy selection (§1.7), LR schedule (§2),
FedAvg (§2)."""
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from python_api.config import ConfigError, load_config
from python_api.data import DeviceAugment, ImageTensors
from python_api.data.class_incremental import ClassIncrementalStream
from python_api.methods.glfc import GLFCConfig, GLFCServer
from python_api.methods.glfc.client import GLFCClient, choose_old_model, herding_selection, lr_for_epoch
from python_api.methods.glfc.proxy import ProxyServer, pixels_to_uint8
from python_api.methods.glfc.server import fedavg

from tests.glfc_tiny import tiny_config


# ---- client groups and class assignment --------------------------------------------------

def test_reference_groups_and_join_counts(tmp_path):
    """30 clients at task 0; each new task adds task_size clients; 90 % of the existing ones get new
    classes (S_b), 10 % keep theirs (S_o)."""
    random.seed(0)
    cfg = tiny_config("data.num_classes=20", "federated.initial_clients=30", "federated.clients_per_round=10",
                      "federated.new_clients_per_task=null", "client.classes_per_client=6")
    server = GLFCServer(cfg, tmp_path, torch.device("cpu"))
    assert server.num_clients == 30 and server.old_client_0 == [] and server.new_client == []
    server.start_task(1)
    assert server.new_client == list(range(30, 40))            # task_size = 10 new clients
    assert len(server.old_client_1) == 27 and len(server.old_client_0) == 3
    assert sorted(server.old_client_0 + server.old_client_1) == list(range(30))
    assert server.model.num_classes == 20
    server.start_task(2)
    assert server.num_clients == 50 and len(server.old_client_1) == 36 and len(server.old_client_0) == 4


def test_lga_rule_lets_t20_run():
    cfg = load_config(GLFCConfig, "glfc-cifar100-t20", ["client.client_class_fraction=0.6",
                                                        "federated.new_clients_per_task=10"])
    assert cfg.classes_per_client_for(5) == 3 and cfg.federated.new_clients_per_task == 10
    with pytest.raises(ConfigError, match="client.classes_per_client=6 exceeds the task size 5"):
        load_config(GLFCConfig, "glfc-cifar100-t20", ["client.classes_per_client=6"]).classes_per_client_for(5)


def _fake_ctx(num_classes=4, task_size=2, per_class=6, threshold=1.2, memory=12, classes_per_client=2):
    cfg = load_config(GLFCConfig, None, [f"client.entropy_threshold={threshold}", f"client.memory_size={memory}",
                                         "client.eval_batch_size=7"])
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(labels), 3, 8, 8), dtype=torch.uint8, generator=g)
    images[:, 0, 0, 0] = labels.to(torch.uint8)               # the fake model reads the class here
    train = ImageTensors(images, labels)
    ctx = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), train=train,
                           stream=ClassIncrementalStream(num_classes, num_classes // task_size),
                           aug=DeviceAugment((0, 0, 0), (1, 1, 1), crop_padding=0, hflip=False),
                           class_indices=[torch.nonzero(labels == c).flatten() for c in range(num_classes)],
                           classes_per_client=classes_per_client)
    return ctx


class ClassReader(nn.Module):
    """Logits over `num_classes`: confident on the known classes, uniform on the others. Features =
    the image itself, so herding has something to rank."""

    def __init__(self, num_classes, known):
        super().__init__()
        self.num_classes, self.known = num_classes, set(known)
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 255).round().long()
        logits = torch.zeros(len(x), self.num_classes)
        for i, c in enumerate(cls.tolist()):
            if c in self.known:
                logits[i, c] = 20.0
        return logits

    def features(self, x):
        return x.flatten(1)


def test_class_assignment_per_group():
    random.seed(1)
    ctx = _fake_ctx(num_classes=20, task_size=10, classes_per_client=6)
    a, b = GLFCClient(0, ctx), GLFCClient(1, ctx)
    for c in (a, b):
        c.before_train(0, 1)
        assert len(set(c.current_class)) == 6 and set(c.current_class) <= set(range(10))
        assert c.last_class is None and c.num_classes == 10
    first_a, first_b = list(a.current_class), list(b.current_class)
    a.before_train(1, 1)                          # S_b: new classes, remembers the last ones
    assert set(a.current_class) <= set(range(10, 20)) and a.last_class == first_a and a.num_classes == 20
    b.before_train(1, 0)                          # S_o: keeps its classes, no memory update
    assert b.current_class == first_b and b.last_class is None and b.num_classes == 20
    kept = list(a.current_class)
    a.before_train(1, 1)                          # same task again: nothing changes
    assert a.current_class == kept


# ---- entropy signal -------------------------------------------------------------------------

def test_entropy_signal_fires_at_task_change_only():
    random.seed(2)
    ctx = _fake_ctx(num_classes=4, task_size=2, threshold=1.2)
    client, keeper = GLFCClient(0, ctx), GLFCClient(1, ctx)
    untrained = ClassReader(2, known=[])
    for c in (client, keeper):
        c.before_train(0, 1)
        c.update_new_set(untrained)
    # ln 2 < 1.2: with 2 classes even an untrained model stays under the reference threshold
    assert not client.signal and client.last_entropy == pytest.approx(math.log(2), abs=1e-4)
    trained = ClassReader(2, known=[0, 1])
    client.update_new_set(trained)               # same task, model got confident: entropy drops
    assert not client.signal
    client.update_new_set(trained)
    assert not client.signal
    keeper.update_new_set(trained)
    next_task = ClassReader(4, known=[0, 1])      # head grew; classes 2, 3 are unseen
    client.before_train(1, 1)
    client.update_new_set(next_task)             # new unseen classes: H = ln 4 - ~0 > 1.2
    assert client.signal and client.last_entropy == pytest.approx(math.log(4), abs=1e-4)
    keeper.before_train(1, 0)                    # keeps classes 0/1 -> nothing changes for it
    keeper.update_new_set(next_task)
    assert not keeper.signal
    client.update_new_set(next_task)             # second round of the task: no new signal
    assert not client.signal


def test_new_client_fires_when_entropy_exceeds_threshold():
    ctx = _fake_ctx(num_classes=20, task_size=10, classes_per_client=6, threshold=1.2)
    client = GLFCClient(0, ctx)
    client.before_train(0, 1)
    client.update_new_set(ClassReader(10, known=[]))   # H = ln 10 > 1.2 against H_prev = 0
    assert client.signal


# ---- exemplar memory ------------------------------------------------------------------------

def test_exemplar_budget_and_reduction():
    random.seed(3)
    ctx = _fake_ctx(num_classes=6, task_size=2, per_class=10, memory=9, classes_per_client=2)
    client = GLFCClient(0, ctx)
    model = ClassReader(6, known=[])
    for task in range(3):
        client.before_train(task, 1)
        client.last_entropy = -100.0             # force the signal
        client.update_new_set(model)
        learned = 2 * task
        assert len(client.learned_classes) == learned == len(client.exemplar_sets)
        if learned:
            m = 9 // learned
            assert all(len(e) == m for e in client.exemplar_sets)
            assert sum(len(e) for e in client.exemplar_sets) <= 9
            for c, e in zip(client.learned_classes, client.exemplar_sets):
                assert bool((ctx.train.labels[e] == c).all())
    idx, labels = client.train_indices()
    assert len(idx) == 2 * 10 + 4 * 2 and bool((ctx.train.labels[idx] == labels).all())


def test_herding_picks_the_mean_first_and_may_repeat():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    picked = herding_selection(f, 4)
    assert picked[0] == 2                         # closest to the mean of the normalised features
    assert len(picked) == 4 and len(set(picked.tolist())) < 4


# ---- old model selection (client table) and proxy ------------------------------------------------

def test_old_model_table():
    b1, b2, cur = {"id": 1}, {"id": 2}, {"id": 0}
    assert choose_old_model(b1, b2, True, cur) is b2
    assert choose_old_model(b1, b2, False, cur) is b1
    assert choose_old_model(None, b2, False, cur) is None
    assert choose_old_model(b1, None, True, cur) is b1
    assert choose_old_model(b1, None, False, cur) is cur
    assert choose_old_model(None, None, False, None) is None


@pytest.mark.parametrize("reset", [False, True])
def test_proxy_selection_sequence(monkeypatch, reset):
    ctx = SimpleNamespace(cfg=load_config(GLFCConfig, None, [f"proxy.best_perf_reset_per_task={str(reset).lower()}",
                                                            "proxy.steps=1", "proxy.max_iter=1", "proxy.keep_last=1",
                                                            "proxy.psnr=false"]),
                          device=torch.device("cpu"), image_shape=(3, 32, 32), encoder=None)
    proxy = ProxyServer(ctx)
    scripted = iter([50.0, 40.0, 50.0, 45.0])
    monkeypatch.setattr(proxy, "monitor_accuracy", lambda state, n: next(scripted))
    monkeypatch.setattr("python_api.methods.glfc.privacy.recover", lambda enc, g: torch.zeros(len(g), dtype=torch.long))
    monkeypatch.setattr("python_api.methods.glfc.privacy.reconstruct",
                        lambda enc, g, y, cfg, shape: (torch.rand(len(g), 1, *shape), torch.zeros(len(g))))
    state = lambda v: {"w": torch.full((1,), float(v))}  # noqa: E731
    pool = torch.zeros(2, 5)
    assert proxy.model_back() == [None, None]
    proxy.process(state(0), 2, pool)                     # task A: monitor set, acc 50 -> best_2 = A
    a = proxy.best_model_2
    assert proxy.best_model_1 is None and a["state"]["w"].item() == 0 and proxy.best_perf == 50
    proxy.process(state(1), 2, None)                     # acc 40 < 50: keep A
    assert proxy.best_model_2 is a
    proxy.process(state(2), 2, None)                     # acc 50 >= 50: ties go to the newer model
    c = proxy.best_model_2
    assert c is not a and c["state"]["w"].item() == 2
    proxy.process(state(3), 4, pool)                     # next task's gradients: best_1 := best_2
    assert proxy.best_model_1 is c
    if reset:
        assert proxy.best_model_2["state"]["w"].item() == 3 and proxy.best_perf == 45
    else:                                                # reference: 45 < 50 (never reset) -> stale
        assert proxy.best_model_2 is c and proxy.best_perf == 50
    assert proxy.model_back() == [proxy.best_model_1, proxy.best_model_2]


def test_pixel_wrap_mimics_to_pil_image():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1])
    assert pixels_to_uint8(x, wrap=True).tolist() == [0, 127, 255, 50, 231]
    assert pixels_to_uint8(x, wrap=False).tolist() == [0, 128, 255, 255, 0]


# ---- LR schedule and aggregation -------------------------------------------------------------

def test_legacy_lr_schedule_matches_spec():
    cfg = load_config(GLFCConfig, "glfc-cifar100-t10").client
    per_round = {r: lr_for_epoch(cfg, r, 10, 20) for r in range(20)}
    for r in (0, 1, 2, 3, 4, 6, 8, 10, 14):
        assert per_round[r] == [2.0] * 20
    assert per_round[5] == pytest.approx([0.4] * 20)
    assert per_round[7] == pytest.approx([2.0] * 10 + [0.08] * 10)
    assert per_round[9] == pytest.approx([0.016] * 20)
    assert per_round[19] == pytest.approx([0.016] * 20)


def test_per_task_step_schedule_is_monotone():
    cfg = load_config(GLFCConfig, "glfc-cifar100-t10", ["client.lr_schedule=per_task_step"]).client
    lrs = [lr for r in range(10) for lr in lr_for_epoch(cfg, r, 10, 20)]
    assert lrs[0] == 2.0 and lrs[99] == 2.0 and lrs[100] == pytest.approx(0.4)
    assert lrs[150] == pytest.approx(0.08) and lrs[199] == pytest.approx(0.016)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_for_epoch(cfg, 10, 10, 20)[0] == 2.0     # restarts at the next task


def test_fedavg_unweighted_weighted_and_integer_buffers():
    s1 = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(3)}
    s2 = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(4)}
    avg = fedavg([s1, s2])
    assert avg["w"].tolist() == [2.0, 4.0] and avg["n"].item() == 3 and avg["n"].dtype == torch.long
    weighted = fedavg([s1, s2], weights=[3, 1])
    assert weighted["w"].tolist() == [1.5, 3.5]


@pytest.mark.parametrize("skip", [False, True])
def test_second_signal_in_a_task_double_counts_unless_switched(skip):
    random.seed(4)
    ctx = _fake_ctx(num_classes=4, task_size=2, per_class=10, memory=8)
    ctx.cfg.client.skip_relearned_classes = skip
    client = GLFCClient(0, ctx)
    model = ClassReader(4, known=[])
    client.before_train(0, 1)
    client.before_train(1, 1)                  # task 1: last_class = the task-0 classes
    first = list(client.last_class)
    for _ in range(2):                         # two signals within the same task
        client.last_entropy = -100.0
        client.update_new_set(model)
    assert client.learned_classes == (first if skip else first + first)
    assert len(client.exemplar_sets) == len(client.learned_classes)
    assert sum(len(e) for e in client.exemplar_sets) <= 8


@pytest.mark.parametrize("mode", ["descent", "gaussian", "none"])
def test_prototype_perturbation_modes(mode):
    from python_api.models import IncrementalNet, build_model
    ctx = _fake_ctx()
    ctx.cfg.client.perturbation = mode
    ctx.cfg.client.perturb_steps = 3
    torch.manual_seed(0)
    model = IncrementalNet(build_model("resnet10", None, width=4), 4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    client = GLFCClient(0, ctx)
    x0 = torch.rand(2, 3, 8, 8)
    x = client.perturb(model, x0, torch.tensor([0, 3]), 4, torch.full((2, model.feature_dim), 0.01))
    assert x.shape == x0.shape and not x.requires_grad
    assert torch.equal(x, x0) == (mode == "none")
    for k, v in model.state_dict().items():          # only the image is optimised
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())
    if mode == "descent":                            # pushed towards the class: the BCE goes down
        onehot = torch.nn.functional.one_hot(torch.tensor([0, 3]), 4).float()
        bce = lambda z: torch.nn.functional.binary_cross_entropy_with_logits(model(z), onehot)  # noqa: E731
        with torch.no_grad():
            assert bce(x) < bce(x0)
