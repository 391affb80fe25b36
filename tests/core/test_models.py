"""Tests of the architecture registry ``cnc_core.models``.

Key names and parameter counts are checked against torchvision's and BackdoorBench's published
architectures (torchvision cannot be imported beside this torch, so the reference values are
hard-coded: torchvision resnet18 has 122 state-dict entries and 11,689,512 parameters, etc.).
Full-width models are built on the meta device, which allocates nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_core.models import (
    ModelInfo,
    _registry,
    create_model,
    list_models,
    model_info,
    register_model,
)

EXPECTED_MODELS = {
    "mobilenet_v2",
    "mobilenet_v2_imagenet",
    "preact_resnet18",
    "resnet18",
    "resnet18_imagenet",
    "resnet34",
    "resnet34_imagenet",
    "resnet50_imagenet",
    "simple_cnn",
    "vgg19_bn",
    "vgg19_bn_cifar",
}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _small(name: str, num_classes: int = 7, in_chans: int = 3) -> nn.Module:
    # width 8 everywhere: a quarter (mobilenet) to an eighth (resnet/vgg) of the standard net.
    return create_model(name, num_classes=num_classes, in_chans=in_chans, width=8)


def _test_input_size(name: str) -> int:
    # ImageNet stems are exercised at 64x64 to stay fast; they pool globally anyway.
    return min(model_info(name).input_size, 64)


# --------------------------------------------------------------------------- registry


def test_list_models_is_sorted_and_complete() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(names) == EXPECTED_MODELS
    assert list_models(family="resnet") == [
        "resnet18",
        "resnet18_imagenet",
        "resnet34",
        "resnet34_imagenet",
        "resnet50_imagenet",
    ]
    assert list_models(family="no-such-family") == []


def test_model_info_defaults() -> None:
    assert model_info("resnet18") == ModelInfo(
        name="resnet18",
        family="resnet",
        input_size=32,
        default_width=64,
        description=model_info("resnet18").description,
        extra_kwargs=("zero_init_residual",),
    )
    assert model_info("resnet50_imagenet").input_size == 224
    assert model_info("mobilenet_v2_imagenet").input_size == 224
    assert model_info("mobilenet_v2").default_width == 32
    assert model_info("simple_cnn").default_width == 16
    assert model_info("preact_resnet18").family == "preact_resnet"
    assert "torchvision" in model_info("vgg19_bn").description
    with pytest.raises(dataclasses.FrozenInstanceError):
        model_info("resnet18").input_size = 3  # type: ignore[misc]


def test_unknown_arch_names_it_and_lists_known() -> None:
    with pytest.raises(ValueError, match="resnet19") as exc:
        create_model("resnet19")
    assert "resnet18" in str(exc.value) and "mobilenet_v2" in str(exc.value)
    with pytest.raises(ValueError, match="known"):
        model_info("nope")


def test_bad_kwargs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"depth.*zero_init_residual"):
        create_model("resnet18", width=4, depth=50)
    with pytest.raises(ValueError, match="accepted extras: none"):
        create_model("simple_cnn", width=4, dropout=0.1)
    for bad in (
        {"width": 0},
        {"width": True},
        {"width": 2.0},
        {"num_classes": 0},
        {"in_chans": -1},
    ):
        with pytest.raises(ValueError, match="positive integer"):
            create_model("simple_cnn", **bad)


def test_extra_kwargs_are_forwarded() -> None:
    m: Any = create_model("mobilenet_v2", width=8, dropout=0.0)
    assert m.classifier[0].p == 0.0
    r: Any = create_model("resnet18", width=4, zero_init_residual=True)
    assert torch.all(r.layer1[0].bn2.weight == 0)


def test_width_none_takes_the_default() -> None:
    with torch.device("meta"):
        m: Any = create_model("mobilenet_v2_imagenet", num_classes=1000)
    assert m.features[0][0].out_channels == 32


def test_register_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))

    @register_model(family="toy", input_size=8, default_width=2)
    def toy_net(num_classes: int, in_chans: int, width: int, *, bias: bool = True) -> nn.Module:
        """A toy.

        More text that is not part of the description.
        """
        return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 64, num_classes, bias=bias))

    assert "toy_net" in list_models()
    info = model_info("toy_net")
    assert (info.family, info.input_size, info.default_width) == ("toy", 8, 2)
    assert info.description == "A toy."
    assert info.extra_kwargs == ("bias",)
    model: Any = create_model("toy_net", num_classes=3, in_chans=2, bias=False)
    assert model(torch.zeros(4, 2, 8, 8)).shape == (4, 3)

    with pytest.raises(ValueError, match="already registered"):
        register_model(name="toy_net")(toy_net)

    def no_width(num_classes: int, in_chans: int) -> nn.Module:
        return nn.Identity()

    with pytest.raises(TypeError, match="width"):
        register_model(no_width)


# --------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", list_models())
def test_forward_shape(name: str) -> None:
    torch.manual_seed(0)
    model = _small(name, num_classes=7, in_chans=1)
    assert model.training  # freshly built models are in train mode, like torchvision's
    size = _test_input_size(name)
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", list_models())
def test_modules_are_surgery_friendly(name: str) -> None:
    """Every Conv2d/Linear/activation is a module called exactly once per forward."""
    model = _small(name).eval()
    calls: dict[str, int] = {}
    hooked = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6)
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            assert not module.inplace, f"{mod_name} is in-place"
        if isinstance(module, hooked):
            calls[mod_name] = 0

            def hook(_m: nn.Module, _i: object, _o: Tensor, key: str = mod_name) -> None:
                calls[key] += 1

            module.register_forward_hook(hook)
    size = _test_input_size(name)
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    assert calls and all(v == 1 for v in calls.values()), {k: v for k, v in calls.items() if v != 1}


@pytest.mark.parametrize("name", list_models())
def test_seeded_builds_are_identical(name: str) -> None:
    torch.manual_seed(123)
    a = _small(name).state_dict()
    torch.manual_seed(123)
    b = _small(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list_models())
def test_init_is_standard(name: str) -> None:
    model = _small(name)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
        if isinstance(module, nn.Conv2d):
            assert module.weight.std() > 0


# --------------------------------------------------------------------------- exact layouts

# torchvision and BackdoorBench parameter counts (num_classes in the key).
KNOWN_PARAM_COUNTS = [
    ("resnet18", 10, 11_173_962),  # CIFAR ResNet-18: the paper's 11.17M
    ("resnet34", 10, 21_282_122),  # CIFAR ResNet-34 (kuangliu)
    ("resnet18_imagenet", 1000, 11_689_512),  # torchvision resnet18
    ("resnet34_imagenet", 1000, 21_797_672),  # torchvision resnet34
    ("resnet50_imagenet", 1000, 25_557_032),  # torchvision resnet50
    ("mobilenet_v2_imagenet", 1000, 3_504_872),  # torchvision mobilenet_v2
    ("mobilenet_v2", 10, 2_236_682),  # strides hold no parameters
    ("vgg19_bn", 1000, 143_678_248),  # torchvision vgg19_bn
    ("vgg19_bn_cifar", 10, 20_040_522),  # kuangliu VGG('VGG19')
    ("preact_resnet18", 10, 11_171_146),  # BackdoorBench PreActResNet18
]


@pytest.mark.parametrize(("name", "num_classes", "expected"), KNOWN_PARAM_COUNTS)
def test_param_counts_at_standard_width(name: str, num_classes: int, expected: int) -> None:
    with torch.device("meta"):
        model: Any = create_model(name, num_classes=num_classes)
    assert _num_params(model) == expected


def test_simple_cnn_is_small() -> None:
    assert _num_params(create_model("simple_cnn", width=8)) == 4_514


def _keys(name: str, num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model: Any = create_model(name, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_resnet18_cifar_keys() -> None:
    keys = _keys("resnet18")
    assert len(keys) == 122  # same entries as torchvision resnet18
    assert keys["conv1.weight"] == (64, 3, 3, 3)  # the CIFAR stem
    assert keys["layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert keys["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert keys["layer2.0.downsample.1.running_var"] == (128,)
    assert keys["layer4.1.bn2.running_var"] == (512,)
    assert keys["layer4.1.bn2.num_batches_tracked"] == ()
    assert keys["fc.weight"] == (10, 512)
    assert keys["fc.bias"] == (10,)
    assert not any(k.startswith("layer1.0.downsample") for k in keys)
    assert not any(k.startswith("layer2.1.downsample") for k in keys)


def test_resnet18_imagenet_keys() -> None:
    keys = _keys("resnet18_imagenet", 1000)
    assert len(keys) == 122
    assert keys["conv1.weight"] == (64, 3, 7, 7)
    assert keys["bn1.running_mean"] == (64,)
    assert keys["layer3.0.downsample.0.weight"] == (256, 128, 1, 1)
    assert keys["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert keys["fc.weight"] == (1000, 512)


def test_resnet50_imagenet_keys() -> None:
    keys = _keys("resnet50_imagenet", 1000)
    assert len(keys) == 320
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.weight": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),  # stride on the 3x3 (v1.5)
        "layer3.5.bn3.running_var": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "layer4.2.bn3.bias": (2048,),
        "fc.weight": (1000, 2048),
    }
    assert {k: keys[k] for k in expected} == expected
    assert "layer1.1.downsample.0.weight" not in keys


def _mobilenet_v2_reference_keys() -> list[str]:
    """torchvision mobilenet_v2 state-dict names without ``num_batches_tracked``, as listed by
    a torchvision ``load_state_dict`` error; spelled out per block type."""

    def bn(prefix: str) -> list[str]:
        return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var")]

    keys = ["features.0.0.weight", *bn("features.0.1")]
    keys += ["features.1.conv.0.0.weight", *bn("features.1.conv.0.1")]
    keys += ["features.1.conv.1.weight", *bn("features.1.conv.2")]
    for i in range(2, 18):
        p = f"features.{i}.conv"
        keys += [f"{p}.0.0.weight", *bn(f"{p}.0.1"), f"{p}.1.0.weight", *bn(f"{p}.1.1")]
        keys += [f"{p}.2.weight", *bn(f"{p}.3")]
    keys += [
        "features.18.0.weight",
        *bn("features.18.1"),
        "classifier.1.weight",
        "classifier.1.bias",
    ]
    return keys


@pytest.mark.parametrize("name", ["mobilenet_v2_imagenet", "mobilenet_v2"])
def test_mobilenet_v2_keys(name: str) -> None:
    keys = _keys(name, 1000)
    assert len(keys) == 314
    assert [k for k in keys if not k.endswith("num_batches_tracked")] == (
        _mobilenet_v2_reference_keys()
    )
    assert keys["features.0.0.weight"] == (32, 3, 3, 3)
    assert keys["features.1.conv.0.0.weight"] == (32, 1, 3, 3)  # depthwise
    assert keys["features.2.conv.0.0.weight"] == (96, 16, 1, 1)  # expand x6
    assert keys["features.17.conv.2.weight"] == (320, 960, 1, 1)
    assert keys["features.18.0.weight"] == (1280, 320, 1, 1)
    assert keys["classifier.1.weight"] == (1000, 1280)


def test_vgg19_bn_keys() -> None:
    tv = _keys("vgg19_bn", 1000)
    assert tv["features.0.weight"] == (64, 3, 3, 3)
    assert tv["features.0.bias"] == (64,)  # VGG convs keep their bias
    assert tv["features.1.running_var"] == (64,)
    assert tv["features.7.weight"] == (128, 64, 3, 3)  # after the first max-pool (index 6)
    assert tv["features.49.weight"] == (512, 512, 3, 3)
    assert tv["features.50.weight"] == (512,)
    assert tv["classifier.0.weight"] == (4096, 512 * 7 * 7)
    assert tv["classifier.3.weight"] == (4096, 4096)
    assert tv["classifier.6.weight"] == (1000, 4096)
    assert len(tv) == 16 * 2 + 16 * 5 + 3 * 2
    cifar = _keys("vgg19_bn_cifar")
    assert {k: v for k, v in cifar.items() if k.startswith("features.")} == {
        k: v for k, v in tv.items() if k.startswith("features.")
    }
    assert cifar["classifier.weight"] == (10, 512)


def test_preact_resnet18_keys() -> None:
    keys = _keys("preact_resnet18")
    assert keys["conv1.weight"] == (64, 3, 3, 3)
    assert "bn1.weight" not in keys  # no stem BN in BackdoorBench's version
    assert keys["layer1.0.bn1.weight"] == (64,)
    assert keys["layer2.0.shortcut.0.weight"] == (128, 64, 1, 1)
    assert "layer2.0.shortcut.1.weight" not in keys  # projection without BN
    assert not any("layer1.0.shortcut" in k or "layer2.1.shortcut" in k for k in keys)
    assert keys["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert keys["linear.weight"] == (10, 512)
    assert not any(k.startswith(("bn.", "fc.")) for k in keys)


# --------------------------------------------------------------------------- behaviour


class _BackdoorBenchPreActBlock(nn.Module):
    """BackdoorBench's PreActBlock forward, written as there (F.relu, in-place add)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class _BackdoorBenchPreActResNet18(nn.Module):
    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        planes, layers = width, []
        for i, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**i
            layers.append(
                nn.Sequential(
                    _BackdoorBenchPreActBlock(planes, out, stride),
                    _BackdoorBenchPreActBlock(out, out, 1),
                )
            )
            planes = out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).view(out.size(0), -1))


def test_preact_resnet18_matches_backdoorbench_forward() -> None:
    torch.manual_seed(0)
    reference = _BackdoorBenchPreActResNet18(num_classes=5, width=8)
    with torch.no_grad():  # non-trivial BN statistics so eval mode tests them
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ours: Any = create_model("preact_resnet18", num_classes=5, width=8)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    reference.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


def test_mobilenet_v2_variants_share_weights_not_strides() -> None:
    torch.manual_seed(0)
    cifar: Any = create_model("mobilenet_v2", num_classes=10, width=8).eval()
    imagenet: Any = create_model("mobilenet_v2_imagenet", num_classes=10, width=8).eval()
    imagenet.load_state_dict(cifar.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert cifar.features(x).shape[-2:] == (4, 4)  # stem and 24-ch stage at stride 1
        assert imagenet.features(x).shape[-2:] == (1, 1)


def test_width_scales_channels() -> None:
    r: Any = create_model("resnet18", width=16)
    assert (r.conv1.out_channels, r.layer4[1].conv2.out_channels, r.fc.in_features) == (
        16,
        128,
        128,
    )
    r50: Any = create_model("resnet50_imagenet", width=8)
    assert r50.fc.in_features == 8 * 8 * 4
    p: Any = create_model("preact_resnet18", width=16)
    assert p.linear.in_features == 128
    v: Any = create_model("vgg19_bn_cifar", width=16)
    assert (v.features[0].out_channels, v.classifier.in_features) == (16, 128)
    vt: Any = create_model("vgg19_bn", width=4)
    assert vt.classifier[0].weight.shape == (256, 32 * 49)
    m: Any = create_model("mobilenet_v2", width=16)  # width_mult 0.5, torchvision rounding
    assert m.features[0][0].out_channels == 16
    assert m.features[17].conv[2].out_channels == 160
    assert m.classifier[1].in_features == 1280  # torchvision keeps 1280 when width_mult < 1
    wide: Any = create_model("mobilenet_v2", width=64)
    assert wide.classifier[1].in_features == 2560
    s: Any = create_model("simple_cnn", width=3)
    assert s.fc.in_features == 6
    # VGG's proportional scaling floors but never reaches zero channels.
    tiny: Any = create_model("vgg19_bn_cifar", width=1)
    assert min(c.out_channels for c in tiny.modules() if isinstance(c, nn.Conv2d)) == 1


def test_cifar_resnet_keeps_resolution() -> None:
    model: Any = create_model("resnet18", width=4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = model.layer4(
            model.layer3(model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x))))))
        )
    assert feats.shape[-2:] == (4, 4)
