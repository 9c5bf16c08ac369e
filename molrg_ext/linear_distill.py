"""Linear distillation (seed 003, Section 3.1 and Appendix C): per noise level sigma, the affine
map ``W_sigma x + b_sigma`` closest in least squares to a denoiser on noisy inputs
``x = x_0 + sigma eps`` (x_0 drawn from a data set). The paper runs Adam on this convex problem;
we solve it in closed form with ``torch.linalg.lstsq`` (float64), which is its exact minimiser.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ._args import (_check_tensor, as_int, as_int_list, check_denoiser_data,
                    check_denoiser_output, check_generator, check_number_or_tensor,
                    check_positive, real_number, values_readable)

__all__ = ["linear_distill", "LinearDenoiser"]


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under torch.func wrappers (vmap, jacrev): for vmap it holds the values of
    the whole batch, so they can be checked in Python where ``bool(t)`` would fail."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


class LinearDenoiser(nn.Module):
    """A bank of affine denoisers ``W_j x + b_j``, one per noise level ``sigmas[j]``.

    ``forward(x, sigma)`` uses, for each sample, the level of the grid equal to its ``sigma``
    (relative tolerance 1e-6); ``sigma`` is a number, a 0-d tensor or a ``[B]`` tensor (one level
    per sample, as the samplers and :mod:`molrg_ext.jacobian` pass it; it works under
    ``torch.func.vmap``/``jacrev``). Other levels are an error (no interpolation).
    """

    def __init__(self, sigmas: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                 sample_shape: Sequence[int]):
        super().__init__()
        where = "LinearDenoiser"
        for t, name in ((sigmas, "sigmas"), (W, "W"), (b, "b")):
            _check_tensor(t, name, where)
        for t, name in ((sigmas, "sigmas"), (b, "b")):
            if t.device != W.device:
                raise ValueError(f"{where}: {name} is on {t.device} but W is on {W.device}")
        if not W.is_floating_point():
            raise TypeError(f"{where}: W must be floating point, got dtype {W.dtype}")
        if b.dtype != W.dtype:
            raise TypeError(f"{where}: b has dtype {b.dtype} but W has dtype {W.dtype}")
        if sigmas.is_complex() or sigmas.dtype == torch.bool:
            raise TypeError(f"{where}: sigmas must be real, got dtype {sigmas.dtype}")
        if W.dim() != 3 or W.shape[0] == 0 or W.shape[1] != W.shape[2]:
            raise ValueError(f"{where}: W must be [S, n, n] with S >= 1 levels, got shape "
                             f"{tuple(W.shape)}")
        S, n = W.shape[0], W.shape[1]
        if sigmas.shape != (S,):
            raise ValueError(f"{where}: sigmas must hold one level per matrix of W: W has "
                             f"S = {S} (shape {tuple(W.shape)}), sigmas has shape "
                             f"{tuple(sigmas.shape)}")
        if b.shape != (S, n):
            raise ValueError(f"{where}: b must be [S, n] = [{S}, {n}] for W of shape "
                             f"{tuple(W.shape)}, got shape {tuple(b.shape)}")
        check_positive(sigmas, "sigmas", where)
        for t, name in ((W, "W"), (b, "b")):
            if not torch.isfinite(t).all():
                raise ValueError(f"{where}: {name} contains NaN or Inf values")
        shape = tuple(as_int_list(sample_shape, "sample_shape", where, 0))
        if math.prod(shape) != n:
            raise ValueError(f"{where}: sample_shape {shape} has {math.prod(shape)} entries but "
                             f"W is [S, n, n] with n = {n}")
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("W", W)
        self.register_buffer("b", b)
        self.sample_shape = shape

    def index(self, sigma: float) -> int:
        """Grid index of the level equal to the number ``sigma`` (an error for any other)."""
        sig = float(check_number_or_tensor(sigma, "sigma", "LinearDenoiser"))
        if not math.isfinite(sig):  # the relative tolerance below would be inf
            raise ValueError(f"LinearDenoiser: sigma must be finite, got {sig}")
        err = (self.sigmas.double() - sig).abs()
        j = int(err.argmin())
        if not err[j] <= 1e-6 * max(abs(sig), 1e-12):  # NaN fails too
            raise ValueError(f"LinearDenoiser: sigma = {sig} is not one of the distilled levels "
                             f"{self.sigmas.tolist()}")
        return j

    def _indices(self, sigma: torch.Tensor, B: int) -> torch.Tensor:
        """Grid index per sample ([B] or [1]) for a 0-d / [1] / [B] sigma tensor; vmap-safe."""
        where = "LinearDenoiser"
        if sigma.dim() > 1 or sigma.numel() not in (1, B):
            raise ValueError(f"{where}: sigma must be a number, a 0-d tensor or have B = {B} "
                             f"entries, got shape {tuple(sigma.shape)}")
        if not sigma.is_floating_point():
            raise TypeError(f"{where}: sigma must be a floating-point tensor, got {sigma.dtype}")
        grid = self.sigmas.double()
        # membership check on the concrete values (under vmap: those of every sample at once)
        # (functorch off: torch 2.8, not 2.11, wrapped the results of ops on the plain tensor
        # again)
        with torch._C._DisableFuncTorch():
            vals = _plain(sigma).detach().reshape(-1, 1).to(device=grid.device,
                                                            dtype=torch.float64)
            finite = torch.isfinite(vals[:, 0])  # for +-inf the relative tolerance would be inf
            ok = finite & ((vals - grid).abs().min(dim=1).values
                           <= 1e-6 * vals[:, 0].abs().clamp_min(1e-12))
            if not bool(ok.all()):
                if not bool(finite.all()):
                    raise ValueError(f"{where}: sigma must be finite, got "
                                     f"{vals[~finite, 0][0].item()}")
                bad = vals[~ok, 0].tolist()
                raise ValueError(f"{where}: sigma = {bad[0] if len(bad) == 1 else bad} is not one "
                                 f"of the distilled levels {self.sigmas.tolist()}")
        sig = sigma.reshape(-1, 1).to(device=grid.device, dtype=torch.float64)
        return (sig - grid).abs().argmin(dim=1)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        where = "LinearDenoiser"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: x must be a tensor, got {type(x).__name__}")
        n = self.W.shape[-1]
        if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() != n:
            raise ValueError(f"{where}: x must be a non-empty [B, *shape] batch of samples with "
                             f"{n} entries, got shape {tuple(x.shape)}")
        if x.dtype != self.W.dtype:
            raise TypeError(f"{where}: x has dtype {x.dtype} but the denoiser has {self.W.dtype}")
        with torch._C._DisableFuncTorch():
            finite = bool(torch.isfinite(_plain(x)).all())
        if not finite:
            raise ValueError(f"{where}: x contains NaN or Inf values")
        x2 = x.reshape(x.shape[0], n)
        if not isinstance(sigma, torch.Tensor):
            j = self.index(sigma)
            return (x2 @ self.W[j].T + self.b[j]).reshape(x.shape)
        j = self._indices(sigma, x.shape[0])
        if values_readable(j):
            # one GEMM per level present (the samplers pass a [B] sigma of one level); gathering
            # W[j] made a [B, n, n] copy: 256 MB at B = 1024, n = 256
            levels = j.unique().tolist()
            if len(levels) == 1:
                return (x2 @ self.W[levels[0]].T + self.b[levels[0]]).reshape(x.shape)
            out = x2.new_empty(x2.shape)
            for u in levels:
                rows = j == u
                out[rows] = x2[rows] @ self.W[u].T + self.b[u]
            return out.reshape(x.shape)
        # under torch.func transforms (levels not readable): each sample its own level by gather
        W, b = self.W[j], self.b[j]  # [B or 1, n, n], [B or 1, n]
        return ((W @ x2.unsqueeze(-1)).squeeze(-1) + b).reshape(x.shape)


@torch.no_grad()
def linear_distill(
    denoiser: Callable[[torch.Tensor, float], torch.Tensor],
    X0: torch.Tensor,
    sigmas: Union[float, Sequence[float], torch.Tensor],
    n_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 4096,
) -> LinearDenoiser:
    """Fit ``D(x; sigma) ~ W_sigma x + b_sigma`` for every sigma in ``sigmas``.

    Args:
        denoiser: callable ``denoiser(x, sigma)`` on ``[B, *shape]`` batches.
        X0: ``[N, *shape]`` clean data; inputs are ``X0[i] + sigma eps`` with random i.
        sigmas: noise levels > 0: a sequence (or 1-D tensor) of numbers; a single number (or a 0-d
            tensor) is taken as a one-level grid ``[sigma]``.
        n_samples: input/output pairs per level (default ``max(4 (n + 1), N)``); must exceed n so
            that the affine least-squares problem has a unique solution. A level whose noisy
            inputs still span fewer than n + 1 dimensions (a sigma below X0's resolution) gives a
            warning: its fit is the minimum-norm one.
        generator: torch.Generator for reproducibility.
        batch_size: denoiser calls are chunked to this many samples (an int >= 1).

    Returns:
        :class:`LinearDenoiser` with ``W`` [S, n, n] and ``b`` [S, n] (dtype of ``X0``).
    """
    where = "linear_distill"
    check_denoiser_data(denoiser, X0, where)
    if isinstance(sigmas, torch.Tensor):
        if sigmas.is_complex() or sigmas.dtype == torch.bool:
            raise TypeError(f"{where}: sigmas must be real, got dtype {sigmas.dtype}")
        sigmas = sigmas.detach().reshape(-1).tolist()  # a 0-d tensor is one level
    elif isinstance(sigmas, (int, float)) and not isinstance(sigmas, bool):
        sigmas = [sigmas]  # a single level
    if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__iter__"):
        raise TypeError(f"{where}: sigmas must be a number or a sequence of numbers, got "
                        f"{type(sigmas).__name__}")
    sig = [real_number(s, f"sigmas[{k}]", where, 0.0, lo_open=True) for k, s in enumerate(sigmas)]
    if not sig:
        raise ValueError(f"{where}: sigmas must be a non-empty list of finite levels > 0, got []")
    # the levels are stored in X0's dtype: one that rounds to 0 or inf there is off the grid
    levels = torch.tensor(sig, dtype=X0.dtype, device=X0.device)
    if not bool((torch.isfinite(levels) & (levels > 0)).all()):
        raise ValueError(f"{where}: sigmas must be finite and > 0 in X0's dtype {X0.dtype}, got "
                         f"{sig}")
    batch_size = as_int(batch_size, "batch_size", where, 1)
    check_generator(generator, where)
    N = X0.shape[0]
    n = X0[0].numel()
    M = as_int(n_samples, "n_samples", where, 1) if n_samples is not None else max(4 * (n + 1), N)
    if M <= n:
        raise ValueError(f"{where}: n_samples = {M} must exceed n = {n} for a unique fit")
    Ws, bs = [], []
    for s in sig:
        idx = torch.randint(0, N, (M,), generator=generator, device=X0.device)
        eps = torch.randn((M, *X0.shape[1:]), generator=generator, dtype=X0.dtype,
                          device=X0.device)
        x = X0[idx] + s * eps
        ys = []
        for i in range(0, M, batch_size):
            xi = x[i:i + batch_size]
            ys.append(check_denoiser_output(denoiser(xi, s), xi, s, where))
        y = torch.cat(ys)
        A = torch.cat([x.reshape(M, n).double(), torch.ones(M, 1, dtype=torch.float64,
                                                             device=X0.device)], 1)
        fit = torch.linalg.lstsq(A, y.reshape(M, n).double(),
                                 driver="gelsd" if A.device.type == "cpu" else None)
        sol = fit.solution
        rank = int(fit.rank) if fit.rank.numel() else int(torch.linalg.matrix_rank(A))
        if rank < n + 1:
            # e.g. sigma below X0's resolution: x = x_0 + sigma eps rounds back to the N points
            warnings.warn(f"{where}: at sigma = {s:g} the {M} noisy inputs span only {rank} of "
                          f"the n + 1 = {n + 1} dimensions of the affine fit, so W and b are the "
                          "minimum-norm one of many fits (sigma below X0's resolution in "
                          f"{X0.dtype}? use float64 or a larger sigma)", UserWarning,
                          stacklevel=2)
        Ws.append(sol[:n].T)
        bs.append(sol[n])
    W = torch.stack(Ws).to(X0.dtype)
    b = torch.stack(bs).to(X0.dtype)
    if not (torch.isfinite(W).all() and torch.isfinite(b).all()):
        raise ValueError(f"{where}: the fitted W or b overflows X0's dtype {X0.dtype} (the "
                         f"denoiser's outputs are too large)")
    return LinearDenoiser(levels, W, b, X0.shape[1:])
