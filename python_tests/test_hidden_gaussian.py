"""Tests of the seed-003 tools: optimal (multi-delta) denoiser op, Gaussian denoiser and its
closed-form trajectory, linearity score, linear distillation."""
import math
import warnings

import pytest
import torch

import molrg_ext
from molrg_ext import subspace_dae
from molrg_ext.hidden_gaussian import (
    GaussianDenoiser,
    OptimalDenoiser,
    linear_distill,
    linearity_score,
    optimal_denoiser,
)
from molrg_ext.metrics.linearity import edm_sigma_grid
from molrg_ext.modules import random_orthonormal


def direct_optimal(x, X, sigma, s=1.0):
    """Independent reference: dense soft-max over all training points (eq. (5))."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
    s = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1)
    d2 = ((x[:, None, :] - s[..., None] * X[None]) ** 2).sum(-1)
    return torch.softmax(-d2 / (2 * (s * sigma) ** 2), dim=1) @ X


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------ optimal denoiser op
@pytest.mark.parametrize("block", [1, 7, 64, 1000])
@pytest.mark.parametrize("sigma", [0.05, 0.6, 5.0])
def test_optimal_matches_direct_softmax_float64(block, sigma):
    g = gen(1)
    X = torch.randn(157, 9, generator=g, dtype=torch.float64)
    x = X[torch.randint(0, 157, (11,), generator=g)] + sigma * torch.randn(11, 9, generator=g,
                                                                             dtype=torch.float64)
    y = optimal_denoiser(x, X, sigma, block=block)
    torch.testing.assert_close(y, direct_optimal(x, X, sigma), rtol=1e-12, atol=1e-12)


def test_optimal_per_sample_sigma_and_scale():
    g = gen(2)
    X = torch.randn(80, 5, generator=g, dtype=torch.float64)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.3, 1.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    s = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.1], dtype=torch.float64)
    torch.testing.assert_close(optimal_denoiser(x, X, sigma, s), direct_optimal(x, X, sigma, s),
                               rtol=1e-12, atol=1e-12)


def test_optimal_float32_close_to_float64():
    g = gen(3)
    X = torch.randn(500, 48, generator=g, dtype=torch.float64)
    x = torch.randn(20, 48, generator=g, dtype=torch.float64) * 3
    y64 = direct_optimal(x, X, 3.0)
    y32 = optimal_denoiser(x.float(), X.float(), 3.0)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimal_returns_training_points_at_small_noise(dtype):
    """Memorisation: at sigma = 0.002 (the EDM minimum) D(x_t) is the nearest training point,
    even in float32 where exp(-d^2 / 2 sigma^2) underflows for every other point."""
    g = gen(4)
    X = torch.randn(200, 48, generator=g).to(dtype)
    idx = torch.randint(0, 200, (16,), generator=g)
    x = X[idx] + 0.002 * torch.randn(16, 48, generator=g).to(dtype)
    y = optimal_denoiser(x, X, 0.002)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, X[idx], rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.002, 0.02, 0.2, 0.5, 1.0])
def test_optimal_float32_accurate_where_posterior_is_mixed(sigma, two_point_queries):
    """float32 against the float64 reference on the same inputs, where two training points share
    the weight. At small sigma the kernel must carry the cross term <x, X_j> in double (in float32
    the logits of ||x||^2 - 2<x, X_j> + ||X_j||^2 would be off by O(1) at sigma = 0.002 and the
    weights by a factor e): the result is then exact to float resolution. At mid noise float32
    cross terms are allowed by a rounding bound (logit error < 2^-11), which costs <= ~1e-4."""
    g = gen(21)
    X = torch.randn(300, 48, generator=g)
    ones = torch.ones(48)
    x = two_point_queries(X, ones, sigma * ones, g).to(X.dtype)
    ref = direct_optimal(x.double(), X.double(), sigma)
    xr = x.clone().requires_grad_()
    y = optimal_denoiser(xr, X, sigma)
    tol = 1e-6 if sigma <= 0.02 else 2e-4
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol)
    v = torch.randn(48, 48, generator=g)
    (gx,) = torch.autograd.grad(y, xr, v)
    x64 = x.double().requires_grad_()
    (g64,) = torch.autograd.grad(direct_optimal(x64, X.double(), sigma), x64, v.double())
    # (a third training point may be nearer than both for a few queries: there the posterior is
    # a single point and the gradient ~0, so relative errors are taken against a floor)
    norm = g64.norm(dim=1)
    rel = (gx.double() - g64).norm(dim=1) / norm.clamp_min(1e-3 * norm.median())
    assert rel.max() < 1e-3, rel.max()


@pytest.mark.parametrize("B", [3, 70, 200])
def test_optimal_work_splits_match_direct_float64(B):
    """Two threads: a small batch splits the training set (partial soft-max states merged by
    log-sum-exp), a larger one splits the queries into chunks; partial tiles on both axes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = gen(22)
        X = torch.randn(3001, 32, generator=g, dtype=torch.float64)
        x = (X[torch.randint(0, 3001, (B,), generator=g)]
             + 0.4 * torch.randn(B, 32, generator=g, dtype=torch.float64)).requires_grad_()
        s = torch.full((B,), 0.9, dtype=torch.float64)
        gamma = torch.linspace(0.2, 1.5, B, dtype=torch.float64)
        y, lse = torch.ops.molrg.optimal_denoiser(x, X, s, gamma, 100)
        d2 = ((x.detach()[:, None] - s[:, None, None] * X[None]) ** 2).sum(-1)
        logits = -d2 / (2 * gamma[:, None] ** 2)
        torch.testing.assert_close(lse, torch.logsumexp(logits, 1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y, torch.softmax(logits, 1) @ X, rtol=1e-12, atol=1e-12)
        v = torch.randn(B, 32, generator=g, dtype=torch.float64)
        (gx,) = torch.autograd.grad(y, x, v)
        x64 = x.detach().clone().requires_grad_()
        d2r = ((x64[:, None] - s[:, None, None] * X[None]) ** 2).sum(-1)
        (gr,) = torch.autograd.grad(torch.softmax(-d2r / (2 * gamma[:, None] ** 2), 1) @ X, x64, v)
        torch.testing.assert_close(gx, gr, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_optimal_backward_normalises_saved_lse():
    """The backward recomputes the weights as exp(l - lse) and divides by their sum, so a rounded
    lse (float32 at large |lse|) only shifts a common factor: dx is unchanged. An lse that cannot
    belong to these inputs (every weight underflows, or a logit exceeds it) is an error, not a
    silent zero or overflow."""
    g = gen(23)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    s, gamma = torch.ones(6, dtype=torch.float64), torch.full((6,), 0.7, dtype=torch.float64)
    y, lse = torch.ops.molrg.optimal_denoiser(x, X, s, gamma, 16)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)
    bw = torch.ops.molrg.optimal_denoiser_backward
    torch.testing.assert_close(bw(v, x, X, s, gamma, y, lse + 0.25), bw(v, x, X, s, gamma, y, lse),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="lse is inconsistent"):
        bw(v, x, X, s, gamma, y, lse + 1e4)  # every weight underflows
    with pytest.raises(RuntimeError, match="lse is inconsistent"):
        bw(v, x, X, s, gamma, y, lse - 3.0)  # the maximum logit lies above lse
    with pytest.raises(RuntimeError, match="lse contains NaN"):
        bw(v, x, X, s, gamma, y, torch.full_like(lse, float("nan")))


def test_optimal_extreme_scales_are_errors_not_nan():
    """Below gamma = s sigma ~ 5.27e-155 the logit scale 1 / (2 gamma^2) overflows float64 and
    every weight was NaN (y all NaN, no error); huge s overflowed s^2 ||X_j||^2 the same way.
    Both are errors naming what is out of range; the edge itself still gives the nearest point."""
    g = gen(8)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64)
    x = X[:3] + 0.3
    for sigma, s in [(1e-160, 1.0), (1e-100, 1e-60), (1e-200, 1.0)]:
        with pytest.raises(RuntimeError, match=r"optimal_denoiser: gamma = s \* sigma must be >= "
                                               r"5\.27\d*e-155"):
            optimal_denoiser(x, X, sigma, s=s)
    with pytest.raises(RuntimeError, match="optimal_denoiser: the soft-max of some query is not "
                                           "finite .*s, x_t or X_train too large"):
        optimal_denoiser(x, X, 0.5, s=1e200)
    y = optimal_denoiser(X[:3] + 1e-150, X, 6e-155)
    torch.testing.assert_close(y, X[:3], rtol=0, atol=0)
    # the backward op refuses the same gamma (its lse would be meaningless)
    one = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="optimal_denoiser_backward: gamma = s"):
        torch.ops.molrg.optimal_denoiser_backward(x, x, X, one, one * 1e-160, x, one)


def test_optimal_large_noise_gives_training_mean():
    g = gen(5)
    X = torch.randn(64, 4, generator=g, dtype=torch.float64)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = optimal_denoiser(x, X, 1e4)
    torch.testing.assert_close(y, X.mean(0).expand(3, 4), rtol=0, atol=1e-5)


def test_optimal_gradcheck_float64():
    g = gen(6)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.4, 0.8, 1.0, 1.5, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: optimal_denoiser(z, X, sigma, 0.8, block=9), (x,))


def test_optimal_backward_makes_no_zero_gradient_for_lse(backward_is_one_op):
    # lse is a non-differentiable output: its gradient is None in the backward, not a zero
    # tensor allocated and filled per call
    g = gen(8)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = optimal_denoiser(x, X, 0.9)
    backward_is_one_op(y, torch.randn_like(y), "molrg.optimal_denoiser_backward.default")
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_optimal_gradient_is_posterior_covariance():
    """Tweedie: dD/dx = (s / gamma^2) Cov_w(X); check the vector-Jacobian product directly."""
    g = gen(7)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    x = torch.randn(1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    sigma, s = 0.9, 1.2
    y = optimal_denoiser(x, X, sigma, s)
    v = torch.randn(1, 4, generator=g, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, x, v)
    w = torch.softmax(-((x.detach() - s * X) ** 2).sum(1) / (2 * (s * sigma) ** 2), 0)
    mean = w @ X
    cov = (X - mean).T @ (w[:, None] * (X - mean))
    torch.testing.assert_close(dx, (s / (s * sigma) ** 2) * v @ cov, rtol=1e-10, atol=1e-12)


def test_optimal_opcheck():
    g = gen(8)
    for dtype in (torch.float32, torch.float64):
        X = torch.randn(33, 5, generator=g).to(dtype)
        x = torch.randn(4, 5, generator=g).to(dtype).requires_grad_()
        s = torch.full((4,), 1.0, dtype=dtype)
        gamma = torch.tensor([0.5, 1.0, 2.0, 0.7], dtype=dtype)
        torch.library.opcheck(torch.ops.molrg.optimal_denoiser.default, (x, X, s, gamma, 8))
        y, lse = torch.ops.molrg.optimal_denoiser(x.detach(), X, s, gamma, 8)
        torch.library.opcheck(
            torch.ops.molrg.optimal_denoiser_backward.default,
            (torch.randn_like(y), x.detach(), X, s, gamma, y, lse),
        )


def test_optimal_lse_is_logsumexp():
    g = gen(9)
    X = torch.randn(50, 3, generator=g, dtype=torch.float64)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    gamma = torch.full((4,), 0.3, dtype=torch.float64)
    _, lse = torch.ops.molrg.optimal_denoiser(x, X, torch.ones(4, dtype=torch.float64), gamma, 7)
    ref = torch.logsumexp(-((x[:, None] - X[None]) ** 2).sum(-1) / (2 * 0.09), 1)
    torch.testing.assert_close(lse, ref, rtol=1e-12, atol=1e-12)


def test_optimal_torch_compile_roundtrip():
    torch._dynamo.reset()
    g = gen(10)
    X = torch.randn(60, 8, generator=g)
    x = torch.randn(7, 8, generator=g, requires_grad=True)

    def f(z):
        return optimal_denoiser(z, X, 0.5).square().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_e = f(x)
    (gx_e,) = torch.autograd.grad(out_e, x)
    out_c = cf(x)
    (gx_c,) = torch.autograd.grad(out_c, x)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(gx_c, gx_e)


def test_optimal_module_image_shapes():
    g = gen(11)
    X = torch.randn(20, 1, 4, 4, generator=g, dtype=torch.float64)
    mod = OptimalDenoiser(X)
    x = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    y = mod(x, 0.7)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(3, 16), direct_optimal(x.reshape(3, 16),
                                                                X.reshape(20, 16), 0.7))


def test_optimal_bad_inputs():
    X = torch.randn(10, 4)
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="X_train"):
        optimal_denoiser(x, X.double(), 1.0)
    with pytest.raises(TypeError, match="x_t"):
        optimal_denoiser(x.half(), X.half(), 1.0)
    with pytest.raises(ValueError, match="shape"):
        optimal_denoiser(x, torch.randn(10, 5), 1.0)
    with pytest.raises(ValueError, match="N = 0"):
        optimal_denoiser(x, X[:0], 1.0)
    # an empty batch is an empty result, as for the raw op and subspace_dae (it was an error)
    assert optimal_denoiser(x[:0], X, 1.0).shape == (0, 4)
    with pytest.raises(ValueError, match="sigma"):
        optimal_denoiser(x, X, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        optimal_denoiser(x, X, float("nan"))
    with pytest.raises(ValueError, match="sigma"):
        optimal_denoiser(x, X, torch.ones(2))
    with pytest.raises(ValueError, match=r"sigma of shape \(2, 2\) does not broadcast"):
        optimal_denoiser(torch.randn(4, 4), X, torch.full((2, 2), 0.5))
    # a per-sample column [B, 1] is per-sample sigma
    torch.testing.assert_close(optimal_denoiser(x, X, torch.tensor([[0.3], [0.5], [0.7]])),
                               optimal_denoiser(x, X, torch.tensor([0.3, 0.5, 0.7])))
    with pytest.raises(ValueError, match="s must"):
        optimal_denoiser(x, X, 1.0, s=-1.0)
    with pytest.raises(ValueError, match="block"):
        optimal_denoiser(x, X, 1.0, block=0)
    with pytest.raises(ValueError, match="X_train"):
        optimal_denoiser(x, X.clone().requires_grad_(), 1.0)
    with pytest.raises(RuntimeError, match="optimal_denoiser: x_t contains NaN"):
        optimal_denoiser(torch.full((3, 4), float("nan")), X, 1.0)
    with pytest.raises(RuntimeError, match="optimal_denoiser: X_train contains NaN"):
        optimal_denoiser(x, torch.full((10, 4), float("inf")), 1.0)
    # a training set above the scan's 2^16-value grain, scanned in parallel: one bad value, last
    Xbig = torch.randn(20000, 4, dtype=x.dtype)
    Xbig[-1, -1] = float("nan")
    with pytest.raises(RuntimeError, match="X_train contains NaN"):
        optimal_denoiser(x, Xbig, 1.0)
    one = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"gamma = s \* sigma must be finite and > 0"):
        torch.ops.molrg.optimal_denoiser(x, X, one, torch.zeros(3), 4)
    with pytest.raises(RuntimeError, match=r"optimal_denoiser: x_t must be \[B, n\]"):
        torch.ops.molrg.optimal_denoiser(x[None], X, one, one, 4)
    with pytest.raises(RuntimeError, match="X_train has n = 4 columns but x_t has n = 3"):
        torch.ops.molrg.optimal_denoiser(x[:, :3].contiguous(), X, one, one, 4)
    with pytest.raises(RuntimeError, match="s must have shape"):
        torch.ops.molrg.optimal_denoiser(x, X, torch.ones(4), one, 4)
    # Gradients w.r.t. the training set are not implemented: a clear error, not a silent None.
    Xg = X.clone().requires_grad_()
    y, _ = torch.ops.molrg.optimal_denoiser(x, Xg, one, one, 4)
    with pytest.raises(RuntimeError, match="w.r.t. x only"):
        y.sum().backward()


# ----------------------------------------------------------------------------- Gaussian denoiser
def test_gaussian_fit_moments():
    g = gen(12)
    X = torch.randn(300, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g,
                                                                             dtype=torch.float64)
    X = X + torch.arange(5.0, dtype=torch.float64)
    G = GaussianDenoiser.fit(X)
    torch.testing.assert_close(G.mu, X.mean(0))
    cov = torch.cov(X.T, correction=0)
    torch.testing.assert_close(G.U @ torch.diag(G.lam) @ G.U.T, cov)
    assert (G.lam[:-1] >= G.lam[1:]).all()
    # zero noise is the identity on the data's support (full rank here)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(G(x, 0.0), x)
    # large noise collapses to the mean
    torch.testing.assert_close(G(x, 1e6), G.mu.expand(4, 5), rtol=0, atol=1e-8)


def test_gaussian_fit_rank_deficient_data_is_the_projector_at_zero_noise():
    """Rank-3 data in R^8: eigh gave round-off eigenvalues 5e-16 and 5e-17 beside three exact
    zeros, and they counted as support, so at sigma = 0 the map had rank 5 (||W - P|| = 1.41)
    instead of being the projector onto the data's span."""
    g = gen(0)
    B = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64, generator=g)).Q
    X = torch.randn(500, 3, dtype=torch.float64, generator=g) @ B.T + 2.0
    G = GaussianDenoiser.fit(X)
    assert (G.lam[3:] == 0).all() and (G.lam[:3] > 0.5).all()
    W, b = G.matrix(0.0)
    P = B @ B.T
    torch.testing.assert_close(W, P, rtol=0, atol=1e-12)
    x = torch.randn(4, 8, dtype=torch.float64, generator=g)
    torch.testing.assert_close(G(x, 0.0), G.mu + (x - G.mu) @ P, rtol=0, atol=1e-12)
    # a small but real variance (1e-10 of the largest, far above round-off) stays support
    X2 = X + 1e-5 * torch.randn(500, 1, dtype=torch.float64, generator=g) * G.U[:, 4]
    assert int((GaussianDenoiser.fit(X2).lam > 0).sum()) == 4


def test_gaussian_float32_at_extreme_scales():
    """Scale 1e-20: the eigenvalues are subnormal floats, and dividing by lam + sigma^2 clamped
    at the smallest normal number shrank by 0.012 instead of 0.85 (output 99% off). Scale 1e20:
    the variances overflow float32, and fit stored inf eigenvalues (NaN outputs); it now says
    so."""
    g = gen(1)
    X = torch.randn(100, 8, dtype=torch.float64, generator=g)
    x = torch.randn(3, 8, dtype=torch.float64, generator=g)
    for sc in (1e-20, 1.0):
        G64, G32 = GaussianDenoiser.fit(X * sc), GaussianDenoiser.fit((X * sc).float())
        y64 = G64(x * sc, 0.5 * sc)
        err = (G32((x * sc).float(), 0.5 * sc).double() - y64).norm() / y64.norm()
        assert err.item() < (1e-4 if sc < 1 else 1e-6), (sc, err)
    with pytest.raises(ValueError, match="GaussianDenoiser.fit: X's mean or variances .* "
                                         "overflow torch.float32; rescale X or pass it as float64"):
        GaussianDenoiser.fit((X * 1e20).float())
    assert torch.isfinite(GaussianDenoiser.fit(X * 1e20).lam).all()  # float64 holds them


@pytest.mark.parametrize("sigma", [0.01, 0.5, 2.0, 40.0])
def test_gaussian_equals_subspace_dae_k1(sigma):
    """N(0, U U^T) is the MoLRG with K = 1: D_G must equal subspace_dae with c = 1/(1+sigma^2)."""
    g = gen(13)
    n, d = 12, 3
    U = random_orthonormal(n, d, generator=g, dtype=torch.float64)
    G = GaussianDenoiser.from_moments(torch.zeros(n, dtype=torch.float64), U @ U.T)
    x = torch.randn(9, n, generator=g, dtype=torch.float64) * 2
    c = 1.0 / (1.0 + sigma**2)
    ref = subspace_dae(x, U[None], c, 0.0)
    torch.testing.assert_close(G(x, sigma), ref, rtol=1e-10, atol=1e-12)
    # and it is the exact posterior mean from the MoLRG coefficients (Lemma 1, K = 1)
    dae = molrg_ext.SubspaceDAE(n, [d], U=U[None], dtype=torch.float64)
    torch.testing.assert_close(G(x, sigma), dae(x, sigma), rtol=1e-10, atol=1e-12)


def _heun(D, x, sigmas):
    """EDM probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, Heun (Karras Alg. 1)."""
    out = [x]
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        d0 = (x - D(x, s0)) / s0
        x1 = x + (s1 - s0) * d0
        if s1 > 0:
            d1 = (x1 - D(x1, s1)) / s1
            x1 = x + (s1 - s0) * 0.5 * (d0 + d1)
        x = x1
        out.append(x)
    return torch.stack(out)


def test_gaussian_trajectory_matches_heun():
    g = gen(14)
    n = 6
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    cov = A @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0, 0.0], dtype=torch.float64)) @ A.T
    mu = torch.randn(n, generator=g, dtype=torch.float64)
    G = GaussianDenoiser.from_moments(mu, cov)  # rank-deficient on purpose
    sigmas = edm_sigma_grid(400).tolist()
    x_T = mu + 80.0 * torch.randn(5, n, generator=g, dtype=torch.float64)
    num = _heun(G, x_T, sigmas)
    closed = G.trajectory(x_T, 80.0, sigmas)
    err = (num - closed).abs().max() / x_T.abs().max()
    assert err < 1e-4, err
    # last Heun step is Euler to 0.002; the end point at sigma=0 follows from the formula
    torch.testing.assert_close(G.sample(x_T, 80.0), G.trajectory(x_T, 80.0, [0.0])[0])
    # the sample lies in mu + range(cov): zero-eigenvalue directions (numerically ~1e-15, so
    # shrunk by sqrt(1e-15 / 80^2)) vanish at sigma = 0, while the support keeps O(1) values
    resid = (G.sample(x_T, 80.0) - mu) @ G.U[:, 4:]
    assert resid.abs().max() < 1e-6 * x_T.abs().max()
    assert ((G.sample(x_T, 80.0) - mu) @ G.U[:, :4]).abs().max() > 0.1


def test_gaussian_bad_inputs():
    G = GaussianDenoiser.fit(torch.randn(20, 3))
    with pytest.raises(TypeError, match="dtype"):
        G(torch.randn(2, 3, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="3 entries"):
        G(torch.randn(2, 4), 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        G(torch.randn(0, 3), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        G(torch.randn(2, 3), -1.0)
    with pytest.raises(ValueError, match="sigma"):
        G(torch.randn(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        GaussianDenoiser.fit(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="non-empty"):
        GaussianDenoiser.fit(torch.randn(0, 3))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianDenoiser.from_moments(torch.zeros(2), torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="sigma_T"):
        G.trajectory(torch.randn(2, 3), 0.0, [1.0])


# ---------------------------------------------------------------------------- linearity score
def test_linearity_score_is_one_for_linear_denoisers():
    g = gen(15)
    n = 8
    X = torch.randn(50, n, generator=g, dtype=torch.float64)
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    ls = linearity_score(lambda x, s: x @ W.T / (1 + s), X, n_pairs=20, generator=gen(0))
    torch.testing.assert_close(ls, torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-12)
    G = GaussianDenoiser.from_moments(torch.zeros(n, dtype=torch.float64), torch.cov(X.T))
    torch.testing.assert_close(linearity_score(G, X, [0.1, 1.0, 10.0], n_pairs=20),
                               torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_linearity_score_does_not_depend_on_the_output_scale():
    """F.cosine_similarity clamps the norms at 1e-8: a linear map with outputs of norm ~1e-10
    scored 0.002 (read: far from linear). Scaled outputs now score as the unscaled ones; a zero
    map is exactly linear (1), and a pair with one zero output counts 0."""
    g = gen(17)
    n = 8
    X = torch.randn(50, n, generator=g, dtype=torch.float64)
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    lin = linearity_score(lambda x, s: x @ W.T, X, [0.5, 2.0], n_pairs=20, generator=gen(0))
    tiny = linearity_score(lambda x, s: 1e-12 * (x @ W.T), X, [0.5, 2.0], n_pairs=20,
                           generator=gen(0))
    torch.testing.assert_close(tiny, lin, rtol=0, atol=1e-12)
    torch.testing.assert_close(lin, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    relu = lambda x, s: torch.relu(x - 0.5)  # noqa: E731  (nonlinear, zero on many pairs)
    big = linearity_score(relu, X, [1.0], n_pairs=40, generator=gen(1))
    small = linearity_score(lambda x, s: 1e-30 * relu(x, s), X, [1.0], n_pairs=40,
                            generator=gen(1))
    torch.testing.assert_close(small, big, rtol=0, atol=1e-12)
    assert 0.3 < big.item() < 0.99
    zero = linearity_score(lambda x, s: torch.zeros_like(x), X, [1.0], n_pairs=10)
    assert zero.tolist() == [1.0]
    from molrg_ext.metrics.linearity import _cosines
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3e-200, 4e-200]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [6e-300, 8e-300]], dtype=torch.float64)
    assert _cosines(a, b).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_linearity_score_detects_memorisation():
    """The multi-delta denoiser of a small training set is far from linear at intermediate noise
    (it snaps to training points) and nearly linear at very large noise (it returns the mean)."""
    g = gen(16)
    X = torch.randn(10, 16, generator=g, dtype=torch.float64)
    D = OptimalDenoiser(X)
    ls = linearity_score(D, X, [0.3, 1e4], n_pairs=50, generator=gen(1))
    assert ls[0] < 0.9, ls
    assert ls[1] > 0.999, ls


def _linearity_by_hand(D, X, sigmas, n_pairs, a, b, seed):
    """Eq. (11) computed directly: per level, n_pairs pairs x1, x2 = (training sample) + sigma eps,
    drawn as linearity_score draws them (indices [2, P], then noise [2, P, n], per level),
    and the mean absolute cosine between D(a x1 + b x2) and a D(x1) + b D(x2)."""
    g = gen(seed)
    out = []
    for s in sigmas:
        idx = torch.randint(0, X.shape[0], (2, n_pairs), generator=g)
        eps = torch.randn((2, n_pairs, X.shape[1]), generator=g, dtype=X.dtype)
        x1, x2 = X[idx[0]] + s * eps[0], X[idx[1]] + s * eps[1]
        u = D(a * x1 + b * x2, s)
        v = a * D(x1, s) + b * D(x2, s)
        out.append(((u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))).abs().mean().item())
    return torch.tensor(out, dtype=torch.float64)


def test_linearity_score_matches_eq11_by_hand():
    """A nonlinear, sigma-dependent denoiser (its cosines are not 1, so the combination weights,
    the combined input and the level passed all show in the score), checked against eq. (11)
    by hand at 1e-12, with the paper's weights and with asymmetric ones."""
    g = gen(18)
    n, N, P = 6, 12, 9
    X = torch.randn(N, n, generator=g, dtype=torch.float64)
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64)

    def D(x, s):
        return torch.tanh(x @ W.T / (1 + s)) + c * s / (1 + s)

    sig = [0.3, 1.0, 4.0]
    for a, b in [(2 ** -0.5, 2 ** -0.5), (0.6, 0.8)]:
        ls = linearity_score(D, X, sig, n_pairs=P, alpha=a, beta=b, generator=gen(4))
        ref = _linearity_by_hand(D, X, sig, P, a, b, seed=4)
        torch.testing.assert_close(ls, ref, rtol=0, atol=1e-12)
        assert ls.max() < 0.99, ls  # far from 1: the comparison can tell weights apart
    # the score does depend on the weights: swapping a and b moves it well beyond 1e-12
    swapped = _linearity_by_hand(D, X, sig, P, 0.8, 0.6, seed=4)
    assert (swapped - linearity_score(D, X, sig, n_pairs=P, alpha=0.6, beta=0.8,
                                      generator=gen(4))).abs().max() > 1e-3


def test_linearity_score_reproducible_and_bad_inputs():
    X = torch.randn(30, 4)
    f = lambda x, s: torch.tanh(x)  # noqa: E731
    a = linearity_score(f, X, [1.0, 2.0], generator=gen(3))
    b = linearity_score(f, X, [1.0, 2.0], generator=gen(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sigmas"):
        linearity_score(f, X, [0.0])
    with pytest.raises(ValueError, match="X0"):
        linearity_score(f, X[:0], [1.0])
    with pytest.raises(ValueError, match="n_pairs"):
        linearity_score(f, X, [1.0], n_pairs=0)


def _paper_levels_match(grid) -> bool:
    """The paper prints the levels truncated (not rounded) to the decimals shown (4.066 -> "4.06",
    0.0204 -> "0.020"): each printed value p must satisfy 0 <= level - p < 10^-decimals."""
    paper = ["80.0", "42.415", "21.108", "9.723", "4.06", "1.501", "0.469", "0.116", "0.020",
             "0.002"]
    return len(grid) == len(paper) and all(
        -1e-12 <= a - float(p) < 10.0 ** -len(p.split(".")[1]) for a, p in zip(grid, paper))


def test_edm_sigma_grid_matches_paper_levels():
    grid = edm_sigma_grid(10)
    assert grid.dtype == torch.float64 and grid.shape == (10,)
    smax, smin, rho = 80.0, 0.002, 7.0
    for i, a in enumerate(grid.tolist()):
        expect = (smax ** (1 / rho) + i / 9 * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert math.isclose(a, expect, rel_tol=1e-12), (i, a, expect)
    assert _paper_levels_match(grid.tolist()), grid.tolist()
    # the comparison is tight enough to catch a wrong rho or a reversed grid
    assert not _paper_levels_match(edm_sigma_grid(10, rho=6.0).tolist())
    assert not _paper_levels_match(edm_sigma_grid(10, rho=7.5).tolist())
    assert not _paper_levels_match(grid.flip(0).tolist())


# ------------------------------------------------------------------------- linear distillation
def test_linear_distill_recovers_affine_denoiser_exactly():
    g = gen(17)
    n = 7
    X = torch.randn(40, n, generator=g, dtype=torch.float64) * 2 + 1
    G = GaussianDenoiser.fit(X)
    sig = [0.05, 1.0, 20.0]
    L = linear_distill(G, X, sig, generator=gen(5))
    for j, s in enumerate(sig):
        W, b = G.matrix(s)
        torch.testing.assert_close(L.W[j], W, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(L.b[j], b, rtol=1e-8, atol=1e-8)
        x = torch.randn(3, n, generator=g, dtype=torch.float64)
        torch.testing.assert_close(L(x, s), G(x, s), rtol=1e-8, atol=1e-8)


def test_linear_distill_warns_when_the_noise_is_below_the_resolution():
    """float32, sigma = 1e-9: x_0 + sigma eps rounds back to the 5 training points, so the
    design spans 6-7 of the 17 dimensions, and the minimum-norm fit of the identity denoiser was a
    rank-6 map (||W - I|| = 3.19) with no word. At sigma = 1e-3 the fit is I, without a warning."""
    X0 = torch.randn(5, 16, generator=gen(3))
    with pytest.warns(UserWarning, match=r"linear_distill: at sigma = 1e-09 the 68 noisy inputs "
                                         r"span only [0-9] of the n \+ 1 = 17 dimensions"):
        linear_distill(lambda x, s: x.clone(), X0, [1e-9], generator=gen(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ld = linear_distill(lambda x, s: x.clone(), X0, [1e-3], generator=gen(1))
    torch.testing.assert_close(ld.W[0], torch.eye(16), rtol=0, atol=1e-4)


def test_linear_distill_of_mean_denoiser_and_bad_inputs():
    X = torch.randn(30, 3, dtype=torch.float64)
    L = linear_distill(lambda x, s: torch.zeros_like(x) + 2.0, X, [1.0], generator=gen(0))
    torch.testing.assert_close(L.W[0], torch.zeros(3, 3, dtype=torch.float64), atol=1e-10,
                               rtol=0)
    torch.testing.assert_close(L.b[0], torch.full((3,), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="not one of"):
        L(X, 2.0)
    with pytest.raises(ValueError, match="n_samples"):
        linear_distill(lambda x, s: x, X, [1.0], n_samples=3)
    with pytest.raises(ValueError, match="sigmas"):
        linear_distill(lambda x, s: x, X, [])
    with pytest.raises(ValueError, match="shape"):
        linear_distill(lambda x, s: x[:, :2], X, [1.0])


def _distilled_gaussian(dtype=torch.float64):
    """A LinearDenoiser distilled from a Gaussian with spread-out eigenvalues (so the Jacobian's
    numerical rank changes with sigma) on the 6-step EDM grid."""
    g = gen(21)
    n = 5
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    X = (torch.randn(200, n, generator=g, dtype=torch.float64)
         * torch.tensor([10.0, 3.0, 1.0, 0.3, 0.1], dtype=torch.float64)) @ Q.T
    X = X.to(dtype)
    G = GaussianDenoiser.fit(X)
    sig = edm_sigma_grid(6).to(dtype)
    return G, linear_distill(G, X, sig.tolist(), generator=gen(22)), sig


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_denoiser_per_sample_sigma_in_sampler(dtype):
    from molrg_ext.sampling import heun_sample

    G, L, sig = _distilled_gaussian(dtype)
    noise = torch.randn(4, 5, generator=gen(23), dtype=dtype)
    out = heun_sample(L, noise, sigmas=sig)  # the sampler passes sigma as a [B] tensor
    ref = torch.cat([heun_sample(lambda x, s: L(x, float(s[0])), noise[i:i + 1], sigmas=sig)
                     for i in range(4)])
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # each sample uses its own level: a [B] sigma mixing levels equals the per-sample calls
    x = torch.randn(3, 5, generator=gen(24), dtype=dtype)
    s = sig[torch.tensor([0, 3, 5])]
    per = torch.cat([L(x[i:i + 1], float(s[i])) for i in range(3)])
    torch.testing.assert_close(L(x, s), per, rtol=tol, atol=tol)
    # 0-d and one-element tensors are one level for the whole batch
    torch.testing.assert_close(L(x, s[1].clone()), L(x, float(s[1])))
    torch.testing.assert_close(L(x, s[1:2]), L(x, float(s[1])))


def test_linear_denoiser_jacobian_rank_per_sample_sigma():
    from molrg_ext.jacobian import jacobian_rank, jacobian_spectrum

    G, L, sig = _distilled_gaussian()
    x = torch.randn(3, 5, generator=gen(25), dtype=torch.float64)
    s = sig[torch.tensor([0, 3, 5])]  # 80, ~0.97, 0.002
    rank = jacobian_rank(L, x, s)  # vmap(jacrev) over the samples
    per = torch.stack([jacobian_rank(L, x[i:i + 1], float(s[i]))[0] for i in range(3)])
    assert torch.equal(rank, per), (rank, per)
    assert len(set(per.tolist())) > 1, per  # the levels really differ
    sv = jacobian_spectrum(L, x, s).svals
    for i in range(3):
        W, _ = G.matrix(float(s[i]))
        torch.testing.assert_close(sv[i], torch.linalg.svdvals(W), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(jacobian_rank(L, x, s[1].clone()),
                               jacobian_rank(L, x, float(s[1])))
    # a level that was not distilled is a clear error, also inside vmap
    with pytest.raises(ValueError, match="LinearDenoiser: sigma = 0.7 is not one of"):
        jacobian_rank(L, x, torch.tensor([float(s[0]), 0.7, float(s[2])], dtype=torch.float64))


def test_linear_denoiser_bad_inputs():
    G, L, sig = _distilled_gaussian()
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="LinearDenoiser: sigma = 0.7 is not one of"):
        L(x, torch.tensor([float(sig[0]), 0.7, float(sig[1])], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma"):
        L(x, float("nan"))
    with pytest.raises(ValueError, match="sigma"):
        L(x, torch.tensor([float(sig[0]), float("nan"), float(sig[1])], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma must be"):
        L(x, sig[:2])  # neither one level nor B levels
    with pytest.raises(ValueError, match="sigma must be"):
        L(x, sig[:3].reshape(3, 1))
    with pytest.raises(TypeError, match="sigma"):
        L(x, torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="sigma"):
        L(x, "80")
    with pytest.raises(TypeError, match="LinearDenoiser: x has dtype"):
        L(x.float(), float(sig[0]))
    with pytest.raises(ValueError, match="LinearDenoiser: x must be"):
        L(torch.randn(3, 4, dtype=torch.float64), float(sig[0]))


def test_linear_distill_argument_validation():
    X = torch.randn(30, 3, dtype=torch.float64)
    G = GaussianDenoiser.fit(X)
    # a single number (or a 0-d tensor) is a one-level grid
    L1 = linear_distill(G, X, 1.0, generator=gen(0))
    L2 = linear_distill(G, X, [1.0], generator=gen(0))
    L3 = linear_distill(G, X, torch.tensor(1.0), generator=gen(0))
    assert L1.sigmas.tolist() == [1.0] and L3.sigmas.tolist() == [1.0]
    torch.testing.assert_close(L1.W, L2.W, rtol=0, atol=0)
    torch.testing.assert_close(L3.W, L2.W, rtol=0, atol=0)
    L4 = linear_distill(G, X, torch.tensor([0.5, 2.0]), generator=gen(0), batch_size=7)
    assert L4.sigmas.tolist() == [0.5, 2.0]
    for bs in (0, -1):
        with pytest.raises(ValueError, match="linear_distill: batch_size"):
            linear_distill(G, X, [1.0], batch_size=bs)
    with pytest.raises(TypeError, match="linear_distill: batch_size"):
        linear_distill(G, X, [1.0], batch_size=2.5)
    with pytest.raises(TypeError, match="linear_distill: n_samples"):
        linear_distill(G, X, [1.0], n_samples=100.5)
    with pytest.raises(TypeError, match="linear_distill: sigmas"):
        linear_distill(G, X, "1.0")
    with pytest.raises(TypeError, match=r"linear_distill: sigmas\[1\]"):
        linear_distill(G, X, [1.0, None])
    with pytest.raises(ValueError, match="linear_distill: sigmas"):
        linear_distill(G, X, -1.0)
    with pytest.raises(ValueError, match="linear_distill: sigmas"):
        linear_distill(G, X, [1.0, float("nan")])


def test_gaussian_from_moments_rejects_non_psd_cov():
    mu = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="from_moments: cov must be positive semi-definite"):
        GaussianDenoiser.from_moments(mu, torch.diag(torch.tensor([1.0, -5.0],
                                                                  dtype=torch.float64)))
    with pytest.raises(ValueError, match="cov must be positive semi-definite"):
        GaussianDenoiser.from_moments(mu.float(), torch.diag(torch.tensor([1.0, -1e-3])))
    # round-off negatives are clamped to 0: float64 below 1e-8 and float32 below 1e-5 relative
    G = GaussianDenoiser.from_moments(mu, torch.diag(torch.tensor([1.0, -1e-12],
                                                                  dtype=torch.float64)))
    assert G.lam.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="cov"):
        GaussianDenoiser.from_moments(mu, torch.diag(torch.tensor([1.0, -1e-6],
                                                                  dtype=torch.float64)))
    G = GaussianDenoiser.from_moments(mu.float(), torch.diag(torch.tensor([1.0, -1e-7])))
    assert G.lam.tolist() == [1.0, 0.0]
    # a rank-deficient covariance from float32 data (eigenvalue round-off) is fine
    X = torch.randn(4, 8, generator=gen(30))
    G = GaussianDenoiser.from_moments(X.mean(0), torch.cov(X.T, correction=0))
    assert (G.lam >= 0).all()


def test_gaussian_denoiser_dtype_and_device_mismatch():
    n = 3
    mu32 = torch.zeros(n)
    U64 = torch.eye(n, dtype=torch.float64)
    lam64 = torch.ones(n, dtype=torch.float64)
    with pytest.raises(TypeError, match="GaussianDenoiser: U has dtype torch.float64 but mu"):
        GaussianDenoiser(mu32, U64, lam64)
    with pytest.raises(TypeError, match="GaussianDenoiser: lam has dtype"):
        GaussianDenoiser(mu32, U64.float(), lam64)
    with pytest.raises(TypeError, match="mu must be float32 or float64"):
        GaussianDenoiser(mu32.half(), U64.half(), lam64.half())
    with pytest.raises(TypeError, match="U must be a torch.Tensor"):
        GaussianDenoiser(mu32, [[1.0]], lam64)
    with pytest.raises(ValueError, match="lam must hold"):
        GaussianDenoiser(mu32.double(), U64, -lam64)
    with pytest.raises(TypeError, match="from_moments: cov has dtype"):
        GaussianDenoiser.from_moments(mu32, torch.eye(n, dtype=torch.float64))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="U is on"):
            GaussianDenoiser(mu32.double(), U64.cuda(), lam64)
    G = GaussianDenoiser(mu32.double(), U64, lam64)
    torch.testing.assert_close(G(torch.ones(2, n, dtype=torch.float64), 1.0),
                               torch.full((2, n), 0.5, dtype=torch.float64))


def test_linearity_score_takes_absolute_cosines():
    """Eq. (11) averages |cos|: a denoiser whose combined output points against the combination
    (D(x) = x for half the norms, -x otherwise) scores by magnitude, not by sign."""
    X = torch.randn(40, 5, generator=gen(30), dtype=torch.float64)

    def D(x, s):
        return torch.where(x.norm(dim=1, keepdim=True) > 3.0, -x, x)

    ls = linearity_score(D, X, [1.0, 2.0], n_pairs=50, generator=gen(31))
    ref = _linearity_by_hand(D, X, [1.0, 2.0], 50, 2 ** -0.5, 2 ** -0.5, seed=31)
    torch.testing.assert_close(ls, ref, rtol=0, atol=1e-12)
    g = gen(31)  # the same draws: some signed cosines are negative, so the signed mean is lower
    idx = torch.randint(0, 40, (2, 50), generator=g)
    eps = torch.randn((2, 50, 5), generator=g, dtype=torch.float64)
    x1, x2 = X[idx[0]] + eps[0], X[idx[1]] + eps[1]
    a = 2 ** -0.5
    u, v = D(a * x1 + a * x2, 1.0), a * D(x1, 1.0) + a * D(x2, 1.0)
    cos = (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))
    assert (cos < 0).any() and ls[0] > cos.mean() + 1e-3


def test_score_difference_is_the_mean_of_per_sample_rmse():
    """Seed 003 eq. (10): E_i sqrt(||a_i - b_i||^2 / d), not sqrt(E ||a - b||^2 / d)."""
    from molrg_ext.experiments.hidden_gaussian import _rmse

    a = torch.zeros(2, 4, dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    assert _rmse(a, b) == pytest.approx(2.0)  # (1 + 3) / 2; the root of the mean square is sqrt(5)


def test_float32_backward_is_right_far_from_the_data():
    """A query far from the data at small sigma has |lse| ~ 1e9. Saved in float32 that lse was
    off by ~100: the backward capped the top weights (dx 1-3.4x the true value) or underflowed
    all of them (a false 'lse is inconsistent' error). lse is float64 for every input type."""
    X = torch.tensor([[0.0, 0.0], [1e-7, 0.0]])
    for x0 in (9.0, 9.5, 10.0, 10.5, 11.0):
        x = torch.tensor([[x0, 0.0]], requires_grad=True)
        optimal_denoiser(x, X, 7.0710678e-4)[0, 0].backward()
        x64 = x.detach().double().requires_grad_()
        optimal_denoiser(x64, X.double(), 7.0710678e-4)[0, 0].backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=0)
    x = torch.tensor([[83.0]], requires_grad=True)
    optimal_denoiser(x, torch.zeros(1, 1), 1.1e-3).sum().backward()  # raised before
    assert x.grad.item() == 0.0
    y, lse = torch.ops.molrg.optimal_denoiser(x.detach(), torch.zeros(1, 1), torch.ones(1),
                                              torch.full((1,), 1.1e-3), 8)
    assert lse.dtype == torch.float64 and y.dtype == torch.float32
    g32 = torch.tensor(1.1e-3).item()  # the float32 gamma the op sees
    assert lse.item() == pytest.approx(-83.0**2 / (2 * g32**2), rel=1e-12)
    with pytest.raises(RuntimeError, match="lse must be float64"):
        torch.ops.molrg.optimal_denoiser_backward(torch.ones_like(y), x.detach(), torch.zeros(1, 1),
                                                  torch.ones(1), torch.full((1,), 1.1e-3), y,
                                                  lse.float())


def test_linear_denoiser_mixed_levels_make_no_per_sample_matrix(dispatched_ops):
    """A [B] sigma gathered W[j] into a [B, n, n] copy (256 MB at B = 1024, n = 256, on every
    sampler step); now one GEMM per level present."""
    G, L, sig = _distilled_gaussian()
    x = torch.randn(7, 5, generator=gen(26), dtype=torch.float64)  # B = 7, 6 levels in L
    s = sig[torch.tensor([0, 3, 5, 3, 0, 5, 3])]
    calls = dispatched_ops(lambda: L(x, s))
    shapes = {tuple(a.shape) for _, args in calls for a in args if isinstance(a, torch.Tensor)}
    assert L.W.shape == (6, 5, 5) and (7, 5, 5) not in shapes
    per = torch.cat([L(x[i:i + 1], float(s[i])) for i in range(7)])
    torch.testing.assert_close(L(x, s), per, rtol=1e-12, atol=1e-12)
