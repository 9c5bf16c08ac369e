"""The fast CPU denoiser kernels against the reference.

Covers the paths the fast kernels add (sample-blocked register tiles for small bases, batched
GEMMs for bases beyond 64 KiB): sample counts that are not multiples of the block (64), of the
tile rows or of the SIMD width, n = 1 and n not a multiple of the width (tail vectors), panels
wider than one tile (several column chunks, with a remainder chunk), component panels of one,
two and three vectors, K = 1, heterogeneous dims with padded columns, float64 (gradcheck), P
large enough for the per-instance gradient path and P = 1 for the per-thread accumulators, and
the sharp soft-max (phi = 1e8) where some weights are exactly zero; hard mode on the GEMM path by
(instance, component) groups, including components no sample is assigned to.
"""
import pytest
import torch

import molrg_ext as M
from molrg_ext import reference as R


def _run(f, x, U, c, phi, bias, dims, mode, g):
    x = x.detach().clone().requires_grad_()
    U = U.detach().clone().requires_grad_()
    y = f(x, U, c, phi, bias, dims, mode)
    (y * g).sum().backward()
    return y.detach(), x.grad, U.grad


CASES = [
    # (P, B, n, dims)
    (1, 1, 1, [1]),
    (1, 3, 1, [1, 1, 1]),
    (2, 1367, 13, [3, 1, 5]),  # B odd, n not a multiple of 8, padded columns
    (6, 257, 48, [6, 6]),  # P >= 2 threads: per-instance dU path
    (1, 4099, 9, [2]),  # K = 1, several parallel chunks
    (3, 0, 5, [2, 2]),  # empty batch
    (2, 301, 37, [9, 17, 4]),  # D = 51: column chunks 3 + 3 + 1 vectors, dW = 3 vectors
    (1, 130, 64, [8, 8, 8, 8]),  # D = 32, component panels of one vector
    (3, 65, 20, [16]),  # K = 1, dm = 16: two-vector component panel
    # soft lanes (float32), lane-major C and dP: Dp = 48 (three 16-column blocks per group) with a
    # partial last group; n = 80: expand chunks of 4 + 1 vectors (tiles of 6 rows, 16-row groups)
    (2, 77, 40, [16, 9, 12]),
    (1, 45, 80, [5, 7]),
    (2, 37, 700, [12, 20, 5]),  # large panel (> 64 KiB): batched-GEMM path, padded columns
    (2, 200, 700, [12, 20, 5]),  # B n dmax >= 2^21: hard mode by component groups
    (1, 0, 700, [20, 20, 20]),  # large panel, empty batch
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("P,B,n,dims", CASES)
def test_fast_kernels_match_reference(P, B, n, dims, mode, dtype):
    g = torch.Generator().manual_seed(P * 1000 + B + n)
    K, dm = len(dims), max(dims)
    x = torch.randn(P, B, n, generator=g, dtype=dtype)
    U = torch.randn(P, K, n, dm, generator=g, dtype=dtype) / max(1.0, n**0.5)
    c = torch.rand(P, B, generator=g, dtype=dtype) + 0.5
    phi = torch.rand(P, B, generator=g, dtype=dtype) * 3
    bias = torch.randn(P, B, K, generator=g, dtype=dtype) if mode == "soft" else None
    gy = torch.randn(P, B, n, generator=g, dtype=dtype)
    ours = _run(M.subspace_dae, x, U, c, phi, bias, dims, mode, gy)
    ref = _run(R.subspace_dae, x, U, c, phi, bias, dims, mode, gy)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tol)
    assert torch.equal(M.hard_assign(x, U, dims), R.hard_assign(x, U, dims))


def test_sharp_softmax_has_exact_zero_weights():
    # phi = 1e8: the weights are one-hot up to underflow; the skipped components must not matter
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 300, 12, generator=g, dtype=torch.float64)
    U = torch.randn(4, 3, 12, 4, generator=g, dtype=torch.float64) / 3
    phi = torch.full((4, 300), 1e8, dtype=torch.float64)
    gy = torch.randn_like(x)
    ours = _run(M.subspace_dae, x, U, 0.9, phi, None, [4, 2, 3], "soft", gy)
    ref = _run(R.subspace_dae, x, U, 0.9, phi, None, [4, 2, 3], "soft", gy)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=1e-12)
    # gradients carry 2 phi dlogit P_k with phi = 1e8: float64 rounding in dlogit (~1e-16) is
    # amplified to ~1e-8 relative in both implementations, so compare on the gradient scale
    for a, b in zip(ours[1:], ref[1:]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gradcheck_packed_path(mode):
    g = torch.Generator().manual_seed(1)
    P, B, n, dims = 4, 4, 6, [3, 1]
    x = torch.randn(P, B, n, generator=g, dtype=torch.float64, requires_grad=True)
    U = torch.randn(P, 2, n, 3, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.rand(P, B, generator=g, dtype=torch.float64).requires_grad_()
    phi = torch.rand(P, B, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, U, c, phi: M.subspace_dae(x, U, c, phi, None, dims, mode), (x, U, c, phi)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hard_groups_with_empty_components(dtype):
    """Large panel, hard mode, every sample of instance 0 forced to component 1 and of instance 1
    to components 0 and 2 only: the empty groups get zero gradient, the rest match the reference."""
    g = torch.Generator().manual_seed(7)
    P, B, n, dims = 2, 160, 800, [10, 20, 16]
    K, dm = len(dims), max(dims)
    x = torch.randn(P, B, n, generator=g, dtype=dtype)
    U = torch.randn(P, K, n, dm, generator=g, dtype=dtype) / n**0.5
    c = torch.rand(P, B, generator=g, dtype=dtype) + 0.5
    gy = torch.randn(P, B, n, generator=g, dtype=dtype)
    assign = torch.stack([torch.ones(B, dtype=torch.long), 2 * (torch.arange(B) % 2)])

    def run(f):
        xr, Ur, cr = (t.clone().requires_grad_() for t in (x, U, c))
        phi = torch.ones(P, B, dtype=dtype, requires_grad=True)
        y = f(xr, Ur, cr, phi, None, dims, "hard", assign)
        (y * gy).sum().backward()
        return y.detach(), xr.grad, Ur.grad, cr.grad, phi.grad

    ours, ref = run(M.subspace_dae), run(R.subspace_dae)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for a, b in zip(ours[:4], ref[:4]):
        torch.testing.assert_close(a, b, **tol)
    dU = ours[2]
    assert torch.count_nonzero(dU[0, [0, 2]]) == 0 and torch.count_nonzero(dU[1, 1]) == 0
    assert torch.count_nonzero(dU[0, 1, :, : dims[1]]) > 0
    # phi does not enter the hard mode: zero gradient here, none from the reference's graph
    assert torch.count_nonzero(ours[4]) == 0 and ref[4] is None


def test_opcheck_hard_groups():
    """opcheck (schema, fake kernel, autograd registration) on the grouped hard GEMM path."""
    g = torch.Generator().manual_seed(3)
    P, B, n, dims = 1, 160, 700, [12, 20, 5]
    x = torch.randn(P, B, n, generator=g, dtype=torch.float64, requires_grad=True)
    U = (torch.randn(P, 3, n, 20, generator=g, dtype=torch.float64) / n**0.5).requires_grad_()
    c = (torch.rand(P, B, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    phi = torch.ones(P, B, dtype=torch.float64)
    torch.library.opcheck(torch.ops.molrg.subspace_dae, (x, U, c, phi, None, None, dims, 1))
    with torch.no_grad():
        y, proj, w = torch.ops.molrg.subspace_dae(x, U, c, phi, None, None, dims, 1)
    torch.library.opcheck(torch.ops.molrg.subspace_dae_backward,
                          (torch.randn_like(y), x.detach(), U.detach(), c.detach(), phi, proj, w,
                           dims, 1, True, True))




@pytest.mark.parametrize("n", [48, 1000], ids=["blocked", "gemm"])
def test_subnormal_intermediates_flushed_to_zero(n):
    """CPU kernels run with FTZ/DAZ (csrc/cpu/flush_subnormals.h): x86 takes a microcode assist
    per instruction that touches a subnormal, and far components' soft-max weights make them.
    Component 0 is zero here and component 1 has the normal but tiny weight exp(-86) = 4.5e-38,
    so y = c w_1 U_1 P_1 is mostly subnormal in the reference (and in a build without the flags),
    and so are some of the gradients of c and of the logit bias. Ours: dc and dbias (per-sample
    loops on both paths) and y on the blocked path hold no subnormal (the GEMM path's y comes
    from MKL, which runs without the flags), all within a few times the smallest normal of the
    reference, and the caller's thread gets its floating-point mode back. n = 1000: n K d_max
    4 bytes = 80 KB, beyond the blocked kernels' 64 KiB."""
    tiny = torch.finfo(torch.float32).tiny
    subnormal = lambda t: (t != 0) & (t.abs() < tiny)  # noqa: E731
    g = torch.Generator().manual_seed(11)
    P, B, dims = 1, 300, [10, 10]
    x = torch.randn(P, B, n, generator=g)
    U = torch.randn(P, 2, n, 10, generator=g) / n**0.5
    U[:, 0] = 0
    phi = torch.zeros(P, B)  # logits = bias
    c = torch.full((P, B), 0.9, requires_grad=True)
    bias = torch.zeros(P, B, 2)
    bias[..., 1] = -86.0
    bias.requires_grad_()
    gy = torch.randn(P, B, n, generator=g)
    y_ref = R.subspace_dae(x, U, c, phi, bias, dims, "soft")
    y_ref.backward(gy)
    y_ref = y_ref.detach()
    y, proj, w = torch.ops.molrg.subspace_dae(x, U, c.detach(), phi, bias.detach(), None, dims, 0)
    _, _, dc, _, dbias = torch.ops.molrg.subspace_dae_backward(
        gy, x, U, c.detach(), phi, proj, w, dims, 0, False, False)
    for ref, frac in ((y_ref, 0.3), (c.grad, 0.02), (bias.grad[..., 1], 0.02)):
        assert subnormal(ref).float().mean() > frac
    for ours in ((y, w, dc, dbias) if n == 48 else (w, dc, dbias)):
        assert not subnormal(ours).any()
    torch.testing.assert_close(w[..., 1], torch.full((P, B), 4.4738e-38), rtol=1e-4, atol=0)
    # y_i = sum_j coef_j U_ij: every coefficient and every partial sum of the d_1 steps is
    # flushed when below the smallest normal, each moving y_i by < tiny (|U_ij| < 1)
    assert U.abs().max() < 1
    torch.testing.assert_close(y, y_ref, rtol=0, atol=(2 * dims[1] + 1) * tiny)
    torch.testing.assert_close(dc, c.grad, rtol=1e-4, atol=2 * tiny)
    torch.testing.assert_close(dbias, bias.grad, rtol=1e-4, atol=2 * tiny)
    # the caller's thread and the pool's workers (a tensor large enough to be split) still make
    # subnormals: every guard restored the mode it found
    assert subnormal(torch.tensor([1e-38]) * torch.tensor([0.01])).all()
    assert subnormal(torch.full((1 << 20,), 1e-38) * 0.01).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_large_outputs_written_by_streaming_stores(mode, dtype):
    """The blocked kernels write an output y or dx of at least 8 MiB (kStreamMinBytes, rows of
    whole 64-byte lines: n = 48) with non-temporal stores. Per sample the math is the same as for
    a small batch, written with plain stores: the outputs of the whole batch must equal those of
    its slices bit for bit, and match the reference. B is odd, so the last block is partial."""
    g = torch.Generator().manual_seed(5)
    P, B, n, dims = 1, 45001, 48, [6, 6]
    assert B * n * dtype.itemsize >= 8 << 20
    x = torch.randn(P, B, n, generator=g, dtype=dtype)
    U = torch.randn(P, 2, n, 6, generator=g, dtype=dtype) / n**0.5
    c = torch.rand(P, B, generator=g, dtype=dtype) + 0.5
    phi = torch.rand(P, B, generator=g, dtype=dtype) * 3
    gy = torch.randn(P, B, n, generator=g, dtype=dtype)
    y, dx, _ = _run(M.subspace_dae, x, U, c, phi, None, dims, mode, gy)
    for s in range(0, B, 4096):  # slices of at most 4096 x 48 x 8 bytes = 1.5 MiB
        sl = slice(s, s + 4096)
        ys, dxs, _ = _run(M.subspace_dae, x[:, sl], U, c[:, sl], phi[:, sl], None, dims, mode,
                          gy[:, sl])
        assert torch.equal(y[:, sl], ys)
        assert torch.equal(dx[:, sl], dxs)
    y_ref, dx_ref, _ = _run(R.subspace_dae, x, U, c, phi, None, dims, mode, gy)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
