"""FCCL's config tree (specs/fccl.md 2): participants (domain + backbone), data, pretraining, the method.

Defaults are the CVPR code's Digits protocol; the presets `fccl-digits`, `fccl-officehome` and
`fccl-demo` set the rest. Every reference quirk is a named switch documented at its field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from python_api.config import ConfigError, RunConfig

ALGORITHMS = ("fccl", "fedmd", "solo")
SCENARIOS = ("bundled", "digits", "officehome")
PUBLIC_SETS = ("bundled", "cifar100", "fashion_mnist", "tiny_imagenet")
TARGETS = ("reference", "all_current")
INITS = ("pytorch", "glfc")


@dataclass
class ParticipantConfig:
    """One participant: its private domain, its backbone and its private-data budget."""
    domain: str = "plain"              # Digits: mnist|usps|svhn|syn; Office-Home: Art|Clipart|Product|Real World;
                                       # bundled: plain|inverted|rotated|coloured
    backbone: str = "resnet10"         # resnet10|resnet12|resnet18|resnet34|efficientnet_b0|mobilenetv2|googlenet
    width: float = 1.0                 # channel multiplier (1.0 = the reference network; smaller for demos)
    private_samples: Optional[int] = None   # private subset size (None = the whole training pool)
    local_epochs: int = 1              # Private_Training_Epoch[i]


def _digits_participants() -> list:
    return [ParticipantConfig("mnist", "resnet10", 1.0, 150, 40), ParticipantConfig("usps", "resnet12", 1.0, 80, 35),
            ParticipantConfig("svhn", "efficientnet_b0", 1.0, 5000, 3),
            ParticipantConfig("syn", "mobilenetv2", 1.0, 1800, 4)]


@dataclass
class FCCLModelConfig:
    """How every participant's backbone is built (specs/fccl.md 2.2)."""
    init: str = "pytorch"              # pytorch: the layers' defaults, as the FCCL code (no file under
                                       # fccl/Network/ touches init); glfc: GLFC's ResNet init, conv
                                       # N(0, sqrt(2/(k*k*out))) (about 7 points lower intra-domain, issue 16)
    efficientnet_drop_connect: float = 0.0   # 0: the reference, whose drop-connect is dead code
                                             # (efficientnet.py:119-124); 0.2: the rate it configures, applied


@dataclass
class FCCLDataConfig:
    scenario: str = "digits"           # bundled | digits | officehome
    root: str = "data"                 # where the dataset files live (see python_api/data/domains.py)
    image_size: int = 32               # every private and public image is resized once to this size
    subset_seed: int = 42              # np.random.seed(42) of the CVPR code for the private subsets
    test_split_seed: int = 0           # the held-out test split (Office-Home: 30 % per class; the bundled
                                       # partition) depends on this alone, never on a training seed
    public: str = "cifar100"           # cifar100 | fashion_mnist | tiny_imagenet | bundled (the bundled scenario's split)
    public_size: int = 5000            # random subset of the public training split
    public_batch_size: int = 512
    public_drop_last: bool = True      # the reference drops the last partial public batch
    private_batch_size: int = 512      # TrainBatchSize (no drop_last)
    eval_batch_size: int = 512
    test_per_domain: Optional[int] = None   # cost cut for smoke tests, not a method setting: evaluate on an evenly
                                            # spaced subset of at most N images of each test domain; null = the
                                            # whole test set (the reference)
    officehome_reference_split: bool = False  # True: spec 2.4's class-ordered truncation + test on the whole domain
    bundled_train_per_domain: int = 100
    bundled_public_size: int = 500


@dataclass
class PretrainConfig:
    """The intra-domain teacher and initial model of every participant (spec 1.5)."""
    epochs: int = 40                   # CVPR HEAD: 40 (the first push used 2)
    batch_size: int = 256
    lr: float = 1e-3
    cache_dir: str = "~/.cache/fcl_ext/fccl-pretrained"   # checkpoints keyed by a hash of config and data
    subset_seed: Optional[int] = None  # None: pretrain on the FL private subset (corrected); 0: the reference's
                                       # seed-0 subset, a different draw than the FL one (spec 4.2.3)


@dataclass
class FCCLMethodConfig:
    algorithm: str = "fccl"            # fccl | fedmd (L1 to the mean logits, then CE) | solo (private CE only)
    rounds: int = 40
    target: str = "reference"          # reference: mean(others' current, own previous-round model);
                                       # all_current: mean of every participant's current logits, FCCL+'s
                                       # target only (FCCL+'s other parts are not implemented)
    off_diag_weight: float = 0.0051    # lambda
    off_diag_target: float = -1.0      # the reference pushes off-diagonals to -1; 0 = Barlow Twins
    unbiased_std: bool = True          # torch.std (B-1), as the reference
    std_eps: float = 0.0               # no epsilon in the reference
    public_epochs: int = 1             # Public_Training_Epoch
    public_lr: float = 1e-3
    fresh_public_optimizer: bool = True  # the reference builds a new Adam for every public batch (= sign-SGD);
                                         # False keeps one Adam per participant per round
    local_lr: float = 1e-3             # Adam, created once per participant per round
    temperature: float = 1.0
    intra_weight: float = 1.0          # KL to the frozen pretrained model
    inter_weight: float = 1.0          # KL to the model from the end of the previous round
    temperature_squared: bool = False  # the reference has no T^2 factor
    loss_backend: str = "fcl_ext"      # fcl_ext (fused ops) | reference (pure PyTorch twins)
    evaluate_solo: bool = True         # also report the pretrained-only models (the SOLO baseline, spec 1.5)
    top_k: int = 5                     # top-k reported besides top-1 (Office-Home's headline is top-5)
    headline: str = "auto"             # the accuracy the summary, table and plots lead with; auto = the
                                       # reference's rule (utils_idea.py:86-111): top1 on Digits and bundled,
                                       # top-k otherwise (top-5 at the default top_k); topk = top_k's accuracy


@dataclass
class FCCLConfig:
    METHOD = "fccl"
    method: str = "fccl"
    run: RunConfig = field(default_factory=RunConfig)
    data: FCCLDataConfig = field(default_factory=FCCLDataConfig)
    participants: list[ParticipantConfig] = field(default_factory=_digits_participants)
    model: FCCLModelConfig = field(default_factory=FCCLModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    fccl: FCCLMethodConfig = field(default_factory=FCCLMethodConfig)

    def __post_init__(self):
        # YAML gives plain dicts for the participant list; turn them into ParticipantConfig.
        from python_api.config import from_dict
        self.participants = [p if isinstance(p, ParticipantConfig) else
                             from_dict(ParticipantConfig, p, prefix=f"participants.{i}.")
                             for i, p in enumerate(self.participants)]

    def headline_metric(self) -> str:
        """"top1" or "top{k}": fccl.headline resolved for the scenario (auto: top-1 on Digits, top-5 otherwise)."""
        headline = self.fccl.headline
        if headline == "auto":
            headline = "top1" if self.data.scenario in ("digits", "bundled") else "top5"
        return "top1" if headline == "top1" else f"top{self.fccl.top_k}"

    def validate(self) -> None:
        m, d = self.fccl, self.data
        if m.algorithm not in ALGORITHMS:
            raise ConfigError(f"fccl.algorithm: {m.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        if m.target not in TARGETS:
            raise ConfigError(f"fccl.target: {m.target!r} is not one of {', '.join(TARGETS)}")
        if m.loss_backend not in ("fcl_ext", "reference"):
            raise ConfigError(f"fccl.loss_backend: {m.loss_backend!r} is not fcl_ext or reference")
        if m.headline not in ("auto", "top1", "top5", "topk"):
            raise ConfigError(f"fccl.headline: {m.headline!r} is not auto, top1, top5 or topk")
        if m.top_k < 1:
            raise ConfigError(f"fccl.top_k: must be at least 1, got {m.top_k}")
        if m.headline == "top5" and m.top_k != 5:
            # top-5 is only measured when top_k is 5; reporting another k under the name top5 would mislead.
            raise ConfigError(f"fccl.headline: top5 needs fccl.top_k=5, got fccl.top_k={m.top_k} "
                              f"(use fccl.headline=topk for top-{m.top_k})")
        if self.model.init not in INITS:
            raise ConfigError(f"model.init: {self.model.init!r} is not one of {', '.join(INITS)}")
        if not 0.0 <= self.model.efficientnet_drop_connect < 1.0:
            raise ConfigError(f"model.efficientnet_drop_connect: must be in [0, 1), "
                              f"got {self.model.efficientnet_drop_connect}")
        if d.scenario not in SCENARIOS:
            raise ConfigError(f"data.scenario: {d.scenario!r} is not one of {', '.join(SCENARIOS)}")
        if d.public not in PUBLIC_SETS:
            raise ConfigError(f"data.public: {d.public!r} is not one of {', '.join(PUBLIC_SETS)}")
        if len(self.participants) < 2:
            raise ConfigError("participants: FCCL needs at least two participants")
        if m.rounds < 1:
            raise ConfigError(f"fccl.rounds: must be at least 1, got {m.rounds}")
        if d.test_per_domain is not None and d.test_per_domain < 1:
            raise ConfigError(f"data.test_per_domain: must be >= 1 or null, got {d.test_per_domain}")
        if d.public_batch_size < 2:
            raise ConfigError("data.public_batch_size: the batch standardisation needs at least 2 images")
        for i, p in enumerate(self.participants):
            if p.local_epochs < 0:
                raise ConfigError(f"participants.{i}.local_epochs: must be >= 0")
