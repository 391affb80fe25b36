"""CLP baseline: an outlier channel planted in a conv -> BN pair is pruned; the input is kept."""

from __future__ import annotations

import torch
from torch import nn

from cnc_core.purify.clp import CLPConfig, clp, conv_bn_pairs
from tests.core.test_synthesis import PreActNet, tiny_net


def test_clp_zeroes_planted_outlier_channel() -> None:
    net = tiny_net(width=16)
    with torch.no_grad():
        net[3].weight[5] *= 30.0  # channel 5 of the second conv: huge Lipschitz bound
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = clp(net, CLPConfig(u=3.0), example=torch.zeros(2, 3, 8, 8))
    assert res.pruned.get("4") == [5]
    bn = res.model[4]
    assert bn.weight[5] == 0 and bn.bias[5] == 0
    assert res.num_pruned == 1 and len(res.uclc["4"]) == 16
    # the input model is untouched
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_conv_bn_pairs_post_and_pre_activation() -> None:
    assert conv_bn_pairs(tiny_net(), torch.zeros(1, 3, 8, 8)) == [("0", "1"), ("3", "4")]
    # a pre-activation BN is fed by a sum, not by a conv: no pair
    assert conv_bn_pairs(PreActNet(), torch.zeros(1, 3, 8, 8)) == [("stem", "bn")]


def test_clp_high_threshold_prunes_nothing() -> None:
    net = tiny_net()
    res = clp(net, CLPConfig(u=100.0), example=torch.zeros(1, 3, 8, 8))
    assert res.num_pruned == 0
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(res.model(x), net(x))
    assert isinstance(res.model, nn.Sequential)
