"""Jacobian spectrum and numerical rank of denoisers (paper Lemma 2 and eq. (46)).

* :func:`dae_jacobian_spectrum`: closed-form singular values (and right singular vectors) of the
  Jacobian ``J = d x_theta / d x_t`` of the subspace denoiser. ``J = Ubar G Ubar^T`` with
  ``Ubar = [U_1 .. U_K] = Q R``, so ``svals(J) = |eig(R G R^T)|``: O(D^3) per sample with
  ``D = sum d_k`` and no n x n matrix (fused C++ op ``torch.ops.molrg.dae_jacobian_spectrum``).
* :func:`numerical_rank`: eq. (46), batched.
* :func:`jacobian_spectrum`, :func:`jacobian_rank`, :func:`jacobian_directions`: the same for any
  callable ``denoiser(x, sigma)``: ``"analytic"`` (a :class:`~molrg_ext.SubspaceDAE`),
  ``"jacrev"`` (batched ``vmap(jacrev)`` + SVD) or ``"lanczos"`` (matrix-free: randomized block
  subspace iteration on ``J^T J`` with JVP/VJP, the tail energy from a Hutchinson estimate).
"""
from __future__ import annotations

import math
import threading
from typing import Callable, NamedTuple, Optional

import torch

from . import _C  # noqa: F401  (registers torch.ops.molrg.*)
from ._autocast import disabled, to_float32
from ._args import (as_int, check_denoiser_output, check_number_or_tensor, check_positive,
                    prepare_dae_args, restore)

__all__ = [
    "dae_jacobian_spectrum",
    "numerical_rank",
    "jacobian_spectrum",
    "jacobian_rank",
    "jacobian_directions",
    "JacobianSpectrum",
    "stack_bases",
    "sym_eig",
]

METHODS = ("auto", "analytic", "jacrev", "lanczos")


# ----------------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("molrg::dae_jacobian_spectrum")
def _spectrum_fake(x, U, R, c, phi, bias, assign, dims, mode, vectors):
    P, B, _ = x.shape
    r = R.shape[1]
    vecs = x.new_empty((P, B, r, r)) if vectors else x.new_empty((0,))
    return x.new_empty((P, B, r)), vecs


@torch.library.register_fake("molrg::sym_eig")
def _sym_eig_fake(A, vectors):
    n = A.shape[-1]
    vecs = A.new_empty(A.shape) if vectors else A.new_empty((0,))
    return A.new_empty(A.shape[:-2] + (n,)), vecs


# The spectrum ops are not differentiable: their outputs never require grad, and a backward
# (reachable only by bypassing that) fails loudly instead of returning a wrong zero.
def _non_diff_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _make_non_diff_backward(name: str):
    def _backward(ctx, *grads):
        raise RuntimeError(f"molrg::{name} is not differentiable")

    return _backward


torch.library.register_autograd(
    "molrg::dae_jacobian_spectrum",
    _make_non_diff_backward("dae_jacobian_spectrum"),
    setup_context=_non_diff_setup,
)
torch.library.register_autograd(
    "molrg::sym_eig", _make_non_diff_backward("sym_eig"), setup_context=_non_diff_setup
)


# ------------------------------------------------------------------------------ analytic spectrum
def stack_bases(U: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``Ubar = [U_1[:, :d_1] .. U_K[:, :d_K]]``: ``U`` [P, K, n, dmax] -> [P, n, sum d_k]."""
    return torch.cat([U[:, k, :, :d] for k, d in enumerate(dims)], dim=-1)


def sym_eig(A: torch.Tensor, vectors: bool = False):
    """Eigen-decomposition of small symmetric matrices ``A`` [..., m, m] with the package's own
    batched solver (Householder tridiagonalisation + implicit QR). Uses ``(A + A^T) / 2``.
    Returns eigenvalues ascending [..., m] and, if ``vectors``, eigenvectors as columns."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"sym_eig: A must be a torch.Tensor, got {type(A).__name__}")
    lam, V = torch.ops.molrg.sym_eig(A, bool(vectors))
    return (lam, V) if vectors else lam


def dae_jacobian_spectrum(
    x: torch.Tensor,
    U: torch.Tensor,
    c,
    phi,
    bias: Optional[torch.Tensor] = None,
    dims=None,
    mode: str = "soft",
    return_vectors: bool = False,
    assign: Optional[torch.Tensor] = None,
):
    """Singular values of ``J = d subspace_dae(x, U, c, phi, bias, dims, mode) / dx`` per sample.

    Arguments are those of :func:`molrg_ext.subspace_dae`. The weights ``w`` include ``bias``
    (which does not depend on ``x``); in hard mode ``J = c U_k0 U_k0^T`` (the assignment is
    piecewise constant). Returns ``svals`` [..., min(n, D)] in descending order (D = sum d_k; J
    has no other non-zero singular value) and, when ``return_vectors``, the right singular vectors
    [..., n, min(n, D)] as columns (``J`` is symmetric: they are also its eigenvectors).
    Not differentiable (outputs never require grad).
    """
    where = "dae_jacobian_spectrum"
    x, U, c, phi, bias = to_float32(x, U, c, phi, bias)  # under torch.autocast
    a = prepare_dae_args(x, U, c, phi, bias, dims, mode, assign, where=where)
    with torch.no_grad(), disabled(a.x):  # QR and the vectors' product in float32 too
        Ub = stack_bases(a.U.detach(), a.dims)
        Q, R = torch.linalg.qr(Ub)  # reduced: Q [P, n, r], R [P, r, D]
        sv, V = torch.ops.molrg.dae_jacobian_spectrum(
            a.x.detach(), a.U.detach(), R.contiguous(), a.c.detach(), a.phi.detach(),
            None if a.bias is None else a.bias.detach(), a.assign, a.dims, a.mode,
            bool(return_vectors),
        )
        if not return_vectors:
            return restore(sv, a)
        vecs = torch.matmul(Q.unsqueeze(1), V)  # [P, B, n, r]
    return restore(sv, a), restore(vecs, a)


# --------------------------------------------------------------------------------- numerical rank
def numerical_rank(svals: torch.Tensor, eta: float = 0.99, tail=None) -> torch.Tensor:
    """Eq. (46): the smallest ``r`` with ``sum_{i<=r} s_i^2 / sum_i s_i^2 > eta^2``, batched over
    leading dimensions of ``svals`` [..., m] (sorted internally; must be >= 0 and finite).

    ``tail`` (optional, broadcastable to ``svals.shape[:-1]``) is energy outside the listed
    values (e.g. a matrix-free estimate of ``sum_{i>m} s_i^2``); it enters the denominator, and
    when even all m values do not pass the threshold the result is ``m + 1`` (a lower bound).
    A zero spectrum has rank 0. Returns int64 [...].
    """
    if not isinstance(svals, torch.Tensor):
        raise TypeError(f"numerical_rank: svals must be a torch.Tensor, got {type(svals).__name__}")
    if not svals.is_floating_point():
        raise TypeError(f"numerical_rank: svals must be floating point, got {svals.dtype}")
    if svals.dim() == 0:
        raise ValueError("numerical_rank: svals must have a last dimension of singular values")
    if not isinstance(eta, (int, float)) or not 0.0 < float(eta) < 1.0:
        raise ValueError(f"numerical_rank: eta must be a number in (0, 1), got {eta!r}")
    # Value checks are data-dependent: skipped while torch.compile traces (shape checks stay).
    checking = not torch.compiler.is_compiling()
    if checking and svals.numel() and (not torch.isfinite(svals).all() or (svals < 0).any()):
        raise ValueError("numerical_rank: svals must be finite and >= 0")
    lead = svals.shape[:-1]
    s = torch.sort(svals.double(), dim=-1, descending=True).values
    tail_t = None
    if tail is not None:
        tail_t = torch.as_tensor(check_number_or_tensor(tail, "tail", "numerical_rank"),
                                 dtype=torch.float64, device=svals.device)
        try:
            ok = torch.broadcast_shapes(tail_t.shape, lead) == lead
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"numerical_rank: tail of shape {tuple(tail_t.shape)} must broadcast "
                             f"to svals.shape[:-1] = {tuple(lead)}")
        if checking and (not torch.isfinite(tail_t).all() or (tail_t < 0).any()):
            raise ValueError("numerical_rank: tail must be finite and >= 0")
    # Energies relative to the largest value (or sqrt(tail)): squares of large float64 values
    # (1e160 and up) would overflow to inf and give rank m + 1.
    top = s[..., 0] if s.shape[-1] else s.new_zeros(lead)
    if tail_t is not None:
        top = torch.maximum(top, tail_t.sqrt())
    scale = torch.where(top > 0, top, torch.ones_like(top)).unsqueeze(-1)
    e = (s / scale).square()
    cum = torch.cumsum(e, dim=-1)
    total = cum[..., -1] if e.shape[-1] else e.new_zeros(lead)
    if tail_t is not None:
        total = total + tail_t / scale[..., 0].square()
    thresh = (float(eta) ** 2) * total
    below = (cum <= thresh.unsqueeze(-1)).sum(-1)
    rank = below + 1
    return torch.where(total > 0, rank, torch.zeros_like(rank))


# ------------------------------------------------------------------------- any denoiser: helpers
class JacobianSpectrum(NamedTuple):
    """Top singular values of the Jacobian per sample.

    svals: [B, m] descending. vectors: [B, m, *event_shape] right singular vectors (rows), or
    None. tail: [B] energy ``sum s_i^2`` outside the listed values (exact methods: the spectrum
    is complete and tail is 0; ``lanczos``: a Hutchinson estimate)."""

    svals: torch.Tensor
    vectors: Optional[torch.Tensor]
    tail: torch.Tensor


def _is_subspace_dae(denoiser) -> bool:
    from .modules import SubspaceDAE

    return isinstance(denoiser, SubspaceDAE)


def _sigma_per_sample(sigma, x: torch.Tensor, B: int, where: str) -> torch.Tensor:
    s = torch.as_tensor(check_number_or_tensor(sigma, "sigma", where), dtype=x.dtype,
                        device=x.device)
    try:
        s = torch.broadcast_to(s, (B,))
    except RuntimeError as e:
        raise ValueError(f"{where}: sigma of shape {tuple(s.shape)} does not broadcast to [B = {B}]") from e
    return check_positive(s, "sigma", where).contiguous()


def _check_common(denoiser, x_t, method: str, where: str):
    if not callable(denoiser):
        raise TypeError(f"{where}: denoiser must be callable as denoiser(x, sigma)")
    if not isinstance(x_t, torch.Tensor):
        raise TypeError(f"{where}: x_t must be a torch.Tensor, got {type(x_t).__name__}")
    if x_t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{where}: x_t must be float32 or float64, got {x_t.dtype}")
    if x_t.dim() < 2 or x_t.shape[0] == 0:
        raise ValueError(f"{where}: x_t must be [B, ...] with B >= 1, got shape {tuple(x_t.shape)}")
    if not torch.isfinite(x_t).all():
        raise ValueError(f"{where}: x_t contains NaN or Inf values")
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}, got {method!r}")


def _check_k(k, n: int, where: str) -> int:
    k = as_int(k, "k", where, 1)
    if k > n:
        raise ValueError(f"{where}: k must be an int in [1, n = {n}], got {k}")
    return k


def _flat_fn(denoiser, event_shape, where: str):
    """The denoiser on flat [M, n] inputs. Its output is checked here as far as that needs no
    values (this runs under torch.func transforms); check_denoiser_output checks the plain output
    (the values) afterwards."""
    n = math.prod(event_shape)

    def f(xf: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        M = xf.shape[0]
        x = xf.reshape(M, *event_shape)
        y = check_denoiser_output(denoiser(x, sig), x, sig, where, values=False)
        return y.reshape(M, n)

    return f


def _analytic(denoiser, x_t, sigma, vectors: bool, where: str) -> JacobianSpectrum:
    if not _is_subspace_dae(denoiser):
        raise ValueError(f"{where}: method='analytic' needs a molrg_ext.SubspaceDAE denoiser")
    if x_t.shape[-1] != denoiser.n:
        raise ValueError(f"{where}: x_t has n = {x_t.shape[-1]} but the denoiser has n = {denoiser.n}")
    B = x_t.shape[-2]
    sig = _sigma_per_sample(sigma, x_t, B, where)
    c, phi, bias = denoiser.coefficients(sig)
    U = denoiser.U.detach()
    out = dae_jacobian_spectrum(x_t, U, c, phi, bias, denoiser.dims, denoiser.mode, vectors)
    if vectors:
        sv, V = out
        return JacobianSpectrum(sv, V.transpose(-1, -2), sv.new_zeros(sv.shape[:-1]))
    return JacobianSpectrum(out, None, out.new_zeros(out.shape[:-1]))


def _jacrev(f, xf, sig, vectors: bool, chunk_size, check) -> JacobianSpectrum:
    def single(xb, sb):
        y = f(xb.unsqueeze(0), sb.unsqueeze(0)).squeeze(0)
        return y, y  # the output itself as aux, to check its values (check(y, x))

    jac = torch.func.jacrev(single, has_aux=True)
    J, Y = torch.func.vmap(jac, chunk_size=chunk_size)(xf, sig)  # [B, n, n], [B, n]
    check(Y, xf)
    J = J.detach()
    if vectors:
        _, S, Vh = torch.linalg.svd(J)
        return JacobianSpectrum(S, Vh, S.new_zeros(S.shape[:-1]))
    S = torch.linalg.svdvals(J)
    return JacobianSpectrum(S, None, S.new_zeros(S.shape[:-1]))


def _orth(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(A).Q


# torch.func.jvp enters a forward-AD level, and PyTorch keeps those levels process-wide: two
# threads inside jvp at once deleted each other's level (RuntimeError: "Trying to access a forward
# AD level with an invalid index") or got wrong tangents. The lock serialises our JVPs; the VJPs
# and everything else still run concurrently. Forward AD that other code runs in other threads at
# the same time is beyond it. Re-entrant: it is held while the denoiser runs, and a denoiser may
# itself take a Lanczos spectrum.
_JVP_LOCK = threading.RLock()


def _lanczos(f, xf, sig, k: int, iters: int, oversample: int, probes: int,
             generator, check) -> JacobianSpectrum:
    """Randomized block subspace iteration on J^T J (Halko, Martinsson, Tropp 2011, alg. 4.4)
    with batched JVPs / VJPs; every sample of the batch is handled at once by stacking the block
    columns along the batch axis (the denoiser must treat samples independently). The output of
    the first JVP goes through check(y, x)."""
    B, n = xf.shape
    l = min(n, k + oversample)

    def stack(V):  # [B, n, m] -> [m*B, n]
        return V.permute(2, 0, 1).reshape(-1, n)

    def unstack(Y, m):  # [m*B, n] -> [B, n, m]
        return Y.reshape(m, B, n).permute(1, 2, 0)

    def rep(m):
        return xf.repeat(m, 1), sig.repeat(m)

    unchecked = [True]

    def jv(V):
        m = V.shape[-1]
        X, S = rep(m)
        with _JVP_LOCK:
            y, t = torch.func.jvp(lambda z: f(z, S), (X,), (stack(V),))
        if unchecked:
            check(y, X)
            unchecked.clear()
        return unstack(t.detach(), m)

    vjp_cache = {}

    def jtv(Y):
        m = Y.shape[-1]
        if m not in vjp_cache:
            X, S = rep(m)
            vjp_cache[m] = torch.func.vjp(lambda z: f(z, S), X)[1]
        (g,) = vjp_cache[m](stack(Y))
        return unstack(g.detach(), m)

    V = _orth(torch.randn(B, n, l, generator=generator, dtype=xf.dtype).to(xf.device))
    for _ in range(iters):
        Y = _orth(jv(V))
        V = _orth(jtv(Y))
    Y = jv(V)  # J V = W S Zh  =>  J ~ W S (V Z)^T on span(V)
    _, S, Zh = torch.linalg.svd(Y, full_matrices=False)
    Vk = torch.matmul(V, Zh.transpose(-1, -2))[..., :k]  # [B, n, k]
    S = S[..., :k]
    # Tail energy sum_{i>k} s_i^2 = tr((I - Vk Vk^T) J^T J (I - Vk Vk^T)), Hutchinson estimate
    # with Rademacher probes projected onto the complement of the top-k directions.
    tail = S.new_zeros(B)
    if probes > 0 and k < n:
        Z = torch.randint(0, 2, (B, n, probes), generator=generator).to(xf) * 2 - 1
        Z = Z - torch.matmul(Vk, torch.matmul(Vk.transpose(-1, -2), Z))
        JZ = jv(Z)
        tail = JZ.square().sum(dim=(-2, -1)) / probes
    return JacobianSpectrum(S, Vk.transpose(-1, -2), tail)


def jacobian_spectrum(
    denoiser: Callable,
    x_t: torch.Tensor,
    sigma,
    method: str = "auto",
    k: Optional[int] = None,
    *,
    vectors: bool = False,
    iters: int = 4,
    oversample: int = 8,
    probes: int = 16,
    chunk_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> JacobianSpectrum:
    """Singular values (and optionally right singular vectors) of ``d denoiser(x_t, sigma)/dx_t``.

    ``denoiser(x, sigma)`` maps ``x`` [M, *event_shape] and per-sample ``sigma`` [M] to a
    tensor of the shape of ``x``, treating samples independently (eval mode). ``x_t`` is
    [B, *event_shape] (a :class:`~molrg_ext.SubspaceDAE` also takes [P, B, n]); ``sigma`` a number
    or [B]. ``method``: ``"analytic"`` (SubspaceDAE only, closed form), ``"jacrev"`` (full
    Jacobian by ``vmap(jacrev)``, then SVD; ``chunk_size`` bounds memory), ``"lanczos"``
    (matrix-free top-``k``, default k = min(n, 32)), ``"auto"``: analytic for a SubspaceDAE,
    else jacrev when n <= 1024, else lanczos. ``k`` truncates the exact methods too. The
    analytic spectrum has min(n, sum d_k) entries (the Jacobian's rank is at most sum d_k); a
    larger ``k`` appends zero singular values and, with ``vectors``, an orthonormal basis of the
    null space, so that k always gives k entries.
    """
    where = "jacobian_spectrum"
    _check_common(denoiser, x_t, method, where)
    event_shape = tuple(x_t.shape[1:])
    n = math.prod(event_shape)
    if k is not None:
        k = _check_k(k, n, where)
    if chunk_size is not None:
        chunk_size = as_int(chunk_size, "chunk_size", where, 1)
    iters, oversample, probes = (as_int(v, name, where, 0) for name, v in
                                 (("iters", iters), ("oversample", oversample), ("probes", probes)))
    if method == "auto":
        method = "analytic" if _is_subspace_dae(denoiser) else ("jacrev" if n <= 1024 else "lanczos")
    if method == "analytic":
        out = _analytic(denoiser, x_t, sigma, vectors, where)
    else:
        # (a SubspaceDAE runs its pure-PyTorch composition under the transforms: ops.py)
        B = x_t.shape[0]
        sig = _sigma_per_sample(sigma, x_t, B, where)
        f = _flat_fn(denoiser, event_shape, where)
        xf = x_t.detach().reshape(B, n)

        def check(y, x):
            check_denoiser_output(y, x, sigma, where)

        # Without grad mode: the transforms differentiate w.r.t. their own inputs regardless,
        # and a network's parameters that require grad would otherwise make every chunk's
        # Jacobian carry its autograd graph until the chunks are joined (memory grew with B
        # whatever chunk_size was: 629 MB instead of 172 MB for an MLP at B = 4096, n = 48).
        with torch.no_grad():
            if method == "jacrev":
                out = _jacrev(f, xf, sig, vectors, chunk_size, check)
            else:
                kk = min(n, 32) if k is None else k
                out = _lanczos(f, xf, sig, kk, iters, oversample, probes, generator, check)
        if out.vectors is not None:
            out = out._replace(vectors=out.vectors.reshape(*out.vectors.shape[:-1], *event_shape))
    if k is not None and k < out.svals.shape[-1]:
        extra = out.svals[..., k:].square().sum(-1)
        vecs = out.vectors
        if vecs is not None:
            vecs = vecs.narrow(out.svals.dim() - 1, 0, k)
        out = JacobianSpectrum(out.svals[..., :k], vecs, out.tail + extra)
    elif k is not None and k > out.svals.shape[-1]:
        out = _pad_null_space(out, k)
    return out


def _pad_null_space(out: JacobianSpectrum, k: int) -> JacobianSpectrum:
    """The analytic spectrum of rank r = min(n, sum d_k) completed to k > r entries: zero
    singular values, and as their right singular vectors an orthonormal basis of the complement
    of the r vectors (the Jacobian's null space; any basis of it is one), so that ``k`` always
    gives k entries as the other methods do."""
    r = out.svals.shape[-1]
    svals = torch.cat([out.svals, out.svals.new_zeros(*out.svals.shape[:-1], k - r)], -1)
    vecs = out.vectors
    if vecs is not None:  # [..., r, n]: the full QR of their columns spans the complement
        Q = torch.linalg.qr(vecs.transpose(-1, -2), mode="complete").Q
        vecs = torch.cat([vecs, Q[..., r:k].transpose(-1, -2)], -2)
    return JacobianSpectrum(svals, vecs, out.tail)


def jacobian_rank(
    denoiser: Callable,
    x_t: torch.Tensor,
    sigma,
    eta: float = 0.99,
    method: str = "auto",
    *,
    k: Optional[int] = None,
    **kwargs,
) -> torch.Tensor:
    """Numerical rank (eq. (46)) of the denoiser's Jacobian at every sample: int64 [B] ([P, B]).

    With ``method="lanczos"`` the top-k spectrum and the estimated tail energy give the rank;
    k starts at ``k`` (default min(n, 16)) and doubles until the threshold is reached within the
    computed values (or k = n); the exact methods ignore ``k`` (it is checked all the same).
    Other keywords go to :func:`jacobian_spectrum`.
    """
    if not isinstance(eta, (int, float)) or not 0.0 < float(eta) < 1.0:
        raise ValueError(f"jacobian_rank: eta must be a number in (0, 1), got {eta!r}")
    _check_common(denoiser, x_t, method, "jacobian_rank")
    n = math.prod(x_t.shape[1:])
    if k is not None:
        k = _check_k(k, n, "jacobian_rank")
    m = method
    if m == "auto":
        m = "analytic" if _is_subspace_dae(denoiser) else ("jacrev" if n <= 1024 else "lanczos")
    if m != "lanczos":
        sp = jacobian_spectrum(denoiser, x_t, sigma, m, None, **kwargs)
        return numerical_rank(sp.svals, eta)
    kk = min(n, 16) if k is None else k
    while True:
        sp = jacobian_spectrum(denoiser, x_t, sigma, "lanczos", kk, **kwargs)
        rank = numerical_rank(sp.svals, eta, tail=sp.tail)
        if bool((rank <= kk).all()) or kk >= n:
            return rank.clamp(max=n)
        kk = min(n, 2 * kk)


def jacobian_directions(
    denoiser: Callable, x_t: torch.Tensor, sigma, k: int, method: str = "auto", **kwargs
) -> torch.Tensor:
    """Top-``k`` right singular vectors of the denoiser's Jacobian at each sample (the editing
    directions of Section 4.2): [B, k, *event_shape] unit vectors, in descending singular-value
    order (the sign of each vector is arbitrary)."""
    if k is None:  # jacobian_spectrum would return all n directions
        raise TypeError("jacobian_directions: k must be an int (the number of directions), "
                        "got None")
    sp = jacobian_spectrum(denoiser, x_t, sigma, method, k, vectors=True, **kwargs)
    return sp.vectors
