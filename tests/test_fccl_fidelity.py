"""FCCL fidelity (issue 16, items 10-16): weight init per method, EfficientNet drop-connect, the pretraining
cache key, test splits that no training data touches, participants sharing a domain, per-participant
overrides, headline-metric plots and the device the public augmentation runs on."""
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from python_api.config import ConfigError, list_presets, load_config
from python_api.data import domains as D
from python_api.engine import InProcessEngine
from python_api.engine.runner import run_training
from python_api.methods.fccl import FCCLConfig, FCCLServer, intra_inter
from python_api.methods.fccl.data import build_domains, check_splits, pretrain_domains
from python_api.methods.fccl.participant import FCCLParticipant, build_backbone, code_digest
from python_api.methods.glfc import GLFCConfig
from python_api.models import build_model
from tests.test_fccl_data import write_tiny_digits_root
from tests.test_fccl_trainer import TINY_PARTICIPANTS, tiny_config
from tests.testing import HAS_GPU

pytestmark = pytest.mark.filterwarnings("ignore:fcl_ext.ops has no FCCL losses")

REPO = Path(__file__).resolve().parents[1]
ALL_BACKBONES = ("resnet10", "resnet12", "resnet18", "resnet34", "efficientnet_b0", "mobilenetv2", "googlenet")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- 10. weight init per method

def _layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _fan_in(layer):
    return layer.weight[0].numel()


def assert_pytorch_init(model, name):
    """kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in), BN gamma 1 beta 0."""
    for layer in _layers(model):
        bound = 1.0 / math.sqrt(_fan_in(layer))
        w = layer.weight.detach()
        assert w.abs().max() <= bound * (1 + 1e-6), f"{name}: {layer} exceeds the default init's bound"
        if w.numel() >= 4096:
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), f"{name}: {layer}"
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def assert_glfc_init(model, name):
    """GLFC's ResNet init: conv weights N(0, sqrt(2/(k*k*out))) (zero mean, that std)."""
    checked = 0
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        w = conv.weight.detach()
        if w.numel() < 4096:
            continue
        expected = math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))
        assert w.std().item() == pytest.approx(expected, rel=0.1), f"{name}: {conv}"
        assert abs(w.mean().item()) < 4 * expected / math.sqrt(w.numel()), f"{name}: {conv}"
        checked += 1
    assert checked > 0, name


def _fccl_preset_backbones():
    cases = []
    for preset in (p for p in list_presets() if p.startswith("fccl-")):
        cfg = load_config(FCCLConfig, preset)
        for p in cfg.participants:
            cases.append((preset, p.backbone, p.width))
    return cases


@pytest.mark.parametrize("preset,backbone,width", _fccl_preset_backbones())
def test_fccl_presets_build_backbones_with_pytorch_default_init(preset, backbone, width):
    cfg = load_config(FCCLConfig, preset)
    assert cfg.model.init == "pytorch"
    torch.manual_seed(0)
    model = build_backbone(backbone, 10, width, init=cfg.model.init)
    assert_pytorch_init(model, f"{preset}/{backbone}")


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_every_fccl_backbone_under_each_init(backbone):
    # The FCCL+ heterogeneous Office-Home nets (resnet18/34, googlenet, resnet12) included; narrow widths.
    cfg = load_config(FCCLConfig, "fccl-officehome", [f"participants.*.backbone={backbone}",
                                                      "participants.*.width=0.25"])
    torch.manual_seed(0)
    assert_pytorch_init(build_backbone(backbone, 65, 0.25, init=cfg.model.init), backbone)
    glfc_cfg = load_config(FCCLConfig, "fccl-officehome", ["model.init=glfc"])
    torch.manual_seed(0)
    assert_glfc_init(build_backbone(backbone, 65, 0.25, init=glfc_cfg.model.init), backbone)


@pytest.mark.parametrize("preset", [p for p in list_presets() if p.startswith("glfc-")])
def test_glfc_presets_keep_glfc_resnet_init(preset):
    cfg = load_config(GLFCConfig, preset)
    torch.manual_seed(0)
    # as GLFCServer builds its backbone (methods/glfc/server.py)
    assert_glfc_init(build_model(cfg.model.arch, None, width=cfg.model.width), f"{preset}/{cfg.model.arch}")


def test_glfc_init_draws_are_unchanged():
    # GLFC's numbers must not move: the same draws as the original in-constructor init (conv order, N(0, s)).
    torch.manual_seed(3)
    model = build_model("resnet10", 10, width=8)
    expected = []
    torch.manual_seed(3)
    reference = build_model("resnet10", 10, width=8, init="pytorch")
    for m in reference.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            expected.append(m.weight.detach().clone())
    got = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_init_switch_is_checked():
    with pytest.raises(ConfigError, match="model.init"):
        load_config(FCCLConfig, "fccl-demo", ["model.init=xavier"])
    with pytest.raises(ValueError, match="model.init"):
        build_model("resnet10", 10, init="xavier")


# ---------------------------------------------------------------- 11. EfficientNet drop-connect, cache key

def _mbconv_rates(model):
    return [block.drop_rate for block in model.blocks]


def test_efficientnet_drop_connect_off_by_default_and_switchable():
    cfg = load_config(FCCLConfig, "fccl-digits")
    assert cfg.model.efficientnet_drop_connect == 0.0
    off = build_backbone("efficientnet_b0", 10, 0.25, **vars_of(cfg.model))
    assert all(rate == 0.0 for rate in _mbconv_rates(off))
    on_cfg = load_config(FCCLConfig, "fccl-digits", ["model.efficientnet_drop_connect=0.2"])
    on = build_backbone("efficientnet_b0", 10, 0.25, **vars_of(on_cfg.model))
    rates = _mbconv_rates(on)
    assert rates[0] == 0.0 and max(rates) == pytest.approx(0.2 * (len(rates) - 1) / len(rates))
    # functionally: with drop-connect off, two train-mode passes of a residual block agree; on, they differ
    residual = next(i for i, b in enumerate(off.blocks) if b.residual and on.blocks[i].drop_rate > 0)
    x = torch.randn(8, off.blocks[residual].project[0].out_channels, 4, 4)
    torch.manual_seed(0)
    assert torch.equal(off.blocks[residual].train()(x), off.blocks[residual](x))
    on.blocks[residual].drop_rate = 0.5
    outs = [on.blocks[residual].train()(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    with pytest.raises(ConfigError, match="model.efficientnet_drop_connect"):
        load_config(FCCLConfig, "fccl-digits", ["model.efficientnet_drop_connect=1.5"])


def vars_of(model_cfg):
    return {"init": model_cfg.init, "efficientnet_drop_connect": model_cfg.efficientnet_drop_connect}


def _key(backbone="resnet10", **options):
    fake = SimpleNamespace(backbone=backbone, width=0.25, seed=0, index=0,
                           build_options={"init": "pytorch", "efficientnet_drop_connect": 0.0, **options})
    data = SimpleNamespace(num_classes=10, train_images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
                           train_labels=torch.zeros(2, dtype=torch.int64))
    return FCCLParticipant.pretrain_key(fake, SimpleNamespace(epochs=1, batch_size=2, lr=1e-3), data)


def test_pretrain_key_covers_init_drop_connect_and_code(tmp_path, monkeypatch):
    base = _key()
    assert _key(init="glfc") != base
    assert _key("efficientnet_b0", efficientnet_drop_connect=0.2) != _key("efficientnet_b0")
    # Editing the backbone's module, or the data readers, changes the key (no stale checkpoint reuse).
    import python_api.data.domains as domains_module
    import python_api.models.resnet_cifar as resnet_module
    for module in (resnet_module, domains_module):
        edited = tmp_path / f"{module.__name__}.py"
        shutil.copy(module.__file__, edited)
        edited.write_text(edited.read_text() + "\n# a change\n")
        before = code_digest("resnet10")
        with monkeypatch.context() as patch:
            patch.setattr(module, "__file__", str(edited))
            assert code_digest("resnet10") != before
            assert _key() != base
    assert _key() == base


def test_changed_init_does_not_reuse_a_cached_checkpoint(tmp_path):
    first = InProcessEngine(FCCLServer(tiny_config(tmp_path)), progress=False).client(0)
    assert first.pretrain_info["cached"] is False
    again = InProcessEngine(FCCLServer(tiny_config(tmp_path)), progress=False).client(0)
    assert again.pretrain_info["cached"] is True
    other = tiny_config(tmp_path)
    other.model.init = "glfc"
    changed = InProcessEngine(FCCLServer(other), progress=False).client(0)
    assert changed.pretrain_info["cached"] is False and changed.pretrain_info["path"] != first.pretrain_info["path"]


# ---------------------------------------------------------------- 12. no test data in training, ever

def _unique_images(rng, count, shape):
    """Random images; row i's first pixel encodes i so that no two are equal."""
    images = rng.randint(0, 255, (count,) + shape).astype(np.uint8)
    flat = images.reshape(count, -1)
    flat[:, 0], flat[:, 1] = np.arange(count) % 256, np.arange(count) // 256
    return images


def _write_folder(root, classes, per_class, rng, size=16):
    from PIL import Image
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(_unique_images(rng, per_class, (size, size, 3))):
            Image.fromarray(image).save(root / c / f"{j}.png")


def write_tiny_office_home(root):
    rng = np.random.RandomState(1)
    for domain in D.OFFICE_HOME_DOMAINS:
        _write_folder(root / "OfficeHome" / domain, ["Alarm", "Bike", "Candle", "Zebra"], 10, rng)
    import pickle
    (root / "cifar-100-python").mkdir(parents=True)
    with open(root / "cifar-100-python" / "train", "wb") as fh:
        pickle.dump({"data": rng.randint(0, 255, (40, 3072)).astype(np.uint8), "fine_labels": [0] * 40}, fh)


def write_tiny_digits_unique(root):
    write_tiny_digits_root(root)
    shutil.rmtree(root / "syn")   # the shared fixture repeats its images between SYN's splits; use unique ones
    rng = np.random.RandomState(2)
    for split in ("imgs_train", "imgs_valid"):
        _write_folder(root / "syn" / split, [str(c) for c in range(10)], 2, rng, size=32)


def _pixel_set(images):
    return {bytes(image.numpy()) for image in images}


SCENARIO_OVERRIDES = {
    "officehome": ["participants=[{domain: Art, backbone: resnet10, private_samples: 14},"
                   "{domain: Clipart, backbone: resnet10, private_samples: 20},"
                   "{domain: Product, backbone: resnet10, private_samples: 25},"
                   "{domain: Real World, backbone: resnet10}]", "data.public_size=16"],
    "digits": ["participants=[{domain: mnist, backbone: resnet10, private_samples: 15},"
               "{domain: usps, backbone: resnet12, private_samples: 8},"
               "{domain: svhn, backbone: resnet10, private_samples: 20},"
               "{domain: syn, backbone: resnet12, private_samples: 18}]", "data.public_size=16"],
}


def _scenario_config(scenario, root, *overrides):
    preset = {"officehome": "fccl-officehome", "digits": "fccl-digits"}[scenario]
    return load_config(FCCLConfig, preset, [f"data.root={root}", "data.image_size=16",
                                            *SCENARIO_OVERRIDES[scenario], *overrides])


@pytest.mark.parametrize("scenario", ["officehome", "digits"])
def test_no_training_or_public_image_in_any_test_set(tmp_path, scenario):
    root = tmp_path / "data"
    (write_tiny_office_home if scenario == "officehome" else write_tiny_digits_unique)(root)
    reference_tests = None
    for subset_seed, pretrain_seed, split_quirk in ((42, None, False), (42, 0, False), (0, 0, False),
                                                    (7, 3, True)):
        cfg = _scenario_config(scenario, root, f"data.subset_seed={subset_seed}",
                               f"pretrain.subset_seed={'null' if pretrain_seed is None else pretrain_seed}",
                               f"data.officehome_reference_split={str(split_quirk).lower()}")
        built, public = build_domains(cfg)
        pretrain = pretrain_domains(cfg, built)
        check_splits(built, pretrain, public)
        tested = set().union(*(_pixel_set(d.test_images) for d in built))
        for d, p in zip(built, pretrain):
            assert not _pixel_set(d.train_images) & tested, f"private training image of {d.name} in a test set"
            assert not _pixel_set(p.train_images) & tested, f"pretraining image of {p.name} in a test set"
        public_pixels = _pixel_set(D.resize_uint8(public.images, 16))
        assert not public_pixels & tested
        # test sets do not depend on any training seed
        tests = [bytes(d.test_images.numpy()) for d in built]
        reference_tests = reference_tests or tests
        assert tests == reference_tests


def test_bundled_test_sets_independent_of_training_seeds_and_disjoint(tmp_path):
    seen = None
    for subset_seed in (0, 1, 42):
        cfg = tiny_config(tmp_path, data={"subset_seed": subset_seed})
        built, public = build_domains(cfg)
        check_splits(built, pretrain_domains(cfg, built), public)
        tested = set().union(*({int(i) for i in d.test_index} for d in built))
        assert tested and not tested & {int(i) for i in public.index}
        for d in built:
            assert not tested & {int(i) for i in d.train_index}
        tests = [d.test_index.tolist() for d in built]
        seen = seen or tests
        assert tests == seen


def test_leak_check_raises_and_runs_when_the_server_is_built(tmp_path):
    cfg = tiny_config(tmp_path)
    built, public = build_domains(cfg)
    leaky = [D.DomainData(**{**vars(built[0]), "train_index": torch.cat([built[0].train_index,
                                                                         built[1].test_index[:1]])}),
             built[1]]
    with pytest.raises(ValueError, match="test image"):
        check_splits(leaky, leaky, public)
    with pytest.raises(ValueError, match="test image"):
        FCCLServer(cfg, domains=leaky, public=public)
    public_leak = D.PublicData(**{**vars(public), "index": built[0].test_index[:2]})
    with pytest.raises(ValueError, match="public set"):
        check_splits(built, built, public_leak)


# ---------------------------------------------------------------- 13. participants sharing a domain

def test_intra_inter_keyed_by_participant():
    accuracies = [{"top1": {"a": 90.0, "b": 30.0}}, {"top1": {"a": 70.0, "b": 20.0}},
                  {"top1": {"a": 10.0, "b": 80.0}}]
    result = intra_inter(accuracies, "top1", ["a", "a", "b"])
    assert result["intra"] == [90.0, 70.0, 80.0]
    assert result["inter"] == [30.0, 20.0, 10.0]


def test_two_participants_on_one_domain(tmp_path):
    participants = [TINY_PARTICIPANTS[0], dict(TINY_PARTICIPANTS[0], width=0.125), TINY_PARTICIPANTS[1]]
    cfg = tiny_config(tmp_path, participants=participants, fccl={"rounds": 1},
                      data={"bundled_train_per_domain": 24})
    cfg.participants[0].private_samples = cfg.participants[1].private_samples = 12
    result = run_training("fccl", cfg, out_dir=tmp_path / "run", verbose=False)
    summary, record = result.summary, result.records[0]
    assert summary["domains"] == ["plain", "plain", "inverted"]
    assert summary["test_domains"] == ["plain", "inverted"]
    matrix = record["accuracy_top1"]
    assert [len(row) for row in matrix] == [2, 2, 2]
    assert record["p0_plain_intra_top1"] == matrix[0][0] and record["p1_plain_intra_top1"] == matrix[1][0]
    assert record["p2_inverted_intra_top1"] == matrix[2][1]
    assert record["p1_plain_inter_top1"] == matrix[1][1] and record["p2_inverted_inter_top1"] == matrix[2][0]
    # their own private subsets of the shared training pool
    built, _ = build_domains(cfg)
    assert not torch.equal(built[0].train_index, built[1].train_index)
    assert torch.equal(built[0].test_index, built[1].test_index)


# ---------------------------------------------------------------- 14. per-participant overrides

def test_per_participant_overrides():
    cfg = load_config(FCCLConfig, "fccl-digits", ["participants.1.local_epochs=5"])
    assert [p.local_epochs for p in cfg.participants] == [40, 5, 3, 4]
    cfg = load_config(FCCLConfig, "fccl-digits", ["participants.*.local_epochs=5", "participants.3.width=0.5"])
    assert [p.local_epochs for p in cfg.participants] == [5, 5, 5, 5]
    assert [p.width for p in cfg.participants] == [1.0, 1.0, 1.0, 0.5]
    cfg = load_config(FCCLConfig, None, ["participants.*.local_epochs=2"])   # no file: the defaults' list
    assert [p.local_epochs for p in cfg.participants] == [2, 2, 2, 2]
    with pytest.raises(ConfigError, match=r"did you mean 'participants\.1\.local_epochs'"):
        load_config(FCCLConfig, "fccl-digits", ["participants.1.local_epoch=5"])
    with pytest.raises(ConfigError, match=r"index 0\.\.3 or '\*'"):
        load_config(FCCLConfig, "fccl-digits", ["participants.4.local_epochs=5"])
    with pytest.raises(ConfigError, match=r"participants\.2\.local_epochs: expected an integer"):
        load_config(FCCLConfig, "fccl-digits", ["participants.2.local_epochs=many"])


def test_readme_fccl_commands_parse():
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if "fcl-ext train fccl" in line]
    assert lines
    for line in lines:
        tokens = [token.strip("'\"") for token in line.split("#")[0].split()]
        preset = tokens[tokens.index("--config") + 1] if "--config" in tokens else None
        overrides = [t for t in tokens if "=" in t and not t.startswith("-")]
        load_config(FCCLConfig, preset, overrides)   # raises ConfigError on a key that does not exist


# ---------------------------------------------------------------- 15. plots in the headline metric

def test_headline_follows_the_scenario():
    assert load_config(FCCLConfig, None, ["data.scenario=officehome"]).headline_metric() == "top5"
    assert load_config(FCCLConfig, None, ["data.scenario=digits"]).headline_metric() == "top1"
    assert load_config(FCCLConfig, "fccl-officehome").headline_metric() == "top5"


def test_headline_top5_refuses_another_top_k_and_topk_names_it():
    # top5 with top_k=3 used to report top-3 under the name top5.
    with pytest.raises(ConfigError, match=r"fccl.headline: top5 needs fccl.top_k=5, got fccl.top_k=3"):
        load_config(FCCLConfig, None, ["fccl.headline=top5", "fccl.top_k=3"])
    assert load_config(FCCLConfig, None, ["fccl.headline=topk", "fccl.top_k=3"]).headline_metric() == "top3"
    assert load_config(FCCLConfig, None, ["data.scenario=officehome", "fccl.top_k=3"]).headline_metric() == "top3"


def test_plots_show_the_headline_metric(tmp_path, monkeypatch):
    import python_api.methods.fccl.plots as plots
    drawn = {}
    real_curves, real_matrix = plots.plot_curves, plots.plot_matrix

    def curves(path, series, xlabel, ylabel, title):
        drawn[Path(path).name] = (series, ylabel)
        return real_curves(path, series, xlabel, ylabel, title)

    def matrix(path, values, *args, **kwargs):
        drawn[Path(path).name] = (values, args[0])
        return real_matrix(path, values, *args, **kwargs)

    monkeypatch.setattr(plots, "plot_curves", curves)
    monkeypatch.setattr(plots, "plot_matrix", matrix)
    cfg = tiny_config(tmp_path, fccl={"rounds": 1, "headline": "top5"})
    result = run_training("fccl", cfg, out_dir=tmp_path / "run", verbose=False)
    record = result.records[0]
    assert record["mean_intra_top5"] != record["mean_intra_top1"]   # the two metrics differ here
    series, ylabel = drawn["accuracy_mean.png"]
    assert "top-5" in ylabel
    assert series["mean intra"][1] == [record["mean_intra_top5"]]
    assert series["SOLO intra"][1] == [result.summary["solo"]["intra"]["mean"]]
    series, _ = drawn["accuracy_participants.png"]
    assert series["plain/resnet10 intra"][1] == [record["p0_plain_intra_top5"]]
    values, title = drawn["accuracy_matrix.png"]
    assert values == record["accuracy_top5"] and "top-5" in title


# ---------------------------------------------------------------- 16. public augmentation on the device

def _augmentation_devices(tmp_path, monkeypatch, device):
    import python_api.methods.fccl.server as server_module
    seen = []
    real = server_module.augment_public

    def recording(public, images, generator=None):
        seen.append(images.device.type)
        out = real(public, images, generator)
        seen.append(out.device.type)
        return out

    monkeypatch.setattr(server_module, "augment_public", recording)
    cfg = tiny_config(tmp_path, run={"device": device}, fccl={"rounds": 1})
    server = FCCLServer(cfg)
    server._collaborate(InProcessEngine(server, progress=False))
    return server, seen


def test_public_images_live_and_are_augmented_on_the_server_device(tmp_path, monkeypatch):
    server, seen = _augmentation_devices(tmp_path, monkeypatch, "cpu")
    assert server.public_images.device == server.device and seen and set(seen) == {"cpu"}


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device visible")
def test_public_augmentation_runs_on_the_gpu(tmp_path, monkeypatch):
    server, seen = _augmentation_devices(tmp_path, monkeypatch, "cuda")
    assert server.public_images.is_cuda and seen and set(seen) == {"cuda"}
