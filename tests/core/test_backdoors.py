from __future__ import annotations

import pytest
import torch

from cnc_core.backdoors import (
    ATTACKS,
    Attack,
    attack_labels,
    create_attack,
    list_attacks,
    make_poisoned_testset,
    plan_poison,
    poison_dataset,
    register_attack,
)
from cnc_core.backdoors.badnet import BadNet


def _images(n: int = 16, seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Fashion-MNIST-like: dark border, content in the middle.
    x = torch.zeros(n, 3, size, size)
    x[:, :, 4:-4, 4:-4] = torch.rand(n, 1, size - 8, size - 8, generator=g)
    return x


def _labels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))


def test_registry_has_the_four_attacks() -> None:
    assert list_attacks() == ["badnet", "blended", "inputaware", "wanet"]
    with pytest.raises(ValueError, match="unknown attack"):
        create_attack("trojannn")
    with pytest.raises(ValueError, match="registered twice"):
        register_attack(type("Dup", (BadNet,), {"name": "badnet"}))


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_apply_changes_images_in_range(name: str) -> None:
    attack = create_attack(name, seed=0)
    x = _images()
    before = x.clone()
    out = attack.apply(x)
    assert torch.equal(x, before), "apply must not modify its input"
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    changed = (out - x).abs().flatten(1).amax(1)
    assert torch.all(changed > 0.01), "every image must carry the trigger"
    assert torch.equal(create_attack(name, seed=0).apply(x), out), "same seed, same trigger"


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_apply_rejects_wrong_shapes(name: str) -> None:
    attack = create_attack(name)
    with pytest.raises(ValueError):
        attack.apply(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError):
        attack.apply(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError):
        attack.apply(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("name", ["blended", "wanet", "inputaware"])
def test_seed_changes_trigger(name: str) -> None:
    x = _images()
    a, b = create_attack(name, seed=0), create_attack(name, seed=1)
    assert not torch.allclose(a.apply(x), b.apply(x))


def test_badnet_patch() -> None:
    x = _images()
    out = create_attack("badnet").apply(x)
    assert torch.all(out[..., -3:, -3:] == 1.0)
    assert torch.equal(out[..., :-3, :], x[..., :-3, :])
    assert torch.equal(out[..., :, :-3], x[..., :, :-3])


def test_blended_formula() -> None:
    attack = create_attack("blended", alpha=0.2)
    x = _images()
    expected = 0.8 * x + 0.2 * attack.pattern  # type: ignore[attr-defined]
    assert torch.allclose(attack.apply(x), expected)


def test_wanet_zero_strength_is_identity_and_default_warps() -> None:
    x = _images()
    assert torch.allclose(create_attack("wanet", s=0.0).apply(x), x, atol=1e-5)
    warped = create_attack("wanet").apply(x)
    # Imperceptible but real: small mean change, larger at edges of content.
    diff = (warped - x).abs()
    assert 1e-3 < float(diff.mean()) < 0.1


def test_inputaware_trigger_depends_on_input() -> None:
    attack = create_attack("inputaware")
    x = _images(4)
    pattern, mask = attack.pattern_and_mask(x)  # type: ignore[attr-defined]
    assert mask.shape == (4, 1, 32, 32)
    density = mask.flatten(1).mean(1)
    assert torch.allclose(density, torch.full((4,), 0.05), atol=0.01)
    assert not torch.equal(mask[0], mask[1]), "masks must differ between inputs"
    assert not torch.allclose(pattern[0], pattern[1]), "patterns must differ between inputs"
    assert float(pattern.min()) >= 0.0 and float(pattern.max()) <= 1.0


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_cross_samples(name: str) -> None:
    attack = create_attack(name)
    x = _images(8)
    g = torch.Generator().manual_seed(3)
    if attack.cross_ratio == 0:
        with pytest.raises(NotImplementedError):
            attack.apply_cross(x, g)
        return
    cross = attack.apply_cross(x, g)
    assert cross.shape == x.shape
    assert float(cross.min()) >= 0.0 and float(cross.max()) <= 1.0
    assert not torch.allclose(cross, x) and not torch.allclose(cross, attack.apply(x))


def test_attack_labels() -> None:
    y = torch.tensor([0, 1, 5, 9])
    assert attack_labels(y, "all2one", target=2).tolist() == [2, 2, 2, 2]
    assert attack_labels(y, "all2all", num_classes=10).tolist() == [1, 2, 6, 0]
    with pytest.raises(ValueError, match="mode"):
        attack_labels(y, "one2one")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_poison_dataset_all2one(name: str) -> None:
    n = 200
    x, y = _images(n), _labels(n)
    attack = create_attack(name)
    out = poison_dataset(x, y, attack, mode="all2one", target=0, rate=0.1, seed=0)
    pm, cm = out.poison_mask, out.cross_mask
    assert int(pm.sum()) == 20
    assert int(cm.sum()) == round(attack.cross_ratio * 20)
    assert not torch.any(pm & cm)
    assert torch.all(y[pm] != 0), "target-class images are never poisoned"
    assert torch.all(out.labels[pm] == 0)
    assert torch.equal(out.labels[~pm], y[~pm]), "cross and clean samples keep true labels"
    assert torch.equal(out.images[~pm & ~cm], x[~pm & ~cm])
    assert torch.allclose(out.images[pm], attack.apply(x[pm]))
    assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0


def test_poison_dataset_all2all() -> None:
    n = 300
    x, y = _images(n), _labels(n)
    out = poison_dataset(x, y, create_attack("badnet"), mode="all2all", rate=0.1, seed=1)
    pm = out.poison_mask
    assert int(pm.sum()) == 30
    assert torch.equal(out.labels[pm], (y[pm] + 1) % 10)
    assert torch.equal(out.labels[~pm], y[~pm])


def test_plan_is_seeded_and_validated() -> None:
    y = _labels(100)
    a = plan_poison(y, rate=0.2, cross_ratio=1.0, seed=5)
    b = plan_poison(y, rate=0.2, cross_ratio=1.0, seed=5)
    c = plan_poison(y, rate=0.2, cross_ratio=1.0, seed=6)
    assert torch.equal(a.poison_mask, b.poison_mask) and torch.equal(a.cross_mask, b.cross_mask)
    assert not torch.equal(a.poison_mask, c.poison_mask)
    assert a.num_poison == 20 and a.num_cross == 20
    with pytest.raises(ValueError, match="rate"):
        plan_poison(y, rate=1.5)
    with pytest.raises(ValueError, match="mode"):
        plan_poison(y, mode="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eligible"):
        plan_poison(torch.zeros(10, dtype=torch.long), rate=0.5, target=0)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_make_poisoned_testset(name: str) -> None:
    x, y = _images(50), _labels(50)
    attack: Attack = create_attack(name)
    xp, yp = make_poisoned_testset(x, y, attack, mode="all2one", target=3)
    keep = y != 3
    assert xp.shape[0] == int(keep.sum()) < 50
    assert torch.all(yp == 3)
    assert torch.allclose(xp, attack.apply(x[keep]))
    xa, ya = make_poisoned_testset(x, y, attack, mode="all2all")
    assert xa.shape[0] == 50 and torch.equal(ya, (y + 1) % 10)
