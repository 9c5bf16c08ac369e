"""torch.func transforms, forward-mode AD, double backward and torch.compile corner cases.

The kernels have reverse-mode autograd only. Before these tests:
- torch.func.jvp / jacfwd and forward_ad dual tensors through subspace_dae and optimal_denoiser
  gave zero (or None) tangents with no error, and torch.func.grad / jacrev failed;
- double backward (create_graph=True, torch.autograd.functional.hessian) was silently zero, and
  train_step's loss.backward() left U.grad None, each after one generic UserWarning;
- SubspaceDAE with a tensor sigma did not compile with fullgraph=True, optimal_denoiser and
  train_step did not compile with dynamic=True and a float argument, and jacobian_rank failed on
  OptimalDenoiser and GaussianDenoiser (value checks under vmap).
Now the public wrappers run a pure-PyTorch composition of the same math under transforms, the raw
ops and the backward ops refuse what they cannot differentiate, and the checks skip values that
cannot be read.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import molrg_ext
from molrg_ext import reference
from molrg_ext.hidden_gaussian import GaussianDenoiser, OptimalDenoiser, optimal_denoiser

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def dae_case(seed=0, n=10, dims=(4, 2, 3), B=3):
    g = gen(seed)
    U = torch.linalg.qr(torch.randn(len(dims), n, max(dims), generator=g, dtype=F64))[0]
    x = torch.randn(B, n, generator=g, dtype=F64)
    v = torch.randn(B, n, generator=g, dtype=F64)
    bias = torch.randn(len(dims), generator=g, dtype=F64)
    return x, U.contiguous(), v, bias, list(dims)


def direct_optimal(x, X, sigma):
    d2 = ((x[:, None, :] - X[None]) ** 2).sum(-1)
    return torch.softmax(-d2 / (2 * sigma**2), dim=1) @ X


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_subspace_dae_under_torch_func(mode):
    x, U, v, bias, dims = dae_case()
    ours = lambda z: molrg_ext.subspace_dae(z, U, 0.8, 1.3, bias, dims, mode)  # noqa: E731
    ref = lambda z: reference.subspace_dae(z, U, 0.8, 1.3, bias, dims, mode)  # noqa: E731
    _, t = torch.func.jvp(ours, (x,), (v,))
    _, t_ref = torch.func.jvp(ref, (x,), (v,))
    assert t.abs().max() > 0.1  # was exactly 0
    torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(ours)(x), torch.func.jacrev(ref)(x))
    loss = lambda f: (lambda z: f(z).square().sum())  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss(ours))(x), torch.func.grad(loss(ref))(x))
    torch.testing.assert_close(torch.func.hessian(loss(ours))(x), torch.func.hessian(loss(ref))(x))
    torch.testing.assert_close(torch.func.vmap(ours)(x[:, None]), ref(x)[:, None])


def test_subspace_dae_forward_ad_on_U():
    x, U, _, _, dims = dae_case(seed=1)
    dU = torch.randn(U.shape, generator=gen(2), dtype=F64)
    with fwAD.dual_level():
        y = molrg_ext.subspace_dae(x, fwAD.make_dual(U, dU), 0.8, 1.3, None, dims)
        tangent = fwAD.unpack_dual(y).tangent
    _, want = torch.func.jvp(lambda V: reference.subspace_dae(x, V, 0.8, 1.3, None, dims),
                             (U,), (dU,))
    assert tangent is not None  # was None
    torch.testing.assert_close(tangent, want)


def test_subspace_dae_module_jacobian_under_jacrev():
    m = molrg_ext.SubspaceDAE(10, [4, 2, 3], dtype=F64)
    x = torch.randn(4, 10, generator=gen(3), dtype=F64)
    sigma = torch.full((4,), 0.3, dtype=F64)
    J = torch.func.vmap(torch.func.jacrev(lambda z, s: m(z[None], s[None])[0]))(x, sigma)
    c, phi, bias = molrg_ext.posterior_mean_coefficients(1.0, 0.3, m.dims)
    Jr = torch.stack([torch.autograd.functional.jacobian(
        lambda z: reference.subspace_dae(z[None], m.U.detach(), c, phi, bias, m.dims)[0], xi)
        for xi in x])
    torch.testing.assert_close(J, Jr)


def test_optimal_denoiser_under_torch_func():
    g = gen(4)
    X = torch.randn(50, 10, generator=g, dtype=F64)
    x = torch.randn(3, 10, generator=g, dtype=F64)
    v = torch.randn(3, 10, generator=g, dtype=F64)
    ours = lambda z: optimal_denoiser(z, X, 0.7)  # noqa: E731
    ref = lambda z: direct_optimal(z, X, 0.7)  # noqa: E731
    _, t = torch.func.jvp(ours, (x,), (v,))
    _, t_ref = torch.func.jvp(ref, (x,), (v,))
    assert t.abs().max() > 0.1  # was exactly 0
    torch.testing.assert_close(t, t_ref)
    loss = lambda f: (lambda z: f(z).square().sum())  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss(ours))(x), torch.func.grad(loss(ref))(x))
    torch.testing.assert_close(torch.func.vmap(ours)(x[:, None]), ref(x)[:, None])
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(ours(fwAD.make_dual(x, v))).tangent
    torch.testing.assert_close(tangent, t_ref)
    # float32 under a transform: logits in float64 as in the kernels
    _, t32 = torch.func.jvp(lambda z: optimal_denoiser(z, X.float(), 0.7), (x.float(),),
                            (v.float(),))
    torch.testing.assert_close(t32.double(), t_ref, rtol=1e-4, atol=1e-5)


def test_raw_ops_refuse_forward_mode_tangents():
    x, U, v, _, dims = dae_case(seed=5)
    B = len(x)
    cs, ph = torch.full((1, B), 0.8, dtype=F64), torch.full((1, B), 1.3, dtype=F64)
    X = torch.randn(20, 10, generator=gen(6), dtype=F64)
    one, gam = torch.ones(B, dtype=F64), torch.full((B,), 0.7, dtype=F64)
    lv = molrg_ext.make_levels(molrg_ext.schedules.get_schedule("edm"), 8)
    Xs = torch.randn(1, 30, 10, generator=gen(7), dtype=F64)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, v)
        with pytest.raises(NotImplementedError, match="subspace_dae: forward-mode AD"):
            torch.ops.molrg.subspace_dae(xd[None], U[None], cs, ph, None, None, dims, 0)
        with pytest.raises(NotImplementedError, match="optimal_denoiser: forward-mode AD"):
            torch.ops.molrg.optimal_denoiser(xd, X, one, gam, 512)
        with pytest.raises(NotImplementedError, match="forward AD with molrg::train_step"):
            torch.ops.molrg.train_step(fwAD.make_dual(Xs, torch.ones_like(Xs)), U[None],
                                       lv.table(), None, dims, 8, 1, 0, 1)


def test_double_backward_is_an_error_not_zero():
    x, U, _, _, dims = dae_case(seed=8)
    X = torch.randn(30, 10, generator=gen(9), dtype=F64)
    for f, op in [(lambda z: molrg_ext.subspace_dae(z, U, 0.8, 1.3, None, dims),
                   "subspace_dae_backward"),
                  (lambda z: optimal_denoiser(z, X, 0.7), "optimal_denoiser_backward")]:
        z = x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "autograd kernel was not registered" warning
            (gz,) = torch.autograd.grad(f(z).square().sum(), z, create_graph=True)
        with pytest.raises(RuntimeError, match=f"derivative for molrg::{op} is not implemented"):
            gz.square().sum().backward()
        with pytest.raises(RuntimeError, match=f"molrg::{op}"):
            torch.autograd.functional.hessian(lambda z: f(z).square().sum(), x)
        # first-order gradients with create_graph=False are unchanged
        z = x.clone().requires_grad_(True)
        f(z).square().sum().backward()
        assert z.grad is not None and z.grad.abs().max() > 0


def test_train_step_loss_backward_is_an_error():
    lv = molrg_ext.make_levels(molrg_ext.schedules.get_schedule("edm"), 16)
    X = torch.randn(2, 40, 8, generator=gen(10), dtype=F64)
    U = molrg_ext.random_orthonormal(8, 3, 2, 2, dtype=F64, generator=gen(11)).requires_grad_()
    loss, grad_U = molrg_ext.train_step(X, U, [3, 2], lv, 16, 5, 3)
    assert grad_U.abs().max() > 0
    with pytest.raises(RuntimeError, match="derivative for molrg::train_step is not implemented"):
        loss.sum().backward()  # U.grad silently stayed None


def test_train_step_refuses_expanded_U_with_lr():
    lv = molrg_ext.make_levels(molrg_ext.schedules.get_schedule("edm"), 16)
    X = torch.randn(2, 40, 8, generator=gen(12), dtype=F64)
    U = molrg_ext.random_orthonormal(8, 3, 1, 2, dtype=F64, generator=gen(13))  # [1, K, n, d]
    with pytest.raises(ValueError, match="train_step: lr updates U in place, but U is an "
                                         "expanded view"):
        molrg_ext.train_step(X, U.expand(2, -1, -1, -1), [3, 2], lv, 16, 5, 3, lr=0.1)
    molrg_ext.train_step(X, U.expand(2, -1, -1, -1), [3, 2], lv, 16, 5, 3)  # no lr: fine


def test_compile_fullgraph_subspace_dae_module_with_tensor_sigma():
    m = molrg_ext.SubspaceDAE(10, [4, 2, 3], dtype=F64)
    x = torch.randn(5, 10, generator=gen(14), dtype=F64)
    sigma = torch.tensor([0.3, 1e-3, 2.0, 0.7, 5.0], dtype=F64)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, sigma), m(x, sigma), rtol=1e-14, atol=0)
    # extreme levels (the branch-free form of posterior_mean_coefficients) agree as well
    fn = torch.compile(molrg_ext.posterior_mean_coefficients, fullgraph=True, backend="eager")
    s = torch.tensor([1.0, 1e200, 1e-200], dtype=F64)
    g = torch.tensor([0.5, 1e-200, 1.0], dtype=F64)
    for got, want in zip(fn(s, g), molrg_ext.posterior_mean_coefficients(s, g)):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def test_compile_dynamic_with_float_arguments():
    g = gen(15)
    X = torch.randn(40, 6, generator=g, dtype=F64)
    x = torch.randn(7, 6, generator=g, dtype=F64)
    fn = torch.compile(lambda a, s: optimal_denoiser(a, X, s), dynamic=True, fullgraph=True,
                       backend="eager")
    for rows, sigma in ((7, 0.5), (3, 0.9)):
        torch.testing.assert_close(fn(x[:rows], sigma), optimal_denoiser(x[:rows], X, sigma))
    lv = molrg_ext.make_levels(molrg_ext.schedules.get_schedule("edm"), 16)
    Xs = torch.randn(2, 40, 8, generator=g, dtype=F64)
    step = torch.compile(lambda X_, U_, lr: molrg_ext.train_step(X_, U_, [3, 2], lv, 8, 5, 4,
                                                                 lr=lr),
                         dynamic=True, fullgraph=True, backend="eager")
    U0 = molrg_ext.random_orthonormal(8, 3, 2, 2, dtype=F64, generator=g)
    for lr in (0.05, 0.01):
        U1, U2 = U0.clone(), U0.clone()
        step(Xs, U1, lr)
        molrg_ext.train_step(Xs, U2, [3, 2], lv, 8, 5, 4, lr=lr)
        torch.testing.assert_close(U1, U2, rtol=0, atol=0)


def test_jacobian_tools_on_optimal_and_gaussian_denoisers():
    """jacobian_spectrum (vmap of jacrev, and Lanczos) through the package's own denoisers: the
    optimal denoiser's Jacobian is (s / gamma^2) Cov_w(X) (Tweedie), the Gaussian one's the
    shrinkage matrix W(sigma)."""
    g = gen(16)
    X = torch.randn(30, 8, generator=g, dtype=F64)
    xq = X[:4] + 0.5 * torch.randn(4, 8, generator=g, dtype=F64)
    od = OptimalDenoiser(X)
    sigma = 0.5
    d2 = ((xq[:, None] - X[None]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * sigma**2), 1)
    mean = w @ X
    cov = torch.einsum("bj,bjn,bjm->bnm", w, X[None] - mean[:, None], X[None] - mean[:, None])
    want = torch.linalg.eigvalsh(cov / sigma**2).flip(-1)
    for method in ("jacrev", "lanczos"):
        sv = molrg_ext.jacobian_spectrum(od, xq, sigma, method=method, k=8).svals
        torch.testing.assert_close(sv, want, rtol=1e-8, atol=1e-10)
    gd = GaussianDenoiser.fit(X)
    sv = molrg_ext.jacobian_spectrum(gd, xq, sigma, method="jacrev").svals
    W, _ = gd.matrix(sigma)
    want = torch.linalg.svdvals(W).expand(4, -1)
    torch.testing.assert_close(sv, want)


def test_optimal_denoiser_empty_batch():
    X = torch.randn(10, 2, 3, dtype=F64)
    x = torch.zeros(0, 2, 3, dtype=F64, requires_grad=True)
    y = optimal_denoiser(x, X, 0.5)
    assert y.shape == (0, 2, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 2, 3)


def test_train_step_on_meta_tensors():
    """Shapes only (the fake kernel): the level table's value check is skipped on meta, where
    it failed with "Tensor.item() cannot be called on meta tensors"."""
    lv = molrg_ext.make_levels(molrg_ext.schedules.get_schedule("edm"), 16)
    X = torch.empty(2, 40, 8, device="meta")
    U = torch.empty(2, 2, 8, 3, device="meta")
    loss, grad_U = molrg_ext.train_step(X, U, [3, 2], lv, 16, 5, 3)
    assert loss.shape == (2,) and loss.device.type == "meta"
    assert grad_U.shape == U.shape and grad_U.device.type == "meta"
