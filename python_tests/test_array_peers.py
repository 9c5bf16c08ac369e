"""The benchmarks' array-library peers (molrg_ext.array_peers), run with NumPy: their hand-written
gradients and spectra must be the fused ops' numbers, so that the CuPy rows time the same math."""
import numpy as np
import pytest
import torch

import molrg_ext
from molrg_ext import array_peers as ap
from molrg_ext.bench import _levels


def _problem(P=2, B=40, n=10, K=3, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, B, n, generator=g, dtype=torch.float64)
    U = torch.randn(P, K, n, d, generator=g, dtype=torch.float64) / n ** 0.5
    c = 0.5 + torch.rand(P, B, generator=g, dtype=torch.float64)
    phi = 0.5 + 3 * torch.rand(P, B, generator=g, dtype=torch.float64)
    gy = torch.randn(P, B, n, generator=g, dtype=torch.float64)
    return x, U, c, phi, gy


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_dae_forward_and_grad_match_the_op(mode):
    x, U, c, phi, gy = _problem()
    dims = [U.shape[-1]] * U.shape[1]
    Ur = U.clone().requires_grad_()
    y = molrg_ext.subspace_dae(x, Ur, c, phi, None, dims, mode)
    (dU,) = torch.autograd.grad(y, Ur, gy)
    xn, Un, cn, pn, gn = (t.numpy() for t in (x, U, c, phi, gy))
    proj, w, yn = ap.dae_forward(np, xn, Un, cn, pn, mode)
    np.testing.assert_allclose(yn, y.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ap.dae_grad_U(np, xn, Un, cn, pn, proj, w, gn, mode), dU.numpy(),
                               rtol=1e-9, atol=1e-11)
    if mode == "hard":
        assert set(np.unique(w)) == {0.0, 1.0}


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_train_step_matches_the_fused_op_on_its_draws(mode):
    # the fused op's own random numbers (philox_draws) fed to the composition: same loss, same
    # gradient, so the composition is the op's math and not just something of the same shape
    P, N, n, K, d, M, seed, step = 3, 50, 10, 2, 3, 64, 7, 5
    g = torch.Generator().manual_seed(1)
    X = torch.randn(P, N, n, generator=g, dtype=torch.float64)
    U = torch.randn(P, K, n, d, generator=g, dtype=torch.float64) / n ** 0.5
    lv = _levels()
    loss, grad = molrg_ext.train_step(X, U, [d] * K, lv, M, seed, step, mode)
    idx, lev, eps = molrg_ext.philox_draws(seed, step, P, M, N, lv.L, n, torch.float64)
    ln, gn = ap.train_step_arrays(np, X.numpy(), U.numpy(), lv.table(torch.float64).numpy(),
                                  idx.numpy(), lev.numpy(), eps.numpy(), mode)
    np.testing.assert_allclose(ln, loss.numpy(), rtol=1e-10)
    np.testing.assert_allclose(gn, grad.numpy(), rtol=1e-9, atol=1e-12)
    assert np.abs(gn).max() > 0


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_jacobian_spectrum_matches_the_fused_op(mode):
    x, U, c, phi, _ = _problem(P=1, B=12, n=9, K=2, d=3)
    x, U, c, phi = x[0], U[0], c[0], phi[0]
    ours = molrg_ext.dae_jacobian_spectrum(x, U, c, phi, dims=[3, 3], mode=mode)
    sv = ap.jacobian_spectrum(np, x.numpy(), U.numpy(), c.numpy(), phi.numpy(), mode)
    assert sv.shape == (12, 9) and ours.shape == (12, 6)
    np.testing.assert_allclose(sv[:, :6], ours.numpy(), rtol=1e-9, atol=1e-12)
    assert np.abs(sv[:, 6:]).max() < 1e-12
    if mode == "soft":  # the weights' term matters: without it the spectrum differs
        proj, w, _ = ap.dae_forward(np, x.numpy()[None], U.numpy()[None], c.numpy()[None],
                                    phi.numpy()[None], mode)
        J0 = c.numpy()[:, None, None] * np.einsum("bk,knd,kmd->bnm", w[0], U.numpy(), U.numpy())
        assert np.abs(np.linalg.svd(J0, compute_uv=False)[:, :6] - ours.numpy()).max() > 1e-3


def test_unknown_mode_is_named():
    x, U, c, phi, _ = _problem()
    with pytest.raises(ValueError, match="mode"):
        ap.dae_forward(np, x.numpy(), U.numpy(), c.numpy(), phi.numpy(), "medium")


def test_cupy_cases_are_none_without_cupy_and_a_gpu():
    from molrg_ext import bench
    if bench._cupy() is not None:
        pytest.skip("cupy and a CUDA device are present")
    assert bench.make_dae_case("cupy", 8, 2, 2, 16) is None
    assert bench.make_train_case("cupy", 8, 2, 2, 16, 2, N=32) is None
    assert bench.make_jacobian_case("cupy", 8, 2, 2, 5) is None


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_cupy_cases_agree_with_the_fused_ops(mode):
    from molrg_ext import bench
    cp = bench._cupy()
    if cp is None:
        pytest.skip("needs cupy and a CUDA device")
    n, K, d, B = 10, 2, 3, 12
    dU = torch.as_tensor(bench.make_dae_case("cupy", n, K, d, B, mode=mode)()).cpu()
    x, U, c, phi, gy = bench._problem(n, K, d, B)
    Ur = U.clone().requires_grad_()
    (ref,) = torch.autograd.grad(molrg_ext.subspace_dae(x, Ur, c, phi, None, [d] * K, mode), Ur,
                                 gy)
    torch.testing.assert_close(dU, ref, rtol=1e-4, atol=1e-5)
    sv = torch.as_tensor(bench.make_jacobian_case("cupy", n, K, d, B, mode=mode)()).cpu()
    ours = bench.make_jacobian_case("ours", n, K, d, B, mode=mode)()
    torch.testing.assert_close(sv[:, : K * d], ours, rtol=1e-4, atol=1e-5)
    step = bench.make_train_case("cupy", n, K, d, 16, 2, mode=mode, N=32)
    g1, g2 = (torch.as_tensor(step()).cpu() for _ in range(2))
    assert torch.isfinite(g1).all() and g1.abs().sum() > 0 and not torch.equal(g1, g2)
