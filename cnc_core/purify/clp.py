"""Channel Lipschitzness-based Pruning (CLP), a data-free backdoor baseline.

Zheng et al., "Data-free Backdoor Removal based on Channel Lipschitzness", ECCV 2022. For each
BN channel k following a conv, the upper bound of the channel's Lipschitz constant is

    UCLC_k = || W_k ||_2 * | gamma_k / sigma_k |,

with ``W_k`` the conv kernel of output channel k reshaped to ``Cin x (K*K)`` and ``||.||_2``
its spectral norm (as in the authors' code). Channels with UCLC above ``mean + u * std`` of
their layer are pruned by zeroing the BN's gamma and beta.

Pairing: a BN is paired with the conv whose output tensor is exactly the BN's input
(found by hooks on one forward pass), which is the post-activation conv -> BN pattern;
BNs fed by anything else (pre-activation nets) are left alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cnc_core.progress import ProgressFn

__all__ = ["CLPConfig", "CLPResult", "clp", "conv_bn_pairs"]


@dataclass(frozen=True)
class CLPConfig:
    u: float = 3.0  # threshold in standard deviations above the layer mean


@dataclass
class CLPResult:
    """The pruned copy and, per BN layer name, the channel indices zeroed."""

    model: nn.Module
    pruned: dict[str, list[int]] = field(default_factory=dict)
    uclc: dict[str, list[float]] = field(default_factory=dict)

    @property
    def num_pruned(self) -> int:
        return sum(len(v) for v in self.pruned.values())


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` pairs where the BN's input is exactly the conv's output.

    Found by one forward pass of ``example`` with hooks (eval mode, restored).
    """
    produced: dict[int, str] = {}
    keep: list[Tensor] = []  # hold outputs so their ids cannot be reused during the pass
    pairs: list[tuple[str, str]] = []
    handles = []

    def conv_hook(name: str):  # noqa: ANN202 - hook factory
        def hook(_m: nn.Module, _i: tuple[Tensor, ...], out: Tensor) -> None:
            produced[id(out)] = name
            keep.append(out)

        return hook

    def bn_hook(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            src = produced.get(id(inputs[0]))
            if src is not None:
                pairs.append((src, name))

        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
    was = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
        keep.clear()
    seen: set[str] = set()
    unique = []
    for conv, bn in pairs:
        if bn not in seen:
            seen.add(bn)
            unique.append((conv, bn))
    return unique


def clp(
    model: nn.Module,
    config: CLPConfig,
    *,
    example: Tensor,
    progress: ProgressFn | None = None,
    stage: str = "clp",
) -> CLPResult:
    """Prune channels with an outlying Lipschitz upper bound (Zheng et al., ECCV 2022).

    ``model`` is not changed: a deep copy is pruned and returned. ``example`` is one input
    batch (any content; shape matters) used to find the conv -> BN pairs.
    """
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    pairs = conv_bn_pairs(out, example)
    result = CLPResult(model=out)
    with torch.no_grad():
        for i, (conv_name, bn_name) in enumerate(pairs):
            conv = modules[conv_name]
            bn = modules[bn_name]
            assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            if conv.groups != 1 or bn.weight is None or bn.running_var is None:
                continue
            w = conv.weight.reshape(conv.out_channels, conv.in_channels, -1)  # (Cout, Cin, K*K)
            spectral = torch.linalg.matrix_norm(w, ord=2)  # (Cout,)
            sigma = torch.sqrt(bn.running_var + bn.eps)
            uclc = spectral * (bn.weight / sigma).abs()
            threshold = uclc.mean() + config.u * uclc.std()
            idx = torch.nonzero(uclc > threshold).flatten()
            result.uclc[bn_name] = uclc.tolist()
            if idx.numel():
                bn.weight[idx] = 0.0
                if bn.bias is not None:
                    bn.bias[idx] = 0.0
                result.pruned[bn_name] = idx.tolist()
            if progress is not None:
                progress(stage, (i + 1) / len(pairs))
    if progress is not None:
        progress(stage, 1.0)
    return result
