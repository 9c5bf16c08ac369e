"""Data far from unit scale: hard_assign and optimal_denoiser rescale it by an exact power of two.

In float32, squared norms of values above ~1e19 overflow and products of values below ~1e-19 are
flushed to zero (the CPU kernels run with FTZ/DAZ); before the rescaling hard_assign put every
sample of data at 1e-20 in cluster 0 and optimal_denoiser's output at 1e19 was 86% off, both
without an error. Both ops are scale-equivariant, so data far from unit scale is scaled by a
power of two (csrc/checks.h: range_shift, od_shift_keeps_range, assign_shifts) and the results
are the numbers of a call at a safe scale. The shift never moves queries or small rows out of
range.
"""
from __future__ import annotations

import pytest
import torch

import molrg_ext
from molrg_ext._cuda_check import cuda_skip_reason
from molrg_ext.hidden_gaussian import optimal_denoiser

def _devices(op: str) -> list:
    reason = cuda_skip_reason(op)
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        reason is not None, reason=reason or "")])]


ASSIGN_DEVICES, OPTIMAL_DEVICES = _devices("hard_assign"), _devices("optimal_denoiser")
SCALES = [1e-30, 1e-20, 1e-19, 2.0**-17, 2.0**17, 1e19, 1e20, 1e30]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def subspace_data(n=12, K=3, d=2, B=200, noise=0.05, seed=0):
    g = gen(seed)
    U = torch.linalg.qr(torch.randn(K, n, d, generator=g, dtype=torch.float64))[0]
    lab = torch.randint(0, K, (B,), generator=g)
    a = torch.randn(B, d, 1, generator=g, dtype=torch.float64)
    x = (U[lab] @ a).squeeze(-1) + noise * torch.randn(B, n, generator=g, dtype=torch.float64)
    return x, U


@pytest.mark.parametrize("device", ASSIGN_DEVICES)
@pytest.mark.parametrize("scale", SCALES)
def test_hard_assign_float32_far_from_unit_scale(device, scale):
    x, U = subspace_data()
    want = molrg_ext.hard_assign(x, U)
    xs = (x * scale).float().to(device)
    got = molrg_ext.hard_assign(xs, U.float().to(device))
    assert torch.equal(got.cpu(), want)
    # U far from unit scale too (it need not be orthonormal), in the opposite direction
    got = molrg_ext.hard_assign(xs, (U / scale).float().to(device))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", ASSIGN_DEVICES)
def test_hard_assign_gemm_path_far_from_unit_scale(device):
    """n K dmax large enough for the CPU op's batched-GEMM path (64 KiB of float32 U)."""
    x, U = subspace_data(n=256, K=4, d=20, B=64, seed=3)
    want = molrg_ext.hard_assign(x, U)
    for scale in (1e-22, 1e21):
        got = molrg_ext.hard_assign((x * scale).float().to(device), U.float().to(device))
        assert torch.equal(got.cpu(), want)


def od_case(seed=1, n=16, N=40, B=64, sigma=1.0):
    g = gen(seed)
    X = torch.randn(N, n, generator=g, dtype=torch.float64)
    idx = torch.randint(0, N, (B,), generator=g)
    x = X[idx] + sigma * torch.randn(B, n, generator=g, dtype=torch.float64)
    v = torch.randn(B, n, generator=g, dtype=torch.float64)
    return x, X, v


def od_value_and_grad(x, X, sigma, v):
    x = x.detach().requires_grad_(True)
    y = optimal_denoiser(x, X, sigma)
    (y * v).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("device", OPTIMAL_DEVICES)
@pytest.mark.parametrize("scale", SCALES)
def test_optimal_denoiser_float32_far_from_unit_scale(device, scale):
    """D(c x; c X, c sigma) = c D(x; X, sigma), and the vector-Jacobian product does not change
    with c: float32 at every scale against float64 at unit scale."""
    x, X, v = od_case()
    y64, g64 = od_value_and_grad(x, X, 1.0, v)
    y, g = od_value_and_grad((x * scale).float().to(device), (X * scale).float().to(device),
                             scale, v.float().to(device))
    err_y = ((y.cpu().double() / scale - y64).norm() / y64.norm()).item()
    err_g = ((g.cpu().double() - g64).norm() / g64.norm()).item()
    assert err_y < 2e-6, err_y  # 1.5e-7 to 2e-7 measured; before the rescaling 0.86 at 1e19
    assert err_g < 5e-6, err_g  # 4.5e-7 to 7.7e-7 measured; before, inf at 1e19


def test_optimal_denoiser_rescaled_call_is_bit_identical():
    """A shifted call computes the numbers of the unshifted call at unit scale: y and dx of data
    at 2^40 equal 2^40 y and dx at unit scale bit for bit (the float32/double choice of the
    cross terms is scale-free, and scaling by a power of two is exact)."""
    x, X, v = od_case(seed=2, sigma=0.4)
    x, X, v = x.float(), X.float(), v.float()
    c = 2.0**40
    for sigma in (0.05, 0.4, 3.0):
        y1, g1 = od_value_and_grad(x, X, sigma, v)
        yc, gc = od_value_and_grad(x * c, X * c, sigma * c, v)
        assert torch.equal(yc, y1 * c)
        assert torch.equal(gc, g1)
        lse1 = torch.ops.molrg.optimal_denoiser(
            x, X, torch.ones(len(x)), torch.full((len(x),), sigma), 512)[1]
        lsec = torch.ops.molrg.optimal_denoiser(
            x * c, X * c, torch.ones(len(x)), torch.full((len(x),), sigma * c), 512)[1]
        assert torch.equal(lse1, lsec)


def test_optimal_denoiser_float64_huge_data():
    """float64 data at 1e200: s^2 ||X_j||^2 overflowed double and the op refused it ("not
    finite"); rescaled, it is the unit-scale result times 1e200."""
    x, X, _ = od_case(seed=4, sigma=0.5)
    want = optimal_denoiser(x, X, 0.5)
    got = optimal_denoiser(x * 1e200, X * 1e200, 0.5e200)
    torch.testing.assert_close(got / 1e200, want, rtol=1e-12, atol=0)


def test_rescaled_paths_pass_opcheck():
    """The rescaled calls return tensors like the unscaled ones (fake kernels, schema, autograd)."""
    x, U = subspace_data(B=16)
    torch.library.opcheck(torch.ops.molrg.hard_assign.default,
                          ((x * 1e21).float()[None], U.float().contiguous()[None], [2, 2, 2]))
    x, X, _ = od_case(seed=5, B=8, N=12)
    B = len(x)
    xs, Xs = (x * 1e20).float(), (X * 1e20).float()
    s, gamma = torch.ones(B), torch.full((B,), 1e20)
    op = torch.ops.molrg.optimal_denoiser
    torch.library.opcheck(op.default, (xs.requires_grad_(True), Xs, s, gamma, 512))
    y, lse = op(xs.detach(), Xs, s, gamma, 512)
    torch.library.opcheck(torch.ops.molrg.optimal_denoiser_backward.default,
                          (torch.randn_like(y), xs.detach(), Xs, s, gamma, y, lse))


@pytest.mark.parametrize("device", ASSIGN_DEVICES)
def test_hard_assign_rows_far_below_the_largest(device):
    """Rows of very different scale in one call (and instances of very different scale): the
    shift puts the largest |x| |U| near the top of the safe band, not at 1, so a sample of 1e-16
    beside one of 7e4 keeps its label (scaled into [0.5, 1) it got label 0)."""
    U = torch.zeros(2, 4, 1, dtype=torch.float64)
    U[0, 0, 0] = U[1, 1, 0] = 1.0
    x = torch.tensor([[7e4, 0, 0, 0], [0, 1e-16, 0, 0], [0, 2e-16, 1e-17, 0]],
                     dtype=torch.float64)
    want = torch.tensor([0, 1, 1])
    got = molrg_ext.hard_assign(x.float().to(device), U.float().to(device))
    assert torch.equal(got.cpu(), want)
    xs = torch.stack([x[[0, 0, 0]], x[[1, 2, 1]]])  # instance 1 far below instance 0
    got = molrg_ext.hard_assign(xs.float().to(device), U.float().to(device))
    assert torch.equal(got.cpu(), torch.tensor([[0, 0, 0], [1, 1, 1]]))
    for scale in (1e25, 1e-25):  # the whole call far from unit scale
        got = molrg_ext.hard_assign((x * scale).float().to(device), U.float().to(device))
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", OPTIMAL_DEVICES)
@pytest.mark.parametrize("dtype, Xscale, noise, sigma", [
    (torch.float32, 1e-30, 1e9, 1e9), (torch.float32, 1e-30, 1e9, 1e12),
    (torch.float64, 1e-300, 1e9, 1e9), (torch.float32, 1e25, 1e-5, 3e24)])
def test_optimal_denoiser_queries_far_from_the_data_scale(device, dtype, Xscale, noise, sigma):
    """Queries or noise at a scale far from the training data's: shifting x_t and gamma by X's
    scale would overflow them ("x_t contains NaN or Inf" on finite input); such calls run
    unshifted, as before, or with a shift that keeps them in range."""
    g = gen(7)
    X = torch.randn(50, 8, generator=g, dtype=torch.float64) * Xscale
    x = X[:4] + noise * torch.randn(4, 8, generator=g, dtype=torch.float64)
    v = torch.randn(4, 8, generator=g, dtype=torch.float64)
    y64, g64 = od_value_and_grad(x, X, sigma, v)
    y, gr = od_value_and_grad(x.to(dtype).to(device), X.to(dtype).to(device), sigma,
                              v.to(dtype).to(device))
    tol = 1e-5 if dtype == torch.float32 else 1e-12

    def rel(a, b):  # max-abs form: a norm of values ~1e-301 underflows
        return ((a.cpu().double() - b).abs().max() / b.abs().max()).item()

    assert rel(y, y64) < tol
    if g64.abs().max() > torch.finfo(dtype).tiny * 1e6:  # else its true value underflows dtype
        assert rel(gr, g64) < tol
    else:
        assert gr.abs().max() <= torch.finfo(dtype).tiny * 1e6
