"""Tucker-2 (HOSVD) and truncated SVD of layer weights.

Phan et al., "Clean & Compact", ECCV 2024, step 1: every conv weight
``W (Cout, Cin, K, K)`` is written as ``W = G x1 U1 x2 U2`` with a full-rank HOSVD
(De Lathauwer et al., SIAM J. Matrix Anal. Appl. 2000). With the factor matrices taken
from the SVDs of the two unfoldings, the rows of the core's mode-1 unfolding are
orthogonal with norms equal to the mode-1 singular values (likewise for mode 2), so
scaling row ``i`` of the core rescales exactly the ``i``-th singular component.

The SVDs are done directly with ``torch.linalg.svd`` (in float64) rather than through
tensorly's ``partial_tucker``, whose signature changed across releases; the result spans
the same subspaces (checked against tensorly in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tucker2Factors:
    """A Tucker-2 decomposition ``W = core x1 u_out x2 u_in``.

    Shapes: ``core (R1, R2, K1, K2)``, ``u_out (Cout, R1)``, ``u_in (Cin, R2)``,
    ``s_out (R1,)``, ``s_in (R2,)`` (singular values of the mode-1 / mode-2 unfoldings,
    descending). All float64.
    """

    core: Tensor
    u_out: Tensor
    u_in: Tensor
    s_out: Tensor
    s_in: Tensor

    @property
    def ranks(self) -> tuple[int, int]:
        return int(self.core.shape[0]), int(self.core.shape[1])

    def truncate(self, r_out: int, r_in: int) -> Tucker2Factors:
        """Keep the leading ``r_out x r_in`` block of the core (method.md step 4)."""
        return Tucker2Factors(
            core=self.core[:r_out, :r_in],
            u_out=self.u_out[:, :r_out],
            u_in=self.u_in[:, :r_in],
            s_out=self.s_out[:r_out],
            s_in=self.s_in[:r_in],
        )

    def scale(self, f_out: Tensor, f_in: Tensor) -> Tucker2Factors:
        """Scale the core's mode-1 rows by ``f_out`` and mode-2 rows by ``f_in``.

        The two scalings commute (method.md step 3). Singular values scale with them.
        """
        core = self.core * f_out.view(-1, 1, 1, 1) * f_in.view(1, -1, 1, 1)
        return Tucker2Factors(core, self.u_out, self.u_in, self.s_out * f_out, self.s_in * f_in)

    def reconstruct(self) -> Tensor:
        """``core x1 u_out x2 u_in`` -> ``(Cout, Cin, K1, K2)``."""
        return torch.einsum("abkl,oa,ib->oikl", self.core, self.u_out, self.u_in)


def tucker2_hosvd(weight: Tensor) -> Tucker2Factors:
    """Full-rank Tucker-2 HOSVD of a conv weight ``(Cout, Cin, K1, K2)``.

    Returns factors in float64; ``reconstruct()`` equals ``weight`` to rounding.
    """
    w = weight.detach().to(torch.float64).cpu()
    c_out, c_in, k1, k2 = w.shape
    # mode-1 unfolding: (Cout, Cin*K1*K2)
    u_out, s_out, _ = torch.linalg.svd(w.reshape(c_out, -1), full_matrices=False)
    # mode-2 unfolding: (Cin, Cout*K1*K2)
    u_in, s_in, _ = torch.linalg.svd(w.transpose(0, 1).reshape(c_in, -1), full_matrices=False)
    # core = W x1 U1^T x2 U2^T: (R1, R2, K1, K2)
    core = torch.einsum("oikl,oa,ib->abkl", w, u_out, u_in)
    return Tucker2Factors(core, u_out, u_in, s_out, s_in)


@dataclass(frozen=True)
class SVDFactors:
    """A truncated SVD ``W = u diag(s) vh`` of a matrix ``(Cout, Cin)`` (float64)."""

    u: Tensor  # (Cout, R)
    s: Tensor  # (R,)
    vh: Tensor  # (R, Cin)

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    def truncate(self, rank: int) -> SVDFactors:
        return SVDFactors(self.u[:, :rank], self.s[:rank], self.vh[:rank])

    def scale(self, factors: Tensor) -> SVDFactors:
        return SVDFactors(self.u, self.s * factors, self.vh)

    def reconstruct(self) -> Tensor:
        return (self.u * self.s) @ self.vh


def matrix_svd(weight: Tensor) -> SVDFactors:
    """SVD of a Linear weight ``(Cout, Cin)`` or a 1x1 conv weight ``(Cout, Cin, 1, 1)``.

    For these layers the mode-1 and mode-2 singular values of Tucker-2 coincide, so one
    truncated SVD (two layers) is the right factorisation (method.md, pitfalls).
    """
    w = weight.detach().to(torch.float64).cpu().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return SVDFactors(u, s, vh)
