"""The benchmarks' array-library peers: the denoiser's fwd+bwd, the training step and the Jacobian
spectrum written against an array module ``xp`` (CuPy on a GPU, the ``cupy`` rows of
:mod:`molrg_ext.bench`; NumPy in the tests, which check the math against the fused ops).

Shapes (equal subspace dimensions, as the benchmark cases use): ``x`` [P, B, n], ``U``
[P, K, n, d], ``c`` and ``phi`` [P, B]. The gradient wrt ``U`` is written out by hand (the array
libraries have no autograd), by formulas algebraically equal to the kernels':

    y = c sum_k w_k U_k P_k,   P_k = U_k^T x,   w = softmax_k(phi ||P_k||^2) (soft) or one-hot
    dU_k = sum_b x (c w_k r_k + 2 phi dl_k P_k)^T + g (c w_k P_k)^T,   r_k = U_k^T g,
    dl_k = w_k (h_k - sum_j w_j h_j),   h_k = c <r_k, P_k>   (0 in hard mode)

(the kernels evaluate dl_k as c w_k sum_{j != k} w_j (<r_k, P_k> - <r_j, P_j>), which is exactly
0 for saturated weights: kernels::dae_dlogit)

for an upstream gradient g = dL/dy.
"""
from __future__ import annotations

__all__ = ["dae_forward", "dae_grad_U", "train_step_arrays", "jacobian_spectrum"]


def dae_forward(xp, x, U, c, phi, mode, assign=None):
    """Returns (proj [P,B,K,d], w [P,B,K], y [P,B,n]). assign [P,B] (optional, hard mode): the
    component of each sample instead of the argmax of ||P_k||^2 (the training step takes it from
    the clean sample)."""
    proj = xp.einsum("pbn,pknd->pbkd", x, U)
    sq = (proj * proj).sum(-1)
    if mode == "soft":
        lg = phi[..., None] * sq
        w = xp.exp(lg - lg.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
    elif mode == "hard":
        k0 = sq.argmax(-1) if assign is None else assign
        w = xp.eye(U.shape[1], dtype=x.dtype)[k0]
    else:
        raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
    y = c[..., None] * xp.einsum("pbkd,pknd->pbn", w[..., None] * proj, U)
    return proj, w, y


def dae_grad_U(xp, x, U, c, phi, proj, w, g, mode):
    """dL/dU [P,K,n,d] from the upstream gradient g = dL/dy [P,B,n] (the forward's proj, w)."""
    r = xp.einsum("pbn,pknd->pbkd", g, U)
    cw = c[..., None] * w
    dP = cw[..., None] * r
    if mode == "soft":  # the weights' dependence on x through the logits
        h = c[..., None] * (r * proj).sum(-1)
        dl = w * (h - (w * h).sum(-1, keepdims=True))
        dP = dP + 2 * phi[..., None, None] * dl[..., None] * proj
    return (xp.einsum("pbn,pbkd->pknd", x, dP)
            + xp.einsum("pbn,pbkd->pknd", g, cw[..., None] * proj))


def train_step_arrays(xp, X, U, table, idx, lev, eps, mode):
    """One training step of P instances from given draws: idx [P,M] sample indices into X
    [P,N,n], lev [P,M] rows of the level table [L,5] (s, gamma, lambda, c, phi), eps [P,M,n] the
    noise. Returns (loss [P], grad_U [P,K,n,d]): the mean over the M slots of
    lambda ||D(x_t) - x_0||^2 with x_t = s x_0 + gamma eps, and its gradient wrt U (the
    contract of :func:`molrg_ext.train_step`; hard mode assigns by the clean sample)."""
    M = idx.shape[1]
    x0 = xp.take_along_axis(X, idx[..., None], axis=1)
    s, gm, lam, c, phi = (table[lev, j] for j in range(5))
    xt = s[..., None] * x0 + gm[..., None] * eps
    assign = None
    if mode == "hard":
        q = xp.einsum("pbn,pknd->pbkd", x0, U)
        assign = (q * q).sum(-1).argmax(-1)
    proj, w, y = dae_forward(xp, xt, U, c, phi, mode, assign)
    diff = y - x0
    loss = (lam * (diff * diff).sum(-1)).mean(1)
    g = (2 / M) * lam[..., None] * diff
    return loss, dae_grad_U(xp, xt, U, c, phi, proj, w, g, mode)


def jacobian_spectrum(xp, x, U, c, phi, mode):
    """Singular values [B, n] (descending) of the denoiser's Jacobian dy/dx at each of B samples
    of one instance (x [B,n], U [K,n,d], c and phi [B]): J is formed and decomposed,
    J = c sum_k w_k U_k U_k^T + 2 c phi sum_k w_k a_k (a_k - a_bar)^T with a_k = U_k P_k and
    a_bar = sum_j w_j a_j (the second sum only in soft mode, where w depends on x)."""
    proj, w, _ = dae_forward(xp, x[None], U[None], c[None], phi[None], mode)
    proj, w = proj[0], w[0]  # [B,K,d], [B,K]
    UUt = xp.einsum("knd,kmd->knm", U, U)
    J = c[:, None, None] * xp.einsum("bk,knm->bnm", w, UUt)
    if mode == "soft":
        a = xp.einsum("bkd,knd->bkn", proj, U)
        abar = xp.einsum("bk,bkn->bn", w, a)
        J = J + (2 * c * phi)[:, None, None] * xp.einsum("bk,bkn,bkm->bnm", w, a,
                                                         a - abar[:, None, :])
    return xp.linalg.svd(J, compute_uv=False)
