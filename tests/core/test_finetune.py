"""Fine-tuning: shapes kept, agreement with the teacher improves, BN recalibration, cancel."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from cnc_core.progress import Cancelled
from cnc_core.purify.finetune import (
    FinetuneConfig,
    agreement,
    augment_batch,
    finetune,
    mixup_batch,
    recalibrate_bn,
)
from tests.core.test_synthesis import tiny_net


def _data(n: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * 0.7 + 0.4


def _damaged_student(teacher: nn.Module) -> nn.Module:
    import copy

    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.4 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return student


def test_finetune_improves_agreement_and_keeps_shapes() -> None:
    teacher = tiny_net(seed=1)
    student = _damaged_student(teacher)
    clean = _data(128)
    probe = _data(256, seed=9)
    before = agreement(student, teacher, probe)
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    proxies = clean + 0.1 * torch.randn_like(clean)
    labels = teacher(clean).argmax(1)
    cfg = FinetuneConfig(epochs=8, lr=5e-3, batch_size=32, holdout=0.2, patience=8)
    res = finetune(student, teacher, clean, proxies, labels, cfg)
    after = agreement(student, teacher, probe)
    assert after > before + 0.05
    assert {k: v.shape for k, v in student.state_dict().items()} == shapes
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())
    assert res.history[0]["epoch"] == 0 and len(res.history) >= 2
    assert {"kd", "proxy", "agreement", "proxy_fix", "score"} <= set(res.history[-1])
    assert 0 <= res.best_epoch <= 8 and not student.training


def test_finetune_is_deterministic_and_accepts_soft_labels() -> None:
    teacher = tiny_net(seed=2)
    clean = _data(64)
    soft = teacher(clean).detach()
    cfg = FinetuneConfig(epochs=2, batch_size=32, early_stopping=False, bn_mode="train")
    outs = []
    for _ in range(2):
        student = _damaged_student(teacher)
        finetune(student, teacher, clean, clean.flip(3), soft, cfg)
        outs.append(student(clean))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError):
        finetune(student, teacher, clean, None, None, FinetuneConfig(bn_mode="bogus"))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match="optimizer must be one of .*'lbfgs'"):
        finetune(student, teacher, clean, None, None, FinetuneConfig(optimizer="lbfgs"))
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_recalibrate_bn_matches_data_statistics() -> None:
    net = tiny_net()
    data = _data(200) * 2.0 + 1.0
    recalibrate_bn(net, data, batch_size=50)
    bn = net[1]
    with torch.no_grad():
        h = net[0](data)
    assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, h.var((0, 2, 3)), rtol=0.05)
    assert bn.momentum == 0.1 and not net.training


def test_finetune_cancels_within_one_step() -> None:
    teacher = tiny_net()
    student = _damaged_student(teacher)
    seen: list[float] = []

    def listener(stage: str, fraction: float) -> None:
        seen.append(fraction)
        if len(seen) == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        finetune(
            student,
            teacher,
            _data(64),
            None,
            None,
            FinetuneConfig(epochs=5, batch_size=8),
            progress=listener,
        )
    assert len(seen) == 2


@pytest.mark.parametrize("stamped_batch", ["separate", "joint", "both"])
def test_online_stamp_unlearns_a_planted_shortcut(stamped_batch: str) -> None:
    """Trained with a stamp, the student gives stamped images the teacher's CLEAN label,
    whether the stamped images run in their own batch, beside the clean ones or both."""
    teacher = tiny_net(seed=4)
    student = _damaged_student(teacher)
    clean = _data(96)

    def stamp(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        out = images.clone()
        out[:, :, -2:, -2:] = 3.0
        return out

    cfg = FinetuneConfig(
        epochs=6,
        lr=5e-3,
        batch_size=32,
        holdout=0.25,
        patience=6,
        augment=True,
        shift=1,
        feature_weight=1.0,
        stamped_batch=stamped_batch,
    )
    res = finetune(student, teacher, clean, None, None, cfg, stamp=stamp)
    assert "proxy_fix" in res.history[-1] and res.history[-1]["proxy"] > 0
    probe = _data(128, seed=11)
    gen = torch.Generator().manual_seed(0)
    fixed = (student(stamp(probe, gen)).argmax(1) == teacher(probe).argmax(1)).float().mean()
    before = (teacher(stamp(probe, gen)).argmax(1) == teacher(probe).argmax(1)).float().mean()
    assert fixed > 0.5 and fixed > before


def _watch_bn_batches(student: nn.Module) -> tuple[list[tuple[bool, int]], RemovableHandle]:
    """(training mode, batch size) of every forward through the student's first BN, and the
    hook's handle."""
    seen: list[tuple[bool, int]] = []
    hook = student[1].register_forward_pre_hook(
        lambda m, inp: seen.append((m.training, inp[0].shape[0]))
    )
    return seen, hook


def _one_bn_train_epoch(**overrides: object) -> FinetuneConfig:
    """One epoch in batches of 16, BN in train mode, no recalibration or early stopping."""
    base: dict[str, object] = dict(
        epochs=1,
        batch_size=16,
        bn_mode="train",
        early_stopping=False,
        recalibrate=False,
        final_recalibrate=False,
        feature_weight=1.0,
    )
    return FinetuneConfig(**{**base, **overrides})  # type: ignore[arg-type]


def test_stamped_batch_decides_which_bn_batches_the_stamped_images_join() -> None:
    """``stamped_batch``: "joint", one training forward of clean + stamped images per step,
    so BN batch statistics mix them; "separate", the stamped images are a batch of their
    own; "both", the two."""
    teacher = tiny_net(seed=4)
    clean = _data(64)

    def stamp(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.full_like(images, 5.0)

    sizes = {}
    for mode in ("separate", "joint", "both"):
        student = _damaged_student(teacher)
        seen, hook = _watch_bn_batches(student)
        cfg = _one_bn_train_epoch(stamped_batch=mode)
        res = finetune(student, teacher, clean, None, None, cfg, stamp=stamp)
        hook.remove()
        assert res.history[-1]["proxy"] > 0 and res.history[-1]["feature"] > 0
        sizes[mode] = [n for training, n in seen if training]
    assert sizes["separate"] == [16, 8] * 4  # 64 images in batches of 16, half stamped
    assert sizes["joint"] == [24] * 4
    assert sizes["both"] == [24, 8] * 4
    with pytest.raises(ValueError, match="stamped_batch"):
        finetune(student, teacher, clean, None, None, FinetuneConfig(stamped_batch="mixed"))


def test_all_to_all_stamp_takes_half_the_stamped_images_in_its_own_batch_mode() -> None:
    """With an ``all_to_all_stamp``, the stamped share is halved between the two stamps; the
    all-to-all half goes through the student as ``all_to_all_batch`` says, the other as
    ``stamped_batch``; the held-out and recalibration images are split the same way."""
    teacher = tiny_net(seed=4)
    clean = _data(64)
    calls: dict[str, list[int]] = {"first": [], "a2a": []}

    def stamp_as(name: str, value: float):  # noqa: ANN202 - a StampFn
        def stamp(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            calls[name].append(images.shape[0])
            return torch.full_like(images, value)

        return stamp

    student = _damaged_student(teacher)
    seen, hook = _watch_bn_batches(student)
    cfg = _one_bn_train_epoch(
        recalibrate=True, recal_stamped=0.25, stamped_batch="separate", all_to_all_batch="joint"
    )
    res = finetune(
        student,
        teacher,
        clean,
        None,
        None,
        cfg,
        stamp=stamp_as("first", 5.0),
        all_to_all_stamp=stamp_as("a2a", -5.0),
    )
    hook.remove()
    assert res.history[-1]["proxy"] > 0
    # recalibration: 16 stamped copies, 8 each; then 4 steps of 16 clean + 8 stamped
    assert calls["first"] == [8] + [4] * 4 and calls["a2a"] == [8] + [4] * 4
    assert [n for training, n in seen if training][-8:] == [20, 4] * 4
    with pytest.raises(ValueError, match="all_to_all_batch"):
        finetune(student, teacher, clean, None, None, FinetuneConfig(all_to_all_batch="mixed"))


def test_stamped_loss_weighs_each_half_by_its_weight_and_share() -> None:
    """``_stamped_loss``: per stamp, the mean over the passes its images went through, times
    its weight and its share of the stamped images."""
    from cnc_core.purify.finetune import _proxy_loss, _stamped_loss, _StampGroup

    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(6, 4, generator=g)
    joint, own = torch.randn(2, 4, generator=g), torch.randn(6, 4, generator=g)

    def noop(x: torch.Tensor, _g: torch.Generator) -> torch.Tensor:
        return x

    groups = [_StampGroup(noop, 0, 4, "separate", 2.0), _StampGroup(noop, 4, 6, "both", 5.0)]
    cfg = FinetuneConfig()
    labels = teacher_logits.argmax(1)

    def ce(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _proxy_loss(o, y, cfg.temperature)

    expected = (
        2.0 * ce(own[:4], labels[:4]) * 4 / 6
        + 5.0 * ((ce(joint, labels[4:]) + ce(own[4:], labels[4:])) / 2) * 2 / 6
    )
    got = _stamped_loss(groups, joint, own, teacher_logits, cfg)
    assert torch.allclose(got, expected)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_recal_stamped_puts_stamped_copies_into_the_bn_statistics(share: float) -> None:
    """With ``recal_stamped`` the BN running mean is that of the clean images plus stamped
    copies of that share of them; 0 keeps the clean-only statistics."""
    teacher = tiny_net(seed=4)
    student = _damaged_student(teacher)
    clean = _data(64)

    def stamp(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.full_like(images, 5.0)  # the same loud image whatever the source

    cfg = FinetuneConfig(epochs=1, lr=0.0, batch_size=16, recal_stamped=share)
    finetune(student, teacher, clean, None, None, cfg, stamp=stamp)
    k = int(round(share * clean.shape[0]))
    with torch.no_grad():
        h_clean = student[0](clean)
        h_stamped = student[0](torch.full_like(clean[:k], 5.0))
    expected = torch.cat([h_clean, h_stamped]).mean((0, 2, 3))
    assert torch.allclose(student[1].running_mean, expected, atol=1e-4)


def test_augment_batch_shifts_and_flips() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, g, shift=0, flip=False), x)
    flipped = augment_batch(x, torch.Generator().manual_seed(1), shift=0, flip=True)
    pairs = zip(flipped, x, strict=True)
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in pairs)
    shifted = augment_batch(x, g, shift=2, flip=False)
    assert shifted.shape == x.shape and not torch.equal(shifted, x)


def test_mixup_batch_blends_each_image_with_another_and_mostly_keeps_itself() -> None:
    x = torch.stack([torch.full((3, 4, 4), float(i)) for i in range(16)])
    mixed = mixup_batch(x, torch.Generator().manual_seed(0), alpha=1.0)
    again = mixup_batch(x, torch.Generator().manual_seed(0), alpha=1.0)
    assert torch.equal(mixed, again)  # seeded by the generator, not by torch's global RNG
    assert not torch.equal(mixed, x)
    # each image is a constant again (a convex mix of two constants), within the batch's range
    assert torch.allclose(mixed, mixed.mean(dim=(1, 2, 3), keepdim=True).expand_as(mixed))
    assert float(mixed.min()) >= 0.0 and float(mixed.max()) <= 15.0
    # folded weight >= 0.5: each image stays nearer itself than the batch's farthest image
    own = x[:, 0, 0, 0]
    assert ((mixed[:, 0, 0, 0] - own).abs() <= 7.5 + 1e-5).all()


def test_finetune_with_mixup_runs_the_teacher_each_step_and_improves_agreement() -> None:
    teacher = tiny_net(seed=1)
    student = _damaged_student(teacher)
    clean = _data(128)
    probe = _data(256, seed=9)
    before = agreement(student, teacher, probe)
    cfg = FinetuneConfig(epochs=8, lr=5e-3, batch_size=32, holdout=0.2, patience=8, mixup=1.0)
    res = finetune(student, teacher, clean, None, None, cfg)
    assert agreement(student, teacher, probe) > before + 0.05
    assert len(res.history) >= 2


@pytest.mark.parametrize("cached", [True, False])
def test_logit_teacher_share_teaches_the_second_teachers_labels(
    cached: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``logit_teacher_share=1`` the student learns the logit teacher's labels (the BN
    outputs still distilled from the first teacher); with share 0 the second is ignored."""
    import cnc_core.purify.finetune as ft

    if not cached:
        monkeypatch.setattr(ft, "TEACHER_CACHE_BYTES", 0)  # the teacher runs each step
    teacher, other = tiny_net(seed=1), tiny_net(seed=7)
    clean = _data(128)
    probe = _data(256, seed=9)
    assert agreement(teacher, other, probe) < 0.6  # two teachers that disagree
    cfg = FinetuneConfig(
        epochs=8, lr=5e-3, batch_size=32, holdout=0.2, patience=8, feature_weight=1.0
    )
    mixed, plain = _damaged_student(teacher), _damaged_student(teacher)
    finetune(mixed, teacher, clean, None, None, cfg, logit_teacher=other)  # share 0: ignored
    res = finetune(
        plain,
        teacher,
        clean,
        None,
        None,
        FinetuneConfig(**{**cfg.__dict__, "logit_teacher_share": 1.0}),
        logit_teacher=other,
    )
    assert agreement(plain, other, probe) > agreement(mixed, other, probe) + 0.1
    assert agreement(mixed, teacher, probe) > agreement(mixed, other, probe)
    # the held-out criterion scores agreement with the mixed target, which training raises
    assert res.history[-1]["agreement"] > res.history[0]["agreement"]
    assert not any(m._forward_hooks for m in other.modules())


def test_logit_teacher_on_agreed_keeps_the_first_teachers_labels_where_they_disagree() -> None:
    teacher, other = tiny_net(seed=1), tiny_net(seed=7)
    clean = _data(128)
    probe = _data(256, seed=9)
    cfg = FinetuneConfig(
        epochs=8, lr=5e-3, batch_size=32, holdout=0.2, patience=8, logit_teacher_share=1.0
    )
    everywhere, agreed = _damaged_student(teacher), _damaged_student(teacher)
    finetune(everywhere, teacher, clean, None, None, cfg, logit_teacher=other)
    finetune(
        agreed,
        teacher,
        clean,
        None,
        None,
        FinetuneConfig(**{**cfg.__dict__, "logit_teacher_on": "agreed"}),
        logit_teacher=other,
    )
    with torch.no_grad():
        t, o = teacher(probe).argmax(1), other(probe).argmax(1)
        disputed = t != o
        assert int(disputed.sum()) > 50
        follows_teacher = {
            name: float((m(probe).argmax(1) == t)[disputed].float().mean())
            for name, m in (("everywhere", everywhere.eval()), ("agreed", agreed.eval()))
        }
    assert follows_teacher["agreed"] > follows_teacher["everywhere"] + 0.2
    with pytest.raises(ValueError, match="logit_teacher_on"):
        finetune(agreed, teacher, clean, None, None, FinetuneConfig(logit_teacher_on="some"))


def test_feature_distillation_matches_bn_outputs_and_removes_its_hooks() -> None:
    teacher = tiny_net(seed=3)
    clean = _data(128)
    probe = _data(64, seed=11)

    def feature_gap(student: nn.Module) -> float:
        gaps = []
        taps: dict[str, list[torch.Tensor]] = {}
        handles = [
            m.register_forward_hook(lambda _m, _i, o, n=n: taps.setdefault(n, []).append(o))
            for model in (student, teacher)
            for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d)
        ]
        with torch.no_grad():
            student.eval()
            teacher.eval()
            student(probe)
            teacher(probe)
        for h in handles:
            h.remove()
        for s_out, t_out in taps.values():
            gaps.append(float((s_out - t_out).pow(2).mean() / t_out.pow(2).mean()))
        return sum(gaps) / len(gaps)

    cfg = FinetuneConfig(epochs=6, lr=5e-3, batch_size=32, early_stopping=False)
    plain, feat = _damaged_student(teacher), _damaged_student(teacher)
    finetune(plain, teacher, clean, None, None, cfg)
    res = finetune(
        feat, teacher, clean, None, None, FinetuneConfig(**{**cfg.__dict__, "feature_weight": 5.0})
    )
    assert res.history[-1]["feature"] > 0
    assert feature_gap(feat) < feature_gap(plain)
    # every hook is gone: the teacher and student run without collecting anything
    assert not any(m._forward_hooks for m in teacher.modules())
    assert not any(m._forward_hooks for m in feat.modules())


def test_feature_depth_distils_only_the_shallowest_bn_layers() -> None:
    from cnc_core.purify.finetune import _BNTaps

    teacher = tiny_net(seed=1)
    student = _damaged_student(teacher)
    bns = [n for n, m in student.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) >= 2
    taps = _BNTaps(student, teacher, depth=0.5)
    try:
        assert taps.names == bns[: round(0.5 * len(bns))]
    finally:
        taps.close()
    # any depth keeps at least the first layer
    tiny = _BNTaps(student, teacher, depth=0.01)
    assert tiny.names == bns[:1]
    tiny.close()


def test_cached_teacher_outputs_train_the_same_student_as_running_the_teacher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The teacher's logits and BN outputs looked up from a cache (fixed, unaugmented training
    images) give the student the same training as running the teacher on every batch."""
    import cnc_core.purify.finetune as ft

    teacher = tiny_net(seed=4)
    clean = _data(96)
    cfg = FinetuneConfig(
        epochs=3, lr=5e-3, batch_size=32, feature_weight=5.0, bn_mode="train", holdout=0.2
    )
    cached, direct = _damaged_student(teacher), _damaged_student(teacher)
    res_cached = finetune(cached, teacher, clean, None, None, cfg)
    monkeypatch.setattr(ft, "TEACHER_CACHE_BYTES", 0)  # too small: the teacher runs each step
    res_direct = finetune(direct, teacher, clean, None, None, cfg)
    for a, b in zip(res_cached.history, res_direct.history, strict=True):
        assert a.keys() == b.keys()
        assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    for name, value in cached.state_dict().items():
        assert torch.allclose(value.float(), direct.state_dict()[name].float(), atol=1e-5)
    assert res_cached.history[-1]["feature"] > 0
    assert not any(m._forward_hooks for m in teacher.modules())


def test_weight_average_of_the_last_epoch_is_that_epoch_and_of_more_is_their_mean() -> None:
    """``average_from``: averaging only the last epoch returns the plain run's weights;
    averaging two epochs returns the mean of the weights after each (BN statistics
    re-estimated, here in eval mode: averaged with the rest)."""
    teacher = tiny_net(seed=2)
    clean = _data(64)
    base = dict(epochs=3, batch_size=32, early_stopping=False, bn_mode="eval")

    def run(**kw: object) -> tuple[nn.Module, object, list[dict[str, torch.Tensor]]]:
        student = _damaged_student(teacher)
        states: list[dict[str, torch.Tensor]] = []
        cfg = FinetuneConfig(**{**base, **kw})  # type: ignore[arg-type]
        # the weights after each epoch, read through the progress callback at epoch ends
        steps = 2  # 64 images in batches of 32

        def grab(_stage: str, frac: float) -> None:
            if round(frac * cfg.epochs * steps) % steps == 0:
                states.append({k: v.clone() for k, v in student.state_dict().items()})

        res = finetune(student, teacher, clean, None, None, cfg, progress=grab)
        return student, res, states

    plain, _, states = run()
    last, res_last, _ = run(average_from=3)
    assert res_last.averaged and res_last.averaged_epochs == 1
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in last.state_dict().items())
    two, res_two, _ = run(average_from=2)
    assert res_two.averaged_epochs == 2
    mean = {
        k: (states[1][k] + states[2][k]) / 2 for k, v in states[1].items() if v.is_floating_point()
    }
    got = two.state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in mean.items())
    assert len(states) == 3 and not torch.allclose(got["0.weight"], states[2]["0.weight"])


def test_weight_average_competes_with_the_best_epoch_by_the_held_out_score() -> None:
    teacher = tiny_net(seed=1)
    student = _damaged_student(teacher)
    clean = _data(128)
    cfg = FinetuneConfig(epochs=4, lr=5e-3, batch_size=32, holdout=0.2, patience=4, average_from=2)
    res = finetune(student, teacher, clean, None, None, cfg)
    assert res.averaged_epochs == 3 and res.averaged_score is not None
    assert res.averaged == (res.averaged_score >= res.best_score)
