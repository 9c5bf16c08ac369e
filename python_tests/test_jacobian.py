"""Jacobian spectrum / numerical rank (SPEC section 4): fused op vs autograd, Lemma 2, Fig. 3(b),
matrix-free method vs full SVD, numerical_rank semantics, errors, opcheck and torch.compile."""
import math

import pytest
import torch
from torch import nn

import molrg_ext as M
from molrg_ext import reference as ref
from molrg_ext.jacobian import sym_eig

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _bases(n, dims, overlapping, g, dtype=F64):
    """[K, n, dmax] bases (padded with garbage past d_k, which must be ignored)."""
    K, dm = len(dims), max(dims)
    U = torch.randn(K, n, dm, generator=g, dtype=dtype)  # garbage padding
    if overlapping:
        for k, d in enumerate(dims):
            U[k, :, :d] = M.random_orthonormal(n, d, generator=g, dtype=dtype)
    else:
        Q = M.random_orthonormal(n, sum(dims), generator=g, dtype=dtype)
        off = 0
        for k, d in enumerate(dims):
            U[k, :, :d] = Q[:, off:off + d]
            off += d
    return U


def _autograd_jac(x, U, c, phi, bias, dims, mode):
    """Per-sample n x n Jacobians of the pure-PyTorch reference: [B, n, n]."""
    out = []
    for b in range(x.shape[0]):
        bb = None if bias is None else bias[b:b + 1]

        def f(z):
            return ref.subspace_dae(z[None], U, c[b:b + 1], phi[b:b + 1], bb, dims, mode)[0]

        out.append(torch.autograd.functional.jacobian(f, x[b]))
    return torch.stack(out)


# --------------------------------------------------------------------------------- eigensolver
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_sym_eig_matches_eigh(dtype, tol):
    g = _gen(0)
    mats = []
    for n in (1, 2, 3, 7, 20):
        A = torch.randn(n, n, generator=g, dtype=F64)
        mats.append((n, A + A.T))
    # degenerate, zero, clustered, graded and already-diagonal matrices
    Q = M.random_orthonormal(9, 9, generator=g, dtype=F64)
    lam = torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 0.0, 0.0, -2.0, -2.0], dtype=F64)
    mats += [(9, torch.eye(9, dtype=F64)), (9, torch.zeros(9, 9, dtype=F64)),
             (9, Q @ torch.diag(lam) @ Q.T), (9, torch.diag(lam)),
             (9, Q @ torch.diag(10.0 ** -torch.arange(9.0, dtype=F64) * 6) @ Q.T)]
    for n, A in mats:
        A = A.to(dtype)
        w, V = sym_eig(A, vectors=True)
        w_ref = torch.linalg.eigvalsh(A.double())
        scale = max(1.0, A.abs().max().item())
        assert (w.double() - w_ref).abs().max().item() <= tol * scale * n
        VV = V.double()
        assert (VV.T @ VV - torch.eye(n, dtype=F64)).abs().max().item() <= tol * n
        resid = A.double() @ VV - VV * w.double()[None, :]
        assert resid.abs().max().item() <= tol * scale * n
        assert torch.equal(sym_eig(A), w)


def test_sym_eig_batched_and_symmetrises():
    g = _gen(1)
    A = torch.randn(2, 3, 6, 6, generator=g, dtype=F64)
    w = sym_eig(A)
    assert w.shape == (2, 3, 6)
    torch.testing.assert_close(w, torch.linalg.eigvalsh((A + A.mT) / 2), rtol=0, atol=1e-12)
    # two blocks 200 orders of magnitude apart (a purely relative deflation test stalls here)
    B = torch.zeros(4, 4, dtype=F64)
    B[:2, :2] = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    B[2:, 2:] = torch.tensor([[2.0, 1.0], [1.0, 2.0]]) * 1e-200
    B[1, 2] = B[2, 1] = 1e-250
    torch.testing.assert_close(sym_eig(B)[-2:], torch.tensor([1.0, 3.0], dtype=F64))


@pytest.mark.parametrize("dtype,scales", [(torch.float32, (1e-30, 1e-12, 1e12, 1e19, 1e30)),
                                          (torch.float64, (1e-250, 1e-100, 1e100, 1e160, 1e250))])
def test_sym_eig_extreme_scales(dtype, scales):
    """Finite matrices of any magnitude: entries beyond 2^+-20 are scaled by a power of two
    before the reduction (1e19 in float32 used to overflow the QR shifts and fail)."""
    g = _gen(7)
    A = torch.randn(6, 6, generator=g, dtype=F64)
    A = A + A.T
    w_ref = torch.linalg.eigvalsh(A)
    for sc in scales:
        w, V = sym_eig((A * sc).to(dtype), vectors=True)
        tol = 2e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(w.double() / sc, w_ref, rtol=tol, atol=tol * w_ref.abs().max())
        VV = V.double()
        assert (VV.T @ VV - torch.eye(6, dtype=F64)).abs().max() < 10 * tol


def test_dae_jacobian_spectrum_huge_c():
    x, U = _small(torch.float32)
    sv1 = M.dae_jacobian_spectrum(x, U, 1.0, 1.0, dims=[2, 3])
    for c in (1e20, 1e-25):  # J and M scale with c; 1e20 failed to converge in float32
        sv = M.dae_jacobian_spectrum(x, U, c, 1.0, dims=[2, 3])
        torch.testing.assert_close(sv.double() / c, sv1.double(), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------- analytic vs autograd
CASES = [
    # n, dims, overlapping
    (12, [3, 3], False),
    (12, [2, 4, 3], False),
    (12, [2, 4, 3], True),
    (7, [4, 3, 5], True),  # D = 12 > n = 7
]


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("n,dims,overlapping", CASES)
def test_analytic_spectrum_matches_autograd_svd(mode, n, dims, overlapping):
    g = _gen(hash((n, tuple(dims), overlapping)) % 1000)
    B, K, D = 6, len(dims), sum(dims)
    U = _bases(n, dims, overlapping, g)
    x = torch.randn(B, n, generator=g, dtype=F64) * 2
    c = torch.rand(B, generator=g, dtype=F64) + 0.2
    phi = torch.rand(B, generator=g, dtype=F64) * 0.5
    bias = torch.randn(B, K, generator=g, dtype=F64)
    sv = M.dae_jacobian_spectrum(x, U, c, phi, bias, dims, mode)
    r = min(n, D)
    assert sv.shape == (B, r)
    S = torch.linalg.svdvals(_autograd_jac(x, U, c, phi, bias, dims, mode))
    torch.testing.assert_close(sv, S[:, :r], rtol=1e-10, atol=1e-11)
    if r < n:  # J = Ubar G Ubar^T has no other non-zero singular value
        assert S[:, r:].abs().max().item() < 1e-12
    assert (sv[:, :-1] >= sv[:, 1:]).all()


def test_vectors_are_singular_vectors_and_instances():
    g = _gen(3)
    P, B, n, dims = 2, 4, 10, [3, 2, 4]
    U = torch.stack([_bases(n, dims, True, g) for _ in range(P)])  # [P, K, n, dm]
    x = torch.randn(P, B, n, generator=g, dtype=F64)
    c = torch.rand(P, B, generator=g, dtype=F64) + 0.5
    phi = torch.rand(P, B, generator=g, dtype=F64)
    sv, V = M.dae_jacobian_spectrum(x, U, c, phi, None, dims, "soft", return_vectors=True)
    assert sv.shape == (P, B, 9) and V.shape == (P, B, n, 9)
    for p in range(P):
        J = _autograd_jac(x[p], U[p], c[p], phi[p], None, dims, "soft")
        torch.testing.assert_close(sv[p], torch.linalg.svdvals(J)[:, :9], rtol=1e-10, atol=1e-11)
        Vp = V[p]
        torch.testing.assert_close(Vp.mT @ Vp, torch.eye(9, dtype=F64).expand(B, 9, 9),
                                   rtol=0, atol=1e-12)
        JV = J @ Vp
        torch.testing.assert_close(JV.norm(dim=-2), sv[p], rtol=1e-10, atol=1e-11)
        # J symmetric and ||J v|| = |v^T J v| <=> v is an eigenvector (Cauchy-Schwarz)
        torch.testing.assert_close((Vp * JV).sum(-2).abs(), sv[p], rtol=1e-10, atol=1e-11)


def test_float32_is_stable_at_small_noise():
    """phi ~ 1e8 at sigma = 1e-4: the op must not lose the float32 digits to cancellation."""
    g = _gen(4)
    n, d = 48, 6
    U = _bases(n, [d, d], False, g)
    x0 = U[0] @ torch.randn(d, 32, generator=g, dtype=F64)
    for sigma in (1e-4, 1e-2, 1.0, 20.0):
        xt = (x0 + sigma * torch.randn(n, 32, generator=g, dtype=F64)).T.contiguous()
        c, phi, bias = M.posterior_mean_coefficients(1.0, torch.tensor(sigma, dtype=F64), [d, d])
        s64 = M.dae_jacobian_spectrum(xt, U, c, phi, bias, [d, d])
        s32 = M.dae_jacobian_spectrum(xt.float(), U.float(), c.float(), phi.float(),
                                      bias.float(), [d, d])
        assert ((s32.double() - s64).abs().max() / s64.max()).item() < 1e-5


def test_float32_with_subnormal_weights_matches_float64():
    """K = 4, phi = 20: some soft-max weights fall in float32's subnormal range (exp(-87) and
    below), which the CPU op flushes to zero (FTZ/DAZ, csrc/cpu/flush_subnormals.h; the op ran
    3.3x faster with it on this problem at B = 4096); the spectrum must still match float64's,
    and the caller's thread must get its floating-point mode back."""
    g = _gen(9)
    n, dims, B = 48, [6, 6, 6, 6], 512
    U = torch.randn(4, n, 6, generator=g, dtype=F64) / n**0.5
    x = torch.randn(B, n, generator=g, dtype=F64)
    c, phi = torch.full((B,), 0.9, dtype=F64), torch.full((B,), 20.0, dtype=F64)
    sq = torch.einsum("bn,knd->bkd", x, U).square().sum(-1)
    w = torch.softmax(phi[:, None] * sq, -1).float()  # what float32 rounds the weights to
    tiny = torch.finfo(torch.float32).tiny
    assert ((w > 0) & (w < tiny)).sum() > 10
    s64 = M.dae_jacobian_spectrum(x, U, c, phi, None, dims)
    s32 = M.dae_jacobian_spectrum(x.float(), U.float(), c.float(), phi.float(), None, dims)
    # float32's own rounding of the 2 phi P P^T terms (spectra up to 127 here) gives 3.0e-5 of the
    # largest value, the same with and without the flush (measured against the build before it)
    assert ((s32.double() - s64).abs().max() / s64.max()).item() < 1e-4
    assert ((torch.tensor([1e-38]) * torch.tensor([0.01])) != 0).all()


# --------------------------------------------------------------------------- Lemma 2, Fig. 3(b)
def _molrg_samples(U, dims, B, g, return_labels=False):
    K = len(dims)
    k = torch.randint(0, K, (B,), generator=g)
    a = torch.randn(B, max(dims), generator=g, dtype=F64)
    mask = torch.arange(max(dims))[None, :] < torch.tensor(dims)[k][:, None]
    x = torch.einsum("bnd,bd->bn", U[k], a * mask)
    return (x, k) if return_labels else x


def test_lemma2_rank_bounds_over_noise_range():
    g = _gen(5)
    n, dims = 30, [3, 5, 4]
    U = _bases(n, dims, False, g)
    dae = M.SubspaceDAE(n, dims, U=U, dtype=F64)
    x0, label = _molrg_samples(U, dims, 64, g, return_labels=True)
    for sigma in torch.logspace(-3, 2, 11, dtype=F64).tolist():
        xt = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=F64)
        sv = M.jacobian_spectrum(dae, xt, sigma).svals
        exact = (sv > 1e-9 * sv[:, :1]).sum(-1)
        assert exact.min().item() >= min(dims) and exact.max().item() <= sum(dims)
        num = M.jacobian_rank(dae, xt, sigma)
        assert num.min().item() >= min(dims) and num.max().item() <= sum(dims)
    # at the extremes the bounds are attained: every subspace alive / only the sample's own
    hi = M.jacobian_rank(dae, x0 + 100 * torch.randn(x0.shape, generator=g, dtype=F64), 100.0)
    assert (hi == sum(dims)).all()
    lo = M.jacobian_rank(dae, x0 + 1e-3 * torch.randn(x0.shape, generator=g, dtype=F64), 1e-3)
    assert torch.equal(lo, torch.tensor(dims)[label].to(lo.dtype))


def test_fig3b_rank_is_2d_at_high_noise_and_d_at_low_noise():
    g = _gen(6)
    n, d = 48, 6
    U = _bases(n, [d, d], False, g)
    dae = M.SubspaceDAE(n, [d, d], U=U, dtype=F64)  # true subspaces, EDM (s = 1)
    x0 = _molrg_samples(U, [d, d], 100, g)
    ranks = {}
    for sigma in (80.0, 10.0, 0.1, 0.002):
        xt = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=F64)
        ranks[sigma] = M.jacobian_rank(dae, xt, sigma)
    assert (ranks[80.0] == 2 * d).all() and (ranks[10.0] == 2 * d).all()
    assert (ranks[0.1] == d).all() and (ranks[0.002] == d).all()


def test_hard_mode_rank_is_assigned_dimension():
    g = _gen(7)
    n, dims = 20, [2, 5]
    U = _bases(n, dims, True, g)
    dae = M.SubspaceDAE(n, dims, U=U, dtype=F64, mode="hard")
    xt = torch.randn(16, n, generator=g, dtype=F64)
    k0 = M.hard_assign(xt, U, dims)
    sv = M.jacobian_spectrum(dae, xt, 0.5).svals
    torch.testing.assert_close(
        (sv > 1e-9).sum(-1), torch.tensor(dims)[k0], rtol=0, atol=0)
    # J = c U_k U_k^T with orthonormal U_k: the non-zero singular values all equal c
    c = 1.0 / (1.0 + 0.25)
    torch.testing.assert_close(sv[:, :2], torch.full((16, 2), c, dtype=F64))


# ---------------------------------------------------------------------------- numerical_rank
def test_numerical_rank_definition():
    s = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],      # rank 1
        [1.0, 1.0, 1.0, 1.0],      # 3/4 < 0.9801 -> 4
        [0.0, 3.0, 0.0, 4.0],      # unsorted: 16/25 = 0.64 -> 2
        [1.0, 0.1, 0.0, 0.0],      # 1/1.01 = 0.990099 > 0.9801 -> 1
        [1.0, 0.15, 0.0, 0.0],     # 1/1.0225 = 0.978 -> 2
        [0.0, 0.0, 0.0, 0.0],      # zero Jacobian -> 0
    ], dtype=F64)
    torch.testing.assert_close(M.numerical_rank(s), torch.tensor([1, 4, 2, 1, 2, 0]))
    # eta^2 = 0.25: 1/4 is not > 0.25, so four equal values need r = 2
    torch.testing.assert_close(M.numerical_rank(s, eta=0.5), torch.tensor([1, 2, 1, 1, 1, 0]))
    # batched leading dims; and eq. (46) by brute force on random spectra
    g = _gen(8)
    R = torch.rand(3, 5, 9, generator=g, dtype=F64) ** 4
    got = M.numerical_rank(R, eta=0.9)
    assert got.shape == (3, 5)
    e = torch.sort(R, -1, descending=True).values.square()
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(5)):
        ei = e[idx[0], idx[1]]
        want = next(r for r in range(1, 10) if ei[:r].sum() / ei.sum() > 0.81)
        assert got[idx[0], idx[1]].item() == want
    # tail energy enters the denominator; not reached within the listed values -> m + 1
    torch.testing.assert_close(M.numerical_rank(torch.tensor([[1.0, 1.0]]), tail=0.0),
                               torch.tensor([2]))
    torch.testing.assert_close(M.numerical_rank(torch.tensor([[1.0, 1.0]]), tail=1.0),
                               torch.tensor([3]))


def test_numerical_rank_errors():
    with pytest.raises(ValueError, match="eta"):
        M.numerical_rank(torch.ones(3), eta=1.0)
    with pytest.raises(ValueError, match="eta"):
        M.numerical_rank(torch.ones(3), eta=0)
    with pytest.raises(ValueError, match="svals"):
        M.numerical_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="svals"):
        M.numerical_rank(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="svals"):
        M.numerical_rank(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="tail"):
        M.numerical_rank(torch.ones(3), tail=-1.0)
    with pytest.raises(ValueError, match=r"tail of shape \(5, 3\) must broadcast"):
        M.numerical_rank(torch.ones(3, 2), tail=torch.ones(5, 3))
    with pytest.raises(ValueError, match=r"tail of shape \(4,\) must broadcast"):
        M.numerical_rank(torch.ones(3, 2), tail=torch.ones(4))
    with pytest.raises(TypeError, match="tail must be a number or a tensor"):
        M.numerical_rank(torch.ones(3), tail="1")


def test_numerical_rank_of_huge_and_tiny_values():
    # squares of 1e160 overflow float64: energies are taken relative to the largest value
    for sc in (1e-300, 1e-160, 1.0, 1e160, 1e300):
        s = torch.tensor([[1.0, 1.0, 1e-3], [3.0, 2.0, 1.0]], dtype=F64) * sc
        torch.testing.assert_close(M.numerical_rank(s), torch.tensor([2, 3]))
        if 1e-150 < sc < 1e150:  # the tail is an energy (squared units): representable here
            torch.testing.assert_close(
                M.numerical_rank(s, tail=torch.tensor([0.0, 100.0], dtype=F64) * sc * sc),
                torch.tensor([2, 4]))


# -------------------------------------------------------------------- any denoiser: MLP, methods
class _MLP(nn.Module):
    """Small noise-conditioned MLP denoiser with a decaying Jacobian spectrum."""

    def __init__(self, n, h=24, seed=0):
        super().__init__()
        g = _gen(seed)
        self.W1 = nn.Parameter(torch.randn(h, n + 1, generator=g, dtype=F64) / math.sqrt(n))
        self.W2 = nn.Parameter(torch.randn(n, h, generator=g, dtype=F64) / math.sqrt(h))
        self.register_buffer("A", torch.diag(0.7 ** torch.arange(n, dtype=F64)))

    def forward(self, x, sigma):
        shape = x.shape
        xf = x.reshape(shape[0], -1)
        s = torch.broadcast_to(torch.as_tensor(sigma, dtype=xf.dtype), (shape[0],))
        h = torch.tanh(torch.cat([xf, torch.log(s)[:, None]], -1) @ self.W1.T)
        return (h @ self.W2.T + xf @ self.A.T).reshape(shape)


def test_jacrev_and_lanczos_match_full_svd_on_mlp():
    n, B = 16, 5
    net = _MLP(n)
    g = _gen(9)
    x = torch.randn(B, n, generator=g, dtype=F64)
    sigma = torch.rand(B, generator=g, dtype=F64) + 0.1
    J = torch.stack([torch.autograd.functional.jacobian(
        lambda z: net(z[None], sigma[b:b + 1])[0], x[b]) for b in range(B)])
    S_ref = torch.linalg.svdvals(J)
    jr = M.jacobian_spectrum(net, x, sigma, "jacrev")
    torch.testing.assert_close(jr.svals, S_ref, rtol=1e-10, atol=1e-12)
    assert M.jacobian_spectrum(net, x, sigma).svals.shape == (B, n)  # auto -> jacrev
    k = 4
    lz = M.jacobian_spectrum(net, x, sigma, "lanczos", k, vectors=True, iters=6, probes=64,
                             generator=_gen(10))
    torch.testing.assert_close(lz.svals, S_ref[:, :k], rtol=1e-8, atol=1e-10)
    # top-k right singular vectors agree with the SVD's up to sign
    Vh = torch.linalg.svd(J).Vh[:, :k]
    cos = (lz.vectors * Vh).sum(-1).abs()
    torch.testing.assert_close(cos, torch.ones(B, k, dtype=F64), rtol=0, atol=1e-6)
    # Hutchinson tail estimate of sum_{i>k} s_i^2
    tail = S_ref[:, k:].square().sum(-1)
    assert ((lz.tail - tail).abs() / tail).max().item() < 0.35
    # the rank estimate agrees with the exact one
    r_exact = M.numerical_rank(S_ref)
    r_lz = M.jacobian_rank(net, x, sigma, method="lanczos", k=4, iters=6, probes=64,
                           generator=_gen(11))
    assert (r_lz - r_exact).abs().max().item() <= 1
    assert (r_lz == r_exact).float().mean().item() >= 0.8


def test_auto_analytic_matches_jacrev_on_reference_denoiser():
    g = _gen(12)
    n, dims = 14, [3, 4]
    # generic (non-orthonormal) bases: distinct singular values, so directions are unique
    U = torch.randn(2, n, 4, generator=g, dtype=F64) / math.sqrt(n) * 2
    dae = M.SubspaceDAE(n, dims, U=U, dtype=F64)

    dt = torch.tensor(dims, dtype=F64)

    def plain(x, sigma):  # the same posterior mean in plain PyTorch (vmap/jacrev-able), s = 1
        s2 = sigma * sigma
        c, phi = 1.0 / (1.0 + s2), 1.0 / (2.0 * s2 * (1.0 + s2))
        bias = math.log(0.5) - 0.5 * dt * torch.log1p(1.0 / s2)[..., None]
        return ref.subspace_dae(x, U, c, phi, bias, dims, "soft")

    x = _molrg_samples(U, dims, 8, g) + 0.7 * torch.randn(8, n, generator=g, dtype=F64)
    sigma = torch.linspace(0.3, 2.0, 8, dtype=F64)
    a = M.jacobian_spectrum(dae, x, sigma, k=7)
    j = M.jacobian_spectrum(plain, x, sigma, "jacrev", k=7)
    torch.testing.assert_close(a.svals, j.svals, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.tail, j.tail, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(M.jacobian_rank(dae, x, sigma),
                               M.jacobian_rank(plain, x, sigma, method="jacrev"))
    da = M.jacobian_directions(dae, x, sigma, 3)
    dj = M.jacobian_directions(plain, x, sigma, 3, method="jacrev")
    assert da.shape == dj.shape == (8, 3, n)
    gap = (a.svals[:, :3] - a.svals[:, 1:4]).abs().min().item()
    assert gap > 1e-6  # distinct singular values: directions unique up to sign
    torch.testing.assert_close((da * dj).sum(-1).abs(), torch.ones(8, 3, dtype=F64),
                               rtol=0, atol=1e-8)


def test_directions_keep_event_shape():
    net = _MLP(12, seed=1)
    x = torch.randn(3, 2, 2, 3, generator=_gen(13), dtype=F64)  # image-like samples
    v = M.jacobian_directions(net, x, 0.5, 2)
    assert v.shape == (3, 2, 2, 2, 3)
    torch.testing.assert_close(v.reshape(3, 2, 12).norm(dim=-1), torch.ones(3, 2, dtype=F64))
    v2 = M.jacobian_directions(net, x, 0.5, 2, method="lanczos", iters=6, generator=_gen(0))
    assert v2.shape == v.shape
    torch.testing.assert_close((v * v2).reshape(3, 2, 12).sum(-1).abs(),
                               torch.ones(3, 2, dtype=F64), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- errors
def _small(dtype=F64):
    g = _gen(14)
    U = _bases(8, [2, 3], False, g, dtype)
    x = torch.randn(4, 8, generator=g, dtype=dtype)
    return x, U


def test_bad_inputs_give_clear_errors():
    x, U = _small()
    with pytest.raises(ValueError, match="mode"):
        M.dae_jacobian_spectrum(x, U, 1.0, 1.0, dims=[2, 3], mode="medium")
    with pytest.raises(ValueError, match="dims"):
        M.dae_jacobian_spectrum(x, U, 1.0, 1.0, dims=[2, 9])
    with pytest.raises(ValueError, match="K = 0"):
        M.dae_jacobian_spectrum(x, U[:0], 1.0, 1.0, dims=[])
    with pytest.raises(TypeError, match="U has dtype"):
        M.dae_jacobian_spectrum(x, U.float(), 1.0, 1.0, dims=[2, 3])
    with pytest.raises(ValueError, match="n = "):
        M.dae_jacobian_spectrum(x[:, :5], U, 1.0, 1.0, dims=[2, 3])
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="x contains NaN"):
        M.dae_jacobian_spectrum(bad, U, 1.0, 1.0, dims=[2, 3])
    with pytest.raises(RuntimeError, match="phi contains NaN"):
        M.dae_jacobian_spectrum(x, U, 1.0, float("inf"), dims=[2, 3])
    # the raw op checks R against the sizes
    a = torch.zeros(1, 4, 8, dtype=F64)
    U4 = U[None].contiguous()
    cc = torch.ones(1, 4, dtype=F64)
    with pytest.raises(RuntimeError, match=r"R must have shape \[1, 5, 5\]"):
        torch.ops.molrg.dae_jacobian_spectrum(a, U4, torch.zeros(1, 4, 5, dtype=F64), cc, cc,
                                              None, None, [2, 3], 0, False)
    with pytest.raises(RuntimeError, match="mode must be 0"):
        torch.ops.molrg.dae_jacobian_spectrum(a, U4, torch.zeros(1, 5, 5, dtype=F64), cc, cc,
                                              None, None, [2, 3], 4, False)
    with pytest.raises(RuntimeError, match="assign is only used in hard mode"):
        torch.ops.molrg.dae_jacobian_spectrum(a, U4, torch.zeros(1, 5, 5, dtype=F64), cc, cc,
                                              None, torch.zeros(1, 4, dtype=torch.long), [2, 3],
                                              0, False)
    with pytest.raises(RuntimeError, match="A must be square"):
        torch.ops.molrg.sym_eig(torch.zeros(3, 4), False)
    with pytest.raises(RuntimeError, match="A contains NaN"):
        sym_eig(torch.full((3, 3), float("nan")))


def test_bad_inputs_generic_api():
    x, U = _small()
    dae = M.SubspaceDAE(8, [2, 3], U=U, dtype=F64)
    net = _MLP(8)
    with pytest.raises(ValueError, match="method"):
        M.jacobian_rank(net, x, 1.0, method="power")
    with pytest.raises(ValueError, match="analytic"):
        M.jacobian_rank(net, x, 1.0, method="analytic")
    # jacrev and lanczos work on a SubspaceDAE too (its pure-PyTorch composition under torch.func)
    torch.testing.assert_close(M.jacobian_rank(dae, x, 1.0, method="jacrev"),
                               M.jacobian_rank(dae, x, 1.0, method="analytic"))
    with pytest.raises(ValueError, match="eta"):
        M.jacobian_rank(dae, x, 1.0, eta=1.5)
    with pytest.raises(ValueError, match="sigma"):
        M.jacobian_rank(net, x, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        M.jacobian_rank(net, x, torch.ones(3, dtype=F64))
    with pytest.raises(TypeError, match="sigma must be a number or a tensor"):
        M.jacobian_rank(net, x, "a")
    with pytest.raises(ValueError, match="B >= 1"):
        M.jacobian_rank(net, x[:0], 1.0)
    with pytest.raises(ValueError, match="k must be"):
        M.jacobian_directions(net, x, 1.0, 9)
    with pytest.raises(ValueError, match="NaN"):
        M.jacobian_rank(net, x * float("nan"), 1.0)
    with pytest.raises(TypeError, match="callable"):
        M.jacobian_rank(3, x, 1.0)
    with pytest.raises(ValueError, match="n = 5"):
        M.jacobian_rank(dae, x[:, :5], 1.0)


def test_not_differentiable_and_empty_batch():
    x, U = _small()
    Ug = U.clone().requires_grad_(True)
    sv = M.dae_jacobian_spectrum(x.requires_grad_(True), Ug, 1.0, 0.5, dims=[2, 3])
    assert not sv.requires_grad
    R = torch.linalg.qr(M.jacobian.stack_bases(Ug[None].detach(), [2, 3])).R
    out, _ = torch.ops.molrg.dae_jacobian_spectrum(
        x[None].detach().requires_grad_(True), Ug[None], R.contiguous(),
        torch.ones(1, 4, dtype=F64), torch.ones(1, 4, dtype=F64), None, None, [2, 3], 0, False)
    assert not out.requires_grad
    e = M.dae_jacobian_spectrum(x[:0].detach(), U, 1.0, 0.5, dims=[2, 3])
    assert e.shape == (0, 5)


# ------------------------------------------------------------------------ opcheck and compile
def _op_args(dtype, mode, vectors, bias, assign):
    g = _gen(15)
    P, B, n, dims = 2, 3, 7, [2, 3]
    U = torch.stack([_bases(n, dims, True, g, dtype) for _ in range(P)])
    x = torch.randn(P, B, n, generator=g, dtype=dtype)
    R = torch.linalg.qr(M.jacobian.stack_bases(U, dims)).R.contiguous()
    c = torch.rand(P, B, generator=g, dtype=dtype) + 0.5
    phi = torch.rand(P, B, generator=g, dtype=dtype)
    b = torch.randn(P, B, 2, generator=g, dtype=dtype) if bias else None
    a = torch.randint(0, 2, (P, B), generator=g) if assign else None
    return (x, U, R, c, phi, b, a, dims, mode, vectors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,vectors,bias,assign", [
    (0, False, False, False), (0, True, True, False), (1, True, False, True),
    (1, False, False, False)])
def test_opcheck_spectrum(dtype, mode, vectors, bias, assign):
    torch.library.opcheck(torch.ops.molrg.dae_jacobian_spectrum,
                          _op_args(dtype, mode, vectors, bias, assign))


@pytest.mark.parametrize("vectors", [False, True])
def test_opcheck_sym_eig(vectors):
    A = torch.randn(2, 5, 5, generator=_gen(16), dtype=F64)
    torch.library.opcheck(torch.ops.molrg.sym_eig, (A + A.mT, vectors))


def test_compile_fullgraph_round_trip():
    x, U = _small()
    c = torch.full((4,), 0.8, dtype=F64)
    phi = torch.full((4,), 0.3, dtype=F64)

    def f(x, U, c, phi):
        sv = M.dae_jacobian_spectrum(x, U, c, phi, dims=[2, 3])
        return M.numerical_rank(sv), sv

    eager = f(x, U, c, phi)
    torch._dynamo.reset()
    comp = torch.compile(f, fullgraph=True, backend="aot_eager")(x, U, c, phi)
    torch.testing.assert_close(comp[1], eager[1])
    torch.testing.assert_close(comp[0], eager[0])


@pytest.mark.parametrize("k", [5, 6])
def test_analytic_k_above_the_rank_pads_with_the_null_space(k):
    """The analytic spectrum has sum d_k = 4 entries; k = 5, 6 (<= n = 6) asked for directions
    past the rank, and got 4 of them (shape [3, 4, 6], where jacrev gives [3, k, 6]). Now: zero
    singular values and an orthonormal completion, which the Jacobian maps to zero."""
    g = _gen(5)
    n, dims = 6, [2, 2]
    U = torch.randn(2, n, 2, generator=g, dtype=F64) / math.sqrt(n) * 2
    dae = M.SubspaceDAE(n, dims, U=U, dtype=F64)
    x = torch.randn(3, n, generator=g, dtype=F64)
    sp = M.jacobian_spectrum(dae, x, 0.5, k=k, vectors=True)
    assert sp.svals.shape == (3, k) and sp.vectors.shape == (3, k, n)
    full = M.jacobian_spectrum(dae, x, 0.5, vectors=True)
    assert full.svals.shape == (3, 4)  # without k: the rank's worth, as documented
    torch.testing.assert_close(sp.svals[:, :4], full.svals, rtol=0, atol=0)
    assert (sp.svals[:, 4:] == 0).all() and (sp.tail == 0).all()
    V = sp.vectors
    torch.testing.assert_close(V @ V.transpose(-1, -2), torch.eye(k, dtype=F64).expand(3, k, k),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(V[:, :4], full.vectors, rtol=0, atol=0)
    s2 = torch.tensor(0.25, dtype=F64)
    c, phi = 1.0 / (1.0 + s2), 1.0 / (2.0 * s2 * (1.0 + s2))
    bias = math.log(0.5) - 0.5 * torch.tensor(dims, dtype=F64) * torch.log1p(1.0 / s2)
    for b in range(3):
        J = torch.func.jacrev(lambda z: ref.subspace_dae(z[None], U, c[None], phi[None],
                                                         bias[None], dims, "soft")[0])(x[b])
        torch.testing.assert_close(J @ V[b, 4:].T, torch.zeros(n, k - 4, dtype=F64),
                                   rtol=0, atol=1e-12)
    assert M.jacobian_directions(dae, x, 0.5, k).shape == (3, k, n)


@pytest.mark.parametrize("method", ["jacrev", "lanczos"])
def test_network_jacobian_records_no_parameter_graph(method, monkeypatch):
    """With parameters that require grad (any freshly trained network), the vmapped Jacobians
    and outputs carried each chunk's autograd graph w.r.t. the parameters until the chunks were
    joined, so memory grew with B whatever chunk_size was (629 MB against 172 MB for an MLP at
    B = 4096, n = 48). The transforms now run without grad mode: same values, no graph."""
    import molrg_ext.jacobian as J

    seen = []
    real = J.check_denoiser_output

    def spy(y, x, sigma, where, values=True):
        if values:  # the plain outputs after the transforms (values=False: inside them)
            seen.append(y.requires_grad)
        return real(y, x, sigma, where, values)

    monkeypatch.setattr(J, "check_denoiser_output", spy)
    net = _MLP(8)
    assert all(p.requires_grad for p in net.parameters())
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    kw = dict(k=4, generator=torch.Generator().manual_seed(2)) if method == "lanczos" else {}
    sv = M.jacobian_spectrum(net, x, 0.5, method=method, **kw).svals
    assert seen and not any(seen)
    for p in net.parameters():
        p.requires_grad_(False)
    kw = dict(k=4, generator=torch.Generator().manual_seed(2)) if method == "lanczos" else {}
    torch.testing.assert_close(sv, M.jacobian_spectrum(net, x, 0.5, method=method, **kw).svals)


def test_lanczos_from_several_threads_matches_serial():
    """torch.func.jvp's forward-AD levels are process-wide: two threads in jacobian_spectrum's
    Lanczos at once had each other's level deleted (RuntimeError) or got wrong spectra. The JVPs
    are serialised by a lock; every concurrent result equals its serial twin bit for bit."""
    import concurrent.futures

    net = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 24)).double()
    den = lambda x, s: net(x) / (1 + s[:, None] ** 2)  # noqa: E731
    xs = [torch.randn(4, 24, generator=_gen(40 + i), dtype=F64) for i in range(4)]

    def spectrum(i):
        with torch.no_grad():
            return M.jacobian_spectrum(den, xs[i], 0.3, "lanczos", k=5, iters=2,
                                       generator=_gen(50 + i)).svals

    want = [spectrum(i) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(spectrum, [i % 4 for i in range(48)]))
    for i, sv in enumerate(got):
        assert torch.equal(sv, want[i % 4]), i


def test_lanczos_inside_a_denoiser_does_not_deadlock():
    """The JVP lock is held while the denoiser runs; a denoiser that takes a Lanczos spectrum
    itself re-enters it (a plain Lock hung there). Run in a daemon thread so a hang fails."""
    import threading

    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    inner = lambda x, s: net(x)  # noqa: E731

    def outer(x, s):
        M.jacobian_spectrum(inner, x.detach(), 0.5, "lanczos", k=2, iters=1, probes=0)
        return net(x)

    x = torch.randn(2, 8, generator=_gen(60), dtype=F64)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(
        "svals", M.jacobian_spectrum(outer, x, 0.5, "lanczos", k=2, iters=1, probes=0,
                                     generator=_gen(61)).svals),
        daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "deadlock"
    with torch.no_grad():
        want = M.jacobian_spectrum(inner, x, 0.5, "lanczos", k=2, iters=1, probes=0,
                                   generator=_gen(61)).svals
    assert torch.equal(out["svals"], want)
