"""One purified student scored under other class-prior corrections, side by side.

The correction (:mod:`cnc_core.purify.calibrate`) is the pipeline's last change to the model
and touches only the classifier's biases, so every variant here is the model the pipeline
would return with that setting, up to the record's rounding (4 decimals of the shift and of
the reference distribution): the run's shift is undone and the correction redone from the
same student, images and reference distribution (the run's record).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cnc_core.purify.calibrate import classifier, shift_to_prior

# name -> (max_shift, whether the run's named target classes are spared); None: uncorrected
VARIANTS: dict[str, tuple[float, bool] | None] = {
    "uncorrected": None,
    "s23 rule (nothing spared, cap 3)": (3.0, False),
    "spared, cap 1.5": (1.5, True),
    "spared, cap 1": (1.0, True),
}


def prior_variants(
    student: nn.Module,
    images: torch.Tensor,
    record: dict[str, Any],
    score: Callable[[nn.Module], dict[str, Any]],
    *,
    iterations: int,
) -> dict[str, dict[str, Any]]:
    """``score(student)`` under each of :data:`VARIANTS`, given the run's
    ``detection["prior_correction"]`` record; the student's biases are restored after."""
    num_classes = len(record["shift"])
    head = classifier(student, num_classes)
    assert head is not None and head.bias is not None
    as_run = head.bias.detach().clone()
    uncorrected = as_run - torch.tensor(record["shift"]).to(as_run)
    reference = torch.tensor(record["teacher"])
    out: dict[str, dict[str, Any]] = {}
    try:
        for name, variant in VARIANTS.items():
            with torch.no_grad():
                head.bias.copy_(uncorrected)
            shift = None
            if variant is not None:
                max_shift, spare = variant
                rec = shift_to_prior(
                    student,
                    images,
                    reference,
                    num_classes=num_classes,
                    iterations=iterations,
                    max_shift=max_shift,
                    avoided_below=record.get("avoided_below"),
                    spared=record.get("spared", []) if spare else [],
                )
                shift = rec.shift if rec is not None else None
            out[name] = {**score(student), "shift": shift}
    finally:
        with torch.no_grad():
            head.bias.copy_(as_run)
    return out
