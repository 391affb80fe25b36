"""Factorised layers and the one helper that swaps modules in a model.

In the style of tensorly-torch's ``FactorizedConv.from_conv``: a factorised layer is
built from an existing layer and a decomposition, and is made only of plain
``nn.Conv2d`` / ``nn.Linear`` children, so metrics, ONNX export and hooks see ordinary
layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnc_core.decompose import SVDFactors, Tucker2Factors


class Tucker2Conv2d(nn.Module):
    """A Tucker-2 conv: 1x1 (Cin->R2), KxK (R2->R1), 1x1 (R1->Cout).

    Parameters: ``Cin*R2 + R1*R2*K*K + R1*Cout`` (+ bias), against ``Cout*Cin*K*K``
    dense (Phan et al., ECCV 2024, step 4; Kim et al., ICLR 2016 for the layout).
    """

    def __init__(self, conv: nn.Conv2d, ranks: tuple[int, int]) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError("Tucker-2 needs groups=1 (depthwise/grouped convs are skipped)")
        r_out, r_in = ranks
        # project the input channels onto the mode-2 subspace (no spatial extent)
        self.first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False)
        # the spatial kernel acts on the small core; stride/padding/dilation live here
        self.core = nn.Conv2d(
            r_in,
            r_out,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            bias=False,
            padding_mode=conv.padding_mode,
        )
        # lift back to the output channels, with the original bias
        self.last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None)
        self.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, factors: Tucker2Factors) -> Tucker2Conv2d:
        """Build from ``conv`` and (truncated, possibly scaled) factors."""
        layer = cls(conv, factors.ranks)
        dtype = conv.weight.dtype
        with torch.no_grad():
            layer.first.weight.copy_(factors.u_in.T[:, :, None, None].to(dtype))  # (R2,Cin,1,1)
            layer.core.weight.copy_(factors.core.to(dtype))  # (R1,R2,K,K)
            layer.last.weight.copy_(factors.u_out[:, :, None, None].to(dtype))  # (Cout,R1,1,1)
            if conv.bias is not None and layer.last.bias is not None:
                layer.last.bias.copy_(conv.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.core(self.first(x)))


class LowRankConv1x1(nn.Module):
    """A 1x1 conv as a truncated SVD: 1x1 (Cin->R, stride kept), 1x1 (R->Cout)."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if conv.groups != 1 or conv.kernel_size != (1, 1):
            raise ValueError("LowRankConv1x1 needs a 1x1 conv with groups=1")
        # padding sits on the first (bias-free) conv, so padded positions still get the bias
        self.first = nn.Conv2d(
            conv.in_channels,
            rank,
            1,
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            bias=False,
        )
        self.last = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
        self.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, factors: SVDFactors) -> LowRankConv1x1:
        layer = cls(conv, factors.rank)
        dtype = conv.weight.dtype
        with torch.no_grad():
            layer.first.weight.copy_(factors.vh[:, :, None, None].to(dtype))  # (R,Cin,1,1)
            layer.last.weight.copy_((factors.u * factors.s)[:, :, None, None].to(dtype))
            if conv.bias is not None and layer.last.bias is not None:
                layer.last.bias.copy_(conv.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.first(x))


class LowRankLinear(nn.Module):
    """A Linear layer as a truncated SVD: Linear (in->R), Linear (R->out, bias kept)."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.first = nn.Linear(linear.in_features, rank, bias=False)
        self.last = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
        self.to(device=linear.weight.device, dtype=linear.weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, factors: SVDFactors) -> LowRankLinear:
        layer = cls(linear, factors.rank)
        dtype = linear.weight.dtype
        with torch.no_grad():
            layer.first.weight.copy_(factors.vh.to(dtype))  # (R, in)
            layer.last.weight.copy_((factors.u * factors.s).to(dtype))  # (out, R)
            if linear.bias is not None and layer.last.bias is not None:
                layer.last.bias.copy_(linear.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.first(x))


def get_module(model: nn.Module, dotted_name: str) -> nn.Module:
    """The submodule at ``dotted_name`` (``""`` is the model itself)."""
    return model.get_submodule(dotted_name) if dotted_name else model


def replace_module(model: nn.Module, dotted_name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``dotted_name`` inside ``model`` (in place); returns the old module."""
    if not dotted_name:
        raise ValueError("cannot replace the root module")
    parent_name, _, child = dotted_name.rpartition(".")
    parent = get_module(model, parent_name)
    old = getattr(parent, child)
    if isinstance(parent, nn.Sequential | nn.ModuleList) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    return old
