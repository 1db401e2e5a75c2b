"""GLFC settings (spec specs/glfc.md).

One rule: the defaults, and every paper-named preset, reproduce the official code (conditionWang/FCIL,
torch 1.2) switch by switch. The fixes are one documented group, `quirks: corrected`, which sets every
switch of `SWITCHES` that the config does not set explicitly to its corrected value. Every switch
names the spec point it reproduces; docs/glfc-trainer.md lists them all (reference / default / fix).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from python_api.config import ConfigError, DataConfig, RunConfig

__all__ = ["GLFCConfig", "ModelConfig", "FederatedConfig", "ClientConfig", "ProxyConfig", "MetricsConfig",
           "Switch", "SWITCHES", "QUIRKS", "switch_report"]


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
    max_images_per_class: Optional[int] = None   # cost cut for smoke tests, not a method setting: clients use only
                                            # the first N training images of each class (training, entropy, herding,
                                            # prototypes); null = every image (the reference)
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
    herding_train_mode: bool = True         # reference: herding features in train mode, one batch per class (BN batch
                                            # stats): entropy_signal ends with model.train() (GLFC.py:185) before herding
    bn_stats_after_upload: bool = True      # reference (§4.2-8): the prototype pass alters the uploaded BN stats
    eval_batch_size: int = 500
    refresh_together: bool = True           # unselected clients' entropy passes packed into shared batches (same
                                            # values: one global model in eval mode); false: one client at a time
    refresh_pack_images: int = 0            # images per packed forward (0 = eval_batch_size); larger packs keep a
                                            # GPU busy, values are the same whatever it is


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
    accuracy_integer_truncation: bool = True    # torch-1.2 integer % (§4.2-10), for the monitor and evaluation
    encoder_num_classes: Optional[int] = 100    # LeNet output size (reference: 100, hard-wired); None = the dataset's
    encoder_seed: Optional[int] = None      # the fixed random LeNet every party rebuilds from this seed; None = run.seed
    tolerance_grad: float = 1e-5            # L-BFGS; the reference ran torch 1.2 (1e-5; torch >= 1.4: 1e-7)
    tolerance_change: float = 1e-9          # L-BFGS; torch 1.2's value (unchanged since)
    nonfinite_rollback: bool = False        # not in the reference: a reconstruction whose loss turns NaN/Inf goes
                                            # back to its best iterate and stops (false: NaN in, NaN out)
    psnr: bool = False                      # PRIVACY: true makes firing clients also send their raw perturbed
                                            # prototypes (images) so the run can report reconstruction PSNR


@dataclass
class MetricsConfig:
    prototype_grid_max: int = 32            # reconstructed prototypes shown in plots/reconstructions.png


@dataclass(frozen=True)
class Switch:
    """One reference behaviour: its key, the official code's value, the corrected value (what
    `quirks: corrected` sets), where the spec describes it, and what the fix changes."""
    key: str
    reference: object
    corrected: object
    spec: str
    fix: str


QUIRKS = ("reference", "corrected")

# Switches that change results. Defaults = reference; `quirks: corrected` = the corrected column.
SWITCHES = (
    Switch("client.lr_schedule", "legacy_per_round", "per_task_step", "§2, §4.2-1",
           "monotone per-task steps at 100/150/180 of 200 task epochs instead of restarting at lr every round"),
    Switch("client.herding_train_mode", True, False, "§1.5 (GLFC.py:185)",
           "herding features in eval mode (running BN stats), as iCaRL intends"),
    Switch("client.prototype_train_mode", True, False, "§1.6, §4.2-8",
           "prototype class-mean features in eval mode (as LGA does)"),
    Switch("client.bn_stats_after_upload", True, False, "§4.2-8",
           "the uploaded BN running stats are those of local training, untouched by the prototype pass"),
    Switch("client.prototype_input_normalised", False, True, "§4.2-7",
           "perturbation and LeNet encoding see normalised images, as the ResNet was trained on"),
    Switch("client.skip_relearned_classes", False, True, "§4.2-12",
           "a second signal in a task does not store the same classes' exemplars twice"),
    Switch("proxy.best_perf_reset_per_task", False, True, "§4.2-5 (ProxyServer.py:41)",
           "best_perf := 0 when a new monitor set arrives (the reference resets the unused last_perf)"),
    Switch("proxy.monitor_transform", "train_aug", "test", "§4.2-6",
           "the monitor set is scored with the test transform instead of random train augmentation"),
    Switch("proxy.pixel_wrap", True, False, "§4.2-13",
           "reconstructions are clipped to [0, 1] before uint8 instead of wrapping modulo 256"),
    Switch("proxy.shuffle_pool", False, True, "§4.2-14",
           "the gradient pool is shuffled before reconstruction, as the paper motivates for privacy"),
    Switch("proxy.accuracy_integer_truncation", True, False, "§2, §4.2-10",
           "accuracy (evaluation and monitor) as a float %, not torch 1.2's integer-truncated %"),
    Switch("proxy.encoder_num_classes", 100, None, "§1.6, §4.2-15",
           "the LeNet's output size follows the dataset's class count (null) instead of the hard-wired 100"),
    Switch("proxy.nonfinite_rollback", False, True, "§1.7 (not in the reference)",
           "a reconstruction whose loss turns NaN/Inf returns to its best iterate and stops"),
    Switch("proxy.tolerance_grad", 1e-5, 1e-5, "§1.7 (torch 1.2 LBFGS default)",
           "none (current torch's default is 1e-7; set it to compare with a newer-torch run)"),
    Switch("proxy.tolerance_change", 1e-9, 1e-9, "§1.7 (torch 1.2 LBFGS default)", "none"),
)

# Not in the group: settings that choose a paper or LGA variant rather than fix a bug, and
# cost-only switches that leave every number unchanged.
VARIANTS = (
    Switch("client.perturbation", "descent", "descent", "§1.6 [paper vs code]",
           "gaussian = the paper's latent-feature noise; none = no perturbation"),
    Switch("client.classes_per_client", 6, 6, "§1.8, §4.2-4", "client.client_class_fraction=0.6 is LGA's rule"),
    Switch("client.client_class_fraction", None, None, "§6 (LGA)", "round(fraction * task_size) classes per client"),
    Switch("federated.new_clients_per_task", None, None, "§4.2-3", "null = task_size (GLFC code); LGA uses 10"),
    Switch("federated.aggregation", "unweighted", "unweighted", "§2", "weighted = FedAvg by client sample counts"),
    Switch("client.old_model_no_grad", False, True, "§4.2-9",
           "cost only: the old model's forward under no_grad (the reference's extra backward changes nothing)"),
)


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def switch_report(cfg) -> str:
    """Every switch: resolved value, reference value, corrected value (for `fcl-ext show-config`)."""
    def fmt(v):
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    rows = [("switch", "value", "reference", "corrected", "spec")]
    for sw in SWITCHES + VARIANTS:
        value = _get(cfg, sw.key)
        if sw.key == "client.old_model_no_grad":
            rows.append((sw.key, fmt(value), "false (same numbers)", fmt(sw.corrected), sw.spec))
            continue
        rows.append((sw.key, fmt(value), fmt(sw.reference), fmt(sw.corrected), sw.spec))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"# quirks: {cfg.quirks}  (reference = the official code; `quirks: corrected` applies the fixes)"]
    for i, r in enumerate(rows):
        if i == len(SWITCHES) + 1:
            lines.append("# -- variants and cost-only switches (not in the corrected group):")
        mark = "" if r[0] == "switch" or r[1] == r[2] or r[2].startswith("false (") else "   <- differs from reference"
        lines.append("# " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] + mark)
    return "\n".join(lines)


@dataclass
class GLFCConfig:
    METHOD = "glfc"
    method: str = "glfc"
    quirks: str = "reference"   # reference (the official code) | corrected (every fix in SWITCHES)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @staticmethod
    def switch_report(cfg) -> str:
        return switch_report(cfg)

    @classmethod
    def prepare_dict(cls, data: dict) -> dict:
        """`quirks: corrected`: every switch the config does not set explicitly takes its corrected value."""
        quirks = data.get("quirks", "reference")
        if quirks not in QUIRKS:
            raise ConfigError(f"quirks: expected one of {', '.join(QUIRKS)}, got {quirks!r}")
        if quirks == "reference":
            return data
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
        for sw in SWITCHES:
            section, key = sw.key.split(".")
            node = data.setdefault(section, {})
            if node is None:
                node = data[section] = {}
            node.setdefault(key, sw.corrected)
        return data

    def validate(self) -> None:
        def choice(key, value, options):
            if value not in options:
                raise ConfigError(f"{key}: expected one of {', '.join(options)}, got {value!r}")
        choice("quirks", self.quirks, QUIRKS)
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
        if self.proxy.tolerance_grad < 0 or self.proxy.tolerance_change < 0:
            raise ConfigError(f"proxy.tolerance_grad / proxy.tolerance_change must be >= 0, got "
                              f"{self.proxy.tolerance_grad} / {self.proxy.tolerance_change}")
        if self.proxy.encoder_num_classes is not None and self.proxy.encoder_num_classes < 1:
            raise ConfigError(f"proxy.encoder_num_classes: must be >= 1 or null, got {self.proxy.encoder_num_classes}")
        if self.client.max_images_per_class is not None and self.client.max_images_per_class < 1:
            raise ConfigError(f"client.max_images_per_class: must be >= 1 or null, got {self.client.max_images_per_class}")
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
