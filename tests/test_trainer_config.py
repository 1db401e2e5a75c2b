"""Config loading, overrides, presets and the CLI's error messages."""
import pytest
import yaml

from python_api.cli import main
from python_api.config import ConfigError, apply_overrides, list_presets, load_config, save_config, to_dict
from python_api.data import ClassIncrementalStream
from python_api.methods import available_methods, get_method
from python_api.methods.glfc import GLFCConfig

GLFC_PRESETS = ["glfc-cifar100-t5", "glfc-cifar100-t10", "glfc-cifar100-t20", "glfc-mini-imagenet",
                "glfc-tiny-imagenet", "glfc-demo"]


@pytest.mark.parametrize("name", GLFC_PRESETS)
def test_presets_load_and_validate(name):
    assert name in list_presets()
    cfg = load_config(GLFCConfig, name)
    assert cfg.method == "glfc"


def test_reference_presets_follow_the_protocol():
    for T, task_size in ((5, 20), (10, 10), (20, 5)):
        cfg = load_config(GLFCConfig, f"glfc-cifar100-t{T}")
        assert cfg.federated.num_tasks == T and cfg.federated.rounds_per_task == 10
        assert cfg.client.lr == 2.0 and cfg.client.local_epochs == 20 and cfg.client.batch_size == 128
        assert cfg.client.lr_schedule == "legacy_per_round" and cfg.client.memory_size == 2000
        assert cfg.classes_per_client_for(task_size) == min(6, task_size)   # the GLFC code's rule (T=20: capped)
        assert cfg.proxy.monitor_transform == "train_aug" and not cfg.proxy.best_perf_reset_per_task


def test_overrides_set_nested_values_and_parse_yaml():
    cfg = load_config(GLFCConfig, "glfc-demo", ["client.local_epochs=7", "data.augment.hflip=false",
                                                  "data.mean=[0.5,0.5,0.5]", "run.max_rounds=null"])
    assert cfg.client.local_epochs == 7 and cfg.data.augment.hflip is False
    assert cfg.data.mean == (0.5, 0.5, 0.5) and cfg.run.max_rounds is None


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"client\.local_epoch.*did you mean 'client\.local_epochs'"):
        load_config(GLFCConfig, "glfc-demo", ["client.local_epoch=3"])
    with pytest.raises(ConfigError, match="unknown config key 'nonsense'"):
        load_config(GLFCConfig, None, ["nonsense=1"])


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="client.local_epochs: expected an integer"):
        load_config(GLFCConfig, None, ["client.local_epochs=many"])
    with pytest.raises(ConfigError, match="client.lr_schedule: expected one of"):
        load_config(GLFCConfig, None, ["client.lr_schedule=cosine"])
    with pytest.raises(ConfigError, match="run.progress: expected true or false"):
        load_config(GLFCConfig, None, ["run.progress=3"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(GLFCConfig, {}, ["client.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides(GLFCConfig, {}, ["client.lr.x=1"])


def test_tasks_must_divide_classes():
    with pytest.raises(ConfigError, match="num_tasks=3 does not divide the 100 classes"):
        ClassIncrementalStream(100, 3)


def test_too_many_classes_per_client_is_explained():
    cfg = load_config(GLFCConfig, None, [])
    with pytest.raises(ConfigError, match="classes_per_client=6 exceeds the task size 5.*client_class_fraction"):
        cfg.classes_per_client_for(5)


def test_missing_preset_and_file(tmp_path):
    with pytest.raises(ConfigError, match="no preset named 'nope'"):
        load_config(GLFCConfig, "nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(GLFCConfig, str(tmp_path / "missing.yaml"))


def test_wrong_method_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: fccl\n")
    with pytest.raises(ConfigError, match="for method 'fccl', not 'glfc'"):
        load_config(GLFCConfig, str(path))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(GLFCConfig, "glfc-cifar100-t20", ["run.seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(GLFCConfig, str(tmp_path / "config.yaml"))
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["run"]["seed"] == 3


def test_method_registry():
    assert "glfc" in available_methods()
    assert get_method("glfc").config_cls is GLFCConfig
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        get_method("nope")


def test_cli_errors_are_clear(capsys, tmp_path):
    assert main(["show-config", "glfc", "--config", "glfc-demo", "client.bogus=1"]) == 2
    assert "unknown config key 'client.bogus'" in capsys.readouterr().err
    assert main(["train", "glfc", "--config", "glfc-demo", "federated.num_tasks=3", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    assert "does not divide the 10 classes" in capsys.readouterr().err


def test_cli_show_config_and_presets(capsys):
    assert main(["show-config", "glfc", "--config", "glfc-demo", "client.lr=0.25", "--data-root", "/d"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["client"]["lr"] == 0.25 and out["data"]["root"] == "/d"
    assert main(["presets"]) == 0
    assert "glfc-demo" in capsys.readouterr().out.split()
