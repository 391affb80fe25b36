"""Backdoor attacks (string-keyed registry) and dataset poisoning, BackdoorBench conventions.

>>> attack = create_attack("badnet", image_size=32, channels=3, seed=0)
>>> poisoned = poison_dataset(images, labels, attack, mode="all2one", target=0, rate=0.1)
"""

from __future__ import annotations

# Importing the attack modules registers them.
from cnc_core.backdoors import badnet, blended, inputaware, wanet  # noqa: F401
from cnc_core.backdoors.base import (
    ATTACKS,
    Attack,
    create_attack,
    list_attacks,
    register_attack,
)
from cnc_core.backdoors.poison import (
    Mode,
    PoisonedDataset,
    PoisonPlan,
    attack_labels,
    make_poisoned_testset,
    plan_poison,
    poison_batch,
    poison_dataset,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "Mode",
    "PoisonPlan",
    "PoisonedDataset",
    "attack_labels",
    "create_attack",
    "list_attacks",
    "make_poisoned_testset",
    "plan_poison",
    "poison_batch",
    "poison_dataset",
    "register_attack",
]
