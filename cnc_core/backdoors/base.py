"""The attack interface and its string-keyed registry.

An attack is a fixed, seeded trigger function on images in [0, 1] of shape (N, C, H, W).
Attacks whose papers train with "cross" (noise) samples, i.e. trigger-like perturbations that
keep their true label so the network learns the exact trigger, also implement
:meth:`Attack.apply_cross` and set ``cross_ratio`` (cross samples per poisoned sample).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

__all__ = ["ATTACKS", "Attack", "create_attack", "list_attacks", "register_attack"]


class Attack(ABC):
    """A backdoor trigger: ``apply`` maps clean images to triggered ones.

    Subclasses hold only fixed state built from ``seed`` at construction, so the same seed
    gives the same trigger in training and in evaluation.
    """

    name: ClassVar[str]
    #: cross ("noise") samples per poisoned sample in training; 0 means none.
    cross_ratio: float = 0.0

    def __init__(self, image_size: int = 32, channels: int = 3, seed: int = 0) -> None:
        self.image_size = image_size
        self.channels = channels
        self.seed = seed

    @abstractmethod
    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return triggered copies of ``images`` ((N, C, H, W), [0, 1]); inputs stay unchanged."""

    def apply_cross(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return cross (noise) samples, trained with their TRUE labels."""
        raise NotImplementedError(f"{self.name} has no cross samples")

    def _check(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"{self.name}: expected (N, {self.channels}, H, W) images, "
                f"got {tuple(images.shape)}"
            )
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.name}: built for {self.image_size}x{self.image_size} images, "
                f"got {tuple(images.shape[-2:])}"
            )
        if not images.is_floating_point():
            raise ValueError(f"{self.name}: images must be float in [0, 1], got {images.dtype}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, seed={self.seed})"


A = TypeVar("A", bound=type[Attack])
ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: A) -> A:
    """Class decorator: add an :class:`Attack` subclass to :data:`ATTACKS` under ``cls.name``."""
    if cls.name in ATTACKS:
        raise ValueError(f"attack {cls.name!r} registered twice")
    ATTACKS[cls.name] = cls
    return cls


def list_attacks() -> list[str]:
    """Registered attack names, sorted."""
    return sorted(ATTACKS)


def create_attack(name: str, **kwargs: object) -> Attack:
    """Build the attack registered as ``name`` (``image_size``, ``channels``, ``seed``, ...)."""
    try:
        cls: Callable[..., Attack] = ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {list_attacks()}") from None
    return cls(**kwargs)
