"""``SubspaceDAE``: the paper's low-rank denoiser (eqs. (9), (11), (16)) as an ``nn.Module``."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ._args import as_int, check_mixture_weights, dims_list, is_one_value, parse_dims, parse_mode
from .ops import hard_assign, subspace_dae
from .posterior import posterior_mean_coefficients

__all__ = ["SubspaceDAE", "random_orthonormal"]


def random_orthonormal(n: int, d: int, *batch: int, generator=None, dtype=torch.float32,
                       device=None) -> torch.Tensor:
    """Random n x d matrices with orthonormal columns (QR of a Gaussian), shape [*batch, n, d]."""
    where = "random_orthonormal"
    n, d = as_int(n, "n", where, 1), as_int(d, "d", where, 1)
    if d > n:
        raise ValueError(f"{where}: d = {d} orthonormal columns need d <= n = {n}")
    batch = tuple(as_int(b, f"batch[{i}]", where, 0) for i, b in enumerate(batch))
    g = torch.randn(*batch, n, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.to(dtype=dtype, device=device).contiguous()


class SubspaceDAE(nn.Module):
    """Denoiser ``x_theta(x_t, t) = c_t sum_k w_k U_k U_k^T x_t`` with learnable bases ``U``.

    Coefficients ``c``, ``phi`` and the logit bias follow Lemma 1 / Proposition 1 from the noise
    level, so with ``U = U*`` the module is the exact posterior mean ``E[x_0 | x_t]``.

    Args:
        n: ambient dimension.
        dims: the subspace dimensions d_k (a list), or one int used for all ``K`` subspaces.
        K: number of subspaces when ``dims`` is an int.
        mode: ``"soft"`` (eq. (9)) or ``"hard"`` (eq. (16)).
        pi: mixture weights (default uniform); they enter the logit bias.
        instances: when given, train that many independent problem instances: ``U`` is
            ``[P, K, n, dmax]`` and inputs are ``[P, B, n]``.
        U: initial bases ``[K, n, dmax]`` (or ``[P, K, n, dmax]``); default random orthonormal.
        schedule: an object with ``s(t)`` and ``sigma(t)`` (see :mod:`molrg_ext.schedules`) used
            when ``forward`` is called with ``t=``.
    """

    def __init__(
        self,
        n: int,
        dims: Union[int, Sequence[int]],
        K: Optional[int] = None,
        *,
        mode: str = "soft",
        pi: Optional[Sequence[float]] = None,
        instances: Optional[int] = None,
        U: Optional[torch.Tensor] = None,
        schedule=None,
        dtype: torch.dtype = torch.float32,
        device=None,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        where = "SubspaceDAE"
        if K is not None:
            K = as_int(K, "K", where, 1)
        if K is None and is_one_value(dims):
            as_int(dims, "dims", where, 1)  # a non-int is a TypeError first
            raise ValueError("SubspaceDAE: K is required when dims is an int")
        dims = dims_list(dims, K, where)
        K = len(dims)
        self.n, self.K, self.dmax = as_int(n, "n", where, 1), K, max(dims) if dims else 0
        self.dims = parse_dims(dims, K, self.dmax, self.n, "SubspaceDAE")
        parse_mode(mode, "SubspaceDAE")
        self.mode = mode
        self.instances = instances
        self.schedule = schedule
        if pi is not None:
            pi_t = check_mixture_weights(torch.as_tensor(pi, dtype=torch.float64), K, where)
            self.register_buffer("pi", (pi_t / pi_t.sum()).to(dtype))
        else:
            self.pi = None
        batch = () if instances is None else (as_int(instances, "instances", where, 1),)
        shape = (*batch, K, self.n, self.dmax)
        if U is None:
            U = random_orthonormal(self.n, self.dmax, *batch, K, generator=generator, dtype=dtype,
                                   device=device)
        elif tuple(U.shape) != shape:
            raise ValueError(f"SubspaceDAE: U must have shape {shape}, got {tuple(U.shape)}")
        self.U = nn.Parameter(U.detach().to(dtype=dtype, device=device).clone())

    def coefficients(self, sigma, s=1.0):
        """(c, phi, bias) at noise level ``sigma`` (x_t = s x_0 + s sigma eps)."""
        sigma = torch.as_tensor(sigma, dtype=self.U.dtype, device=self.U.device)
        s = torch.as_tensor(s, dtype=self.U.dtype, device=self.U.device)
        return posterior_mean_coefficients(s, s * sigma, self.dims, self.pi)

    def forward(self, x_t: torch.Tensor, sigma=None, *, t=None, s=None, assign=None):
        """Denoise ``x_t`` at noise level ``sigma`` (scalar or per sample), or at time ``t`` of
        ``self.schedule``. ``s`` is the signal scale (1 for VE/EDM)."""
        if t is not None:
            if sigma is not None or s is not None:
                raise ValueError("SubspaceDAE: pass either sigma (and s) or t, not both: t sets "
                                 "both from the schedule")
            if self.schedule is None:
                raise ValueError("SubspaceDAE: forward(t=...) needs a schedule")
            t = torch.as_tensor(t, dtype=self.U.dtype, device=self.U.device)
            s, sigma = self.schedule.s(t), self.schedule.sigma(t)
        if sigma is None:
            raise ValueError("SubspaceDAE: pass sigma or t")
        c, phi, bias = self.coefficients(sigma, 1.0 if s is None else s)
        return subspace_dae(x_t, self.U, c, phi, bias, self.dims, self.mode, assign)

    def assign(self, x0: torch.Tensor) -> torch.Tensor:
        """Hard assignment ``argmax_k ||U_k^T x0||`` (eq. (17))."""
        return hard_assign(x0, self.U.detach(), self.dims)

    def bases(self) -> list[torch.Tensor]:
        """The K bases ``U_k`` [..., n, d_k] (padded columns dropped)."""
        return [self.U[..., k, :, :d] for k, d in enumerate(self.dims)]

    @torch.no_grad()
    def orthonormalize_(self) -> "SubspaceDAE":
        """Retract each U_k onto the Stiefel manifold (QR with positive diagonal)."""
        for k, d in enumerate(self.dims):
            q, r = torch.linalg.qr(self.U[..., k, :, :d])
            q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
            self.U[..., k, :, :d] = q
            self.U[..., k, :, d:] = 0
        return self

    def extra_repr(self) -> str:
        inst = f", instances={self.instances}" if self.instances else ""
        return f"n={self.n}, dims={self.dims}, mode={self.mode!r}{inst}"
