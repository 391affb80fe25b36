"""Class-prior correction (cnc_core.purify.calibrate)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cnc_core.purify.calibrate import classifier, match_class_prior, mean_probs


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
