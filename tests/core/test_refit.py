"""Activation-aware refit: exact at full rank, better than plain truncation on its inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnc_core.allocation import Spectrum
from cnc_core.compress import CompressConfig, compress, count_params
from cnc_core.decompose import matrix_svd, tucker2_hosvd
from cnc_core.layers import Tucker2Conv2d
from cnc_core.models import create_model
from cnc_core.purify.refit import (
    RefitConfig,
    activation_spectra,
    layer_moments,
    refit_compact,
    refit_svd,
    refit_tucker2,
)


def _correlated(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are strongly correlated and unevenly scaled (as activations
    are), so the weight-energy subspaces are not the response-energy ones. One fixed
    channel mixing; ``seed`` draws other samples from the same distribution."""
    mix = torch.randn(c, c, generator=torch.Generator().manual_seed(123))
    mix = mix * torch.logspace(0, -2, c)[None, :]
    z = torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))
    return torch.einsum("ij,njhw->nihw", mix, z)


def _conv(seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(12, 10, 3, padding=1, bias=True).eval()


def _error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).pow(2).mean() / b(x).pow(2).mean())


def _moments_of(layer: nn.Module, x: torch.Tensor):
    wrapper = nn.Sequential(layer)
    return layer_moments(wrapper, ["0"], x)["0"]


def test_full_rank_refit_is_exact() -> None:
    conv = _conv()
    x = _correlated(16, 12, 6)
    factors = refit_tucker2(conv.weight, _moments_of(conv, x), (10, 12), RefitConfig())
    layer = Tucker2Conv2d.from_conv(conv, factors)
    assert _error(layer, conv, x) < 1e-10


@pytest.mark.parametrize("weighting", ["rms", "none"])
def test_tucker2_refit_keeps_responses_better_than_truncation(weighting: str) -> None:
    conv = _conv()
    x = _correlated(32, 12, 6)
    ranks = (5, 4)
    plain = Tucker2Conv2d.from_conv(conv, tucker2_hosvd(conv.weight).truncate(*ranks))
    cfg = RefitConfig(output_weighting=weighting, damping=1e-4)
    refit = Tucker2Conv2d.from_conv(
        conv, refit_tucker2(conv.weight, _moments_of(conv, x), ranks, cfg)
    )
    held_out = _correlated(32, 12, 6, seed=1)  # same distribution, other draws
    assert _error(refit, conv, held_out) < 0.5 * _error(plain, conv, held_out)


def test_svd_refit_is_optimal_for_white_inputs_and_beats_plain_svd_otherwise() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 9).eval()
    white = torch.randn(4096, 12, generator=torch.Generator().manual_seed(0))
    cfg = RefitConfig(output_weighting="none", damping=0.0)
    fit = refit_svd(linear.weight, _moments_of(linear, white), 4, cfg)
    plain = matrix_svd(linear.weight).truncate(4)
    # white inputs: the refit is the plain truncated SVD (the same best rank-4 matrix)
    assert torch.allclose(fit.reconstruct(), plain.reconstruct(), atol=0.05)
    x = _correlated(4096, 12, 1)[:, :, 0, 0]
    fit = refit_svd(linear.weight, _moments_of(linear, x), 4, cfg)
    w = linear.weight.detach().double()
    err_fit = ((x.double() @ (w - fit.reconstruct()).T) ** 2).mean()
    err_plain = ((x.double() @ (w - plain.reconstruct()).T) ** 2).mean()
    assert err_fit < 0.5 * err_plain


def test_refit_compact_keeps_ranks_and_params_and_tracks_the_original() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_chans=3, width=4).eval()
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = compress(model, CompressConfig(ratio=3.0))
    before = _error(plain.model.eval(), model, images)
    refitted = compress(model, CompressConfig(ratio=3.0))
    names = refit_compact(model, refitted, images)
    assert names and all(d.name in names for d in refitted.decisions if d.kind == "tucker2")
    assert count_params(refitted.model) == count_params(plain.model)
    for a, b in zip(plain.model.modules(), refitted.model.modules(), strict=True):
        assert type(a) is type(b)
    assert _error(refitted.model.eval(), model, images) < before


def test_refit_refuses_scaled_spectra() -> None:
    model = create_model("resnet18", num_classes=10, in_chans=3, width=4).eval()
    scaled = compress(model, CompressConfig(ratio=2.0, scaling="clip", t_scale=0.5))
    with pytest.raises(ValueError, match="scaling"):
        refit_compact(model, scaled, torch.randn(4, 3, 32, 32))


def test_activation_spectra_measure_response_energy() -> None:
    conv = _conv()
    net = nn.Sequential(conv)
    # rms weighting: every output channel counts 1, so the output energies sum to Cout
    spectra = activation_spectra(net, ["0"], _correlated(32, 12, 6))
    assert spectra["0"].s_out.shape == (10,) and spectra["0"].s_in.shape == (12,)
    assert float(spectra["0"].s_out.pow(2).sum()) == pytest.approx(10.0, rel=1e-4)
    assert torch.all(spectra["0"].s_out[:-1] >= spectra["0"].s_out[1:])
    # white inputs, no weighting, no damping: the input mode is the weight's own spectrum
    white = torch.randn(256, 12, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg = RefitConfig(output_weighting="none", damping=0.0)
    plain = activation_spectra(net, ["0"], white, cfg)["0"]
    hosvd = tucker2_hosvd(conv.weight)
    assert torch.allclose(plain.s_in, hosvd.s_in.float(), rtol=0.05)
    # correlated inputs: the response spectrum decays faster than the weight spectrum
    s_in = spectra["0"].s_in
    assert float(s_in[:4].pow(2).sum() / s_in.pow(2).sum()) > float(
        hosvd.s_in[:4].pow(2).sum() / hosvd.s_in.pow(2).sum()
    )


def test_compress_allocates_on_the_spectra_it_is_given() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_chans=3, width=4).eval()
    cfg = CompressConfig(ratio=2.0, allocation="energy")
    plain = compress(model, cfg)
    target = next(d for d in plain.decisions if d.kind == "tucker2" and d.ranks[0] > 1)
    weight = model.get_submodule(target.name).weight
    # all of this layer's energy in its first component: energy allocation keeps rank 1
    spike = Spectrum(
        torch.tensor([1.0] + [0.0] * (weight.shape[0] - 1)),
        torch.tensor([1.0] + [0.0] * (weight.shape[1] - 1)),
    )
    steered = compress(model, cfg, spectra={target.name: spike})
    chosen = next(d for d in steered.decisions if d.name == target.name)
    assert chosen.ranks == (1, 1)
    assert steered.params_after <= steered.target_params
    # the budget freed there goes to other layers
    others = {d.name: d.ranks for d in plain.decisions if d.name != target.name}
    grown = [d for d in steered.decisions if d.name in others and d.ranks > others[d.name]]
    assert grown
