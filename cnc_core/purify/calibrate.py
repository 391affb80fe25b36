"""Class-prior correction of the purified student (data-free).

The removal (unlearning the inverted trigger, BN statistics of trigger-stamped images, the
teacher cleaning) teaches the student to avoid the suspected target class. Where that class
is a natural one, the cost lands on it alone: on a clean width-16 ResNet-18 (Fashion-MNIST)
Neural Cleanse names class 6 (shirt), and the purified student's recall of it fell from 77%
to 6% while the other classes kept theirs (bench/results/explore-purify.md 4aa). The
avoidance is visible without data: on the clean synthetic images the teacher calls 140 of
1,024 class 6, the student 40.

The correction shifts the classifier's biases until the student's mean predicted class
distribution on the clean synthetic images matches the teacher's, by the fixed-point
iteration of Saerens et al. (Neural Computation 2002) for a changed class prior,
``b_c += log(p_teacher(c) / p_student(c))``. It changes no weight but the last layer's bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PriorCorrection:
    """What :func:`match_class_prior` did: the bias shift per class, the classes left out
    (``spared``), and the mean predicted class distributions of teacher and student (before
    and after) on the images."""

    corrected: list[int]
    shift: list[float]
    teacher: list[float]
    student_before: list[float]
    student_after: list[float]
    spared: list[int] = field(default_factory=list)
    # the relative weight change of each corrected class's refit classifier row, where the
    # rows were refit (:func:`refit_to_prior`) rather than their biases shifted
    refit: list[float] | None = None


def classifier(model: nn.Module, num_classes: int) -> nn.Linear | None:
    """The model's last ``nn.Linear`` with ``num_classes`` outputs and a bias, or None."""
    found = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = module
    return found if found is not None and found.bias is not None else None


@torch.no_grad()
def logits_of(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """``model``'s logits on ``images`` (model-input space), in eval mode, on the CPU."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(b).float().cpu() for b in images.split(batch_size)])
    finally:
        model.train(was_training)


def mean_softmax(logits: Tensor, batch_size: int = 256) -> Tensor:
    """The mean softmax of ``logits`` (one row per image), summed in chunks of
    ``batch_size`` rows as :func:`mean_probs` always has."""
    total = torch.zeros(())
    for chunk in logits.float().cpu().split(batch_size):
        total = total + F.softmax(chunk, dim=1).sum(0)
    return total / logits.shape[0]


@torch.no_grad()
def mean_probs(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """The mean softmax over ``images`` (model-input space), in eval mode."""
    return mean_softmax(logits_of(model, images, batch_size), batch_size)


@torch.no_grad()
def match_class_prior(
    student: nn.Module,
    teacher: nn.Module,
    images: Tensor,
    *,
    num_classes: int,
    iterations: int = 10,
    max_shift: float = 3.0,
    avoided_below: float | None = None,
    spared: Sequence[int] = (),
) -> PriorCorrection | None:
    """Shift ``student``'s classifier biases (in place) so that its mean predicted class
    distribution on ``images`` matches ``teacher``'s; None where the student has no
    classifier with a bias. See :func:`shift_to_prior` for the options."""
    return shift_to_prior(
        student,
        images,
        mean_probs(teacher, images),
        num_classes=num_classes,
        iterations=iterations,
        max_shift=max_shift,
        avoided_below=avoided_below,
        spared=spared,
    )


@torch.no_grad()
def shift_to_prior(
    student: nn.Module,
    images: Tensor,
    reference: Tensor,
    *,
    num_classes: int,
    iterations: int = 10,
    max_shift: float = 3.0,
    avoided_below: float | None = None,
    spared: Sequence[int] = (),
) -> PriorCorrection | None:
    """Shift ``student``'s classifier biases (in place) so that its mean predicted class
    distribution on ``images`` matches ``reference`` (a class distribution); None where the
    student has no classifier with a bias. Each class's total shift is clipped to
    ``max_shift`` logits.

    ``avoided_below``: shift only the classes the student *avoids*, those given less than
    this fraction of the reference's share before the correction (the others' biases stay;
    ``corrected`` lists them); None shifts every class. ``spared``: classes never shifted
    (a class a search named as the backdoor target: raising it lets the backdoor back,
    bench/results/explore-purify.md 4ab)."""
    head = classifier(student, num_classes)
    if head is None:
        return None
    reference = reference.detach().float().cpu().clamp_min(1e-6)
    before = mean_probs(student, images)
    chosen, spared = _chosen(before, reference, avoided_below, spared)
    start = head.bias.detach().clone()
    current = before
    for _ in range(iterations if bool(chosen.any()) else 0):
        step = torch.log(reference / current.clamp_min(1e-6)) * chosen
        step = step.to(head.bias)
        shift = (head.bias + step - start).clamp(-max_shift, max_shift)
        head.bias.copy_(start + shift)
        current = mean_probs(student, images)
    return PriorCorrection(
        corrected=[c for c in range(num_classes) if bool(chosen[c])],
        shift=[round(v, 4) for v in (head.bias - start).tolist()],
        teacher=[round(v, 4) for v in reference.tolist()],
        student_before=[round(v, 4) for v in before.tolist()],
        student_after=[round(v, 4) for v in current.tolist()],
        spared=spared,
    )


def _chosen(
    before: Tensor, reference: Tensor, avoided_below: float | None, spared: Sequence[int]
) -> tuple[Tensor, list[int]]:
    """The classes to correct (a boolean mask): those the student gives under
    ``avoided_below`` of the reference's share (every class where None), less ``spared``
    (returned sorted, in range)."""
    num_classes = before.shape[0]
    if avoided_below is None:
        chosen = torch.ones(num_classes, dtype=torch.bool)
    else:
        chosen = before < avoided_below * reference
    spared = sorted({int(c) for c in spared if 0 <= int(c) < num_classes})
    chosen[spared] = False
    return chosen, spared


@torch.no_grad()
def refit_to_prior(
    student: nn.Module,
    images: Tensor,
    reference_logits: Tensor,
    *,
    num_classes: int,
    ridge: float = 0.1,
    avoided_below: float | None = None,
    spared: Sequence[int] = (),
) -> PriorCorrection | None:
    """The classes :func:`shift_to_prior` would shift, corrected instead by refitting their
    classifier rows to the reference teacher's logits (:func:`refit_head_rows`): the
    removal leaves the avoided class in the student's features (a clean model's class 6:
    a linear probe on them recalls 73% of it, against 7% through the purified head), so a
    new row recovers more of it than a bias alone (bench/results/explore-purify.md 4ad).
    ``shift`` records the rows' bias change."""
    head = classifier(student, num_classes)
    if head is None:
        return None
    reference = mean_softmax(reference_logits).clamp_min(1e-6)
    before = mean_probs(student, images)
    chosen, spared = _chosen(before, reference, avoided_below, spared)
    classes = [c for c in range(num_classes) if bool(chosen[c])]
    start = head.bias.detach().clone()
    changes = refit_head_rows(
        student, reference_logits, images, num_classes=num_classes, classes=classes, ridge=ridge
    )
    return PriorCorrection(
        corrected=classes,
        shift=[round(v, 4) for v in (head.bias - start).tolist()],
        teacher=[round(v, 4) for v in reference.tolist()],
        student_before=[round(v, 4) for v in before.tolist()],
        student_after=[round(v, 4) for v in mean_probs(student, images).tolist()],
        spared=spared,
        refit=changes,
    )


@torch.no_grad()
def features_and_logits(
    model: nn.Module, head: nn.Linear, images: Tensor, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """``model``'s inputs to ``head`` (its penultimate features) and its logits on
    ``images``, in eval mode, on the CPU."""
    feats: list[Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach().cpu()))
    try:
        logits = logits_of(model, images, batch_size)
    finally:
        hook.remove()
    return torch.cat(feats).float(), logits


@torch.no_grad()
def refit_head_rows(
    student: nn.Module,
    reference_logits: Tensor,
    images: Tensor,
    *,
    num_classes: int,
    classes: Sequence[int],
    ridge: float = 0.1,
) -> list[float]:
    """Refit the classifier rows of ``classes`` (weights and bias, in place) so that the
    student's logits of those classes on ``images`` follow ``reference_logits`` (a
    teacher's, one row per image), by ridge regression on the student's penultimate
    features, pulled toward the current rows.

    Distillation matches logits up to a constant per image, so the reference's logits are
    aligned by the median difference of the other classes' logits. ``ridge`` is relative to
    the mean squared feature. Returns the relative change of each refit row's weights."""
    head = classifier(student, num_classes)
    chosen = sorted({int(c) for c in classes if 0 <= int(c) < num_classes})
    if head is None or not chosen:
        return []
    feats, s_logits = features_and_logits(student, head, images)
    t_logits = reference_logits.float().cpu()
    others = [k for k in range(num_classes) if k not in chosen]
    # the median over the other classes: a spared class the student also avoids (the
    # named target) must not pull the offset
    diff = s_logits[:, others] - t_logits[:, others]
    align = diff.median(dim=1).values if others else torch.zeros(feats.shape[0])
    x = torch.cat([feats, torch.ones(feats.shape[0], 1)], dim=1).double()
    gram = x.T @ x
    lam = ridge * float(gram.diagonal()[:-1].mean())
    reg = lam * torch.eye(x.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0.0  # the bias is free
    changes = []
    for c in chosen:
        old = torch.cat([head.weight[c], head.bias[c : c + 1]]).double().cpu()
        target = (t_logits[:, c] + align).double()
        new = torch.linalg.solve(gram + reg, x.T @ target + reg @ old)
        head.weight[c].copy_(new[:-1].to(head.weight))
        head.bias[c] = new[-1].to(head.bias)
        changes.append(round(float((new - old)[:-1].norm() / old[:-1].norm().clamp_min(1e-12)), 4))
    return changes
