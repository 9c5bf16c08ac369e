"""CUDA kernels of the molrg ops: CUDA vs CPU outputs and gradients, gradcheck, opcheck, errors.

The CUDA tests (marker ``cuda``) skip with a reason when there is no CUDA device or when the
extension was built without CUDA kernels. The ptxas-report parser used by scripts/check_cuda.sh
is tested on canned output and runs everywhere (no torch CUDA, no nvcc needed).
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

import molrg_ext.ops as ops
from molrg_ext import reference as ref
from molrg_ext._cuda_check import cuda_skip_reason

ROOT = pathlib.Path(__file__).resolve().parents[1]


_REASON = cuda_skip_reason("subspace_dae")
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def cuda_test(fn):
    for mark in needs_cuda:
        fn = mark(fn)
    return fn


# --------------------------------------------------------------------------- ptxas report parser
def _load_report():
    if not (ROOT / "scripts/ptxas_report.py").exists():
        pytest.skip("needs the source tree (scripts/ptxas_report.py)")
    spec = importlib.util.spec_from_file_location("ptxas_report", ROOT / "scripts/ptxas_report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


CANNED_OK = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 368 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barPd' for 'sm_90'
ptxas info    : Function properties for _Z3barPd
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 72 registers, used 0 barriers, 368 bytes cmem[0]
"""

CANNED_SPILL = """\
ptxas info    : Compiling entry function '_Z3bazPd' for 'sm_80'
ptxas info    : Function properties for _Z3bazPd
    8 bytes stack frame, 8 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 64 registers, 8 bytes cumulative stack size, 368 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    0 bytes stack frame, 0 bytes spill stores, 4 bytes spill loads
"""


def test_ptxas_parser_reads_registers_and_spills():
    rep = _load_report()
    infos = rep.parse_ptxas(CANNED_OK)
    assert [(i.name, i.arch, i.registers, i.stack, i.spill_stores, i.spill_loads) for i in infos] == [
        ("_Z3fooPf", "sm_90", 40, 0, 0, 0),
        ("_Z3barPd", "sm_90", 72, 16, 0, 0),
    ]
    assert not any(i.spills for i in infos)
    spill = rep.parse_ptxas(CANNED_SPILL)
    assert [(i.name, i.registers, i.spill_stores, i.spill_loads, i.spills) for i in spill] == [
        ("_Z3bazPd", 64, 8, 24, True),
        ("_Z6helperv", -1, 0, 4, True),  # device function: spill loads only
    ]


def test_ptxas_report_exit_status(tmp_path, capsys):
    rep = _load_report()
    ok = tmp_path / "a.sm_90.log"
    ok.write_text(CANNED_OK)
    bad = tmp_path / "b.sm_80.log"
    bad.write_text(CANNED_SPILL)
    empty = tmp_path / "c.sm_90.log"
    empty.write_text("nvcc fatal : something else\n")
    assert rep.main([str(ok)]) == 0
    out = capsys.readouterr()
    assert "no spills" in out.out and "a.sm_90" in out.out
    assert rep.main([str(ok), str(bad)]) == 1
    out = capsys.readouterr()
    assert "spills" in out.err and "b.sm_80" in out.err
    assert rep.main([str(empty)]) == 1  # no ptxas lines at all is a failure, not a pass


# ------------------------------------------------------------------------------ CUDA vs CPU ops
def _problem(P, B, n, dims, dmax, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    K = len(dims)
    Q = torch.linalg.qr(torch.randn(P, n, n, generator=g, dtype=torch.float64))[0]
    U = torch.zeros(P, K, n, dmax, dtype=torch.float64)
    col = 0
    for k, d in enumerate(dims):
        U[:, k, :, :d] = Q[:, :, col:col + d]
        U[:, k, :, d:] = torch.randn(P, n, dmax - d, generator=g, dtype=torch.float64)  # ignored
        col += d
    x = torch.randn(P, B, n, generator=g, dtype=torch.float64)
    c = 0.5 + torch.rand(P, B, generator=g, dtype=torch.float64)
    phi = 0.05 + 0.3 * torch.rand(P, B, generator=g, dtype=torch.float64)
    b = torch.randn(P, B, K, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(U), cast(c), cast(phi), cast(b)


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)


def _to(t, dev):
    """A copy of t on dev that is its own leaf: t.to("cpu") is t itself, and marking it to need
    gradients would make the next device's copy a non-leaf without .grad."""
    return None if t is None else t.detach().to(dev, copy=True)


@cuda_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_forward_and_grads_match_cpu(dtype, mode):
    dims = [3, 5, 2]
    x, U, c, phi, b = _problem(2, 37, 41, dims, 5, dtype, seed=1, bias=(mode == "soft"))
    outs = {}
    for dev in ("cpu", "cuda"):
        args = [_to(t, dev).requires_grad_() if t is not None else None for t in (x, U, c, phi, b)]
        y = ops.subspace_dae(*args[:4], bias=args[4], dims=dims, mode=mode)
        gy = torch.linspace(-1, 1, y.numel(), dtype=dtype, device=dev).reshape(y.shape)
        (y * gy).sum().backward()
        outs[dev] = [y.detach().cpu()] + [a.grad.cpu() for a in args if a is not None]
    for a, b_ in zip(outs["cpu"], outs["cuda"]):
        torch.testing.assert_close(b_, a, **_tol(dtype))
    # the reference agrees too (independent einsum composition)
    y_ref = ref.subspace_dae(x, U, c, phi, bias=b, dims=dims, mode=mode)
    torch.testing.assert_close(outs["cuda"][0], y_ref, **_tol(dtype))


@cuda_test
def test_hard_mode_with_assign_and_hard_assign_match_cpu():
    dims = [2, 4]
    x, U, c, phi, _ = _problem(3, 50, 16, dims, 4, torch.float64, seed=2, bias=False)
    a_cpu = ops.hard_assign(x, U, dims=dims)
    a_gpu = ops.hard_assign(x.cuda(), U.cuda(), dims=dims)
    assert a_gpu.dtype == torch.int64 and a_gpu.device.type == "cuda"
    torch.testing.assert_close(a_gpu.cpu(), a_cpu)
    torch.testing.assert_close(a_cpu, ref.hard_assign(x, U, dims=dims))
    forced = (a_cpu + 1) % 2  # the other component: assign must win over the argmax
    y_cpu = ops.subspace_dae(x, U, c, phi, dims=dims, mode="hard", assign=forced)
    y_gpu = ops.subspace_dae(x.cuda(), U.cuda(), c.cuda(), phi.cuda(), dims=dims, mode="hard",
                             assign=forced.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, **_tol(torch.float64))


@cuda_test
def test_large_phi_softmax_is_stable_on_cuda():
    dims = [3, 3]
    x, U, c, _, b = _problem(1, 16, 12, dims, 3, torch.float32, seed=3)
    phi = torch.full((1, 16), 1e8)
    y = ops.subspace_dae(x.cuda(), U.cuda(), c.cuda(), phi.cuda(), bias=b.cuda(), dims=dims)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.cpu(), ops.subspace_dae(x, U, c, phi, bias=b, dims=dims),
                               rtol=1e-4, atol=1e-5)


@cuda_test
def test_long_batch_dU_reduction_is_deterministic_and_matches_cpu():
    # B = 4096 with a small U makes the dU reduction split the batch into chunks.
    dims = [2, 3]
    x, U, c, phi, b = _problem(1, 4096, 8, dims, 3, torch.float64, seed=4)
    gy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    args = [x, U, c, phi]
    res = []
    for dev in ("cpu", "cuda", "cuda"):
        y, proj, w = torch.ops.molrg.subspace_dae(*[t.to(dev) for t in args], b.to(dev), None,
                                                  dims, 0)
        out = torch.ops.molrg.subspace_dae_backward(gy.to(dev), *[t.to(dev) for t in args],
                                                    proj, w, dims, 0, True, True)
        res.append([t.cpu() for t in out])
    for got, want in zip(res[1], res[0]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for first, second in zip(res[1], res[2]):
        assert torch.equal(first, second)  # no atomics: bitwise reproducible


@cuda_test
def test_empty_batch_on_cuda():
    x = torch.zeros(2, 0, 6, device="cuda")
    U = torch.randn(2, 2, 6, 3, device="cuda")
    c = torch.zeros(2, 0, device="cuda")
    y, proj, w = torch.ops.molrg.subspace_dae(x, U, c, c, None, None, [3, 2], 0)
    assert y.shape == (2, 0, 6) and proj.shape == (2, 0, 2, 3) and w.shape == (2, 0, 2)
    dU = torch.ops.molrg.subspace_dae_backward(x, x, U, c, c, proj, w, [3, 2], 0, True, True)[1]
    assert dU.shape == U.shape and torch.count_nonzero(dU) == 0


@cuda_test
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gradcheck_float64_on_cuda(mode):
    dims = [2, 3]
    x, U, c, phi, b = _problem(2, 5, 7, dims, 3, torch.float64, seed=6, bias=(mode == "soft"))
    args = [t.cuda().requires_grad_() for t in (x, U, c, phi)]
    bias = b.cuda().requires_grad_() if b is not None else None

    def f(x_, U_, c_, phi_, *rest):
        return ops.subspace_dae(x_, U_, c_, phi_, bias=rest[0] if rest else None, dims=dims,
                                mode=mode)

    inputs = tuple(args) + ((bias,) if bias is not None else ())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@cuda_test
def test_opcheck_on_cuda():
    dims = [2, 3]
    x, U, c, phi, b = _problem(2, 6, 7, dims, 3, torch.float64, seed=7)
    x, U, c, phi, b = (t.cuda() for t in (x, U, c, phi, b))
    torch.library.opcheck(torch.ops.molrg.subspace_dae.default,
                          (x.requires_grad_(), U.requires_grad_(), c, phi, b, None, dims, 0))
    torch.library.opcheck(torch.ops.molrg.hard_assign.default, (x.detach(), U.detach(), dims))
    y, proj, w = torch.ops.molrg.subspace_dae(x.detach(), U.detach(), c, phi, b, None, dims, 0)
    torch.library.opcheck(torch.ops.molrg.subspace_dae_backward.default,
                          (torch.ones_like(y), x.detach(), U.detach(), c, phi, proj, w, dims, 0,
                           True, True))


@cuda_test
def test_compile_fullgraph_on_cuda():
    dims = [2, 3]
    x, U, c, phi, b = (t.cuda() for t in _problem(1, 9, 7, dims, 3, torch.float32, seed=8))

    def f(x_, U_):
        return ops.subspace_dae(x_, U_, c, phi, bias=b, dims=dims).square().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cf(x, U), f(x, U))


@cuda_test
def test_cuda_errors_name_the_argument():
    dims = [2, 3]
    x, U, c, phi, _ = (t.cuda() if t is not None else None
                       for t in _problem(1, 4, 7, dims, 3, torch.float32, seed=9, bias=False))
    with pytest.raises(RuntimeError, match="U is on"):
        torch.ops.molrg.subspace_dae(x, U.cpu(), c, phi, None, None, dims, 0)
    with pytest.raises(RuntimeError, match="c contains NaN"):
        torch.ops.molrg.subspace_dae(x, U, c * math.nan, phi, None, None, dims, 0)
    with pytest.raises(RuntimeError, match="assign values"):
        torch.ops.molrg.subspace_dae(x, U, c, phi, None,
                                     torch.full((1, 4), 2, dtype=torch.long, device="cuda"),
                                     dims, 1)
    with pytest.raises(RuntimeError, match=r"dims\[1\]"):
        torch.ops.molrg.subspace_dae(x, U, c, phi, None, None, [2, 4], 0)
    with pytest.raises(RuntimeError, match="bias contains NaN"):
        torch.ops.molrg.subspace_dae(x, U, c, phi, torch.full((1, 4, 2), math.nan, device="cuda"),
                                     None, dims, 0)



def _levels(L, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = 0.5 + 0.5 * torch.rand(L, generator=g, dtype=torch.float64)
    gamma = 0.05 + torch.rand(L, generator=g, dtype=torch.float64)
    lam = 0.5 + torch.rand(L, generator=g, dtype=torch.float64)
    c = s / (s**2 + gamma**2)
    phi = s**2 / (2 * gamma**2 * (s**2 + gamma**2))
    table = torch.stack([s, gamma, lam, c, phi], 1).to(dtype)
    bias = torch.randn(L, K, generator=g, dtype=torch.float64).to(dtype)
    return table, bias


@cuda_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [0, 1])
def test_train_step_cuda_matches_cpu_same_seed(dtype, mode):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("molrg::train_step", "CUDA"):
        pytest.skip("no train_step CUDA kernel in this build")
    dims = [3, 2]
    X, U, _, _, _ = _problem(3, 40, 21, dims, 3, dtype, seed=10, bias=False)  # X: 40 samples
    table, bias = _levels(16, 2, dtype, seed=11)
    lb = bias if mode == 0 else None
    args = (dims, 64, 1234, 7, mode)
    loss_c, grad_c = torch.ops.molrg.train_step(X, U, table, lb, *args)
    loss_g, grad_g = torch.ops.molrg.train_step(X.cuda(), U.cuda(), table.cuda(),
                                                _to(lb, "cuda"), *args)
    # Same Philox integers and series log/sin/cos; normals differ only by FMA contraction.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(loss_g.cpu(), loss_c, **tol)
    torch.testing.assert_close(grad_g.cpu(), grad_c, **tol)
    # another step draws other numbers
    loss_other, _ = torch.ops.molrg.train_step(X.cuda(), U.cuda(), table.cuda(), _to(lb, "cuda"),
                                               dims, 64, 1234, 8, mode)
    assert not torch.allclose(loss_other, loss_g)


@cuda_test
def test_train_step_cuda_non_finite_training_sample_is_named():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("molrg::train_step", "CUDA"):
        pytest.skip("no train_step CUDA kernel in this build")
    dims = [3, 2]
    X, U, _, _, _ = _problem(2, 40, 21, dims, 3, torch.float32, seed=12, bias=False)
    table, _ = _levels(16, 2, torch.float32, seed=13)
    X[1, :, 3] = float("nan")  # every sample of instance 1 is non-finite
    with pytest.raises(RuntimeError, match="X contains NaN"):
        torch.ops.molrg.train_step(X.cuda(), U.cuda(), table.cuda(), None, dims, 64, 1, 1, 1)


@cuda_test
def test_train_step_cuda_alerts_under_deterministic_algorithms(deterministic_algorithms):
    """grad_U is summed with atomicAdd on CUDA: torch.use_deterministic_algorithms(True) makes
    the op raise (warn_only: warn), as torch's nondeterministic kernels do."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("molrg::train_step", "CUDA"):
        pytest.skip("no train_step CUDA kernel in this build")
    dims = [3, 2]
    X, U, _, _, _ = _problem(2, 40, 21, dims, 3, torch.float32, seed=14, bias=False)
    table, _ = _levels(16, 2, torch.float32, seed=15)
    args = (X.cuda(), U.cuda(), table.cuda(), None, dims, 64, 1, 1, 1)
    deterministic_algorithms(True)
    with pytest.raises(RuntimeError, match="molrg::train_step"):
        torch.ops.molrg.train_step(*args)
    deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="molrg::train_step"):
        loss, _ = torch.ops.molrg.train_step(*args)
    assert torch.isfinite(loss).all()


@cuda_test
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_jacobian_spectrum_cuda_matches_cpu(mode):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("molrg::dae_jacobian_spectrum", "CUDA"):
        pytest.skip("no dae_jacobian_spectrum CUDA kernel in this build")
    from molrg_ext.jacobian import dae_jacobian_spectrum

    dims = [3, 2, 4]
    x, U, c, phi, b = _problem(2, 9, 13, dims, 4, torch.float64, seed=12, bias=(mode == "soft"))
    sv_c, V_c = dae_jacobian_spectrum(x, U, c, phi, bias=b, dims=dims, mode=mode,
                                      return_vectors=True)
    sv_g, V_g = dae_jacobian_spectrum(x.cuda(), U.cuda(), c.cuda(), phi.cuda(),
                                      bias=_to(b, "cuda"), dims=dims, mode=mode,
                                      return_vectors=True)
    torch.testing.assert_close(sv_g.cpu(), sv_c, rtol=1e-9, atol=1e-10)
    assert _compare_singular_subspaces(sv_c, V_g.cpu(), V_c) > 0
    # and the singular values are those of the dense Jacobian from autograd (one sample)
    J = torch.autograd.functional.jacobian(
        lambda v: ops.subspace_dae(v[None, None], U[:1].cuda(), c[:1, :1].cuda(),
                                   phi[:1, :1].cuda(), bias=_to(b, "cuda")[:1, :1] if b is not None
                                   else None, dims=dims, mode=mode)[0, 0], x[0, 0].cuda())
    sv_dense = torch.linalg.svdvals(J.cpu())[: sv_c.shape[-1]]
    torch.testing.assert_close(sv_g[0, 0].cpu(), sv_dense, rtol=1e-8, atol=1e-9)
    # the device's vectors are right singular vectors of that J: J^T J v = s^2 v, every column
    Jc, v, s = J.cpu(), V_g[0, 0].cpu(), sv_g[0, 0].cpu()
    torch.testing.assert_close(Jc.mT @ (Jc @ v), v * s**2, rtol=0, atol=1e-9)


def _compare_singular_subspaces(sv, V, V_ref, tol=1e-6):
    """Asserts that V and V_ref span the same subspace for every group of equal nonzero singular
    values of every sample (sv [..., r], V [..., n, r]): the projectors V_G V_G^T agree. A
    repeated value (hard mode: c repeated d_k times) has no unique vectors, so columns are not
    compared one by one; zero values are skipped (their vectors are any basis of the null part).
    Returns the number of groups compared."""
    compared = 0
    flat_sv, flat_V, flat_R = sv.reshape(-1, sv.shape[-1]), V.flatten(0, -3), V_ref.flatten(0, -3)
    for s, A, R in zip(flat_sv, flat_V, flat_R):
        scale = max(float(s.abs().max()), 1e-300)
        edges = [0] + [i for i in range(1, len(s)) if abs(float(s[i] - s[i - 1])) > tol * scale]
        for a, b in zip(edges, edges[1:] + [len(s)]):
            if float(s[a]) <= tol * scale:
                continue
            PA, PR = A[:, a:b] @ A[:, a:b].mT, R[:, a:b] @ R[:, a:b].mT
            torch.testing.assert_close(PA, PR, rtol=0, atol=1e-7)
            compared += 1
    return compared


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_singular_subspace_comparison_can_fail(mode):
    """The vector check above, on CPU: a rotation inside a repeated group passes (hard mode has
    c repeated d_k times), a vector from another group does not, and groups are compared in
    both modes (the old column-by-column check compared none in hard mode)."""
    from molrg_ext.jacobian import dae_jacobian_spectrum

    dims = [3, 2, 4]
    x, U, c, phi, b = _problem(2, 9, 13, dims, 4, torch.float64, seed=12, bias=(mode == "soft"))
    sv, V = dae_jacobian_spectrum(x, U, c, phi, bias=b, dims=dims, mode=mode, return_vectors=True)
    assert _compare_singular_subspaces(sv, V, V) >= 2 * 9  # at least one group per sample
    if mode == "hard":  # rotate the first group (c repeated) of sample (0, 0): still right
        d = int((sv[0, 0] > sv[0, 0, 0] * (1 - 1e-9)).sum())
        Q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
        W = V.clone()
        W[0, 0, :, :d] = V[0, 0, :, :d] @ Q
        _compare_singular_subspaces(sv, W, V)
    W = V.clone()
    W[0, 0, :, 0] = V[0, 0, :, -1]  # a vector of another group
    with pytest.raises(AssertionError):
        _compare_singular_subspaces(sv, W, V)


@cuda_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sym_eig_cuda_matches_cpu(dtype):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("molrg::sym_eig", "CUDA"):
        pytest.skip("no sym_eig CUDA kernel in this build")
    g = torch.Generator().manual_seed(13)
    A = torch.randn(5, 3, 7, 7, generator=g, dtype=torch.float64).to(dtype)
    lam_c, V_c = torch.ops.molrg.sym_eig(A, True)
    lam_g, V_g = torch.ops.molrg.sym_eig(A.cuda(), True)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lam_g.cpu(), lam_c, **tol)
    torch.testing.assert_close(lam_g.cpu().double(),
                               torch.linalg.eigvalsh((A + A.mT).double() / 2), **tol)
    S = (A.cuda() + A.cuda().mT) / 2  # A V = V diag(lam) on the device
    torch.testing.assert_close(S @ V_g, V_g * lam_g[..., None, :], **tol)
    lam_only, empty = torch.ops.molrg.sym_eig(A.cuda(), False)
    assert empty.numel() == 0
    torch.testing.assert_close(lam_only, lam_g)


# ------------------------------------------------------------------ optimal denoiser (seed 003)
def _need_optimal_cuda():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("molrg::optimal_denoiser", "CUDA"):
        pytest.skip("no optimal_denoiser CUDA kernel in this build")


def _od_problem(B, N, n, sigma, dtype, seed):
    """Queries near the training points: x = s X_i + gamma eps, per-query s and gamma."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g, dtype=torch.float64)
    s = 0.6 + 0.5 * torch.rand(B, generator=g, dtype=torch.float64)
    gamma = s * sigma * (0.5 + torch.rand(B, generator=g, dtype=torch.float64))
    idx = torch.randint(0, N, (B,), generator=g)
    x = s[:, None] * X[idx] + gamma[:, None] * torch.randn(B, n, generator=g, dtype=torch.float64)
    v = torch.randn(B, n, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (x, X, s, gamma, v))


def _od_dense64(x, X, s, gamma):
    """Independent float64 reference on the CPU: dense logits, logsumexp, softmax @ X."""
    x, X, s, gamma = (t.detach().cpu().double() for t in (x, X, s, gamma))
    logits = -((x[:, None] - s[:, None, None] * X[None]) ** 2).sum(-1) / (2 * gamma[:, None] ** 2)
    return torch.softmax(logits, 1) @ X, torch.logsumexp(logits, 1)


# B = 37 is not a multiple of the 16-query tile; N = 1001 is not a multiple of the 32-point tile
# and gives several training-set splits (merged by log-sum-exp), N = 100 a single split; n = 70
# spans three 32-column chunks, n = 13 part of one.
@cuda_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [0.005, 0.1, 0.7, 5.0])
@pytest.mark.parametrize("N,n", [(1001, 13), (100, 70)])
def test_optimal_denoiser_cuda_matches_cpu(dtype, sigma, N, n, two_point_queries):
    _need_optimal_cuda()
    x, X, s, gamma, v = _od_problem(37, N, n, sigma, dtype, seed=21 + n)
    y_c, lse_c = torch.ops.molrg.optimal_denoiser(x, X, s, gamma, 64)
    args_g = tuple(t.cuda() for t in (x, X, s, gamma))
    y_g, lse_g = torch.ops.molrg.optimal_denoiser(*args_g, 64)
    assert y_g.is_cuda and y_g.dtype == dtype and lse_g.shape == (37,)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(y_g.cpu(), y_c, **tol)
    # The CPU assembles logits from cross terms (||x||^2 - 2 s <x, X_j> + s^2 ||X_j||^2): in
    # float32 it uses a float32 GEMM while its rounding bound stays below 2^-11 logit units, and in
    # float64 the cancellation at sigma = 0.005 costs up to ~5e-9 (measured: 1.6e-4 and 4.4e-9
    # against the dense reference). The GPU squares the differences in double, so its lse is
    # compared with the CPU's at those widths and with the dense float64 reference at the
    # rounding of the output type.
    lse_tol = dict(rtol=1e-6, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-11, atol=5e-8)
    torch.testing.assert_close(lse_g.cpu(), lse_c, **lse_tol)
    y_ref, lse_ref = _od_dense64(x, X, s, gamma)
    ref_tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11,
                                                                               atol=1e-11)
    torch.testing.assert_close(y_g.cpu().double(), y_ref, **ref_tol)
    lse_ref_tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12,
                                                                                   atol=1e-12)
    torch.testing.assert_close(lse_g.cpu().double(), lse_ref, **lse_ref_tol)
    # The gradient on these queries and on queries between two training points (where it is
    # large at every sigma), against the float64 reference row by row; the CPU's too.
    x, s, gamma, v = _od_with_mixed_queries(two_point_queries, x, X, s, gamma, v, sigma, seed=22 + n)
    args_g = tuple(t.cuda() for t in (x, X, s, gamma))
    y_g, lse_g = torch.ops.molrg.optimal_denoiser(*args_g, 64)
    dx_g = torch.ops.molrg.optimal_denoiser_backward(v.cuda(), *args_g, y_g, lse_g)
    _assert_od_grad_close(dx_g.cpu(), v, x, X, s, gamma)
    y_c, lse_c = torch.ops.molrg.optimal_denoiser(x, X, s, gamma, 64)
    dx_c = torch.ops.molrg.optimal_denoiser_backward(v, x, X, s, gamma, y_c, lse_c)
    _assert_od_grad_close(dx_c, v, x, X, s, gamma)


def _od_with_mixed_queries(queries, x, X, s, gamma, v, sigma, seed, B=16):
    """The problem with B queries appended between two training points (conftest's
    two_point_queries), with scales s in [0.6, 1.1] and gamma = (0.5 .. 1.5) s sigma."""
    g = torch.Generator().manual_seed(seed)
    sm = 0.6 + 0.5 * torch.rand(B, generator=g, dtype=torch.float64)
    gm = sm * sigma * (0.5 + torch.rand(B, generator=g, dtype=torch.float64))
    xm = queries(X, sm, gm, g)
    vm = torch.randn(B, X.shape[1], generator=g, dtype=torch.float64)
    return tuple(torch.cat([u, w.to(u.dtype)]) for u, w in ((x, xm), (s, sm), (gamma, gm), (v, vm)))


def _od_grad64(v, x, X, s, gamma):
    """Dense float64 dx = (s / gamma^2) Cov_w(X) v and, per row, the bound
    b = (s / gamma^2) sum_j w_j ||X_j - E_w X||^2 ||v|| >= ||dx|| (trace of Cov times ||v||): how
    far dx moves when each weight w_j changes by a relative error e is about e b."""
    v, x, X, s, gamma = (t.detach().cpu().double() for t in (v, x, X, s, gamma))
    logits = -((x[:, None] - s[:, None, None] * X[None]) ** 2).sum(-1) / (2 * gamma[:, None] ** 2)
    w = torch.softmax(logits, 1)
    dev = X[None] - (w @ X)[:, None]
    k = s / gamma**2
    dx = k[:, None] * ((w * (dev @ v[:, :, None])[..., 0])[..., None] * dev).sum(1)
    return dx, k * (w * (dev**2).sum(-1)).sum(1) * v.norm(dim=1)


def _assert_od_grad_close(dx, v, x, X, s, gamma):
    """||dx - dx_ref|| <= f b + floor per row. f: the logits' relative rounding (float32: the
    CPU's GEMM logits stay within 2^-11 logit units; measured on the CPU: errors up to 1e-6 b in
    float32, 1e-10 b in float64). Rows with a near one-hot posterior have dx ~ 0 and b ~ 0, and
    are held to the floor; on the mixed rows ||dx_ref|| >= 2.7e-3 b (measured), so an all-zero
    gradient fails."""
    ref, bound = _od_grad64(v, x, X, s, gamma)
    f, floor = (1e-4, 1e-6) if dx.dtype == torch.float32 else (1e-9, 1e-18)
    err = (dx.double() - ref).norm(dim=1)
    bad = err > f * bound + floor
    assert not bad.any(), (f"rows {bad.nonzero().flatten().tolist()}: error "
                           f"{err[bad].tolist()} against allowed {(f * bound + floor)[bad].tolist()}")
    return ref, bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [0.005, 0.7])
def test_optimal_denoiser_cpu_gradient_within_the_device_test_bound(dtype, sigma,
                                                                     two_point_queries):
    """The per-row bound the CUDA comparison uses holds for the CPU kernel (runs everywhere), and
    is tight enough that a zero gradient fails it."""
    x, X, s, gamma, v = _od_problem(37, 100, 70, sigma, dtype, seed=91)
    x, s, gamma, v = _od_with_mixed_queries(two_point_queries, x, X, s, gamma, v, sigma, seed=92)
    y, lse = torch.ops.molrg.optimal_denoiser(x, X, s, gamma, 64)
    dx = torch.ops.molrg.optimal_denoiser_backward(v, x, X, s, gamma, y, lse)
    ref, bound = _assert_od_grad_close(dx, v, x, X, s, gamma)
    assert (ref.norm(dim=1)[-16:] > 1e-3 * bound[-16:]).all()  # the mixed rows are not ~ 0
    with pytest.raises(AssertionError):
        _assert_od_grad_close(torch.zeros_like(dx), v, x, X, s, gamma)


@cuda_test
def test_optimal_denoiser_cuda_gradient_is_posterior_covariance():
    """Tweedie on the device: dx = (s / gamma^2) Cov_w(X) v, from dense float64 weights."""
    _need_optimal_cuda()
    x, X, s, gamma, v = _od_problem(21, 300, 6, 0.5, torch.float64, seed=31)
    xg = x.cuda().requires_grad_()
    y = torch.ops.molrg.optimal_denoiser(xg, X.cuda(), s.cuda(), gamma.cuda(), 64)[0]
    (dx,) = torch.autograd.grad(y, xg, v.cuda())
    logits = -((x[:, None] - s[:, None, None] * X[None]) ** 2).sum(-1) / (2 * gamma[:, None] ** 2)
    w = torch.softmax(logits, 1)
    mean = w @ X
    cov = torch.einsum("bj,bjk,bjl->bkl", w, X[None] - mean[:, None], X[None] - mean[:, None])
    expect = (s / gamma**2)[:, None] * torch.einsum("bkl,bl->bk", cov, v)
    torch.testing.assert_close(dx.cpu(), expect, rtol=1e-10, atol=1e-10)


@cuda_test
def test_optimal_denoiser_gradcheck_float64_on_cuda():
    _need_optimal_cuda()
    x, X, s, gamma, _ = _od_problem(19, 70, 5, 0.8, torch.float64, seed=32)
    X, s, gamma = X.cuda(), s.cuda(), gamma.cuda()
    xg = x.cuda().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: torch.ops.molrg.optimal_denoiser(z, X, s, gamma, 16)[0], (xg,))


@cuda_test
def test_optimal_denoiser_opcheck_on_cuda():
    _need_optimal_cuda()
    for dtype in (torch.float32, torch.float64):
        x, X, s, gamma, v = (t.cuda() for t in _od_problem(6, 45, 5, 0.6, dtype, seed=33))
        torch.library.opcheck(torch.ops.molrg.optimal_denoiser.default,
                              (x.requires_grad_(), X, s, gamma, 8))
        y, lse = torch.ops.molrg.optimal_denoiser(x.detach(), X, s, gamma, 8)
        torch.library.opcheck(torch.ops.molrg.optimal_denoiser_backward.default,
                              (v, x.detach(), X, s, gamma, y, lse))


@cuda_test
def test_optimal_denoiser_cuda_empty_batch():
    _need_optimal_cuda()
    X = torch.randn(10, 3, device="cuda")
    e = torch.empty(0, device="cuda")
    y, lse = torch.ops.molrg.optimal_denoiser(torch.empty(0, 3, device="cuda"), X, e, e, 8)
    assert y.shape == (0, 3) and lse.shape == (0,)


@cuda_test
def test_optimal_denoiser_cuda_errors_name_the_argument():
    _need_optimal_cuda()
    x, X, s, gamma, v = (t.cuda() for t in _od_problem(5, 40, 4, 0.7, torch.float64, seed=34))
    op, bw = torch.ops.molrg.optimal_denoiser, torch.ops.molrg.optimal_denoiser_backward
    with pytest.raises(RuntimeError, match="X_train is on cpu but x_t is on cuda"):
        op(x, X.cpu(), s, gamma, 8)
    with pytest.raises(RuntimeError, match="x_t must be a CUDA tensor"):
        op(x.cpu(), X, s, gamma, 8)
    with pytest.raises(RuntimeError, match="X_train contains NaN"):
        op(x, X * math.nan, s, gamma, 8)
    with pytest.raises(RuntimeError, match=r"gamma = s \* sigma must be finite and > 0"):
        op(x, X, s, -gamma, 8)
    with pytest.raises(RuntimeError, match="X_train has n = 5"):
        op(x, torch.randn(40, 5, dtype=x.dtype, device="cuda"), s, gamma, 8)
    y, lse = op(x, X, s, gamma, 8)
    with pytest.raises(RuntimeError, match="lse is inconsistent"):
        bw(v, x, X, s, gamma, y, lse + 1e4)  # every weight underflows (finish kernel)
    with pytest.raises(RuntimeError, match="lse is inconsistent"):
        bw(v, x, X, s, gamma, y, lse - 3.0)  # a logit above lse (main kernel)
    with pytest.raises(RuntimeError, match="grad_y is on"):
        bw(v.cpu(), x, X, s, gamma, y, lse)
