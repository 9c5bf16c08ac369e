"""Pure-PyTorch reference of the subspace-denoiser ops: the test oracle and the eager baseline.

Same arguments and semantics as :mod:`molrg_ext.ops`, written as the plain composition
(einsum, softmax, one-hot) that autograd differentiates.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._args import prepare_dae_args, restore

__all__ = ["subspace_dae", "hard_assign", "masked_bases"]


def masked_bases(U: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """U [..., K, n, dmax] with the columns past dims[k] set to zero."""
    dmax = U.shape[-1]
    cols = torch.arange(dmax, device=U.device)
    mask = (cols[None, :] < torch.tensor(dims, device=U.device)[:, None]).to(U.dtype)
    return U * mask[:, None, :]


def subspace_dae(
    x: torch.Tensor,
    U: torch.Tensor,
    c,
    phi,
    bias: Optional[torch.Tensor] = None,
    dims=None,
    mode: str = "soft",
    assign: Optional[torch.Tensor] = None,
    *,
    where: str = "reference.subspace_dae",
) -> torch.Tensor:
    a = prepare_dae_args(x, U, c, phi, bias, dims, mode, assign, where=where)
    Um = masked_bases(a.U, a.dims)
    proj = torch.einsum("pbn,pknd->pbkd", a.x, Um)
    sq = proj.square().sum(-1)
    K = Um.shape[1]
    if a.mode == 0:
        logits = a.phi[..., None] * sq
        if a.bias is not None:
            logits = logits + a.bias
        w = torch.softmax(logits, dim=-1)
    else:
        k0 = a.assign if a.assign is not None else sq.argmax(-1)
        w = F.one_hot(k0, K).to(x.dtype)
    y = a.c[..., None] * torch.einsum("pbk,pknd,pbkd->pbn", w, Um, proj)
    return restore(y, a)


def hard_assign(x0: torch.Tensor, U: torch.Tensor, dims=None) -> torch.Tensor:
    a = prepare_dae_args(
        x0, U, 0.0, 0.0, dims=dims, where="reference.hard_assign", x_name="x0"
    )
    proj = torch.einsum("pbn,pknd->pbkd", a.x, masked_bases(a.U, a.dims))
    return restore(proj.square().sum(-1).argmax(-1), a)
