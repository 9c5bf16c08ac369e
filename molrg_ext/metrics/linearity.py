"""Linearity score of a denoiser (seed 003, Section 3.1, eq. (11) of Appendix A):

    LS(sigma) = E_{x1, x2} | cos( D(a x1 + b x2; sigma), a D(x1; sigma) + b D(x2; sigma) ) |,

with x1, x2 = (training sample) + sigma eps drawn independently and a^2 + b^2 = 1 (default
a = b = 1/sqrt(2)) so that the combined input has the right noise variance.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .._args import (INDEX_MAX, as_int, check_denoiser_data, check_denoiser_output,
                     check_generator, real_number, real_tensor)
from ..schedules import EDM

__all__ = ["linearity_score", "edm_sigma_grid"]


def edm_sigma_grid(num: int = 10, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   rho: float = 7.0) -> torch.Tensor:
    """EDM noise levels ``(smax^(1/rho) + i/(num-1) (smin^(1/rho) - smax^(1/rho)))^rho``,
    decreasing, float64, without the final 0 (:meth:`molrg_ext.schedules.EDM.sigma_steps`).
    ``num = 10`` gives the grid of seed 003 (80, 42.415, ..., 0.002)."""
    where = "edm_sigma_grid"
    # bounded so that a huge num is a clear error, not an OverflowError or a failed allocation
    num = as_int(num, "num", where, 2, INDEX_MAX + 1)
    smin, smax, rho = (real_number(v, name, where, 0.0, lo_open=True) for v, name in
                       ((sigma_min, "sigma_min"), (sigma_max, "sigma_max"), (rho, "rho")))
    if not smin < smax:
        raise ValueError(f"{where}: sigma_max must be > sigma_min, got sigma_min = {smin} and "
                         f"sigma_max = {smax}")
    return EDM(sigma_min=smin, sigma_max=smax, rho=rho).sigma_steps(num)[:-1]


@torch.no_grad()
def linearity_score(
    denoiser: Callable[[torch.Tensor, float], torch.Tensor],
    X0: torch.Tensor,
    sigmas: Optional[Sequence[float]] = None,
    n_pairs: int = 100,
    alpha: float = 2 ** -0.5,
    beta: float = 2 ** -0.5,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Mean absolute cosine similarity between ``D(alpha x1 + beta x2)`` and ``alpha D(x1) +
    beta D(x2)`` (the absolute value as in eq. (11); it matters only where some cosines are
    negative, i.e. for strongly nonlinear denoisers). The cosine does not depend on the outputs'
    scale; a pair where both are exactly zero counts 1 (exactly linear), one zero 0.

    Args:
        denoiser: callable ``denoiser(x, sigma)`` on ``[B, *shape]`` batches.
        X0: ``[N, *shape]`` clean samples (training data); pairs are drawn with replacement.
        sigmas: noise levels (default: the 10-level EDM grid of seed 003).
        n_pairs: pairs (x1, x2) per level (the paper uses 100).
        alpha, beta: combination weights (the paper uses a^2 + b^2 = 1).
        generator: torch.Generator for reproducibility.

    Returns:
        float64 tensor ``[S]``, one score per sigma.
    """
    where = "linearity_score"
    check_denoiser_data(denoiser, X0, where)
    n_pairs = as_int(n_pairs, "n_pairs", where, 1)
    alpha, beta = real_number(alpha, "alpha", where), real_number(beta, "beta", where)
    check_generator(generator, where)
    if sigmas is None:
        sig = edm_sigma_grid()
    else:
        sig = real_tensor(sigmas, "sigmas", where, torch.float64)
    sig = sig.reshape(-1)
    if sig.numel() == 0 or not (torch.isfinite(sig).all() and (sig > 0).all()):
        raise ValueError(f"{where}: sigmas must be a non-empty list of finite levels > 0")
    N = X0.shape[0]
    out = torch.empty(sig.numel(), dtype=torch.float64)
    for j, s in enumerate(sig.tolist()):
        idx = torch.randint(0, N, (2, n_pairs), generator=generator, device=X0.device)
        eps = torch.randn((2, n_pairs, *X0.shape[1:]), generator=generator, dtype=X0.dtype,
                          device=X0.device)
        x1 = X0[idx[0]] + s * eps[0]
        x2 = X0[idx[1]] + s * eps[1]
        x = torch.cat([x1, x2, alpha * x1 + beta * x2])
        d = check_denoiser_output(denoiser(x, s), x, s, where)
        d1, d2, d12 = d[:n_pairs], d[n_pairs:2 * n_pairs], d[2 * n_pairs:]
        cos = _cosines(d12.reshape(n_pairs, -1).double(),
                       (alpha * d1 + beta * d2).reshape(n_pairs, -1).double())
        out[j] = cos.abs().mean()
    return out


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of a and b [M, n] whatever their scale: each row is divided by its largest
    |entry| first (F.cosine_similarity clamps the norms at 1e-8, which took the score of a linear
    map with outputs of norm 1e-10 to 0.002). Two zero rows: 1 (the combination is exactly
    linear); one zero row: 0."""
    def unit_scale(v):
        m = v.abs().amax(1, keepdim=True)
        return torch.where(m > 0, v / torch.where(m > 0, m, 1.0), 0.0), m[:, 0] > 0

    (ua, nza), (ub, nzb) = unit_scale(a), unit_scale(b)
    den = ua.norm(dim=1) * ub.norm(dim=1)
    cos = (ua * ub).sum(1) / torch.where(den > 0, den, 1.0)
    return torch.where(nza & nzb, cos, (~nza & ~nzb).to(cos.dtype))
