"""Poisoning training sets and building triggered test sets.

Conventions follow BackdoorBench (Wu et al., NeurIPS 2022 Datasets & Benchmarks): poison rate
0.1 of the whole training set, target class 0; all-to-one relabels triggered images to the
target, all-to-all relabels ``y -> (y + 1) mod C``. For all-to-one only images whose true
label differs from the target are poisoned (poisoning a target-class image teaches nothing).
Attacks with cross (noise) samples (WaNet, InputAware) also get ``cross_ratio`` x (number
poisoned) further images turned into cross samples, kept at their true labels.

Two ways to use it: :func:`poison_dataset` triggers a fixed subset once (static poisoning);
:func:`plan_poison` + :func:`poison_batch` fix WHICH samples are poisoned but apply the
trigger per mini-batch, after data augmentation, as BackdoorBench's training loops do for
WaNet and InputAware (the trigger is not then shifted or flipped by the augmentation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cnc_core.backdoors.base import Attack

__all__ = [
    "Mode",
    "PoisonPlan",
    "PoisonedDataset",
    "attack_labels",
    "make_poisoned_testset",
    "plan_poison",
    "poison_batch",
    "poison_dataset",
]

Mode = Literal["all2one", "all2all"]


def attack_labels(labels: Tensor, mode: Mode, target: int = 0, num_classes: int = 10) -> Tensor:
    """The label a successful attack makes the model predict for each true label."""
    if mode == "all2one":
        return torch.full_like(labels, target)
    if mode == "all2all":
        return (labels + 1) % num_classes
    raise ValueError(f"mode must be 'all2one' or 'all2all', got {mode!r}")


@dataclass(frozen=True)
class PoisonPlan:
    """Which training samples are poisoned (relabelled) and which become cross samples."""

    poison_mask: Tensor  # bool (N,)
    cross_mask: Tensor  # bool (N,), disjoint from poison_mask

    @property
    def num_poison(self) -> int:
        return int(self.poison_mask.sum())

    @property
    def num_cross(self) -> int:
        return int(self.cross_mask.sum())


def plan_poison(
    labels: Tensor,
    *,
    mode: Mode = "all2one",
    target: int = 0,
    rate: float = 0.1,
    cross_ratio: float = 0.0,
    seed: int = 0,
) -> PoisonPlan:
    """Choose ``round(rate * N)`` samples to poison and ``round(cross_ratio * that)`` cross ones.

    Raises
    ------
    ValueError
        If the rate or mode is invalid, or there are too few eligible samples.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if cross_ratio < 0:
        raise ValueError(f"cross_ratio must be >= 0, got {cross_ratio}")
    n = labels.shape[0]
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    if mode == "all2one":
        eligible = (labels != target).nonzero().flatten()
    elif mode == "all2all":
        eligible = torch.arange(n)
    else:
        raise ValueError(f"mode must be 'all2one' or 'all2all', got {mode!r}")
    n_poison = round(rate * n)
    if n_poison > eligible.numel():
        raise ValueError(f"cannot poison {n_poison} of {eligible.numel()} eligible samples")
    poison_idx = eligible[torch.randperm(eligible.numel(), generator=g)[:n_poison]]
    poison_mask = torch.zeros(n, dtype=torch.bool)
    poison_mask[poison_idx] = True
    rest = (~poison_mask).nonzero().flatten()
    n_cross = round(cross_ratio * n_poison)
    if n_cross > rest.numel():
        raise ValueError(f"cannot pick {n_cross} cross samples from {rest.numel()} clean ones")
    cross_mask = torch.zeros(n, dtype=torch.bool)
    cross_mask[rest[torch.randperm(rest.numel(), generator=g)[:n_cross]]] = True
    return PoisonPlan(poison_mask=poison_mask, cross_mask=cross_mask)


def poison_batch(
    images: Tensor,
    labels: Tensor,
    poison_mask: Tensor,
    cross_mask: Tensor,
    attack: Attack,
    *,
    mode: Mode = "all2one",
    target: int = 0,
    num_classes: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Trigger and relabel the masked samples of one batch; make the cross ones. Copies."""
    images, labels = images.clone(), labels.clone()
    poison_mask = poison_mask.to(images.device)
    cross_mask = cross_mask.to(images.device)
    if bool(poison_mask.any()):
        images[poison_mask] = attack.apply(images[poison_mask], generator)
        labels[poison_mask] = attack_labels(labels[poison_mask], mode, target, num_classes)
    n_cross = int(cross_mask.sum())
    if n_cross == 1:
        # InputAware's cross trigger needs a second image: borrow the whole batch's triggers.
        cross_all = attack.apply_cross(images, generator) if images.shape[0] > 1 else images
        images[cross_mask] = cross_all[cross_mask]
    elif n_cross > 1:
        images[cross_mask] = attack.apply_cross(images[cross_mask], generator)
    return images, labels


@dataclass(frozen=True)
class PoisonedDataset:
    """A statically poisoned training set; masks mark the poisoned and cross samples."""

    images: Tensor  # float (N, C, H, W) in [0, 1]
    labels: Tensor  # int64 (N,), poisoned samples relabelled
    poison_mask: Tensor  # bool (N,)
    cross_mask: Tensor  # bool (N,)


def poison_dataset(
    images: Tensor,
    labels: Tensor,
    attack: Attack,
    mode: Mode = "all2one",
    target: int = 0,
    rate: float = 0.1,
    seed: int = 0,
    num_classes: int = 10,
) -> PoisonedDataset:
    """Poison ``rate`` of a training set with ``attack`` (plus its cross samples), statically.

    Parameters
    ----------
    images : Tensor
        Float (N, C, H, W) in [0, 1]; not modified.
    labels : Tensor
        int64 (N,) true labels; not modified.
    attack : Attack
        The trigger; its ``cross_ratio`` sets the number of cross samples.
    mode, target, rate, seed, num_classes
        See :func:`plan_poison` and :func:`attack_labels`.
    """
    plan = plan_poison(
        labels, mode=mode, target=target, rate=rate, cross_ratio=attack.cross_ratio, seed=seed
    )
    g = torch.Generator().manual_seed(seed + 1)
    out_x, out_y = poison_batch(
        images,
        labels,
        plan.poison_mask,
        plan.cross_mask,
        attack,
        mode=mode,
        target=target,
        num_classes=num_classes,
        generator=g,
    )
    return PoisonedDataset(out_x, out_y, plan.poison_mask, plan.cross_mask)


def make_poisoned_testset(
    images: Tensor,
    labels: Tensor,
    attack: Attack,
    mode: Mode = "all2one",
    target: int = 0,
    num_classes: int = 10,
) -> tuple[Tensor, Tensor]:
    """Triggered test images and the labels the attack wants, for ASR.

    All-to-one keeps only images whose true label is not ``target``; all-to-all keeps all and
    labels them ``(y + 1) mod C``.
    """
    if mode == "all2one":
        keep = labels != target
        images, labels = images[keep], labels[keep]
    elif mode != "all2all":
        raise ValueError(f"mode must be 'all2one' or 'all2all', got {mode!r}")
    return attack.apply(images), attack_labels(labels, mode, target, num_classes)
