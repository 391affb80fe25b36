"""One purified student scored under other class-prior corrections, side by side.

The correction (:mod:`cnc_core.purify.calibrate`) is the pipeline's last change to the model
and touches only the classifier's biases, so every variant here is the model the pipeline
would return with that setting, up to the record's rounding (4 decimals of the shift and of
the reference distribution): the run's shift is undone and the correction redone from the
same student, images and reference distribution (the run's record). The row-refit variant
(``prior_head_ridge``) is redone from the run's reference logits
(``PurifyResult.prior_reference_logits``), exactly; the variants that refit to the original
model's logits take them from the caller (the original on the run's synthetic images).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from cnc_core.purify.calibrate import classifier, refit_to_prior, shift_to_prior
from cnc_core.purify.proxies import predict


class Variant(NamedTuple):
    """One correction: its cap, whether the run's named target classes are spared, and the
    class distribution to match (None: the run's reference, from its record); with
    ``head_ridge``, the chosen classes' classifier rows refit to the run's reference logits
    at that ridge (calibrate.refit_to_prior) in place of the capped bias shift, to the
    original model's logits where ``original``; with ``unnamed_only``, the refit only where
    the run named no class (its record's ``spared`` empty), the capped shift elsewhere;
    with ``all_rows``, every class's row but a named one's, not only the avoided classes'
    (session 26, explore-purify.md 4ae: the original's logits brought InputAware
    all-to-one's backdoor back, where nothing was named)."""

    max_shift: float
    spare: bool
    reference: torch.Tensor | None = None
    head_ridge: float | None = None
    original: bool = False
    unnamed_only: bool = False
    all_rows: bool = False


# name -> the correction redone; None: uncorrected
VARIANTS: dict[str, Variant | None] = {
    "uncorrected": None,
    "s23 rule (nothing spared, cap 3)": Variant(3.0, False),
    "spared, cap 1.5": Variant(1.5, True),
    "spared, cap 1": Variant(1.0, True),
    "spared, rows refit (ridge 0.1)": Variant(0.0, True, head_ridge=0.1),
    "rows refit to the original where nothing named (ridge 0.1), else spared, cap 1.5": Variant(
        1.5, True, head_ridge=0.1, original=True, unnamed_only=True
    ),
    "all rows refit to the original where nothing named (ridge 0.1), else spared, cap 1.5": (
        Variant(1.5, True, head_ridge=0.1, original=True, unnamed_only=True, all_rows=True)
    ),
    "all rows refit to the original where nothing named (ridge 1), else spared, cap 1.5": (
        Variant(1.5, True, head_ridge=1.0, original=True, unnamed_only=True, all_rows=True)
    ),
}


def stamped_share(model: nn.Module, proxies: Any) -> dict[str, float]:
    """``{"stamped_to_named": share}``: the share of a run's stamped proxy images (Neural
    Cleanse's trigger on synthetic images) that ``model`` gives Neural Cleanse's class,
    i.e. whether a correction gives the inverted trigger its reach back; empty where the
    run has no inverted trigger."""
    if proxies is None or proxies.inversion is None:
        return {}
    named = int(proxies.inversion.suspected_target)
    return {"stamped_to_named": float((predict(model, proxies.images) == named).float().mean())}


def prior_variants(
    student: nn.Module,
    images: torch.Tensor,
    record: dict[str, Any],
    score: Callable[[nn.Module], dict[str, Any]],
    *,
    iterations: int,
    variants: Mapping[str, Variant | None] = VARIANTS,
    reference_logits: torch.Tensor | None = None,
    original_logits: torch.Tensor | None = None,
) -> dict[str, dict[str, Any]]:
    """``score(student)`` under each of ``variants``, given the run's
    ``detection["prior_correction"]`` record (of a bias shift: a run that refit rows cannot
    be undone from its record) and, for the row refits, the run's reference logits
    (``PurifyResult.prior_reference_logits``; without them those variants are left out)
    or the original model's (``original_logits``, likewise); the student's classifier is
    restored after."""
    if record.get("refit") is not None:
        raise ValueError("the run refit classifier rows: its variants cannot be redone")
    num_classes = len(record["shift"])
    head = classifier(student, num_classes)
    assert head is not None and head.bias is not None
    as_run = head.bias.detach().clone()
    weight = head.weight.detach().clone()
    uncorrected = as_run - torch.tensor(record["shift"]).to(as_run)
    out: dict[str, dict[str, Any]] = {}
    try:
        for name, variant in variants.items():
            with torch.no_grad():
                head.bias.copy_(uncorrected)
                head.weight.copy_(weight)
            shift: list[float] | None = None
            extra: dict[str, Any] = {}
            refit = variant is not None and variant.head_ridge is not None
            if variant is not None and variant.unnamed_only and record.get("spared"):
                refit = False  # a class was named: the capped shift below
            if variant is not None and refit:
                logits = original_logits if variant.original else reference_logits
                if logits is None:
                    continue
                rec = refit_to_prior(
                    student,
                    images,
                    logits,
                    num_classes=num_classes,
                    ridge=float(variant.head_ridge or 0.0),
                    avoided_below=None if variant.all_rows else record.get("avoided_below"),
                    spared=record.get("spared", []) if variant.spare else [],
                )
                shift = rec.shift if rec is not None else None
                extra = {"refit": rec.refit if rec is not None else None}
            elif variant is not None:
                reference = variant.reference
                rec = shift_to_prior(
                    student,
                    images,
                    torch.tensor(record["teacher"]) if reference is None else reference,
                    num_classes=num_classes,
                    iterations=iterations,
                    max_shift=variant.max_shift,
                    avoided_below=record.get("avoided_below"),
                    spared=record.get("spared", []) if variant.spare else [],
                )
                shift = rec.shift if rec is not None else None
            out[name] = {**score(student), "shift": shift, **extra}
    finally:
        with torch.no_grad():
            head.bias.copy_(as_run)
            head.weight.copy_(weight)
    return out
