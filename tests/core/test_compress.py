"""Factorised layers and whole-model compression: exactness, budgets, errors, surgery."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnc_core.compress import CompressConfig, CompressionError, apply_surgery, compress
from cnc_core.decompose import matrix_svd, tucker2_hosvd
from cnc_core.layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d, replace_module
from cnc_core.models import create_model, list_models, model_info


def _input(arch: str, batch: int = 2) -> torch.Tensor:
    size = 32 if model_info(arch).input_size <= 32 else 64
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _model(arch: str, width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_chans=3, width=width)
    # non-trivial BN statistics, so the exactness test covers them
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 8, 3, padding=1),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(6, 8, (3, 5), padding=(1, 2), dilation=(1, 1)),
        nn.Conv2d(6, 8, 3, padding=2, dilation=2),
        nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
    ],
)
def test_tucker2_conv_equals_conv_at_full_rank(conv: nn.Conv2d) -> None:
    torch.manual_seed(0)
    layer = Tucker2Conv2d.from_conv(conv, tucker2_hosvd(conv.weight))
    x = torch.randn(2, 6, 9, 9)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)


def test_low_rank_1x1_and_linear_equal_originals_at_full_rank() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 1, stride=2, padding=1)
    x = torch.randn(2, 6, 7, 7)
    assert torch.allclose(
        LowRankConv1x1.from_conv(conv, matrix_svd(conv.weight))(x), conv(x), atol=1e-5
    )
    lin = nn.Linear(12, 5)
    v = torch.randn(3, 12)
    assert torch.allclose(
        LowRankLinear.from_linear(lin, matrix_svd(lin.weight))(v), lin(v), atol=1e-5
    )


@pytest.mark.parametrize("arch", list_models())
def test_full_rank_decomposition_is_exact_for_every_architecture(arch: str) -> None:
    model = _model(arch)
    x = _input(arch)
    config = CompressConfig(ratio=None, allocation="full", keep_dense_if_larger=False)
    result = compress(model, config)
    assert any(d.kind in ("tucker2", "svd") for d in result.decisions)
    with torch.no_grad():
        assert torch.allclose(result.model.eval()(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ratio", [2.0, 3.0, 4.0])
def test_ratio_is_met_and_reported_exactly(ratio: float) -> None:
    model = _model("resnet18", width=8)
    result = compress(model, CompressConfig(ratio=ratio))
    params = sum(p.numel() for p in result.model.parameters())
    assert result.params_after == params
    assert result.achieved_ratio >= ratio
    assert result.achieved_ratio < ratio * 1.1  # no large overshoot either
    assert result.model(_input("resnet18")).shape == (2, 10)


@pytest.mark.parametrize("allocation", ["keep_ratio", "threshold", "energy"])
def test_every_allocator_meets_a_parameter_budget(allocation: str) -> None:
    model = _model("resnet18", width=8)
    budget = sum(p.numel() for p in model.parameters()) // 3
    result = compress(model, CompressConfig(ratio=None, param_budget=budget, allocation=allocation))
    assert result.params_after <= budget


@pytest.mark.parametrize("ratio", [0.5, 0.0, -1.0, float("nan")])
def test_ratio_below_one_is_an_error(ratio: float) -> None:
    with pytest.raises(CompressionError, match="ratio must be"):
        compress(_model("simple_cnn"), CompressConfig(ratio=ratio))


def test_unreachable_ratio_names_the_best_achievable() -> None:
    with pytest.raises(CompressionError, match=r"cannot reach 1000\.00x.*smallest model"):
        compress(_model("resnet18"), CompressConfig(ratio=1000))


def test_input_model_is_not_changed() -> None:
    model = _model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compress(model, CompressConfig(ratio=3, scaling="clip", t_scale=0.5))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stem_depthwise_and_classifier_are_never_factorised() -> None:
    model = _model("mobilenet_v2")
    result = compress(model, CompressConfig(ratio=1.5))
    by_name = {d.name: d for d in result.decisions}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            assert by_name[name].kind == "skipped"
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            assert by_name[name].kind in ("skipped", "dense")
    assert by_name["classifier.1"].kind == "skipped"


def test_scaling_changes_weights_but_not_shapes_and_stem_is_only_scaled() -> None:
    model = _model("resnet18")
    result = compress(
        model, CompressConfig(ratio=None, allocation="full", scaling="clip", t_scale=0.5)
    )
    stem = {d.name: d for d in result.decisions}["conv1"]
    assert stem.kind == "dense" and stem.scaled
    assert not torch.equal(result.model.conv1.weight, model.conv1.weight)
    s = torch.linalg.svdvals(
        result.model.conv1.weight.detach().reshape(model.conv1.out_channels, -1)
    )
    assert float(s.max() / s.max()) == 1  # finite
    assert result.params_after == result.params_before


def test_preactivation_and_user_models_work_by_module_walk() -> None:
    class UserNet(nn.Module):  # outside the registry, pre-activation order
        def __init__(self) -> None:
            super().__init__()
            self.bn0 = nn.BatchNorm2d(3)
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(16)
            self.b = nn.Conv2d(16, 16, 3, padding=1)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a(torch.relu(self.bn0(x)))
            x = self.b(torch.relu(self.bn1(x)))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    net = UserNet().eval()
    result = compress(net, CompressConfig(ratio=1.3))
    assert {d.name: d.kind for d in result.decisions}["b"] == "tucker2"
    assert result.model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_surgery_record_replays_onto_a_fresh_skeleton() -> None:
    model = _model("preact_resnet18")
    result = compress(model, CompressConfig(ratio=2.5))
    skeleton = create_model("preact_resnet18", num_classes=10, width=4)
    apply_surgery(skeleton, result.surgery_record())
    skeleton.load_state_dict(result.model.state_dict())
    x = _input("preact_resnet18")
    assert torch.allclose(skeleton.eval()(x), result.model(x), atol=1e-6)


def test_replace_module_in_sequential_and_attribute() -> None:
    seq = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 3)))
    old = replace_module(seq, "1.1", nn.Identity())
    assert isinstance(old, nn.Linear) and isinstance(seq[1][1], nn.Identity)
    with pytest.raises(ValueError):
        replace_module(seq, "", nn.Identity())


def test_progress_reports_monotone_fractions() -> None:
    seen: list[tuple[str, float]] = []
    compress(
        _model("simple_cnn"), CompressConfig(ratio=1.2), progress=lambda s, f: seen.append((s, f))
    )
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {s for s, _ in seen} >= {"decompose", "allocate", "build"}


def test_min_layer_share_keeps_small_layers_dense_and_still_meets_the_budget() -> None:
    model = _model("resnet18", width=8)
    result = compress(model, CompressConfig(ratio=3, min_layer_share=0.05))
    by_name = {d.name: d for d in result.decisions}
    assert by_name["layer1.0.conv1"].kind == "dense"
    assert "min_layer_share" in by_name["layer1.0.conv1"].reason
    assert by_name["layer4.0.conv2"].kind == "tucker2"
    assert result.achieved_ratio >= 3
    with pytest.raises(CompressionError, match="min_layer_share"):
        CompressConfig(min_layer_share=1.5).validate()


def test_rank_multiple_aligns_every_factorised_rank_and_still_meets_the_budget() -> None:
    model = _model("resnet18", width=8)
    result = compress(model, CompressConfig(ratio=3, rank_multiple=8))
    factorised = [d for d in result.decisions if d.kind in ("tucker2", "svd")]
    assert factorised
    for d in factorised:
        for rank, full in zip(d.ranks, d.full_ranks, strict=True):
            assert rank % 8 == 0 or rank == full, (d.name, d.ranks, d.full_ranks)
    assert result.achieved_ratio >= 3
    plain = compress(model, CompressConfig(ratio=3))
    assert any(d.ranks[0] % 8 for d in plain.decisions if d.kind == "tucker2")
    with pytest.raises(CompressionError, match="rank_multiple"):
        CompressConfig(rank_multiple=0).validate()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50_imagenet", "mobilenet_v2"])
def test_predicted_layer_macs_equal_the_built_modules(arch: str) -> None:
    """The allocator's MAC formula per layer kind (Tucker-2 with its stride, SVD of a
    strided 1x1 conv and of a Linear, dense) equals what count_macs measures."""
    from cnc_core.compress import _decompose, _positions, find_candidates
    from cnc_core.metrics import count_macs

    model = _model(arch)
    shape = tuple(_input(arch).shape[1:])
    config = CompressConfig(ratio=2, keep_dense_if_larger=False)
    result = compress(model, config, input_shape=shape)
    eligible, _ = find_candidates(model, config)
    positions = _positions(model, [n for n, _, _ in eligible], shape)
    predicted = result.macs_before
    assert predicted == count_macs(model, shape)
    by_name = {d.name: d for d in result.decisions}
    for name, module, kind in eligible:
        c = _decompose(name, module, kind, config)  # type: ignore[arg-type]
        c.in_positions, c.out_positions = positions[name]
        d = by_name[name]
        predicted += c.macs(d.kind, d.ranks) - c.macs("dense", (0, 0))
    assert {d.kind for d in result.decisions} & {"tucker2", "svd"}
    assert predicted == result.macs_after == count_macs(result.model, shape)


def test_mac_budget_holds_beside_the_parameter_budget() -> None:
    model = _model("resnet18", width=8)
    shape = (3, 32, 32)
    params_only = compress(model, CompressConfig(ratio=2, min_layer_share=0.1), input_shape=shape)
    assert params_only.macs_before is not None and params_only.macs_after is not None
    assert params_only.target_macs is None
    # min_layer_share keeps layer1 dense: parameters fall 2x, MACs much less
    assert params_only.macs_before / params_only.macs_after < 1.5
    both = compress(
        model, CompressConfig(ratio=2, mac_ratio=1.7, min_layer_share=0.1), input_shape=shape
    )
    assert both.target_macs == int(params_only.macs_before / 1.7)
    assert both.macs_after is not None and both.macs_after <= both.target_macs
    assert both.macs_after > 0.9 * both.target_macs  # the MAC budget binds, and is spent
    assert both.achieved_ratio >= 2
    assert both.summary()["macs_after"] == both.macs_after


def test_tilted_mac_allocation_spends_the_parameter_budget_within_the_mac_budget() -> None:
    """Where the MAC budget binds first, "shared" keeps fewer ranks everywhere and leaves
    parameters unspent; "tilted" takes ranks from the high-resolution layers instead and
    spends (nearly) the whole parameter budget, within the same MAC budget."""
    model = _model("resnet18", width=8)
    shape = (3, 32, 32)
    budgets = dict(ratio=2, mac_ratio=2.5, allocation="threshold")
    shared = compress(model, CompressConfig(**budgets, mac_allocation="shared"), input_shape=shape)
    tilted = compress(model, CompressConfig(**budgets), input_shape=shape)
    assert shared.mac_tilt == 0.0 and tilted.mac_tilt > 0
    for res in (shared, tilted):
        assert res.macs_after is not None and res.target_macs is not None
        assert res.macs_after <= res.target_macs and res.achieved_ratio >= 2
    assert tilted.target_params is not None
    assert shared.params_after < 0.8 * tilted.target_params <= tilted.params_after
    assert tilted.summary()["mac_tilt"] == tilted.mac_tilt
    # without a MAC budget (or when it does not bind) nothing is tilted
    assert compress(model, CompressConfig(ratio=2), input_shape=shape).mac_tilt == 0.0
    with pytest.raises(CompressionError, match="mac_allocation"):
        CompressConfig(mac_allocation="diagonal").validate()


def test_mac_budget_errors_name_the_problem() -> None:
    model = _model("resnet18", width=8)
    with pytest.raises(CompressionError, match="input shape"):
        compress(model, CompressConfig(ratio=2, mac_ratio=2.0))
    with pytest.raises(CompressionError, match="min_layer_share=0.5"):
        compress(
            model,
            CompressConfig(ratio=2, mac_ratio=20.0, min_layer_share=0.5),
            input_shape=(3, 32, 32),
        )
    for bad in (0.5, float("inf")):
        with pytest.raises(CompressionError, match="mac_ratio"):
            CompressConfig(mac_ratio=bad).validate()
    with pytest.raises(CompressionError, match="full"):
        CompressConfig(allocation="full", ratio=None, mac_ratio=2.0).validate()
