"""Tiny GLFC settings shared by the trainer tests: 2 tasks of 2 synthetic classes, 4 clients, 2 rounds
per task, a width-4 ResNet-10 on 16x16 images and a few reconstruction steps (seconds on one core)."""
from python_api.config import load_config
from python_api.methods.glfc import GLFCConfig

TINY = [
    "run.progress=false", "run.threads=1", "run.device=cpu",
    "data.dataset=synthetic", "data.num_classes=4", "data.samples_per_class=24", "data.image_size=16",
    "data.augment.crop_padding=2",
    "federated.num_tasks=2", "federated.rounds_per_task=2", "federated.initial_clients=4",
    "federated.new_clients_per_task=1", "federated.clients_per_round=2",
    "model.arch=resnet10", "model.width=4",
    "client.local_epochs=1", "client.batch_size=16", "client.lr=0.5", "client.lr_schedule=per_task_step",
    "client.memory_size=10", "client.classes_per_client=2", "client.entropy_threshold=0.3",
    "client.perturb_steps=2",
    "proxy.steps=2", "proxy.max_iter=2", "proxy.keep_last=2",
]


def tiny_config(*extra):
    return load_config(GLFCConfig, None, TINY + list(extra))
