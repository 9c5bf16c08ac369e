"""Exact posterior-mean coefficients of the MoLRG model (Lemma 1, Proposition 1).

For x_t = s x_0 + gamma eps with x_0 ~ sum_k pi_k N(0, U_k U_k^T) (orthonormal U_k, dims d_k),
``E[x_0 | x_t] = c sum_k w_k U_k U_k^T x_t`` with ``w = softmax(phi ||U_k^T x_t||^2 + beta_k)`` and

    c = s / (s^2 + gamma^2),   phi = s^2 / (2 gamma^2 (s^2 + gamma^2)),
    beta_k = log pi_k - (d_k / 2) log((s^2 + gamma^2) / gamma^2).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._args import (check_mixture_weights, check_number_or_tensor, check_positive, dims_list,
                    number_or_tensor, real_tensor, values_readable)

__all__ = ["posterior_mean_coefficients"]

Number = Union[float, int, torch.Tensor]
WHERE = "posterior_mean_coefficients"


def _as_tensor(v: Number, name: str, dtype=None, device=None) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        # used as it is, or an integer tensor in the other argument's float dtype
        # (number_or_tensor would round it to the default dtype first)
        check_number_or_tensor(v, name, WHERE)
        return v if v.is_floating_point() else v.to(dtype or torch.get_default_dtype())
    return number_or_tensor(v, name, WHERE).to(device=device, dtype=dtype or torch.float64)


def posterior_mean_coefficients(
    s: Number,
    gamma: Number,
    dims: Optional[Sequence[int]] = None,
    pi: Optional[Union[Sequence[float], torch.Tensor]] = None,
):
    """Return ``(c, phi, bias)`` so that ``subspace_dae(x_t, U*, c, phi, bias, dims)`` is
    ``E[x_0 | x_t]`` under the MoLRG model.

    ``s`` and ``gamma`` are numbers or tensors (broadcast together, e.g. one noise level per
    sample). ``bias`` has shape ``broadcast(s, gamma).shape + (K,)``; it is ``None`` when neither
    ``dims`` nor ``pi`` is given (equal dims and weights: every logit gets the same shift).
    """
    ref = s if isinstance(s, torch.Tensor) else gamma if isinstance(gamma, torch.Tensor) else None
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
    device = ref.device if ref is not None else None
    s_t = _as_tensor(s, "s", dtype, device)
    g_t = _as_tensor(gamma, "gamma", dtype, device)
    try:
        s_t, g_t = torch.broadcast_tensors(s_t, g_t)
    except RuntimeError:
        raise ValueError(f"{WHERE}: s and gamma must broadcast together, got shapes "
                         f"{tuple(s_t.shape)} and {tuple(g_t.shape)}") from None
    check_positive(s_t, "s", WHERE)
    check_positive(g_t, "gamma", WHERE)
    s2, g2 = s_t * s_t, g_t * g_t
    sg2 = s2 + g2
    den = 2.0 * g2 * sg2
    c = s_t / sg2
    phi = s2 / den
    log_ratio = torch.log1p(s2 / g2)  # log((s^2 + gamma^2) / gamma^2)
    # Where a square or phi's denominator over- or underflows (s = 1e200, gamma = 1e-200 gave
    # phi = NaN, s = 1e-200 bias = -inf), the same coefficients from r = min(s, gamma) /
    # max(s, gamma) <= 1 (inf or 0 only where the true value is beyond the dtype). s >= gamma:
    # c = 1 / (s (1 + r^2)), phi = 1 / (2 gamma^2 (1 + r^2)), log ratio = 2 log(s / gamma) +
    # log1p(r^2); s < gamma: c = (r / gamma) / (1 + r^2), phi = (r / gamma)^2 / (2 (1 + r^2)),
    # log ratio = log1p(r^2).
    # (s and gamma are finite and > 0 here, so nothing is NaN: den beyond the largest float is
    # its overflow to inf)
    fi = torch.finfo(s2.dtype)
    extreme = (torch.minimum(s2, g2) < fi.tiny) | (den < fi.tiny) | (den > fi.max)
    # (where the values cannot be read, compiling or inside torch.func, the branch-free form)
    if not values_readable(extreme) or bool(extreme.any()):
        big = s_t >= g_t
        r = torch.minimum(s_t, g_t) / torch.maximum(s_t, g_t)
        r2 = r.square()
        c_big, c_small = 1.0 / (s_t * (1.0 + r2)), (r / g_t) / (1.0 + r2)
        phi_big, phi_small = 1.0 / (2.0 * g2 * (1.0 + r2)), (r / g_t).square() / (2.0 * (1.0 + r2))
        # log(s / gamma) without the cancellation of log s - log gamma, unless s / gamma overflows
        q = s_t / g_t
        log_q = torch.where(torch.isfinite(q), torch.log(q), torch.log(s_t) - torch.log(g_t))
        lr_big = 2.0 * log_q + torch.log1p(r2)
        c = torch.where(extreme, torch.where(big, c_big, c_small), c)
        phi = torch.where(extreme, torch.where(big, phi_big, phi_small), phi)
        log_ratio = torch.where(extreme, torch.where(big, lr_big, torch.log1p(r2)), log_ratio)
    if dims is None and pi is None:
        return c, phi, None
    if pi is not None:
        pi_t = check_mixture_weights(real_tensor(pi, "pi", WHERE, s_t.dtype, s_t.device), None,
                                     WHERE)
        pi_t = pi_t / pi_t.sum()
        K = pi_t.numel()
    if dims is not None:
        # one int stands for every component (K from pi when given)
        d_t = torch.as_tensor(dims_list(dims, K if pi is not None else None, WHERE),
                              dtype=s_t.dtype, device=s_t.device)
        K = d_t.numel()
    if pi is None:
        pi_t = torch.full((K,), 1.0 / K, dtype=s_t.dtype, device=s_t.device)
    log_ratio = log_ratio[..., None]
    bias = torch.log(pi_t)
    if dims is not None:
        bias = bias - 0.5 * d_t * log_ratio
    else:
        bias = bias.expand(*s_t.shape, K)
    return c, phi, bias
