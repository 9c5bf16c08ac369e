"""Linear distillation (seed 003, Section 3.1 and Appendix C): per noise level sigma, the affine
map ``W_sigma x + b_sigma`` closest in least squares to a denoiser on noisy inputs
``x = x_0 + sigma eps`` (x_0 drawn from a data set). The paper runs Adam on this convex problem;
we solve it in closed form with ``torch.linalg.lstsq`` (float64), which is its exact minimiser.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ._args import check_denoiser_data

__all__ = ["linear_distill", "LinearDenoiser"]


class LinearDenoiser(nn.Module):
    """A bank of affine denoisers ``W_j x + b_j``, one per noise level ``sigmas[j]``.

    ``forward(x, sigma)`` uses the level of the grid equal to ``sigma`` (relative tolerance 1e-6);
    other levels are an error (no interpolation).
    """

    def __init__(self, sigmas: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                 sample_shape: Sequence[int]):
        super().__init__()
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("W", W)
        self.register_buffer("b", b)
        self.sample_shape = tuple(sample_shape)

    def index(self, sigma: float) -> int:
        sig = float(sigma)
        err = (self.sigmas.double() - sig).abs()
        j = int(err.argmin())
        if err[j] > 1e-6 * max(abs(sig), 1e-12):
            raise ValueError(f"LinearDenoiser: sigma = {sig} is not one of the distilled levels "
                             f"{self.sigmas.tolist()}")
        return j

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        j = self.index(sigma)
        x2 = x.reshape(x.shape[0], -1)
        return (x2 @ self.W[j].T + self.b[j]).reshape(x.shape)


@torch.no_grad()
def linear_distill(
    denoiser: Callable[[torch.Tensor, float], torch.Tensor],
    X0: torch.Tensor,
    sigmas: Sequence[float],
    n_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 4096,
) -> LinearDenoiser:
    """Fit ``D(x; sigma) ~ W_sigma x + b_sigma`` for every sigma in ``sigmas``.

    Args:
        denoiser: callable ``denoiser(x, sigma)`` on ``[B, *shape]`` batches.
        X0: ``[N, *shape]`` clean data; inputs are ``X0[i] + sigma eps`` with random i.
        sigmas: noise levels.
        n_samples: input/output pairs per level (default ``max(4 (n + 1), N)``); must exceed n so
            that the affine least-squares problem has a unique solution.
        generator: torch.Generator for reproducibility.
        batch_size: denoiser calls are chunked to this many samples.

    Returns:
        :class:`LinearDenoiser` with ``W`` [S, n, n] and ``b`` [S, n] (dtype of ``X0``).
    """
    where = "linear_distill"
    check_denoiser_data(denoiser, X0, where)
    sig = [float(s) for s in sigmas]
    if not sig or any(not (s > 0 and s < float("inf")) for s in sig):
        raise ValueError(f"{where}: sigmas must be a non-empty list of finite levels > 0")
    N = X0.shape[0]
    n = X0[0].numel()
    M = int(n_samples) if n_samples is not None else max(4 * (n + 1), N)
    if M <= n:
        raise ValueError(f"{where}: n_samples = {M} must exceed n = {n} for a unique fit")
    Ws, bs = [], []
    for s in sig:
        idx = torch.randint(0, N, (M,), generator=generator, device=X0.device)
        eps = torch.randn((M, *X0.shape[1:]), generator=generator, dtype=X0.dtype,
                          device=X0.device)
        x = X0[idx] + s * eps
        y = torch.cat([denoiser(x[i:i + batch_size], s) for i in range(0, M, batch_size)])
        if y.shape != x.shape:
            raise ValueError(f"{where}: denoiser returned shape {tuple(y.shape)} for input "
                             f"{tuple(x.shape)}")
        A = torch.cat([x.reshape(M, n).double(), torch.ones(M, 1, dtype=torch.float64,
                                                             device=X0.device)], 1)
        sol = torch.linalg.lstsq(A, y.reshape(M, n).double(),
                                 driver="gelsd" if A.device.type == "cpu" else None).solution
        Ws.append(sol[:n].T)
        bs.append(sol[n])
    W = torch.stack(Ws).to(X0.dtype)
    b = torch.stack(bs).to(X0.dtype)
    return LinearDenoiser(torch.tensor(sig, dtype=X0.dtype, device=X0.device), W, b,
                          X0.shape[1:])
