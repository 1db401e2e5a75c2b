"""FCCL (Huang et al., CVPR 2022) and its baselines, as engine-agnostic objects (specs/fccl.md).

    FCCLServer(cfg)          the round loop: public-data collaboration, local updates, evaluation
    FCCLParticipant          one party: net, frozen intra-domain teacher, previous-round inter teacher
    FCCLConfig               the config tree (presets fccl-digits, fccl-officehome, fccl-demo)

`fccl.algorithm` picks FCCL (default), FedMD (L1 to the mean logits, then CE) or SOLO (private CE only).
"""
from python_api.methods.fccl.config import FCCLConfig, FCCLDataConfig, FCCLMethodConfig, FCCLModelConfig, \
    ParticipantConfig, PretrainConfig
from python_api.methods.fccl.participant import FCCLParticipant, collaborative_target
from python_api.methods.fccl.server import FCCLServer, intra_inter

__all__ = ["FCCLConfig", "FCCLDataConfig", "FCCLMethodConfig", "FCCLModelConfig", "ParticipantConfig", "PretrainConfig",
           "FCCLParticipant", "FCCLServer", "collaborative_target", "intra_inter"]


def build_fccl(cfg, run_dir=None, device=None) -> FCCLServer:
    return FCCLServer(cfg, device=device)


def _register() -> None:
    from python_api.methods import MethodSpec, register_method
    register_method(MethodSpec(name="fccl", config_cls=FCCLConfig, build=build_fccl,
                               description="FCCL: heterogeneous participants, public-data cross-correlation, "
                                           "dual-domain distillation (and the FedMD / SOLO baselines)"))


_register()
