"""Tools of seed 003 (Li, Dai, Qu, *hidden Gaussian structure*): the empirical optimal
(multi-delta) denoiser, eq. (5), as the fused op ``torch.ops.molrg.optimal_denoiser``.

For x_t = s x_0 + s sigma eps with x_0 uniform over the training points X_i,

    D(x_t) = E[x_0 | x_t] = sum_i softmax_i(-||x_t - s X_i||^2 / (2 gamma^2)) X_i,  gamma = s sigma.

The kernel is tiled like flash attention: per tile of 128 queries x ``block`` training points a
GEMM gives the cross terms <x, X_j> (in double where float32 would lose the logits to cancellation
at small noise), an online max-subtracted soft-max runs over the training blocks and a second GEMM
accumulates P @ X_block; no B x N matrix is formed (memory O(128 block) per thread + O(B n)). It
saves only the output and one log-sum-exp per query; the gradient w.r.t. ``x_t`` is
``(s / gamma^2) Cov_w(X) grad`` (the posterior covariance, as Tweedie's formula says), computed
with the same tiles and the weights recomputed from the saved log-sum-exp. On CUDA tensors the op
runs the kernels of ``csrc/cuda/optimal_denoiser.cu`` (16 queries x 32 training points per tile,
squared differences in double; ``block`` only matters on the CPU; see docs/cuda.md).

The Gaussian denoiser, linearity score and linear distillation live in their own modules and are
re-exported here so that ``molrg_ext.hidden_gaussian`` is the one entry point for seed 003.
"""
from __future__ import annotations

import math
import reprlib
from typing import Union

import torch
from torch import nn

from . import _C  # noqa: F401  (registers torch.ops.molrg.*)
from ._args import (as_int, check_float_pair, check_number_or_tensor, check_positive,
                    needs_composite, real_number)
from ._autocast import disabled, to_float32
from .gaussian_denoiser import GaussianDenoiser
from .linear_distill import LinearDenoiser, linear_distill
from .metrics.linearity import linearity_score

__all__ = [
    "optimal_denoiser",
    "OptimalDenoiser",
    "GaussianDenoiser",
    "linearity_score",
    "linear_distill",
    "LinearDenoiser",
]

Number = Union[float, int, torch.Tensor]
_DEFAULT_BLOCK = 512


# ----------------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("molrg::optimal_denoiser")
def _optimal_denoiser_fake(x, X, s, gamma, block):
    return x.new_empty(x.shape), x.new_empty(x.shape[:1], dtype=torch.float64)


@torch.library.register_fake("molrg::optimal_denoiser_backward")
def _optimal_denoiser_backward_fake(grad_y, x, X, s, gamma, y, lse):
    return x.new_empty(x.shape)


# --------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, X, s, gamma, _block = inputs
    y, lse = output
    ctx.save_for_backward(x, X, s, gamma, y, lse)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero tensor for lse's gradient; grad_y may be None


def _backward(ctx, grad_y, _grad_lse):
    need = ctx.needs_input_grad
    if any(need[1:4]):
        raise RuntimeError(
            "optimal_denoiser: gradients are implemented w.r.t. x only; detach X, s and gamma"
        )
    if grad_y is None or not need[0]:
        return None, None, None, None, None
    x, X, s, gamma, y, lse = ctx.saved_tensors
    dx = torch.ops.molrg.optimal_denoiser_backward(grad_y.contiguous(), x, X, s, gamma, y, lse)
    return dx, None, None, None, None


torch.library.register_autograd(
    "molrg::optimal_denoiser", _backward, setup_context=_setup_context
)


# ------------------------------------------------------------------------------------ public API
def _per_query(v: Number, name: str, like: torch.Tensor, B: int) -> torch.Tensor:
    where = "optimal_denoiser"
    check_number_or_tensor(v, name, where)  # a bool, or a complex tensor (cast below), is refused
    if isinstance(v, torch.Tensor):
        if v.device != like.device:
            raise ValueError(f"{where}: {name} is on {v.device} but x_t is on {like.device}")
        if not v.is_floating_point():
            v = v.to(like.dtype)
        if v.requires_grad:
            raise ValueError(f"{where}: gradients w.r.t. {name} are not supported; detach it")
        v = v.to(like.dtype)
        if v.dim() > 1 and v.numel() == B and sum(d != 1 for d in v.shape) <= 1:
            v = v.reshape(-1)  # [B, 1, ...] per-sample columns; a [2, 2] for B = 4 stays an error
        try:
            v = torch.broadcast_to(v, (B,))
        except RuntimeError as e:
            raise ValueError(
                f"{where}: {name} of shape {tuple(v.shape)} does not broadcast to the batch ({B},)"
            ) from e
        # (skipped where values cannot be read: compiling, torch.func; the kernel checks gamma)
        check_positive(v, name, where)
    else:
        # (compiling with dynamic=True, v may be a symbolic number: the kernel checks gamma)
        if not torch.compiler.is_compiling():
            if not (v > 0 and (isinstance(v, int) or math.isfinite(v))):  # an int may not fit
                raise ValueError(f"{where}: {name} must be finite and > 0, got {v}")
            top = torch.finfo(like.dtype).max
            if v > top:  # torch.full would fail with an unnamed overflow error
                raise ValueError(f"{where}: {name} must be <= {top:g} (the largest {like.dtype} "
                                 f"value, x_t's dtype), got {reprlib.repr(v)}")
        v = torch.full((B,), float(v), dtype=like.dtype, device=like.device)
    return v.contiguous()


def optimal_denoiser(
    x_t: torch.Tensor,
    X_train: torch.Tensor,
    sigma: Number,
    s: Number = 1.0,
    *,
    block: int = _DEFAULT_BLOCK,
) -> torch.Tensor:
    """Empirical optimal denoiser ``E[x_0 | x_t]`` for x_0 uniform over ``X_train`` (eq. (5)).

    Args:
        x_t: ``[B, *shape]`` noisy queries, float32 or float64.
        X_train: ``[N, *shape]`` training points (same dtype and device). Not differentiated.
        sigma: noise level (number or tensor broadcastable to ``[B]``); x_t = s (x_0 + sigma eps).
        s: signal scale (1 for VE / EDM), same forms as ``sigma``.
        block: training points per tile of the kernel (speed only; 512 suits CPU caches).

    Returns:
        ``[B, *shape]``; differentiable w.r.t. ``x_t``. Under ``torch.autocast`` float16 /
        bfloat16 inputs are cast to float32 and the result is float32.

    The op is scale-equivariant, and when max |X_train| lies far from 1 (float32: outside
    2^+-32; float64: 2^+-256) it runs on x_t, X_train and s sigma scaled by a power of two
    (exact), so data, queries and noise at one common scale are as accurate at any scale as at
    unit scale (without this, float32 squared norms overflowed from about 1e19 and products were
    flushed to zero below about 1e-19). Queries or sigma at a scale very far from the data's
    (where the shift would overflow them) run unshifted.

    Threads: with fewer queries than 128 per thread the CPU op also splits the training set
    between threads and merges the partial soft-maxes, so the result can differ in its last bits
    between thread counts (a few ulp).
    """
    where = "optimal_denoiser"
    x_t, X_train, sigma, s = to_float32(x_t, X_train, sigma, s)  # under torch.autocast
    check_float_pair(x_t, X_train, "x_t", "X_train", where)
    if x_t.dim() < 2:
        raise ValueError(f"{where}: x_t must be [B, *shape], got shape {tuple(x_t.shape)}")
    if X_train.dim() < 2:
        raise ValueError(f"{where}: X_train must be [N, *shape], got shape {tuple(X_train.shape)}")
    if tuple(X_train.shape[1:]) != tuple(x_t.shape[1:]):
        raise ValueError(
            f"{where}: X_train samples have shape {tuple(X_train.shape[1:])} but x_t samples "
            f"have shape {tuple(x_t.shape[1:])}"
        )
    if X_train.shape[0] == 0:
        raise ValueError(f"{where}: X_train is empty (N = 0)")
    if X_train.requires_grad:
        raise ValueError(f"{where}: gradients w.r.t. X_train are not supported; detach it")
    block = as_int(block, "block", where, 1, 2**63)
    B = x_t.shape[0]
    s_t = _per_query(s, "s", x_t, B)
    g_t = s_t * _per_query(sigma, "sigma", x_t, B)
    n = X_train[0].numel()
    x2 = x_t.reshape(B, n).contiguous()
    X2 = X_train.reshape(X_train.shape[0], n).contiguous()
    if needs_composite(x_t, X_train, s_t, g_t):  # torch.func transforms, forward-mode AD
        with disabled(x2):
            return _optimal_composite(x2, X2, s_t, g_t).reshape(x_t.shape)
    y, _ = torch.ops.molrg.optimal_denoiser(x2, X2, s_t, g_t, block)
    return y.reshape(x_t.shape)


def _optimal_composite(x: torch.Tensor, X: torch.Tensor, s: torch.Tensor,
                       gamma: torch.Tensor) -> torch.Tensor:
    """The op's math as a pure-PyTorch composition, for torch.func transforms (grad, jacrev,
    jacfwd, jvp, vmap) and forward-mode AD, which the kernels do not support. Logits in float64
    as in the kernels (they cancel at small noise); -||x||^2 / (2 gamma^2) is dropped, being
    constant over the training points. Memory O(B N), unlike the tiled kernels."""
    xd, Xd, sd, gd = x.double(), X.double(), s.double()[:, None], gamma.double()[:, None]
    logits = (2.0 * sd * (xd @ Xd.T) - sd.square() * Xd.square().sum(1)) / (2.0 * gd.square())
    return torch.softmax(logits, dim=1).to(x.dtype) @ X


class OptimalDenoiser(nn.Module):
    """The multi-delta optimal denoiser of a fixed training set: ``forward(x, sigma)``.

    ``X_train`` is stored as a (non-trainable) buffer; ``s`` is the signal scale (1 for EDM).
    """

    def __init__(self, X_train: torch.Tensor, s: float = 1.0, block: int = _DEFAULT_BLOCK):
        super().__init__()
        where = "OptimalDenoiser"
        if not isinstance(X_train, torch.Tensor) or X_train.dim() < 2 or X_train.shape[0] == 0:
            raise ValueError(f"{where}: X_train must be a non-empty [N, *shape] tensor")
        if X_train.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{where}: X_train must be float32 or float64, got {X_train.dtype}")
        if not torch.isfinite(X_train).all():
            raise ValueError(f"{where}: X_train contains NaN or Inf values")
        s = real_number(s, "s", where, 0.0, lo_open=True)
        self.block = as_int(block, "block", where, 1, 2**63)
        self.register_buffer("X_train", X_train.detach().contiguous())
        self.s = s

    def forward(self, x: torch.Tensor, sigma: Number) -> torch.Tensor:
        return optimal_denoiser(x, self.X_train, sigma, self.s, block=self.block)

    def extra_repr(self) -> str:
        return f"N={self.X_train.shape[0]}, sample_shape={tuple(self.X_train.shape[1:])}, s={self.s}"
