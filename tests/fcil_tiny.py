"""Tiny settings for the FCIL baselines: GLFC's tiny stream (tests/glfc_tiny.py) under another method."""
from python_api.config import load_config
from python_api.methods import get_method

from tests.glfc_tiny import TINY

BASELINES = ("finetune", "lwf", "ewc", "icarl", "bic", "joint")


def tiny_baseline_config(method, *extra):
    return load_config(get_method(method).config_cls, None, TINY + list(extra))
