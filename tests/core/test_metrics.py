"""Parameter, byte, MAC and latency counts checked against hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cnc_core.metrics import (
    LatencyResult,
    count_macs,
    count_params,
    measure_latency,
    model_bytes,
    model_stats,
)
from tests.core.fixtures import tiny_convnet

# TinyConvNet(num_classes=10, width=4, in_chans=3) on a 3x8x8 input, by hand:
#   conv1 3->4 k3 pad1 no bias: 4*3*9 = 108 params; 4*8*8 outputs * 3*9      = 6912 MACs
#   bn1: 2*4 = 8 params; buffers 4 + 4 floats + 1 int64
#   conv2 4->8 k3 stride2 groups2 +bias: 8*2*9 + 8 = 152 params; 8*4*4 * 2*9 = 2304 MACs
#   bn2: 2*8 = 16 params; buffers 8 + 8 floats + 1 int64
#   fc 8->10: 80 + 10 = 90 params; 10 * 8                                    = 80 MACs
TINY_PARAMS = 108 + 8 + 152 + 16 + 90
TINY_MACS = 6912 + 2304 + 80
TINY_BYTES = TINY_PARAMS * 4 + (4 + 4 + 8 + 8) * 4 + 2 * 8


def test_tiny_net_params_bytes_macs() -> None:
    model = tiny_convnet()
    assert count_params(model) == TINY_PARAMS == 374
    assert model_bytes(model) == TINY_BYTES
    assert count_macs(model, (3, 8, 8)) == TINY_MACS == 9296


def test_bytes_follow_dtype() -> None:
    model = tiny_convnet().half()
    # Floats halve; the two int64 num_batches_tracked counters stay 8 bytes each.
    assert model_bytes(model) == (TINY_PARAMS + 24) * 2 + 2 * 8


def test_shared_parameters_counted_once() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    assert count_params(model) == 16
    assert model_bytes(model) == 64


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        # stride 2, dilation 2, no padding on 9x9: out 3x3; 4*3*3 outputs * 2*3*3
        (nn.Conv2d(2, 4, 3, stride=2, dilation=2), (2, 9, 9), 4 * 3 * 3 * 2 * 9),
        # depthwise: each output gathers one input channel's 3x3 window
        (nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 5, 5), 6 * 5 * 5 * 9),
        # grouped 1x1, stride 2 on 6x6: out 3x3
        (nn.Conv2d(4, 8, 1, stride=2, groups=4), (4, 6, 6), 8 * 3 * 3 * 1),
        # non-square kernel and padding
        (nn.Conv2d(1, 2, (1, 3), padding=(0, 1)), (1, 4, 4), 2 * 4 * 4 * 3),
        # transposed: each of 3*4*4 inputs scatters to 5 * 2*2 outputs
        (nn.ConvTranspose2d(3, 5, 2, stride=2), (3, 4, 4), 3 * 4 * 4 * 5 * 4),
        # Linear on a sequence: 7 positions * 6 outputs * 5 inputs
        (nn.Linear(5, 6), (7, 5), 7 * 6 * 5),
    ],
)
def test_layer_macs(layer: nn.Module, shape: tuple[int, ...], expected: int) -> None:
    assert count_macs(layer, shape) == expected


class _Tucker2Like(nn.Conv2d):
    """A conv subclass whose forward runs 1x1 -> KxK -> 1x1 children, like a factorized
    layer: only the children may be counted, not the (unused) parent weight too."""

    def __init__(self) -> None:
        super().__init__(8, 8, 3, padding=1)
        self.first = nn.Conv2d(8, 2, 1, bias=False)
        self.core = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.last = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))


def test_factorized_children_counted_not_the_wrapper() -> None:
    hw = 4 * 4
    expected = hw * 2 * 8 + hw * 3 * 2 * 9 + hw * 8 * 3
    assert count_macs(_Tucker2Like(), (8, 4, 4)) == expected


def test_count_macs_restores_modes_and_leaves_no_hooks() -> None:
    model = tiny_convnet().train()
    model.bn1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (3, 8, 8))
    assert model.training and not model.bn1.training and model.bn2.training
    assert all(not m._forward_hooks for m in model.modules())
    for key, value in model.state_dict().items():  # BN statistics untouched (eval run)
        assert torch.equal(value, before[key]), key


def test_latency_positive_and_ordered() -> None:
    model = tiny_convnet().train()
    threads = torch.get_num_threads()
    result = measure_latency(model, (3, 8, 8), batch_size=4, repeats=5, warmup=1, num_threads=1)
    assert isinstance(result, LatencyResult)
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms
    assert (result.batch_size, result.device, result.repeats) == (4, "cpu", 5)
    assert model.training
    assert torch.get_num_threads() == threads


def test_latency_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        measure_latency(tiny_convnet(), (3, 8, 8), batch_size=0)


def test_model_stats_to_dict_is_json() -> None:
    stats = model_stats(tiny_convnet(), (3, 8, 8), latency_batches=(1, 3), repeats=3, warmup=1)
    assert (stats.params, stats.size_bytes, stats.macs) == (TINY_PARAMS, TINY_BYTES, TINY_MACS)
    assert [r.batch_size for r in stats.latency] == [1, 3]
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["input_shape"] == [3, 8, 8]
    assert data["latency"][1]["median_ms"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_latency_and_macs() -> None:
    model = tiny_convnet()
    result = measure_latency(model, (3, 8, 8), batch_size=2, device="cuda", repeats=3, warmup=1)
    assert result.device.startswith("cuda") and result.median_ms > 0
    assert next(model.parameters()).device.type == "cpu"  # a copy ran on the GPU
    assert count_macs(model.cuda(), (3, 8, 8)) == TINY_MACS
