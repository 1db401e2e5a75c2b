"""Build FCCL's participants' domains and the public set from the config (specs/fccl.md 2.2-2.4).

No test image is ever trained on: test splits depend on `data.test_split_seed` alone (never on run.seed,
data.subset_seed or pretrain.subset_seed), and `check_no_test_leak` verifies, for every scenario, that no
private-training, pretraining or public image is in any participant's test set.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from python_api.data import domains as D
from python_api.config import ConfigError


def distinct_domains(cfg) -> list:
    """The participants' domain names, each once, in order of first appearance (the test-set columns)."""
    return list(dict.fromkeys(p.domain for p in cfg.participants))


def build_domains(cfg) -> tuple[list, "D.PublicData"]:
    """(one DomainData per participant, in order; the PublicData). Participants on the same domain share its
    test set and draw their own private subsets from its training pool."""
    d = cfg.data
    names = [p.domain for p in cfg.participants]
    rng = np.random.RandomState(d.subset_seed)   # one stream in participant order, as np.random.seed(42)
    if d.scenario == "bundled":
        unknown = [n for n in names if n not in D.BUNDLED_DOMAINS]
        if unknown:
            raise ConfigError(f"participants: bundled domains are {D.BUNDLED_DOMAINS}, got {unknown}")
        if d.public != "bundled":
            raise ConfigError("data.public: the bundled scenario uses its own public split; set data.public=bundled")
        styles, public = D.bundled_digit_domains(d.image_size, d.bundled_train_per_domain,
                                                 public_size=d.bundled_public_size, seed=d.test_split_seed,
                                                 domains=distinct_domains(cfg))
        by_name = {style.name: style for style in styles}
        built = [_private_subset(by_name[p.domain], p.private_samples, rng) for p in cfg.participants]
        return built, public
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
                                              reference_quirks=d.officehome_reference_split,
                                              split_seed=d.test_split_seed))
    if d.public == "bundled":
        raise ConfigError("data.public: 'bundled' goes with data.scenario=bundled")
    public = D.public_dataset(d.public, d.root, d.public_size, np.random.RandomState(d.subset_seed), d.image_size)
    return built, public


def pretrain_domains(cfg, built: list) -> list:
    """The data each intra-domain teacher is pretrained on: the FL private subset, or with
    pretrain.subset_seed set, an independent draw of the same size from the same training pool (the
    reference's seed-0 mismatch); the test split is the FL one either way."""
    seed = cfg.pretrain.subset_seed
    if seed is None or cfg.data.scenario == "bundled":
        return list(built)
    rng = np.random.RandomState(seed)
    out = []
    for p, domain in zip(cfg.participants, built):
        if cfg.data.scenario == "digits":
            out.append(D.digits_domain(p.domain, cfg.data.root, p.private_samples, rng, cfg.data.image_size))
        else:
            out.append(D.office_home_domain(p.domain, cfg.data.root, p.private_samples, rng, cfg.data.image_size,
                                            reference_quirks=cfg.data.officehome_reference_split,
                                            split_seed=cfg.data.test_split_seed))
    return [dataclasses.replace(o, test_images=b.test_images, test_labels=b.test_labels, test_source=b.test_source,
                                test_index=b.test_index) for o, b in zip(out, built)]


def check_splits(built: list, pretrain_sets: list, public) -> None:
    """No private-training, pretraining or public image in any participant's test set (raises ValueError)."""
    D.check_no_test_leak(built, public, test_sets=built, what="private training")
    D.check_no_test_leak(pretrain_sets, None, test_sets=built, what="pretraining")


def _private_subset(domain: "D.DomainData", count, rng: np.random.RandomState) -> "D.DomainData":
    """A random `count` of the domain's training images (all of them if None)."""
    if count is None or count >= len(domain.train_labels):
        return domain
    keep = torch.from_numpy(np.sort(D.subsample(count, len(domain.train_labels), rng)))
    index = None if domain.train_index is None else domain.train_index[keep]
    return dataclasses.replace(domain, train_images=domain.train_images[keep], train_labels=domain.train_labels[keep],
                               train_index=index)
