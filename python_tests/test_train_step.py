"""Fused training step (molrg::train_step) and its Philox generator (molrg::philox_draws).

* the draws are deterministic in (seed, step), differ across steps, and are statistically sound
  (uniform indices / levels by chi-square, N(0, 1) normals by moments and Kolmogorov-Smirnov);
* train_step equals the same step written with the reference ops on philox_draws' numbers
  (float64, tight tolerance; hard and soft, heterogeneous dims with a logit bias);
* its loss and gradient are unbiased estimates of loss (6) for fixed U: against the closed form
  (hard mode, where the denoiser is linear given the clean assignment) and a large independent
  Monte Carlo (soft mode);
* lr applies U -= lr * grad; bad inputs raise errors naming the argument; opcheck and
  torch.compile(fullgraph=True) accept the op.
"""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import molrg_ext as M
from molrg_ext import reference as R
from molrg_ext.reference import masked_bases


class TinySchedule:
    """VP-like test schedule: s = exp(-t), gamma = sqrt(1 - exp(-2t)), weight 1 + t."""

    def s(self, t):
        return torch.exp(-torch.as_tensor(t, dtype=torch.float64))

    def gamma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.sqrt(-torch.expm1(-2 * t))

    def weight(self, t):
        return 1.0 + torch.as_tensor(t, dtype=torch.float64)

    def time_grid(self, L):
        return torch.linspace(0.05, 1.0, L, dtype=torch.float64)


def reference_step(X, U, dims, levels, batch, seed, step, mode):
    """The same step with philox_draws' numbers and the reference ops + autograd."""
    P, N, n = X.shape
    idx, lev, eps = M.philox_draws(seed, step, P, batch, N, levels.L, n, X.dtype)
    x0 = torch.gather(X, 1, idx[..., None].expand(P, batch, n))
    s, g, lam, c, phi = levels.table(X.dtype)[lev].unbind(-1)
    xt = s[..., None] * x0 + g[..., None] * eps
    Ur = U.detach().clone().requires_grad_()
    if mode == "hard":
        assign = R.hard_assign(x0, U.detach(), dims)
        y = R.subspace_dae(xt, Ur, c, phi, None, dims, "hard", assign)
    else:
        bias = None if levels.bias is None else levels.bias.to(X.dtype)[lev]
        y = R.subspace_dae(xt, Ur, c, phi, bias, dims, "soft")
    loss = (lam * (y - x0).square().sum(-1)).mean(1)
    loss.sum().backward()
    return loss.detach(), Ur.grad


def _problem(P, N, n, dims, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    K, dm = len(dims), max(dims)
    X = torch.randn(P, N, n, generator=g, dtype=dtype)
    U = 0.7 * torch.randn(P, K, n, dm, generator=g, dtype=dtype)
    return X, U


# ------------------------------------------------------------------------------------- the draws
def test_draws_deterministic_and_keyed():
    a = M.philox_draws(7, 3, 2, 16, 10, 5, 9)
    b = M.philox_draws(7, 3, 2, 16, 10, 5, 9)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    c = M.philox_draws(7, 4, 2, 16, 10, 5, 9)
    d = M.philox_draws(8, 3, 2, 16, 10, 5, 9)
    assert not torch.equal(a[2], c[2]) and not torch.equal(a[2], d[2])
    # float64 normals come from the same integers: they agree with float32 to float precision
    e64 = M.philox_draws(7, 3, 2, 16, 10, 5, 9, torch.float64)[2]
    assert torch.allclose(e64.float(), a[2], atol=2e-5, rtol=1e-5)
    # a slot's numbers do not depend on how many slots or elements are drawn
    big = M.philox_draws(7, 3, 3, 40, 10, 5, 13)
    assert torch.equal(big[0][:2, :16], a[0]) and torch.equal(big[1][:2, :16], a[1])
    assert torch.equal(big[2][:2, :16, :9], a[2])
    assert a[0].min() >= 0 and a[0].max() < 10 and a[1].min() >= 0 and a[1].max() < 5


@pytest.mark.parametrize("float64", [False, True])
def test_draws_opcheck_and_compile(float64):
    args = (7, 3, 2, 16, 10, 5, 9, float64)
    torch.library.opcheck(torch.ops.molrg.philox_draws.default, args)
    eager = torch.ops.molrg.philox_draws(*args)
    f = torch.compile(lambda seed, step: torch.ops.molrg.philox_draws(seed, step, *args[2:]),
                      fullgraph=True, backend="aot_eager")
    got = f(7, 3)
    assert [t.dtype for t in got] == [torch.long, torch.long,
                                      torch.float64 if float64 else torch.float32]
    for u, v in zip(got, eager):
        assert u.shape == v.shape and torch.equal(u, v)
    assert not torch.equal(f(7, 4)[2], eager[2])  # the step is an input, not a baked constant


def _philox4x32_10(c, k):
    """Independent numpy Philox4x32-10 (Salmon et al. 2011) on arrays of counters."""
    m32 = np.uint64(0xFFFFFFFF)
    c = [np.asarray(v, dtype=np.uint64) for v in c]
    k0, k1 = (np.asarray(v, dtype=np.uint64) for v in k)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return c


def _box_muller_reference(seed, step, P, Mb, n, uniform):
    """Normals [P, Mb, 4 ceil(n / 4)] of the documented stream in float64: Philox blocks 1 + q of
    counters (block, m, p, step), Box-Muller with numpy's log/sin/cos on uniform(u) of the 32-bit
    draws (float64 values)."""
    p, m = np.meshgrid(np.arange(P), np.arange(Mb), indexing="ij")
    key = (seed & 0xFFFFFFFF, seed >> 32)
    want = np.empty((P, Mb, 4 * ((n + 3) // 4)))
    for q in range((n + 3) // 4):
        u = _philox4x32_10([np.full_like(p, 1 + q), m, p, np.full_like(p, step)], key)
        for h in range(2):
            u1, u2 = uniform(u[2 * h]), uniform(u[2 * h + 1])
            r = np.sqrt(-2 * np.log(np.minimum(u1, 1.0)))
            want[..., 4 * q + 2 * h] = r * np.cos(2 * np.pi * u2)
            want[..., 4 * q + 2 * h + 1] = r * np.sin(2 * np.pi * u2)
    return want


def test_philox_reference_matches_published_vectors():
    # known-answer vectors of the Random123 distribution for philox4x32-10
    kat = [(([0, 0, 0, 0], [0, 0]), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
           (([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
           (([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]),
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])]
    for (c, k), want in kat:
        assert [int(v) for v in _philox4x32_10(c, k)] == want


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# n = 13: rows by 8 normals then 5; n = 37: by 16 (four Philox blocks at once), 16, then 5
@pytest.mark.parametrize("n", [13, 37])
def test_draws_follow_the_documented_stream(dtype, n):
    """philox_draws (the CPU kernels' lane-parallel generator) against the stream layout of
    kernels/philox.h computed independently: Philox counters (block, m, p, step), key = seed,
    multiply-shift indices, Box-Muller with numpy's log/sin/cos."""
    seed, step, P, Mb, N, L = (5 << 32) + 77, 12, 2, 70, 1000, 64  # 70: partial lanes
    idx, lev, eps = M.philox_draws(seed, step, P, Mb, N, L, n, dtype)
    p, m = np.meshgrid(np.arange(P), np.arange(Mb), indexing="ij")
    key = (seed & 0xFFFFFFFF, seed >> 32)
    b0 = _philox4x32_10([np.zeros_like(p), m, p, np.full_like(p, step)], key)
    np.testing.assert_array_equal(idx.numpy(), (b0[0] * np.uint64(N)) >> np.uint64(32))
    np.testing.assert_array_equal(lev.numpy(), (b0[1] * np.uint64(L)) >> np.uint64(32))
    want = _box_muller_reference(seed, step, P, Mb, n,
                                 lambda u: u.astype(np.float64) * 2.0**-32 + 2.0**-33)
    tol = 1e-12 if dtype == torch.float64 else 5e-6  # float32: the uniforms round in float
    np.testing.assert_allclose(eps.double().numpy(), want[..., :n], rtol=0, atol=tol)


def test_float32_normals_within_a_few_ulps():
    """float32 normals against float64 Box-Muller on the same float32 uniforms (u rounded to float,
    then u / 2^32 + 2^-33, exact in float), over 131072 normals: what is left is the error of the
    series log (a polynomial without division), sqrt and sin/cos, a few ulps of max(1, |z|)
    (2.2e-7 measured; the atanh-series log before it gave the same)."""
    seed, step, P, Mb, n = (3 << 32) + 5, 9, 2, 4096, 16
    eps = M.philox_draws(seed, step, P, Mb, 10, 5, n)[2].double().numpy()
    f = np.float32

    def float_uniform(u):
        return (u.astype(f) * f(2.0**-32) + f(2.0**-33)).astype(np.float64)

    want = _box_muller_reference(seed, step, P, Mb, n, float_uniform)
    err = np.abs(eps - want) / np.maximum(1.0, np.abs(want))
    assert err.max() < 5e-7, err.max()
    assert np.median(err) < 5e-8


def test_draws_statistics():
    P, Mb, N, L, n = 4, 4096, 13, 7, 16
    idx, lev, eps = M.philox_draws(123, 9, P, Mb, N, L, n, torch.float64)
    z = eps.flatten().numpy()
    cnt = z.size
    assert abs(z.mean()) < 5 / math.sqrt(cnt)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / cnt)
    assert abs(stats.kurtosis(z, fisher=False) - 3) < 5 * math.sqrt(24 / cnt)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # neighbouring elements (same Box-Muller pair and across pairs) and slots are uncorrelated
    e = eps.reshape(-1, n).numpy()
    for a, b in ((0, 1), (1, 2), (3, 4)):
        assert abs(np.corrcoef(e[:, a], e[:, b])[0, 1]) < 5 / math.sqrt(e.shape[0])
    assert abs(np.corrcoef(e[:-1, 0], e[1:, 0])[0, 1]) < 5 / math.sqrt(e.shape[0])
    for draws, k in ((idx, N), (lev, L)):
        counts = np.bincount(draws.flatten().numpy(), minlength=k)
        assert stats.chisquare(counts).pvalue > 1e-4


# ------------------------------------------------------------------------ exactness vs reference
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("P", [1, 5])  # P = 1: slots split over threads; P = 5: by instance
def test_matches_reference_float64(mode, P):
    dims = [2, 4, 1]
    X, U = _problem(P, 17, 7, dims)
    levels = M.make_levels(TinySchedule(), L=6, dims=dims, pi=[0.5, 0.3, 0.2])
    assert levels.bias is not None and levels.bias.shape == (6, 3)
    loss, grad = M.train_step(X, U, dims, levels, 50, seed=11, step=4, mode=mode)
    rl, rg = reference_step(X, U, dims, levels, 50, 11, 4, mode)
    torch.testing.assert_close(loss, rl, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(grad, rg, rtol=1e-10, atol=1e-11)
    assert grad[:, 0, :, 2:].abs().max() == 0  # padded columns get no gradient


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# The hard CPU step takes its basis gradient through the Gram matrices U_k^T U_k once the batch is
# at least twice sum(dims) = 60 (batch 70), and by projecting the n-space gradient below (batch 50).
@pytest.mark.parametrize("batch", [70, 50])
def test_matches_reference_odd_sizes(mode, dtype, batch):
    # n = 37 (tail vector), D = 51 (three column chunks), M = 70 or 50 (a partial block of
    # slots), dims up to 17 (component panels of three vectors)
    dims = [9, 17, 4]
    X, U = _problem(3, 23, 37, dims, dtype=dtype, seed=5)
    levels = M.make_levels(TinySchedule(), L=5, dims=dims, pi=[0.2, 0.5, 0.3])
    loss, grad = M.train_step(X, U, dims, levels, batch, seed=3, step=9, mode=mode)
    rl, rg = reference_step(X, U, dims, levels, batch, 3, 9, mode)
    if dtype == torch.float64:
        torch.testing.assert_close(loss, rl, rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(grad, rg, rtol=1e-10, atol=1e-11)
    else:  # both sides round in float32; the soft gradient (phi up to 4.8) amplifies it
        torch.testing.assert_close(loss, rl, rtol=1e-4, atol=1e-5 * rl.abs().max().item())
        torch.testing.assert_close(grad, rg, rtol=1e-3, atol=1e-4 * rg.abs().max().item())
    assert grad[:, 2, :, 4:].abs().max() == 0  # padded columns get no gradient


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("batch", [250, 60])  # hard: through the Gram panels (>= 2 sum(dims)), not
def test_matches_reference_panels_of_several_chunks(mode, batch):
    # n = 150, dims up to 50, K d = 200: every packed panel (the full and component bases, their
    # transposes, the Gram matrices of d = 50) spans several column chunks, AVX2 and AVX-512 alike
    dims = [20, 50, 9, 17]
    X, U = _problem(2, 40, 150, dims, seed=4)
    levels = M.make_levels(TinySchedule(), L=5, dims=dims)
    loss, grad = M.train_step(X, U, dims, levels, batch, seed=6, step=2, mode=mode)
    rl, rg = reference_step(X, U, dims, levels, batch, 6, 2, mode)
    torch.testing.assert_close(loss, rl, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(grad, rg, rtol=1e-9, atol=1e-10 * rg.abs().max().item())


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_matches_reference_more_than_four_components(mode):
    # K = 6: the generic per-sample soft-max code (K <= 4 runs it one sample per vector lane),
    # with the per-level logit bias
    dims = [3, 5, 2, 4, 6, 1]
    X, U = _problem(2, 40, 20, dims, seed=4)
    levels = M.make_levels(TinySchedule(), L=5, dims=dims)
    loss, grad = M.train_step(X, U, dims, levels, 130, seed=6, step=2, mode=mode)
    rl, rg = reference_step(X, U, dims, levels, 130, 6, 2, mode)
    torch.testing.assert_close(loss, rl, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(grad, rg, rtol=1e-9, atol=1e-10 * rg.abs().max().item())


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("P", [1, 4])  # P = 1: blocks split over threads; P = 4: by instance
def test_matches_reference_many_blocks(mode, P):
    # batch 200 = blocks of 64, 64, 64 and 8 slots: each block after the first of an instance
    # takes the draws and rows the block before it prefetched
    dims = [3, 5]
    X, U = _problem(P, 301, 21, dims, seed=8)
    levels = M.make_levels(TinySchedule(), L=7, dims=dims)
    loss, grad = M.train_step(X, U, dims, levels, 200, seed=6, step=2, mode=mode)
    rl, rg = reference_step(X, U, dims, levels, 200, 6, 2, mode)
    torch.testing.assert_close(loss, rl, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(grad, rg, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("P, N, n, dims, batch", [(6, 90, 16, [4, 2], 150),
                                                  (1, 500, 20, [3, 5], 2100)],
                         ids=["by_instance", "block_split"])
def test_results_do_not_depend_on_the_threads(mode, P, N, n, dims, batch):
    # by_instance (P >= 2 threads): each instance is done by one thread, whichever takes it, block
    # after block. block_split (P = 1): the 33 blocks of 2100 slots go to the threads in chunks of
    # 8, 8, 8, 8 and 1 blocks (chunk_blocks: under 64 blocks and a small accumulator, 4 chunks),
    # whose partial gradients are summed in chunk order.
    X, U = _problem(P, N, n, dims, torch.float32, seed=P)
    levels = M.make_levels(TinySchedule(), L=9, dims=dims)
    threads = torch.get_num_threads()
    try:
        out = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            out.append(M.train_step(X, U, dims, levels, batch, seed=4, step=1, mode=mode))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in out[1:]:
        assert torch.equal(loss, out[0][0]) and torch.equal(grad, out[0][1])
    rl, rg = reference_step(X.double(), U.double(), dims, levels, batch, 4, 1, mode)
    torch.testing.assert_close(out[0][0].double(), rl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0][1].double(), rg, rtol=1e-3, atol=1e-3 * rg.abs().max().item())


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_matches_reference_float32_equal_dims(mode):
    dims = [3, 3]
    X, U = _problem(3, 20, 48, dims, torch.float32, seed=1)
    levels = M.make_levels(TinySchedule(), L=64)
    assert levels.bias is None
    loss, grad = M.train_step(X, U, dims, levels, 64, seed=5, step=0, mode=mode)
    rl, rg = reference_step(X, U, dims, levels, 64, 5, 0, mode)
    torch.testing.assert_close(loss, rl, rtol=1e-4, atol=1e-5)
    # float32 soft-max at small noise (phi ~ 1e2) amplifies rounding: compare on the grad scale
    torch.testing.assert_close(grad, rg, rtol=1e-3, atol=1e-3 * rg.abs().max().item())


def test_unbatched_and_lr_update():
    dims = [2, 2]
    X, U = _problem(1, 9, 5, dims)
    levels = M.make_levels(TinySchedule(), L=4)
    loss, grad = M.train_step(X[0], U[0], dims, levels, 16, 1, 2)
    l3, g3 = M.train_step(X, U, dims, levels, 16, 1, 2)
    assert loss.shape == () and grad.shape == U[0].shape
    torch.testing.assert_close(loss, l3[0])
    torch.testing.assert_close(grad, g3[0])
    U2 = U.clone()
    l4, g4 = M.train_step(X, U2, dims, levels, 16, 1, 2, lr=0.1)
    torch.testing.assert_close(U2, U - 0.1 * g3)
    torch.testing.assert_close(l4, l3)


# --------------------------------------------------------------------------------- unbiasedness
def _closed_form_hard(X, U, dims, levels):
    """E over (i, l, eps) of the hard-mode loss: given the clean assignment k(i) the denoiser is
    linear, y = c A x_t with A = U_k U_k^T, so E||y - x_i||^2 = ||(c s A - I) x_i||^2 +
    c^2 gamma^2 ||A||_F^2. Differentiable in U."""
    Um = masked_bases(U, dims)
    A = Um @ Um.transpose(-1, -2)  # [P, K, n, n]
    k = R.hard_assign(X, U.detach(), dims)  # [P, N]
    Ai = A[torch.arange(X.shape[0])[:, None], k]  # [P, N, n, n]
    Ax = (Ai @ X[..., None]).squeeze(-1)  # [P, N, n]
    s, g, lam, c, _ = levels.table(X.dtype).unbind(-1)  # [L]
    bias_term = (c * s)[:, None, None, None] * Ax[None] - X[None]  # [L, P, N, n]
    fro = Ai.square().sum((-1, -2))  # [P, N]
    per = bias_term.square().sum(-1) + (c * g).square()[:, None, None] * fro[None]
    return (lam[:, None, None] * per).mean((0, 2))  # [P]


def test_unbiased_hard_closed_form():
    dims = [2, 3]
    P, N, n, S, Mb = 6, 5, 8, 300, 64
    X, U = _problem(P, N, n, dims, seed=3)
    levels = M.make_levels(TinySchedule(), L=5, dims=dims)
    Ur = U.clone().requires_grad_()
    expected = _closed_form_hard(X, Ur, dims, levels)
    expected.sum().backward()
    losses, grads = [], []
    for step in range(S):
        loss, grad = M.train_step(X, U, dims, levels, Mb, seed=99, step=step, mode="hard")
        losses.append(loss)
        grads.append(grad)
    losses, grads = torch.stack(losses), torch.stack(grads)
    z = (losses.mean(0) - expected.detach()) / (losses.std(0) / math.sqrt(S))
    assert z.abs().max() < 5, z
    gse = grads.std(0) / math.sqrt(S)
    mask = gse > 0
    zg = (grads.mean(0) - Ur.grad)[mask] / gse[mask]
    assert zg.abs().max() < 6 and abs(zg.mean()) < 5 / math.sqrt(zg.numel())
    assert torch.all(Ur.grad[~mask] == 0)  # padded columns


def test_unbiased_soft_monte_carlo():
    dims = [2, 2]
    P, N, n, L = 2, 3, 6, 3
    X, U = _problem(P, N, n, dims, seed=4)
    U = U / U.norm(dim=2, keepdim=True)  # unit columns keep the soft-max non-degenerate
    levels = M.make_levels(TinySchedule(), L=L)
    # independent Monte Carlo with torch.randn over every (i, l): E[loss] per instance
    R_ = 4000
    g = torch.Generator().manual_seed(0)
    s, gm, lam, c, phi = levels.table(torch.float64).unbind(-1)
    x0 = X[:, :, None, None, :].expand(P, N, L, R_, n)
    eps = torch.randn(P, N, L, R_, n, generator=g, dtype=torch.float64)
    xt = s[:, None, None] * x0 + gm[:, None, None] * eps
    cc = c[:, None].expand(L, R_).expand(P, N, L, R_).reshape(P, -1)
    pp = phi[:, None].expand(L, R_).expand(P, N, L, R_).reshape(P, -1)
    y = R.subspace_dae(xt.reshape(P, -1, n), U, cc, pp, None, dims, "soft").reshape(P, N, L, R_, n)
    per = lam[:, None] * (y - x0).square().sum(-1)  # [P, N, L, R]
    mc_mean = per.mean((1, 2, 3))
    mc_se = per.mean(1).std(-1).mean(-1) / math.sqrt(R_ * L * N) * 2  # generous SE bound
    S, Mb = 200, 128
    losses = torch.stack([M.train_step(X, U, dims, levels, Mb, 5, st, "soft")[0]
                          for st in range(S)])
    se = torch.sqrt(losses.var(0) / S + mc_se**2)
    z = (losses.mean(0) - mc_mean) / se
    assert z.abs().max() < 5, z


# ---------------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    dims = [2, 2]
    X, U = _problem(2, 6, 5, dims)
    lv = M.make_levels(TinySchedule(), L=4)
    ok = dict(dims=dims, levels=lv, batch=8, seed=0, step=0)

    def call(**kw):
        a = dict(X=X, U=U, **ok)
        a.update(kw)
        return M.train_step(**a)

    with pytest.raises(TypeError, match="X must be float32 or float64"):
        call(X=X.to(torch.int64))
    with pytest.raises(TypeError, match="U has dtype"):
        call(U=U.float())
    with pytest.raises(ValueError, match="instances"):
        call(U=U[:1])
    with pytest.raises(ValueError, match="n = "):
        call(U=U[:, :, :4])
    with pytest.raises(ValueError, match="no training samples"):
        call(X=X[:, :0])
    with pytest.raises(ValueError, match="batch"):
        call(batch=0)
    with pytest.raises(ValueError, match="seed"):
        call(seed=-1)
    with pytest.raises(ValueError, match="step"):
        call(step=2**32)
    with pytest.raises(ValueError, match="mode"):
        call(mode="medium")
    with pytest.raises(ValueError, match=r"dims\[1\]"):
        call(dims=[2, 3])
    with pytest.raises(ValueError, match="K = 0"):
        call(U=U[:, :0], dims=[])
    with pytest.raises(TypeError, match="Levels"):
        call(levels=lv.table())
    with pytest.raises(ValueError, match="must not require grad"):
        call(U=U.clone().requires_grad_(), lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        call(U=U.clone(), lr=float("nan"))
    Xn = X.clone()
    Xn[1, :, 3] = float("nan")  # every sample of instance 1 is non-finite
    with pytest.raises(RuntimeError, match="X contains NaN"):
        call(X=Xn)
    # the same with enough instances for each thread to own whole ones (the other code path)
    P = 2 * torch.get_num_threads() + 1
    Xb, Ub = _problem(P, 6, 5, dims)
    Xb[P - 1, :, 0] = float("inf")
    with pytest.raises(RuntimeError, match="X contains NaN"):
        M.train_step(Xb, Ub, dims, lv, 8, 0, 0)
    for dtype in (torch.float64, torch.float32):
        Un = U.to(dtype).clone()
        Un[1, 0, 2, 1] = float("nan")
        with pytest.raises(RuntimeError, match="U contains NaN or Inf"):
            call(X=X.to(dtype), U=Un)
    bad = lv._replace(c=lv.c.clone().fill_(float("inf")))
    with pytest.raises(RuntimeError, match="levels contains NaN or Inf"):
        call(levels=bad)
    with pytest.raises(RuntimeError, match="lambda"):
        call(levels=lv._replace(lam=-lv.lam))
    with pytest.raises(ValueError, match="levels.bias"):
        call(levels=lv._replace(bias=torch.zeros(4, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="L must be"):
        M.make_levels(TinySchedule(), L=0)
    # beyond the op's 32-bit level index: named before anything is allocated (2**70 had been an
    # OverflowError naming nothing)
    with pytest.raises(ValueError, match=r"make_levels: L must be in \[1, 4294967296\)"):
        M.make_levels(TinySchedule(), L=2**70)
    with pytest.raises(TypeError, match="make_levels: L must be an int, got 4.0"):
        M.make_levels(TinySchedule(), L=4.0)
    assert M.make_levels(TinySchedule(), L=np.int64(4)).s.shape == (4,)
    with pytest.raises(TypeError, match="has no method"):
        M.make_levels(object())
    # dims and pi are validated even where equal ones would drop the bias
    with pytest.raises(ValueError, match="pi must be .*not all zero"):
        M.make_levels(TinySchedule(), L=4, pi=[0, 0])
    with pytest.raises(ValueError, match="pi must be finite"):
        M.make_levels(TinySchedule(), L=4, pi=[float("nan")] * 2)
    with pytest.raises(TypeError, match=r"make_levels: dims\[0\] must be an int"):
        M.make_levels(TinySchedule(), L=4, dims=[2.5, 2])
    with pytest.raises(ValueError, match=r"make_levels: dims\[1\] must be >= 1"):
        M.make_levels(TinySchedule(), L=4, dims=[2, 0])
    assert M.make_levels(TinySchedule(), L=4, dims=[2, 2], pi=[0.5, 0.5]).bias is None
    assert M.make_levels(TinySchedule(), L=4, dims=[2, 3]).bias.shape == (4, 2)
    with pytest.raises(ValueError, match="philox_draws: batch must be in"):
        M.philox_draws(0, 0, 1, 0, 5, 5, 3)
    with pytest.raises(ValueError, match="philox_draws: seed must be in"):
        M.philox_draws(2**64, 0, 1, 2, 10, 4, 3)
    with pytest.raises(TypeError, match="philox_draws: seed must be an int, got 1.7"):
        M.philox_draws(1.7, 0, 1, 2, 10, 4, 3)
    with pytest.raises(TypeError, match="philox_draws: n must be an int"):
        M.philox_draws(1, 0, 1, 2, 10, 4, "3")
    with pytest.raises(RuntimeError, match="batch"):
        torch.ops.molrg.philox_draws(0, 0, 1, 0, 5, 5, 3, False)  # the op checks too
    # the op names its first argument X (the training set), as the wrapper does, not x
    table, op = lv.table(), torch.ops.molrg.train_step
    for bad, msg in [(X[:, :, :4].contiguous(), r"train_step: U has n = 5 rows but X has n = 4"),
                     (X[:1], "train_step: U has 2 instances but X has 1"),
                     (X[0], r"train_step: X must be \[P, N, n\]"),
                     (X.transpose(1, 2).contiguous().transpose(1, 2),
                      "train_step: X must be contiguous")]:
        with pytest.raises(RuntimeError, match=msg):
            op(bad, U, table, None, dims, 8, 0, 0, 0)
    # a Levels table whose fields are not 1-D of one length L names them
    with pytest.raises(ValueError, match="Levels: s must be a 1-D"):
        call(levels=M.Levels(*[t[0] for t in lv[:5]], None))
    with pytest.raises(ValueError, match="Levels: s, gamma, lam, c and phi must have the same"):
        call(levels=lv._replace(c=lv.c[:2]))


# -------------------------------------------------------------------------- opcheck / compile
def test_opcheck_and_compile():
    dims = [2, 3]
    X, U = _problem(2, 7, 6, dims)
    lv = M.make_levels(TinySchedule(), L=4, dims=dims)
    args = (X, U, lv.table(), lv.bias, dims, 16, 3, 1, 0)
    torch.library.opcheck(torch.ops.molrg.train_step.default, args)

    def f(X, U, table, bias):
        loss, grad = torch.ops.molrg.train_step(X, U, table, bias, dims, 16, 3, 1, 1)
        return loss.sum(), U - 0.5 * grad

    eager = f(X, U, lv.table(), lv.bias)
    comp = torch.compile(f, fullgraph=True, backend="aot_eager")(X, U, lv.table(), lv.bias)
    torch.testing.assert_close(comp, eager)


def test_level_table_cache_never_goes_stale():
    """train_step keeps the last level table it built (rebuilding it cost 3-5% of a step): a
    field changed in place, another Levels, another dtype each give the right table."""
    dims = [2, 2]
    X, U = _problem(2, 6, 5, dims)
    lv = M.make_levels(TinySchedule(), L=4)
    fresh = lambda lev: M.Levels(*[None if t is None else t.clone() for t in lev])  # noqa: E731
    a = M.train_step(X, U, dims, lv, 8, 0, 0)
    torch.testing.assert_close(M.train_step(X, U, dims, fresh(lv), 8, 0, 0), a, rtol=0, atol=0)
    lv.c.mul_(2.0)  # in place: the cached table must not be reused
    b = M.train_step(X, U, dims, lv, 8, 0, 0)
    torch.testing.assert_close(b, M.train_step(X, U, dims, fresh(lv), 8, 0, 0), rtol=0, atol=0)
    assert not torch.equal(a[0], b[0])
    lv2 = lv._replace(phi=lv.phi * 3)  # a new tensor in one field
    c = M.train_step(X, U, dims, lv2, 8, 0, 0)
    torch.testing.assert_close(c, M.train_step(X, U, dims, fresh(lv2), 8, 0, 0), rtol=0, atol=0)
    d32 = M.train_step(X.float(), U.float(), dims, lv2, 8, 0, 0)  # another dtype
    assert d32[0].dtype == torch.float32
    torch.testing.assert_close(d32[0].double(), c[0], rtol=1e-5, atol=0)


def test_soft_step_with_unequal_dims_warns_without_a_bias():
    """make_levels(schedule) without dims has no logit bias; with unequal dims in soft mode the
    step's denoiser is then not the posterior mean (dims [1, 6] at the true bases: loss 2.816
    against 2.763 with the bias), and train_step said nothing. Equal dims, hard mode, or a table
    with the bias stay quiet."""
    dims = [1, 3]
    X, U = _problem(2, 20, 8, dims, torch.float64, seed=1)
    plain = M.make_levels(TinySchedule(), L=4)
    with pytest.warns(UserWarning, match=r"train_step: soft mode with unequal dims \[1, 3\], but "
                                         r"levels has no logit bias"):
        M.train_step(X, U, dims, plain, 8, seed=0, step=0, mode="soft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.train_step(X, U, dims, M.make_levels(TinySchedule(), L=4, dims=dims), 8, 0, 0, "soft")
        M.train_step(X, U, dims, plain, 8, seed=0, step=0, mode="hard")
        X2, U2 = _problem(2, 20, 8, [3, 3], torch.float64, seed=1)
        M.train_step(X2, U2, [3, 3], plain, 8, seed=0, step=0, mode="soft")


def test_cpu_ops_run_under_deterministic_algorithms(deterministic_algorithms):
    """torch.use_deterministic_algorithms(True): the CPU ops are deterministic (only the CUDA
    train_step alerts, tested in test_cuda.py), so they run and repeat bit for bit."""
    dims = [3, 2]
    X, U = _problem(4, 30, 12, dims, torch.float32, seed=3)
    levels = M.make_levels(TinySchedule(), L=8, dims=dims)
    deterministic_algorithms(True)
    runs = []
    for _ in range(2):
        loss, grad = M.train_step(X, U, dims, levels, 300, seed=9, step=4, mode="soft")
        x = X[:, :7].clone().requires_grad_(True)
        Ug = U.clone().requires_grad_(True)
        y = M.subspace_dae(x, Ug, 0.8, 2.0, dims=dims)
        y.square().sum().backward()
        od = M.optimal_denoiser(X[0, :5], X[0], 0.3)
        runs.append((loss, grad, y.detach(), x.grad, Ug.grad, od))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
