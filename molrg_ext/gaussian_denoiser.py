"""The Gaussian denoiser of seed 003, eq. (6), and its closed-form sampling trajectory, eq. (7).

For data modelled as N(mu, Sigma) with Sigma = U diag(lambda) U^T (empirical mean and covariance of
a training set), the optimal denoiser at noise level sigma (x = x_0 + sigma eps) is linear:

    D_G(x; sigma) = mu + U diag(lambda / (lambda + sigma^2)) U^T (x - mu),

and the EDM probability-flow ODE dx/dsigma = (x - D_G(x; sigma)) / sigma has the solution

    x(sigma) = mu + U diag(sqrt((lambda + sigma^2) / (lambda + sigma_T^2))) U^T (x_T - mu).

Eq. (7) of the paper sums over the d non-zero eigenvalues only; we keep the full eigenbasis
(lambda = 0 directions included), where the same formula gives the exact ODE solution
``(sigma / sigma_T) u^T (x_T - mu)``, so the trajectory is exact at every sigma, not only at 0.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

from ._args import (as_int_list, check_float_pair, check_number_or_tensor, check_range,
                    real_number, real_tensor, values_readable)

__all__ = ["GaussianDenoiser"]

Number = Union[float, int, torch.Tensor]


def _sigma_per_sample(sigma: Number, x: torch.Tensor, where: str) -> torch.Tensor:
    """sigma as a [B, 1] column (number, 0-d tensor or [B] tensor); finite and >= 0."""
    B = x.shape[0]
    check_number_or_tensor(sigma, "sigma", where)  # a complex or bool sigma would be cast
    if isinstance(sigma, torch.Tensor):
        sig = sigma.to(dtype=x.dtype, device=x.device).reshape(-1)
        if sig.numel() not in (1, B):
            raise ValueError(f"{where}: sigma must be a number or have B = {B} entries, "
                             f"got shape {tuple(sigma.shape)}")
    else:
        sig = torch.tensor([float(sigma)], dtype=x.dtype, device=x.device)
    return check_range(sig, "sigma", where, 0.0, what="finite and >= 0").reshape(-1, 1)


class GaussianDenoiser(nn.Module):
    """Linear denoiser ``mu + U diag(lambda / (lambda + sigma^2)) U^T (x - mu)``.

    Build it with :meth:`fit` (empirical moments of a data set) or :meth:`from_moments`.
    Buffers: ``mu`` [n], ``U`` [n, n] (eigenvectors, columns, by decreasing eigenvalue) and
    ``lam`` [n] (eigenvalues, clamped at 0). Inputs are ``[B, *sample_shape]``.
    """

    def __init__(self, mu: torch.Tensor, U: torch.Tensor, lam: torch.Tensor,
                 sample_shape: Sequence[int] | None = None):
        super().__init__()
        where = "GaussianDenoiser"
        check_float_pair(mu, U, "mu", "U", where)  # same float dtype and device
        check_float_pair(mu, lam, "mu", "lam", where)
        n = mu.numel()
        if U.shape != (n, n) or lam.shape != (n,):
            raise ValueError(f"{where}: U must be [{n}, {n}] and lam [{n}], got "
                             f"{tuple(U.shape)} and {tuple(lam.shape)}")
        if not (torch.isfinite(lam).all() and (lam >= 0).all()):
            raise ValueError(f"{where}: lam must hold finite eigenvalues >= 0")
        if not torch.isfinite(mu).all():
            raise ValueError(f"{where}: mu contains NaN or Inf values")
        if not torch.isfinite(U).all():
            raise ValueError(f"{where}: U contains NaN or Inf values")
        if sample_shape is not None:
            sample_shape = as_int_list(sample_shape, "sample_shape", where, 1)
            if math.prod(sample_shape) != n:
                raise ValueError(f"{where}: sample_shape {tuple(sample_shape)} must hold n = {n} "
                                 f"entries, it holds {math.prod(sample_shape)}")
        self.register_buffer("mu", mu.reshape(n).contiguous())
        self.register_buffer("U", U.contiguous())
        self.register_buffer("lam", lam.contiguous())
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (n,)

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def from_moments(cls, mu: torch.Tensor, cov: torch.Tensor,
                     sample_shape: Sequence[int] | None = None) -> "GaussianDenoiser":
        """From a mean ``mu`` [n] and a symmetric PSD covariance ``cov`` [n, n] (same dtype and
        device). Negative eigenvalues below ``-tol * max |eigenvalue|`` (tol 1e-8 for float64,
        1e-5 for float32) are an error; smaller ones are round-off and clamped to 0, as are
        positive ones within ``10 n eps max |eigenvalue|`` of 0 (the float64 eigensolver's
        round-off), so that a rank-deficient covariance keeps its rank: at sigma = 0 the map is the
        projector onto the data's span, not that plus a few round-off directions."""
        where = "GaussianDenoiser.from_moments"
        if not isinstance(mu, torch.Tensor) or not isinstance(cov, torch.Tensor):
            raise TypeError(f"{where}: mu and cov must be tensors")
        check_float_pair(mu, cov, "mu", "cov", where)
        n = mu.numel()
        if n == 0 or cov.shape != (n, n):
            raise ValueError(f"{where}: cov must be [{n}, {n}] for mu with {n} entries, got "
                             f"{tuple(cov.shape)}")
        if not (torch.isfinite(mu).all() and torch.isfinite(cov).all()):
            raise ValueError(f"{where}: mu and cov must be finite")
        c64 = cov.double()
        if not torch.allclose(c64, c64.T, atol=1e-8 * max(1.0, c64.abs().max().item())):
            raise ValueError(f"{where}: cov must be symmetric")
        lam, U = torch.linalg.eigh(0.5 * (c64 + c64.T))
        # PSD up to round-off: clamp tiny negative eigenvalues, refuse real ones
        tol = (1e-8 if mu.dtype == torch.float64 else 1e-5) * float(lam.abs().max())
        if float(lam[0]) < -tol:
            raise ValueError(f"{where}: cov must be positive semi-definite, its smallest "
                             f"eigenvalue is {float(lam[0]):.6g} (largest |eigenvalue| "
                             f"{float(lam.abs().max()):.6g})")
        # eigh's error is about n eps ||cov||: an eigenvalue within ten times that is 0 up to
        # round-off (rank-3 data in R^8 gave 5e-16 and 5e-17 beside 0, 0, 0)
        noise = 10 * n * torch.finfo(torch.float64).eps * float(lam.abs().max())
        lam = torch.where(lam.abs() <= noise, torch.zeros_like(lam), lam)
        lam, U = lam.flip(0).clamp_min(0.0), U.flip(1)
        return cls(mu.reshape(n), U.to(mu.dtype), lam.to(mu.dtype), sample_shape)

    @classmethod
    def fit(cls, X: torch.Tensor) -> "GaussianDenoiser":
        """Empirical mean and covariance (1/N normalisation, as in the paper) of ``X`` [N, *shape]."""
        where = "GaussianDenoiser.fit"
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"{where}: X must be a tensor, got {type(X).__name__}")
        if X.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{where}: X must be float32 or float64, got {X.dtype}")
        if X.dim() < 2 or X.shape[0] == 0:
            raise ValueError(f"{where}: X must be a non-empty [N, *shape] tensor, got shape "
                             f"{tuple(X.shape)}")
        if not torch.isfinite(X).all():
            raise ValueError(f"{where}: X contains NaN or Inf values")
        X2 = X.detach().reshape(X.shape[0], -1).double()
        mu = X2.mean(0)
        Xc = X2 - mu
        cov = Xc.T @ Xc / X2.shape[0]
        out = cls.from_moments(mu, cov, X.shape[1:]).to(X.dtype)
        if not (torch.isfinite(out.lam).all() and torch.isfinite(out.mu).all()):
            # the moments are taken in float64; in X's dtype the largest may not fit
            raise ValueError(f"{where}: X's mean or variances (largest eigenvalue "
                             f"{float(cov.diagonal().sum()):.3g} at most) overflow {X.dtype}; "
                             "rescale X or pass it as float64")
        return out

    # ---------------------------------------------------------------------------------- maps
    @property
    def n(self) -> int:
        return self.mu.numel()

    def _flat(self, x: torch.Tensor, where: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: x must be a tensor, got {type(x).__name__}")
        if x.dtype != self.mu.dtype:
            raise TypeError(f"{where}: x has dtype {x.dtype} but the denoiser has {self.mu.dtype}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"{where}: x must be a non-empty [B, *shape] batch, got shape "
                             f"{tuple(x.shape)}")
        if x[0].numel() != self.n:
            raise ValueError(f"{where}: x samples must have {self.n} entries, got shape "
                             f"{tuple(x.shape)}")
        if values_readable(x) and not torch.isfinite(x).all():
            raise ValueError(f"{where}: x contains NaN or Inf values")
        return x.reshape(x.shape[0], self.n)

    def shrinkage(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda / (lambda + sigma^2) for sigma of shape [B, 1] -> [B, n]."""
        s2 = sigma * sigma
        den = self.lam + s2
        # sigma = 0 with lambda = 0: the limit of the shrinkage is 0 for sigma -> 0+ off the
        # support; use 1 on the support and 0 off it.
        # (the division's denominator is 1 where den = 0, not den clamped at the smallest normal
        # number: that inflated subnormal ones, float32 data of scale 1e-20 shrank by 0.012
        # where it should by 0.85)
        return torch.where(den > 0, self.lam / torch.where(den > 0, den, torch.ones_like(den)),
                           torch.zeros_like(den))

    def forward(self, x: torch.Tensor, sigma: Number) -> torch.Tensor:
        """``D_G(x; sigma)`` for x ``[B, *shape]`` and sigma a number or ``[B]`` tensor."""
        where = "GaussianDenoiser"
        x2 = self._flat(x, where)
        sig = _sigma_per_sample(sigma, x2, where)
        z = (x2 - self.mu) @ self.U
        y = self.mu + (z * self.shrinkage(sig)) @ self.U.T
        return y.reshape(x.shape)

    def matrix(self, sigma: float):
        """``(W, b)`` with ``D_G(x; sigma) = W x + b`` (x flattened): W [n, n], b [n]."""
        where = "GaussianDenoiser.matrix"
        sig = _sigma_per_sample(real_number(sigma, "sigma", where, 0.0), self.mu[None], where)
        W = (self.U * self.shrinkage(sig)) @ self.U.T
        return W, self.mu - W @ self.mu

    def trajectory(self, x_T: torch.Tensor, sigma_T: float, sigmas) -> torch.Tensor:
        """Closed-form EDM probability-flow ODE solution started at ``x_T`` (noise ``sigma_T``):
        ``[S, B, *shape]``, one slice per sigma in ``sigmas`` (sigma = 0 gives the sample)."""
        where = "GaussianDenoiser.trajectory"
        x2 = self._flat(x_T, where)
        if isinstance(sigma_T, bool) or not isinstance(sigma_T, (int, float)):
            raise TypeError(f"{where}: sigma_T must be a number, got {type(sigma_T).__name__}")
        # The ratio below squares sigma_T and the sigmas in x's dtype: sigma_T^2 must be a normal
        # number there (it underflowed to 0, giving NaN and Inf, or overflowed) and sigma^2 finite.
        fi = torch.finfo(x2.dtype)
        lo, hi = math.sqrt(fi.tiny), math.sqrt(fi.max)
        if not lo <= sigma_T <= hi:
            raise ValueError(f"{where}: sigma_T must be in [{lo:.4g}, {hi:.4g}] for {x2.dtype} "
                             f"(its square is used), got {sigma_T!r}")
        sig = real_tensor(sigmas, "sigmas", where, x2.dtype, x2.device).reshape(-1)
        if not ((sig >= 0) & (sig <= hi)).all():  # NaN fails both
            raise ValueError(f"{where}: sigmas must be in [0, {hi:.4g}] for {x2.dtype} (their "
                             f"squares are used)")
        sigma_T = float(sigma_T)  # an int's square could be too large for torch to take
        z = (x2 - self.mu) @ self.U  # [B, n]
        ratio = torch.sqrt((self.lam + sig[:, None] ** 2) / (self.lam + sigma_T**2))  # [S, n]
        if not torch.isfinite(ratio).all():  # sigma / sigma_T beyond sqrt of the largest number
            raise ValueError(f"{where}: sigmas up to {sig.max().item():.4g} are too large for "
                             f"sigma_T = {sigma_T:.4g}: the trajectory's scale overflows "
                             f"{x2.dtype}")
        out = self.mu + (z[None] * ratio[:, None, :]) @ self.U.T
        return out.reshape(sig.numel(), *x_T.shape)

    def sample(self, x_T: torch.Tensor, sigma_T: float) -> torch.Tensor:
        """End point (sigma = 0) of :meth:`trajectory`."""
        return self.trajectory(x_T, sigma_T, [0.0])[0]

    def extra_repr(self) -> str:
        return f"n={self.n}, sample_shape={self.sample_shape}"
