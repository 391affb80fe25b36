"""Tucker-2 HOSVD and truncated SVD: reconstruction, orthogonality, agreement with tensorly."""

from __future__ import annotations

import pytest
import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from cnc_core.decompose import matrix_svd, tucker2_hosvd


def _weight(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (4, 16, 3, 3), (16, 4, 5, 5), (7, 5, 3, 1)])
def test_full_rank_hosvd_reconstructs_exactly(shape: tuple[int, ...]) -> None:
    w = _weight(shape)
    f = tucker2_hosvd(w)
    assert torch.allclose(f.reconstruct(), w.double(), atol=1e-10)


def test_core_rows_are_orthogonal_with_singular_value_norms() -> None:
    f = tucker2_hosvd(_weight((8, 6, 3, 3)))
    g1 = f.core.reshape(f.core.shape[0], -1)  # mode-1 unfolding of the core
    assert torch.allclose(g1 @ g1.T, torch.diag(f.s_out**2), atol=1e-9)
    g2 = f.core.transpose(0, 1).reshape(f.core.shape[1], -1)
    assert torch.allclose(g2 @ g2.T, torch.diag(f.s_in**2), atol=1e-9)


def test_scaling_a_core_row_scales_exactly_that_singular_value() -> None:
    w = _weight((8, 6, 3, 3))
    f = tucker2_hosvd(w)
    factors = torch.ones_like(f.s_out)
    factors[0] = 0.25
    scaled = f.scale(factors, torch.ones_like(f.s_in)).reconstruct()
    s_new = torch.linalg.svdvals(scaled.reshape(8, -1))
    expected = torch.sort(f.s_out * factors, descending=True).values
    assert torch.allclose(s_new, expected, atol=1e-9)


def test_mode_scalings_commute() -> None:
    f = tucker2_hosvd(_weight((6, 5, 3, 3)))
    ones_out, ones_in = torch.ones_like(f.s_out), torch.ones_like(f.s_in)
    a = torch.linspace(1, 0.2, 6, dtype=torch.float64)
    b = torch.linspace(0.9, 0.3, 5, dtype=torch.float64)
    one = f.scale(a, ones_in).scale(ones_out, b)
    two = f.scale(ones_out, b).scale(a, ones_in)
    assert torch.allclose(one.reconstruct(), two.reconstruct(), atol=1e-12)


def test_truncation_matches_tensorly_partial_tucker_subspaces() -> None:
    w = _weight((12, 10, 3, 3), seed=1).double()
    ranks = (5, 4)
    ours = tucker2_hosvd(w).truncate(*ranks)
    tl.set_backend("pytorch")
    (core, factors), _ = partial_tucker(w, rank=list(ranks), modes=[0, 1], init="svd", n_iter_max=0)
    # same column spaces: the projectors agree
    for mine, theirs in ((ours.u_out, factors[0]), (ours.u_in, factors[1])):
        assert torch.allclose(mine @ mine.T, theirs @ theirs.T, atol=1e-6)
    assert core.shape == ours.core.shape


def test_truncated_error_is_bounded_by_discarded_energy() -> None:
    w = _weight((16, 12, 3, 3), seed=2)
    f = tucker2_hosvd(w)
    t = f.truncate(8, 6)
    err = torch.linalg.norm(t.reconstruct() - w.double()) ** 2
    bound = (f.s_out[8:] ** 2).sum() + (f.s_in[6:] ** 2).sum()
    assert err <= bound + 1e-9


def test_matrix_svd_of_linear_and_1x1_conv() -> None:
    w = _weight((10, 7))
    svd = matrix_svd(w)
    assert torch.allclose(svd.reconstruct(), w.double(), atol=1e-10)
    w4 = _weight((10, 7, 1, 1))
    assert torch.allclose(
        matrix_svd(w4).reconstruct().reshape(10, 7, 1, 1), w4.double(), atol=1e-10
    )
    assert matrix_svd(w).truncate(3).rank == 3
