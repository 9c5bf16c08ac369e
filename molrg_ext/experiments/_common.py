"""Helpers shared by the network experiments (rank-vs-snr, gl-score, edit).

``molrg_samples`` and the Jacobian helpers are stand-ins until ``molrg_ext.data`` (issue 7) and
``molrg_ext.jacobian_*`` (issue 6) land; each prefers the package function when it exists.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
import torch

from ..modules import random_orthonormal

__all__ = ["molrg_samples", "batched_jacobian", "jacobian_singular_values", "numerical_rank",
           "write_json", "read_json", "seed_everything"]


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    return torch.Generator().manual_seed(int(seed))


def molrg_samples(n: int, dims: Sequence[int], N: int, seed: int = 0, pi=None,
                  dtype=torch.float32, U: Optional[torch.Tensor] = None):
    """``N`` MoLRG samples ``x = U*_k a`` (orthogonal bases from one random orthogonal matrix,
    ``a ~ N(0, I_{d_k})``). Returns ``(X [N, n], U [K, n, dmax], labels [N])``; pass ``U`` to
    draw more samples from the same model."""
    g = torch.Generator().manual_seed(int(seed))
    dims = [int(d) for d in dims]
    K, dmax = len(dims), max(dims)
    if U is None:
        Q = random_orthonormal(n, sum(dims), generator=g, dtype=torch.float64)
        U = torch.zeros(K, n, dmax, dtype=torch.float64)
        off = 0
        for k, d in enumerate(dims):
            U[k, :, :d] = Q[:, off:off + d]
            off += d
    U = U.to(torch.float64)
    p = torch.full((K,), 1.0 / K, dtype=torch.float64) if pi is None else torch.as_tensor(pi, dtype=torch.float64)
    labels = torch.multinomial(p / p.sum(), N, replacement=True, generator=g)
    a = torch.randn(N, dmax, generator=g, dtype=torch.float64)
    mask = torch.arange(dmax)[None, :] < torch.as_tensor(dims)[labels][:, None]
    X = torch.einsum("bnd,bd->bn", U[labels], a * mask)
    return X.to(dtype), U.to(dtype), labels


def batched_jacobian(denoiser, x: torch.Tensor, sigma) -> torch.Tensor:
    """Jacobians ``d D(x_b, sigma_b) / d x_b`` for a batch ``x [B, n]`` with n VJPs on the whole
    batch (valid for per-sample denoisers: no batch norm). Returns ``[B, n, n]``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = denoiser(x, sigma)
        rows = []
        for i in range(x.shape[1]):
            (gi,) = torch.autograd.grad(y[:, i].sum(), x, retain_graph=i + 1 < x.shape[1])
            rows.append(gi)
    return torch.stack(rows, dim=1).detach()


def jacobian_singular_values(denoiser, x: torch.Tensor, sigma):
    """Singular values ``[B, n]`` and right singular vectors ``[B, n, n]`` (columns) of the
    denoiser Jacobian at each sample."""
    J = batched_jacobian(denoiser, x, sigma).to(torch.float64)
    _, S, Vh = torch.linalg.svd(J)
    return S, Vh.transpose(-2, -1)


def numerical_rank(singular_values: torch.Tensor, eta: float = 0.99) -> torch.Tensor:
    """Smallest r with ``sum_{i<=r} s_i^2 / sum_i s_i^2 > eta^2`` (eq. (46)), per row."""
    try:
        from .. import numerical_rank as pkg_rank  # issue 6
    except ImportError:
        pkg_rank = None
    if pkg_rank is not None:
        return pkg_rank(singular_values, eta)
    s2 = singular_values.to(torch.float64) ** 2
    s2, _ = s2.sort(dim=-1, descending=True)
    frac = s2.cumsum(-1) / s2.sum(-1, keepdim=True).clamp_min(1e-300)
    return ((frac <= eta ** 2).sum(-1) + 1).clamp_max(s2.shape[-1])


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
