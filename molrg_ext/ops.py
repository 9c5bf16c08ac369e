"""Python interface of the fused subspace-denoiser ops (``torch.ops.molrg.*``).

The fake (meta) kernels are registered here; the denoiser's autograd kernel is C++
(``csrc/subspace_dae_autograd.cpp``). The ops work with ``torch.autograd``,
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck``. Under torch.func transforms
(grad, jacrev, jacfwd, jvp, vmap) and forward-mode AD, :func:`subspace_dae` runs the same math
as a pure-PyTorch composition (``molrg_ext.reference``): the kernels have reverse-mode autograd
only. Double backward (``create_graph=True`` through the backward) raises an error. Under
``torch.autocast`` they run in float32 (float16 / bfloat16 inputs are cast; ``_autocast``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the shared library that registers torch.ops.molrg.*)
from . import reference
from ._args import needs_composite, prepare_dae_args, restore
from ._autocast import disabled, to_float32

__all__ = ["subspace_dae", "hard_assign"]


# ----------------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("molrg::subspace_dae")
def _subspace_dae_fake(x, U, c, phi, bias, assign, dims, mode):
    P, B, n = x.shape
    K, dm = U.shape[1], U.shape[3]
    return x.new_empty((P, B, n)), x.new_empty((P, B, K, dm)), x.new_empty((P, B, K))


@torch.library.register_fake("molrg::subspace_dae_backward")
def _subspace_dae_backward_fake(grad_y, x, U, c, phi, proj, w, dims, mode, need_dx, need_dU):
    P, B, _ = x.shape
    K = U.shape[1]
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    dU = U.new_empty(U.shape) if need_dU else x.new_empty((0,))
    return dx, dU, x.new_empty((P, B)), x.new_empty((P, B)), x.new_empty((P, B, K))


@torch.library.register_fake("molrg::hard_assign")
def _hard_assign_fake(x0, U, dims):
    return x0.new_empty(x0.shape[:2], dtype=torch.long)


# ------------------------------------------------------------------------------------ public API
def subspace_dae(
    x: torch.Tensor,
    U: torch.Tensor,
    c,
    phi,
    bias: Optional[torch.Tensor] = None,
    dims=None,
    mode: str = "soft",
    assign: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Multi-subspace denoiser ``y = c * sum_k w_k U_k U_k^T x`` (paper eqs. (9) and (16)).

    Args:
        x: ``[B, n]`` or ``[P, B, n]`` noisy samples (float32 or float64).
        U: ``[K, n, dmax]`` or ``[P, K, n, dmax]`` subspace bases; columns past ``dims[k]`` are
            ignored. A 3-D ``U`` with a 3-D ``x`` is shared by all P instances.
        c: output scale, a number or a tensor broadcastable to ``[B]`` (``[P, B]``).
        phi: soft-max sharpness, same forms as ``c``.
        bias: optional logit bias broadcastable to ``[B, K]`` (``[P, B, K]``), e.g. ``log pi_k``.
        dims: the K subspace dimensions d_k (list, tuple or int tensor); default all ``dmax``.
        mode: ``"soft"`` (soft-max weights, eq. (9)) or ``"hard"`` (one-hot weights, eq. (16)).
        assign: hard mode only, the component of each sample (int64, broadcastable to ``[B]``),
            e.g. :func:`hard_assign` of the clean samples (eq. (17)); default ``argmax_k ||U_k^T x||``.

    Returns:
        ``y`` with the shape of ``x``. Differentiable w.r.t. ``x``, ``U``, ``c``, ``phi``, ``bias``.
        Under ``torch.autocast`` float16 / bfloat16 inputs are cast to float32 and ``y`` is
        float32 (the float32 policy of torch's softmax and norms); outside it they are refused.

    On CPU the kernels flush subnormal values (below 1.2e-38 in float32) to zero: far components'
    soft-max weights fall there, and x86 cores are many times slower on them. Results differ from
    exact IEEE arithmetic by less than that per operation. The CUDA kernels keep subnormals (the
    build does not use -ftz), so CPU and GPU may differ by that much.

    Threads: y and the gradients w.r.t. x, c, phi and bias do not depend on the number of
    threads. With P >= 2 instances the gradient w.r.t. U sums the per-thread partial sums in an
    order that does, so two thread counts can differ in its last bits (about 1e-7 relative in
    float32).

    Range: the squared projections ``||U_k^T x||^2`` are formed in the input type, so float32
    needs them inside its normal range (for orthonormal U, samples of norm about 1e-19 to 1e19).
    Unlike :func:`hard_assign` this op does not rescale its input (that would cost a pass over
    x in every call); use float64 for data beyond that range.
    """
    x, U, c, phi, bias = to_float32(x, U, c, phi, bias)  # under torch.autocast
    if needs_composite(x, U, c, phi, bias):  # torch.func transforms, forward-mode AD
        with disabled(x):
            return reference.subspace_dae(x, U, c, phi, bias, dims, mode, assign,
                                          where="subspace_dae")
    a = prepare_dae_args(x, U, c, phi, bias, dims, mode, assign)
    y, _, _ = torch.ops.molrg.subspace_dae(a.x, a.U, a.c, a.phi, a.bias, a.assign, a.dims, a.mode)
    return restore(y, a)


def hard_assign(x0: torch.Tensor, U: torch.Tensor, dims=None) -> torch.Tensor:
    """``argmax_k ||U_k^T x0||`` per sample (ties go to the lowest k), eq. (17). Not differentiable.

    ``x0`` is ``[B, n]`` or ``[P, B, n]``; ``U`` as in :func:`subspace_dae`. Returns int64 ``[B]``
    or ``[P, B]``.

    Data far from unit scale is scaled by a power of two first (exact; the argmax does not
    change): U to about 1 when max |U| is outside 2^+-32, then x0 so that max |x0| max |U| sits
    near 2^48 when it is outside 2^+-56 (float32; float64: 2^+-256, 2^498, 2^+-504). So float32
    labels equal float64's at any common scale, and a sample down to about 2^-110 times the
    largest of its call keeps normal energies; one smaller still has energies below float32's
    range, and its label is 0.
    """
    x0, U = to_float32(x0, U)  # under torch.autocast
    a = prepare_dae_args(x0, U, 0.0, 0.0, dims=dims, where="hard_assign", x_name="x0")
    out = torch.ops.molrg.hard_assign(a.x, a.U, a.dims)
    return restore(out, a)
