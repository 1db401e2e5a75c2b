"""GLFC settings (spec specs/glfc.md). Defaults = the reference code's behaviour (spec §7); the
corrected behaviours are switches. Every reference quirk switch names the spec point it reproduces.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from python_api.config import ConfigError, DataConfig, RunConfig

__all__ = ["GLFCConfig", "ModelConfig", "FederatedConfig", "ClientConfig", "ProxyConfig", "MetricsConfig"]


@dataclass
class ModelConfig:
    arch: str = "resnet18"          # any registered backbone (python_api.models): resnet10/12/18/34
    width: int = 64                 # first-stage width; 64 = the reference ResNet-18 (512-d features)


@dataclass
class FederatedConfig:
    num_tasks: int = 10             # T; must divide the dataset's classes
    rounds_per_task: int = 10       # the reference's `--tasks_global` (spec §4.2-2)
    initial_clients: int = 30       # clients at task 0
    new_clients_per_task: Optional[int] = None   # None = task_size (GLFC code, §4.2-3); LGA uses 10
    old_keep_fraction: float = 0.1  # share of existing clients that keep their old classes (S_o); the rest (S_b) get new ones
    clients_per_round: int = 10     # sampled uniformly without replacement over all current clients
    aggregation: str = "unweighted"  # unweighted (reference FedAvg) | weighted (by client sample counts)


@dataclass
class ClientConfig:
    local_epochs: int = 20
    batch_size: int = 128
    lr: float = 2.0
    momentum: float = 0.0
    weight_decay: float = 1e-5
    lr_schedule: str = "legacy_per_round"   # legacy_per_round (spec §2, the optimizer restarts each round) | per_task_step
    legacy_epoch_stride: int = 20           # the literal 20 in the reference's (epoch + 20·round) mod 200 test
    lr_milestones: tuple = (100, 150, 180)  # epochs (mod 200 legacy / cumulative in the task for per_task_step)
    lr_divisors: tuple = (5, 25, 125)
    memory_size: int = 2000                 # exemplars per client, split evenly over its learned classes
    skip_relearned_classes: bool = False    # true: a second signal in a task does not store the same classes
                                            # again (the reference double-counts them, §4.2-12)
    classes_per_client: int = 6             # the reference's hard-coded 6 (§4.2-4)
    client_class_fraction: Optional[float] = None   # if set: round(fraction·task_size) classes (LGA: 0.6; T=20 runs)
    entropy_threshold: float = 1.2
    entropy_eps: float = 1e-5
    loss_backend: str = "auto"              # fcl_ext (fused ops) | reference (pure PyTorch twins) | auto (fcl_ext if built)
    gc_weight: float = 0.5                  # λ1 on L_GC
    rd_weight: float = 0.5                  # λ2 on L_RD
    old_model_no_grad: bool = True          # spec §4.2-9: numerically identical, only faster
    perturbation: str = "descent"           # descent (reference: SGD steps on the image) | gaussian (paper: latent noise) | none
    perturb_steps: int = 50
    perturb_lr_divisor: float = 10.0        # image SGD lr = lr / this (0.2 in the reference)
    perturb_weight_decay: float = 1e-5
    gaussian_gamma: float = 0.1             # paper: noise variance γ·σ²_class in the feature space
    prototype_input_normalised: bool = False   # reference feeds [0,1] pixels to the perturbation and encoder (§4.2-7)
    prototype_train_mode: bool = True       # reference computes prototype features in train mode (BN batch stats)
    bn_stats_after_upload: bool = False     # true reproduces §4.2-8 (prototype pass alters the uploaded BN stats)
    eval_batch_size: int = 500


@dataclass
class ProxyConfig:
    enabled: bool = True                    # false: no prototypes, no best old model -> no L_RD (ablation)
    shuffle_pool: bool = False              # shuffle the gradient pool (paper) — the reference does not (§4.2-14)
    steps: int = 250                        # L-BFGS outer steps per gradient
    max_iter: int = 20
    history_size: int = 100
    lr: float = 0.1
    keep_last: int = 20                     # iterates kept per gradient as monitor images
    optimizer: str = "lbfgs"
    pixel_wrap: bool = True                 # reference ToPILImage on unclipped floats: values wrap mod 256 (§4.2-13); false = clip
    monitor_transform: str = "train_aug"    # train_aug (reference, §4.2-6) | test
    monitor_batch_size: int = 64
    best_perf_reset_per_task: bool = False  # false = reference (best_perf never reset, §4.2-5)
    accuracy_integer_truncation: bool = False   # torch-1.2 integer % (§4.2-10), for the monitor and evaluation
    encoder_num_classes: Optional[int] = None   # LeNet output size; None = the dataset's class count (reference: 100)
    encoder_seed: int = 0                   # the fixed random LeNet every party rebuilds from this seed
    psnr: bool = True                       # audit: clients also send their true prototypes so the run can report PSNR


@dataclass
class MetricsConfig:
    prototype_grid_max: int = 32            # reconstructed prototypes shown in plots/reconstructions.png


@dataclass
class GLFCConfig:
    METHOD = "glfc"
    method: str = "glfc"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self) -> None:
        def choice(key, value, options):
            if value not in options:
                raise ConfigError(f"{key}: expected one of {', '.join(options)}, got {value!r}")
        choice("client.lr_schedule", self.client.lr_schedule, ("legacy_per_round", "per_task_step"))
        if self.method == "glfc" and self.data.partition != "classes":   # the FCIL baselines take dirichlet
            raise ConfigError(f"data.partition={self.data.partition!r}: GLFC draws each client's classes itself "
                              f"(spec §1.2); only data.partition=classes is supported for glfc")
        choice("client.loss_backend", self.client.loss_backend, ("auto", "fcl_ext", "reference"))
        choice("client.perturbation", self.client.perturbation, ("descent", "gaussian", "none"))
        choice("proxy.monitor_transform", self.proxy.monitor_transform, ("train_aug", "test"))
        choice("federated.aggregation", self.federated.aggregation, ("unweighted", "weighted"))
        f = self.federated
        for key in ("num_tasks", "rounds_per_task", "initial_clients", "clients_per_round"):
            if getattr(f, key) < 1:
                raise ConfigError(f"federated.{key}: must be >= 1, got {getattr(f, key)}")
        if f.clients_per_round > f.initial_clients:
            raise ConfigError(f"federated.clients_per_round={f.clients_per_round} exceeds "
                              f"federated.initial_clients={f.initial_clients}")
        if not 0 <= f.old_keep_fraction <= 1:
            raise ConfigError(f"federated.old_keep_fraction: must be in [0, 1], got {f.old_keep_fraction}")
        if self.client.local_epochs < 1 or self.client.batch_size < 1:
            raise ConfigError("client.local_epochs and client.batch_size must be >= 1")
        if len(self.client.lr_milestones) != len(self.client.lr_divisors):
            raise ConfigError("client.lr_milestones and client.lr_divisors must have the same length")
        if self.client.client_class_fraction is not None and not 0 < self.client.client_class_fraction <= 1:
            raise ConfigError(f"client.client_class_fraction: must be in (0, 1], got {self.client.client_class_fraction}")

    def classes_per_client_for(self, task_size: int) -> int:
        """Classes each re-assigned client draws from a task (checked against task_size)."""
        if self.client.client_class_fraction is not None:
            return max(1, int(round(self.client.client_class_fraction * task_size)))
        if self.client.classes_per_client > task_size:
            raise ConfigError(
                f"client.classes_per_client={self.client.classes_per_client} exceeds the task size {task_size} "
                f"(the reference crashes here, spec §4.2-4); set client.client_class_fraction=0.6 (LGA's rule) "
                f"or a smaller client.classes_per_client")
        return self.client.classes_per_client
