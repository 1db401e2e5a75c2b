"""Build FCCL's participants' domains and the public set from the config (specs/fccl.md 2.2-2.4)."""
from __future__ import annotations

import numpy as np

from python_api.data import domains as D
from python_api.config import ConfigError


def build_domains(cfg) -> tuple[list, "D.PublicData"]:
    """(one DomainData per participant, in order; the PublicData)."""
    d = cfg.data
    names = [p.domain for p in cfg.participants]
    if d.scenario == "bundled":
        unknown = [n for n in names if n not in D.BUNDLED_DOMAINS]
        if unknown:
            raise ConfigError(f"participants: bundled domains are {D.BUNDLED_DOMAINS}, got {unknown}")
        if d.public != "bundled":
            raise ConfigError("data.public: the bundled scenario uses its own public split; set data.public=bundled")
        built, public = D.bundled_digit_domains(d.image_size, d.bundled_train_per_domain,
                                                public_size=d.bundled_public_size, seed=d.subset_seed,
                                                domains=names)
        for domain, p in zip(built, cfg.participants):
            if p.private_samples is not None:
                _cut(domain, p.private_samples)
        return built, public
    rng = np.random.RandomState(d.subset_seed)   # one stream in participant order, as np.random.seed(42)
    built = []
    for p in cfg.participants:
        if d.scenario == "digits":
            if p.domain not in D.DIGITS_DOMAINS:
                raise ConfigError(f"participants: Digits domains are {D.DIGITS_DOMAINS}, got {p.domain!r}")
            built.append(D.digits_domain(p.domain, d.root, p.private_samples, rng, d.image_size))
        else:
            if p.domain not in D.OFFICE_HOME_DOMAINS:
                raise ConfigError(f"participants: Office-Home domains are {D.OFFICE_HOME_DOMAINS}, got {p.domain!r}")
            built.append(D.office_home_domain(p.domain, d.root, p.private_samples, rng, d.image_size,
                                              reference_quirks=d.officehome_reference_split))
    if d.public == "bundled":
        raise ConfigError("data.public: 'bundled' goes with data.scenario=bundled")
    public = D.public_dataset(d.public, d.root, d.public_size, np.random.RandomState(d.subset_seed), d.image_size)
    return built, public


def pretrain_domains(cfg, built: list) -> list:
    """The data each intra-domain teacher is pretrained on: the FL private subset, or with
    pretrain.subset_seed set, an independent draw of the same size (the reference's seed-0 mismatch)."""
    seed = cfg.pretrain.subset_seed
    if seed is None or cfg.data.scenario == "bundled":
        return list(built)
    import dataclasses
    rng = np.random.RandomState(seed)
    out = []
    for p, domain in zip(cfg.participants, built):
        if cfg.data.scenario == "digits":
            out.append(D.digits_domain(p.domain, cfg.data.root, p.private_samples, rng, cfg.data.image_size))
        else:
            out.append(D.office_home_domain(p.domain, cfg.data.root, p.private_samples, rng, cfg.data.image_size,
                                            reference_quirks=cfg.data.officehome_reference_split))
    return [dataclasses.replace(o, test_images=b.test_images, test_labels=b.test_labels) for o, b in zip(out, built)]


def _cut(domain, count: int) -> None:
    domain.train_images, domain.train_labels = domain.train_images[:count], domain.train_labels[:count]
