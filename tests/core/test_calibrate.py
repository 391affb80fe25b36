"""Class-prior correction (cnc_core.purify.calibrate)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from cnc_core.purify.calibrate import (
    classifier,
    logits_of,
    match_class_prior,
    mean_probs,
    refit_to_prior,
    shift_to_prior,
)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def test_prior_correction_matches_the_teacher_by_the_bias_alone() -> None:
    teacher = _net(0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[3].bias[2] -= 4.0  # the student avoids class 2
    images = torch.randn(256, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    gap_before = (mean_probs(student, images) - mean_probs(teacher, images)).abs().max()
    weights = {k: v.clone() for k, v in student.state_dict().items() if k != "3.bias"}
    rec = match_class_prior(student, teacher, images, num_classes=4, iterations=10, max_shift=5)
    assert rec is not None
    gap_after = (mean_probs(student, images) - mean_probs(teacher, images)).abs().max()
    assert gap_after < 0.01 < gap_before
    assert rec.shift[2] == max(rec.shift) and rec.shift[2] > 2.0
    assert rec.student_before[2] < rec.teacher[2]
    assert abs(rec.student_after[2] - rec.teacher[2]) < 0.01
    for k, v in student.state_dict().items():  # nothing but the classifier's bias moved
        if k != "3.bias":
            assert torch.equal(v, weights[k])


def test_prior_correction_is_clipped_and_needs_a_biased_classifier() -> None:
    teacher = _net(0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[3].bias[1] -= 6.0
    images = torch.randn(128, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    rec = match_class_prior(student, teacher, images, num_classes=4, max_shift=1.5)
    assert rec is not None and max(abs(v) for v in rec.shift) == pytest.approx(1.5, abs=1e-4)
    no_bias = nn.Sequential(nn.Flatten(), nn.Linear(12, 4, bias=False))
    assert classifier(no_bias, 4) is None
    assert match_class_prior(no_bias, teacher, images, num_classes=4) is None
    assert classifier(teacher, 4) is teacher[3]  # the last Linear with num_classes outputs


def test_prior_correction_can_shift_only_the_avoided_classes() -> None:
    teacher = _net(0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[3].bias[2] -= 4.0  # avoided
        student[3].bias[1] += 0.2  # a small drift, left alone
    images = torch.randn(256, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    bias = student[3].bias.detach().clone()
    rec = match_class_prior(student, teacher, images, num_classes=4, avoided_below=0.6, max_shift=6)
    assert rec is not None and rec.corrected == [2]
    assert rec.shift[2] > 2.0 and rec.shift[0] == rec.shift[1] == rec.shift[3] == 0.0
    assert abs(rec.student_after[2] - rec.teacher[2]) < 0.02
    same = copy.deepcopy(teacher)  # nothing avoided: nothing moves
    rec = match_class_prior(same, teacher, images, num_classes=4, avoided_below=0.6)
    assert rec is not None and rec.corrected == [] and not any(rec.shift)
    assert torch.equal(student[3].bias[[0, 1, 3]], bias[[0, 1, 3]])


def test_prior_correction_spares_the_named_classes() -> None:
    """A spared class keeps its bias even where the student avoids it; the others are
    corrected as before, and an explicit reference distribution is the teacher's."""
    teacher = _net(0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[3].bias[2] -= 4.0
        student[3].bias[0] -= 4.0  # both avoided; class 0 is the "named target"
    images = torch.randn(256, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    twin = copy.deepcopy(student)
    rec = match_class_prior(
        student, teacher, images, num_classes=4, avoided_below=0.6, max_shift=6, spared=[0, 9]
    )
    assert rec is not None and rec.corrected == [2] and rec.spared == [0]
    assert rec.shift[0] == 0.0 and rec.shift[2] > 2.0
    again = shift_to_prior(
        twin,
        images,
        mean_probs(teacher, images),
        num_classes=4,
        avoided_below=0.6,
        max_shift=6,
        spared=[0],
    )
    assert again is not None and again.shift == rec.shift


def test_bench_prior_variants_redo_the_correction_on_the_same_student() -> None:
    """bench/prior_variants.py: "uncorrected" undoes the run's shift, a variant redoes the
    correction from it, and the run's biases are back afterwards."""
    from bench.prior_variants import prior_variants

    teacher = _net(0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[3].bias[2] -= 4.0
        student[3].bias[0] -= 4.0
    images = torch.randn(256, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    plain_bias = student[3].bias.detach().clone()
    rec = match_class_prior(student, teacher, images, num_classes=4, avoided_below=0.6, spared=[0])
    assert rec is not None
    record = {**dataclasses.asdict(rec), "avoided_below": 0.6}
    as_run = student[3].bias.detach().clone()
    seen = prior_variants(
        student,
        images,
        record,
        lambda m: {"bias": m[3].bias.tolist()},
        iterations=10,
    )
    assert seen["uncorrected"]["bias"] == pytest.approx(plain_bias.tolist(), abs=1e-4)
    assert seen["uncorrected"]["shift"] is None
    assert seen["s23 rule (nothing spared, cap 3)"]["shift"][0] > 2.0  # class 0 corrected
    assert seen["spared, cap 1"]["shift"][0] == 0.0
    assert max(seen["spared, cap 1"]["shift"]) == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(student[3].bias, as_run)
    assert "spared, rows refit (ridge 0.1)" not in seen  # no reference logits given
    weight = student[3].weight.detach().clone()
    refit = prior_variants(
        student,
        images,
        record,
        lambda m: {"bias": float(m[3].bias[2].detach())},
        iterations=10,
        reference_logits=logits_of(teacher, images),
    )
    row = refit["spared, rows refit (ridge 0.1)"]
    assert row["refit"] is not None and row["bias"] > float(plain_bias[2]) + 2.0
    assert torch.equal(student[3].weight, weight) and torch.equal(student[3].bias, as_run)
    with pytest.raises(ValueError, match="refit"):
        prior_variants(student, images, {**record, "refit": [0.1]}, lambda m: {}, iterations=1)
    # refit to the original only where the run named nothing: a named class keeps the shift
    hybrid = "rows refit to the original where nothing named (ridge 0.1), else spared, cap 1.5"
    bias_of = lambda m: {"bias": m[3].bias.tolist()}  # noqa: E731
    given = dict(iterations=10, original_logits=logits_of(teacher, images))
    named = prior_variants(student, images, record, bias_of, **given)
    assert named[hybrid] == named["spared, cap 1.5"] and named[hybrid].get("refit") is None
    unnamed = prior_variants(student, images, {**record, "spared": []}, bias_of, **given)
    assert unnamed[hybrid]["refit"] and unnamed[hybrid]["bias"][0] > float(plain_bias[0]) + 2.0
    bare = prior_variants(student, images, {**record, "spared": []}, bias_of, iterations=10)
    assert hybrid not in bare  # no original logits given
    assert torch.equal(student[3].weight, weight) and torch.equal(student[3].bias, as_run)


def test_refit_to_prior_rebuilds_the_avoided_rows_from_the_reference_logits() -> None:
    """The avoided class's row is refit toward the teacher's logits (a damaged row comes
    back closer than a bias shift brings it), the spared and the other rows stay, and the
    class's share moves toward the teacher's."""
    teacher = _net(0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[3].weight[2] *= 0.2  # the class's evidence damaged, not only its bias
        student[3].bias[2] -= 3.0
        student[3].bias[0] -= 4.0  # avoided too, but spared
    images = torch.randn(512, 3, 2, 2, generator=torch.Generator().manual_seed(6))
    reference = logits_of(teacher, images)
    shifted = copy.deepcopy(student)
    shift_to_prior(
        shifted,
        images,
        mean_probs(teacher, images),
        num_classes=4,
        max_shift=9,
        avoided_below=0.6,
        spared=[0],
    )
    rows = student[3].weight.detach().clone()
    rec = refit_to_prior(
        student, images, reference, num_classes=4, avoided_below=0.6, spared=[0], ridge=0.01
    )
    assert rec is not None and rec.corrected == [2] and rec.spared == [0]
    assert rec.refit is not None and len(rec.refit) == 1 and rec.refit[0] > 0.5
    assert torch.equal(student[3].weight[[0, 1, 3]], rows[[0, 1, 3]])
    assert rec.shift[0] == 0.0 and rec.shift[2] > 1.0
    gap_before = abs(rec.student_before[2] - rec.teacher[2])
    assert abs(rec.student_after[2] - rec.teacher[2]) < gap_before / 2
    agree = (logits_of(student, images).argmax(1) == reference.argmax(1)).float().mean()
    agree_shift = (logits_of(shifted, images).argmax(1) == reference.argmax(1)).float().mean()
    assert agree > agree_shift
